"""Tiny-config Hugging Face and diffusers models, built from configs (no downloads), with example inputs.

Each entry builds a model with random weights and the keyword inputs of one
forward, and says how to read the tensor to compare from its output. The
configs are as small as the classes allow (2-4 blocks, widths of 16-64), so
that a CPU compile of each takes seconds: they exist to exercise the
structure of the real classes (their block lists, attention code, caches and
routing), not their numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

VOCAB = 128


@dataclass(frozen=True)
class ZooModel:
    """A model family: how to build one, what to feed it, and what to compare."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    output: Callable[[Any], torch.Tensor] = lambda out: out[0]
    layers_path: str | None = None  # the block list discovery should find


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return seeded


def _tokens(generator: torch.Generator, batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def tiny_decoder_config(**extra: Any) -> dict[str, Any]:
    """The tiny decoder shape every HF test uses (config keyword arguments); ``extra`` adds or overrides."""
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base.update(extra)
    return base


def _hf(config_cls: str, model_cls: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))

    return _seeded(build)


def causal_lm(name: str, config_cls: str, model_cls: str, layers_path: str = "model.layers", **config: Any) -> ZooModel:
    return ZooModel(
        name=name,
        build=_hf(config_cls, model_cls, **config),
        inputs=lambda g: {"input_ids": _tokens(g)},
        output=lambda out: out.logits,
        layers_path=layers_path,
    )


# Mixture-of-experts decoders: 8 experts per layer, more than the 4 layers, so that a
# "longest ModuleList" discovery would pick one layer's experts (where experts are a list).
# transformers 5 stores each layer's experts as 3-D parameters and routes with
# ``experts_implementation``: "grouped_mm" (default, no data-dependent control flow) or "eager"
# (a Python loop over the experts that received tokens: data-dependent, Dynamo breaks the graph).
MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", tiny_decoder_config(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        tiny_decoder_config(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
}


def moe(name: str, **overrides: Any) -> ZooModel:
    """A tiny HF mixture-of-experts decoder, with config overrides (e.g. ``experts_implementation``)."""
    config_cls, model_cls, config = MOE_CONFIGS[name]
    return causal_lm(name, config_cls, model_cls, **{**config, **overrides})


MIXTRAL = moe("mixtral")
QWEN2_MOE = moe("qwen2_moe")

DECODERS = [
    causal_lm("llama", "LlamaConfig", "LlamaForCausalLM", **tiny_decoder_config()),
    causal_lm("mistral", "MistralConfig", "MistralForCausalLM", **tiny_decoder_config()),
    causal_lm("qwen2", "Qwen2Config", "Qwen2ForCausalLM", **tiny_decoder_config()),
    causal_lm("qwen3", "Qwen3Config", "Qwen3ForCausalLM", **tiny_decoder_config(head_dim=16)),
    causal_lm("gemma2", "Gemma2Config", "Gemma2ForCausalLM", **tiny_decoder_config(head_dim=16)),
    causal_lm("phi3", "Phi3Config", "Phi3ForCausalLM", **tiny_decoder_config(pad_token_id=0)),
    causal_lm(
        "gpt_neox",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        layers_path="gpt_neox.layers",
        # GPT-NeoX has no grouped key/value heads.
        **{key: value for key, value in tiny_decoder_config().items() if key != "num_key_value_heads"},
    ),
    causal_lm(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        layers_path="transformer.h",
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=4,
        n_head=4,
        n_positions=64,
    ),
    MIXTRAL,
    QWEN2_MOE,
]

OTHERS = [
    ZooModel(
        name="t5",
        build=_hf(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        inputs=lambda g: {"input_ids": _tokens(g), "decoder_input_ids": _tokens(g, seq=4)},
        output=lambda out: out.logits,
        # Two layers per stack: each decoder block's own list of 3 sub-layers is the longest
        # ModuleList, so this checks that discovery picks a stack of blocks, not a block's parts.
        layers_path="decoder.block",
    ),
    ZooModel(
        name="bert",
        build=_hf(
            "BertConfig",
            "BertModel",
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        inputs=lambda g: {"input_ids": _tokens(g), "attention_mask": torch.ones(2, 6, dtype=torch.long)},
        output=lambda out: out.last_hidden_state,
        layers_path="encoder.layer",
    ),
    ZooModel(
        name="vit",
        build=_hf(
            "ViTConfig",
            "ViTModel",
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        inputs=lambda g: {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)},
        output=lambda out: out.last_hidden_state,
        layers_path="layers",
    ),
    ZooModel(
        name="whisper",
        build=_hf(
            "WhisperConfig",
            "WhisperForConditionalGeneration",
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=32,
            pad_token_id=0,
            decoder_start_token_id=1,
        ),
        inputs=lambda g: {
            "input_features": torch.randn(2, 8, 16, generator=g),
            "decoder_input_ids": _tokens(g, seq=4),
        },
        output=lambda out: out.logits,
        layers_path="model.decoder.layers",
    ),
    ZooModel(
        name="clip",
        build=_seeded(lambda: _clip()),
        inputs=lambda g: {
            "input_ids": _tokens(g),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g),
        },
        output=lambda out: out.logits_per_image,
        layers_path="vision_model.encoder.layers",
    ),
    ZooModel(
        name="flux",
        build=_seeded(lambda: _flux()),
        inputs=lambda g: {
            "hidden_states": torch.randn(1, 16, 4, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g),
            "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(6, 3),
            "return_dict": False,
        },
        layers_path="single_transformer_blocks",
    ),
    ZooModel(
        name="sd3",
        build=_seeded(lambda: _sd3()),
        inputs=lambda g: {
            "hidden_states": torch.randn(1, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g),
            "timestep": torch.tensor([10]),
            "return_dict": False,
        },
        layers_path="transformer_blocks",
    ),
    ZooModel(
        name="unet2d_condition",
        build=_seeded(lambda: _unet()),
        inputs=lambda g: {
            "sample": torch.randn(1, 4, 16, 16, generator=g),
            "timestep": torch.tensor([10]),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
            "return_dict": False,
        },
        layers_path="up_blocks",
    ),
]

ALL = DECODERS + OTHERS
BY_NAME = {entry.name: entry for entry in ALL}


def _clip() -> nn.Module:
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16)
    vision = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )


def _sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
    )


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )

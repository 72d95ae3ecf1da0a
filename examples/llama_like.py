"""A readable Llama-shaped decoder in plain PyTorch, for examples, tests and benchmarks.

The block is the Llama 3 one: RMSNorm, grouped-query attention with rotary
position embeddings and a causal ``F.scaled_dot_product_attention``, RMSNorm,
and a SwiGLU MLP (gate, up, down). Linear layers carry no bias.

There is no KV cache: ``forward`` always attends over exactly the tokens it is
given. A decode step of ``batch`` sequences is therefore modelled as a forward
of ``tokens`` shaped ``[batch, 1]``: it reads every weight once, like a real
decode step, but skips attention over earlier tokens (a small share of the
work at batch sizes up to a few dozen). A prefill is a forward of ``[1, seq]``.

The forward has no data-dependent Python control flow, so
``torch.compile(model, fullgraph=True)`` traces it whole.

Run it directly for a tiny smoke test::

    python examples/llama_like.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that define a Llama-style decoder."""

    vocab: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for the rotary embedding")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Parameters of one decoder block."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden  # two RMSNorm gains

    def num_params(self) -> int:
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden


def llama8b_shape(layers: int = 32) -> LlamaShape:
    """Llama 3 8B: 128256-token vocabulary, hidden 4096, MLP 14336, 32 query and 8 key/value heads."""
    return LlamaShape(vocab=128256, hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=layers)


def tiny_shape(layers: int = 8) -> LlamaShape:
    """A few-hundred-kB model of the same structure, for CPU tests and smoke runs."""
    return LlamaShape(vocab=256, hidden=64, intermediate=128, heads=4, kv_heads=2, layers=layers)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: [batch, heads, seq, head_dim]; ``cos``/``sin``: [seq, head_dim]."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.q_proj = nn.Linear(shape.hidden, shape.heads * shape.head_dim, bias=False)
        self.k_proj = nn.Linear(shape.hidden, shape.kv_heads * shape.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.hidden, shape.kv_heads * shape.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.heads * shape.head_dim, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self._repeat_kv(k), self._repeat_kv(v)  # grouped-query attention: share each k/v head
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        repeats = self.heads // self.kv_heads
        if repeats == 1:
            return t
        batch, kv_heads, seq, head_dim = t.shape
        return t[:, :, None].expand(batch, kv_heads, repeats, seq, head_dim).reshape(batch, self.heads, seq, head_dim)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.up_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.input_norm = RMSNorm(shape.hidden, shape.norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_norm = RMSNorm(shape.hidden, shape.norm_eps)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attention_norm(x))


class LlamaLikeDecoder(nn.Module):
    """tokens ``[batch, seq]`` (int64) -> logits ``[batch, seq, vocab]``; no KV cache (see the module docstring)."""

    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, shape.hidden)
        self.layers = nn.ModuleList(DecoderBlock(shape) for _ in range(shape.layers))
        self.norm = RMSNorm(shape.hidden, shape.norm_eps)
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False)
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, seq: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of positions ``0..seq-1``, each ``[seq, head_dim]``, computed in float32."""
        positions = torch.arange(seq, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.rotary(tokens.shape[1], x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build(
    shape: LlamaShape,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float = 0.02,
) -> LlamaLikeDecoder:
    """A model with random weights, allocated straight on ``device`` and filled in place.

    The module is made on the meta device (no memory, no default init), then
    materialised with ``to_empty`` and filled with ``normal_(0, std)`` from a
    seeded generator on ``device``: an 8B-parameter model builds on a GPU in a
    second or two. RMSNorm gains are ones. Weights are the same for the same
    ``seed``, ``device`` and ``dtype``. Parameters do not require gradients.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaLikeDecoder(shape)
    model = model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.requires_grad_(False)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        # Non-persistent buffers are not parameters: recompute them on the device in float32.
        model.inv_freq = 1.0 / (
            shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=device) / shape.head_dim)
        )
    return model.eval()


def sample_tokens(shape: LlamaShape, batch: int, seq: int, device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, shape.vocab, (batch, seq), generator=generator).to(device)


def _demo() -> None:
    shape = tiny_shape()
    model = build(shape, "cpu", torch.float32, seed=0)
    tokens = sample_tokens(shape, batch=2, seq=16)
    with torch.inference_mode():
        eager = model(tokens)
        compiled = torch.compile(model, fullgraph=True)(tokens)
    print(f"tiny Llama-like decoder: {shape.num_params():,} parameters, logits {tuple(eager.shape)}")
    print(f"compiled (fullgraph) vs eager max abs diff: {(compiled - eager).abs().max().item():.2e}")
    big = llama8b_shape()
    print(f"llama8b_shape(): {big.num_params() / 1e9:.2f}B parameters, {big.layer_params() * 2 / 1e6:.0f} MB per layer in bf16")


if __name__ == "__main__":
    _demo()

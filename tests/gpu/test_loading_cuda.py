"""load_checkpoint() onto a CUDA device: exact logits, pinned arena, device and host memory while placing."""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch

import prefetch_compile
from prefetch_compile import CheckpointError
from prefetch_compile.loading import STAGING_BYTES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_probe import run_probe  # noqa: E402  (tests/memory_probe.py)

DEVICE = "cuda"
SLACK = 64 << 20  # the interpreter's and the CUDA driver's own host allocations while placing
MiB = 1 << 20


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    )


def bf16_checkpoint(directory: Path):
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()
    original.save_pretrained(directory, max_shard_size="200KB")
    return original.to(DEVICE)


def meta_llama():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()


def logits(model, tokens):
    with torch.inference_mode():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("prefetch_step", [1, 2])
def test_sharded_checkpoint_on_cuda_gives_the_original_logits(tmp_path, prefetch_step):
    original = bf16_checkpoint(tmp_path)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = meta_llama()
    runtime = prefetch_compile.load_checkpoint(model, tmp_path, DEVICE, group_size=2, prefetch_step=prefetch_step)
    torch.cuda.synchronize()
    stats = runtime.stats()
    # Straight into place: the device never held more than what stays there.
    assert torch.cuda.max_memory_allocated() - before <= (stats.kept_device_bytes + stats.slot_pool_bytes) * 1.02
    assert runtime.host.pinned and runtime.host.buffer.is_pinned()
    assert all(param.device.type == "cuda" for param in model.parameters())
    assert all(buffer.device.type == "cuda" for buffer in model.buffers())

    tokens = torch.randint(0, 256, (2, 12), device=DEVICE)
    assert torch.equal(logits(model, tokens), logits(original, tokens))
    placed = copy.deepcopy(original)
    prefetch_compile.offload(placed, DEVICE, group_size=2, prefetch_step=prefetch_step)
    want = logits(torch.compile(placed, backend="prefetch_offload"), tokens)
    assert torch.equal(logits(torch.compile(model, backend="prefetch_offload"), tokens), want)


def test_rejected_checkpoint_leaves_no_device_memory_behind(tmp_path):
    original = bf16_checkpoint(tmp_path)
    state = [(name, tensor) for name, tensor in original.state_dict().items()]
    state[-2] = (state[-2][0], state[-2][1].float())  # found mid-way
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = meta_llama()
    with pytest.raises(CheckpointError, match="nothing was loaded into the model: .*dtype torch.float32 in the checkpoint"):
        prefetch_compile.load_checkpoint(model, state, DEVICE, group_size=2)
    gc.collect()
    assert torch.cuda.memory_allocated() == before
    assert all(param.is_meta for param in model.parameters())


@pytest.mark.alone
def test_host_memory_of_loading_is_the_arena_plus_staging(tmp_path):
    run_probe("write", str(tmp_path))
    result = run_probe("load", str(tmp_path), DEVICE)
    grown = result["peak"] - result["baseline"]
    print(f"peak host memory grew {grown / MiB:.1f} MiB for a {result['host_bytes'] / MiB:.1f} MiB arena; resident "
          f"before {_split(result['baseline_split'])}, after {_split(result['after_split'])}")
    assert result["pinned"]
    assert grown <= result["host_bytes"] + 2 * STAGING_BYTES + SLACK


def _split(split: dict[str, int]) -> str:
    return ", ".join(f"{kind} {nbytes / MiB:.1f} MiB" for kind, nbytes in split.items())


@pytest.mark.alone
def test_host_memory_of_offloading_a_host_model_is_not_model_plus_arena():
    result = run_probe("offload", DEVICE)
    grown = result["peak"] - result["baseline"]
    print(f"peak host memory grew {grown / MiB:.1f} MiB over the model; arena {result['host_bytes'] / MiB:.1f} MiB")
    assert result["pinned"]
    assert grown <= result["largest_param"] + SLACK  # page-locking the whole arena up front would add all of it
    assert result["after"] <= result["baseline"] - result["kept_device_bytes"] + SLACK  # kept weights left the host

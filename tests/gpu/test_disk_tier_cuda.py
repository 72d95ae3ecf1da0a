"""The disk tier on a CUDA device: exact logits with layers read from disk, copies that run late, host memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import prefetch_compile
from prefetch_compile import OptionError
from prefetch_compile.checkpoint import read_checkpoint_headers
from prefetch_compile.config import PlanOptions
from prefetch_compile.disk_layout import STAGING_BUFFERS, read_layout
from prefetch_compile.loading import STAGING_BYTES
from prefetch_compile.plan import build_plan

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_probe import run_probe  # noqa: E402  (tests/memory_probe.py)

DEVICE = "cuda"
LAYERS = 8
PLAN = {"group_size": 1, "num_in_group": 1}  # every layer offloaded
SLACK = 64 << 20  # the interpreter's and the CUDA driver's own host allocations
MiB = 1 << 20


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2,
    )


def meta_llama():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()
    original.save_pretrained(tmp_path, max_shard_size="200KB")
    return tmp_path, original.to(DEVICE)


def load(directory: Path, host_layers: int, prefetch_step: int, staging_buffers: int = STAGING_BUFFERS):
    """Loaded with a host budget for ``host_layers`` layers next to the staging ring: the others are on disk."""
    model = meta_llama()
    plan = build_plan(model, PlanOptions(**PLAN, prefetch_step=prefetch_step))
    stored = read_checkpoint_headers(directory)
    staging = max(read_layout(layer, stored).staging_bytes for layer in plan.offloaded)
    budget = host_layers * plan.offloaded[0].nbytes + staging_buffers * staging + 4096
    runtime = prefetch_compile.load_checkpoint(
        model, directory, DEVICE, **PLAN, prefetch_step=prefetch_step, host_budget=budget, staging_buffers=staging_buffers
    )
    assert runtime.stats().disk_layers == LAYERS - host_layers and len(runtime.disk.staging_buffers) == staging_buffers
    return model, runtime


def logits(model, tokens):
    with torch.inference_mode():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("prefetch_step,staging_buffers", [(1, 2), (2, 2), (2, 3)])
def test_layers_read_from_disk_give_the_resident_logits(checkpoint, prefetch_step, staging_buffers):
    directory, original = checkpoint
    model, runtime = load(directory, host_layers=3, prefetch_step=prefetch_step, staging_buffers=staging_buffers)
    assert runtime.host.pinned and all(buffer.is_pinned() for buffer in runtime.disk.staging_buffers)
    tokens = torch.randint(0, 256, (2, 12), device=DEVICE)
    want = logits(original, tokens)
    assert torch.equal(logits(model, tokens), want)  # eager, the same kernels as the resident model

    # Compiled, against the same checkpoint loaded without a host budget (the same graphs, so the same bits).
    in_host = meta_llama()
    prefetch_compile.load_checkpoint(in_host, directory, DEVICE, **PLAN, prefetch_step=prefetch_step)
    want = logits(torch.compile(in_host, backend="prefetch_offload"), tokens)
    compiled = torch.compile(model, backend="prefetch_offload")
    assert torch.equal(logits(compiled, tokens), want)
    torch.testing.assert_close(want, logits(original, tokens), rtol=2e-2, atol=2e-2)  # bf16, other kernels
    reads = runtime.disk.reads
    for _ in range(3):
        assert torch.equal(logits(compiled, tokens), want)
    torch.cuda.synchronize()
    assert {index: count - reads[index] for index, count in runtime.disk.reads.items()} == dict.fromkeys(reads, 3)
    assert runtime.counters.ensure_misses == 0 and runtime.disk.stream_stats().discarded == 0


def test_copies_that_run_late_never_read_a_refilled_staging_buffer(checkpoint):
    """Each block's compute is held up, so every copy (ordered after it) runs late while the reader is fast.

    A reader that refilled a staging buffer when its copy was issued rather
    than when it had finished would overwrite it under the copy: wrong logits.
    """
    directory, original = checkpoint
    model, runtime = load(directory, host_layers=2, prefetch_step=1)
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(2_000_000))
    tokens = torch.randint(0, 256, (1, 8), device=DEVICE)
    want = logits(original, tokens)
    for _ in range(3):
        assert torch.equal(logits(model, tokens), want)
    assert runtime.disk.stream_stats().discarded == 0


def test_cuda_graphs_are_refused(checkpoint):
    directory, _ = checkpoint
    model, _ = load(directory, host_layers=2, prefetch_step=2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": True})
    with pytest.raises(Exception, match="cuda_graphs=True cannot be used with a disk tier") as error:
        logits(compiled, torch.randint(0, 256, (1, 4), device=DEVICE))
    assert isinstance(getattr(error.value, "inner_exception", error.value), OptionError)


@pytest.mark.alone
def test_host_memory_of_loading_and_running_stays_within_the_budget(tmp_path):
    run_probe("write", str(tmp_path))
    budget = 256 * MiB
    result = run_probe("load", str(tmp_path), DEVICE, "--host-budget", str(budget), "--forwards", "2")
    grown = result["peak"] - result["baseline"]
    print(f"peak host memory grew {grown / MiB:.1f} MiB with host_budget {budget / MiB:.0f} MiB "
          f"(arena {result['host_bytes'] / MiB:.0f}, staging ring {result['staging_bytes'] / MiB:.1f})")
    assert result["pinned"] and result["disk_layers"] == 7 and result["finite"]
    assert result["host_bytes"] + result["staging_bytes"] <= budget
    assert grown <= budget + 2 * STAGING_BYTES + SLACK  # the loader's own staging lasts only while it loads

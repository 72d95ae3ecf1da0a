"""Tensor-subclass parameters on a CUDA device: torchao weight-only quantized weights and TP shards.

The quantized tests need torchao (a version built for the device's torch);
the tensor-parallel test needs two GPUs and NCCL and runs
``benchmarks/bench_tp.py``'s model through two spawned processes.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prefetch_compile
from prefetch_compile.leaves import tensor_leaves

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
llama_like = pytest.importorskip("llama_like")

DEVICE = "cuda"
SHAPE = llama_like.LlamaShape(vocab=1024, hidden=1024, intermediate=4096, heads=16, kv_heads=4, layers=8)


def _config(kind: str):
    quantization = pytest.importorskip("torchao.quantization")
    if kind == "int8":
        return quantization.Int8WeightOnlyConfig()
    if kind == "int4":
        # tinygemm's layout (torch's own _weight_int4pack_mm); the default "plain" format needs the mslk package.
        return quantization.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    return quantization.Float8WeightOnlyConfig()


def assert_close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """The prefetch ops may change what Inductor fuses, so bf16 roundings may differ by a few ulps."""
    error = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert error <= scale / 64, f"max error {error} exceeds 1/64 of the output scale {scale}"


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("kind", ["int8", "int4", "float8"])
def test_quantized_llama_matches_resident_compiled(kind, cuda_graphs):
    quantization = pytest.importorskip("torchao.quantization")
    if kind == "float8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    model = llama_like.build(SHAPE, device=DEVICE, dtype=torch.bfloat16, seed=0)
    in_layers = lambda module, name: isinstance(module, torch.nn.Linear) and name.startswith("layers.")  # noqa: E731
    quantization.quantize_(model, _config(kind), filter_fn=in_layers)
    resident = torch.compile(copy.deepcopy(model))
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2, prefetch_step=2)
    weight = model.layers[1].mlp.up_proj.weight
    assert runtime.locate(weight) is not None and all(runtime.locate(leaf) for _, leaf in tensor_leaves(weight))
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": cuda_graphs})
    with torch.inference_mode():
        for batch, seq in [(1, 16), (4, 16), (4, 16)]:
            x = torch.randint(0, SHAPE.vocab, (batch, seq), device=DEVICE)
            got, want = compiled(x), resident(x)
            assert_close_in_bf16(got, want)
            assert torch.equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tp_rank(rank: int, port: int) -> None:
    import tp_offload

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    mesh = tp_offload.init_distributed("cuda")
    try:
        model = llama_like.build(SHAPE, device=DEVICE, dtype=torch.bfloat16, seed=0)
        x = llama_like.sample_tokens(SHAPE, 2, 16, DEVICE)
        with torch.no_grad():
            tp_offload.tensor_parallel(model, mesh)
            want = torch.compile(model)(x)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2})
            for _ in range(2):
                assert_close_in_bf16(compiled(x), want)
        stats = prefetch_compile.runtime_of(model).stats()
        assert stats.offloaded_layers == SHAPE.layers // 2 and stats.host_pinned_bytes >= stats.offloaded_bytes
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_tensor_parallel_two_gpus_offload_their_own_shards():
    mp.spawn(_tp_rank, args=(_free_port(),), nprocs=2, join=True)

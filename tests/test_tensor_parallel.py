"""Tensor parallel with DTensor parameters: each of two gloo ranks offloads only its own shards.

Two processes are started inside the test (torch.multiprocessing, a free port
on 127.0.0.1). Each shards the tiny Llama-like model with
``parallelize_module`` (examples/tp_offload.py), compiles it with the
``prefetch_offload`` backend, and compares its logits with the single-process,
un-offloaded model it started from. Sharding changes the order of the
reductions (the row-wise layers sum two partial products), so the logits differ
from the single-process ones by rounding only: about 2e-7 here; tolerance 1e-5.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prefetch_compile
from prefetch_compile.leaves import leaf_bytes, tensor_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import llama_like  # noqa: E402

WORLD = 2
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, port: int) -> None:
    """One rank: shard, offload through the backend, compare, and check what this rank's host arena holds."""
    from torch.distributed.tensor import DTensor

    import tp_offload

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    mesh = tp_offload.init_distributed("cpu")
    try:
        shape = llama_like.tiny_shape(layers=2)
        model = llama_like.build(shape, "cpu", torch.float32, seed=0)
        # The second shape recompiles: Dynamo then fakifies DTensors whose shards already live in the slot.
        inputs = [llama_like.sample_tokens(shape, batch=2, seq=8), llama_like.sample_tokens(shape, batch=1, seq=5)]
        with torch.no_grad():
            references = [model(tokens) for tokens in inputs]
            unsharded = {name: leaf_bytes(param) for name, param in model.named_parameters()}
            tp_offload.tensor_parallel(model, mesh)
            compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 1, "prefetch_step": 1})
            # Both layers take turns in one slot; each call starts from the slot state the last one left.
            for tokens, reference in [*zip(inputs, references), (inputs[0], references[0])]:
                torch.testing.assert_close(compiled(tokens), reference, **TOLERANCE)

        runtime = prefetch_compile.runtime_of(model)
        offloaded = {name: model.get_parameter(name) for name in runtime.offloaded_params}
        assert set(offloaded) == {name for name in unsharded if name.startswith("layers.")}
        sharded = [name for name, param in offloaded.items() if isinstance(param, DTensor)]
        assert len(sharded) == 2 * len(tp_offload.LAYER_PLAN)
        for name in sharded:
            assert leaf_bytes(offloaded[name]) * WORLD == unsharded[name]  # this rank's half, nothing more
            (inner, shard), = tensor_leaves(offloaded[name])
            assert inner == ("_local_tensor",)
            slot = runtime.slots.buffers[0]
            assert slot.data_ptr() <= shard.data_ptr() < slot.data_ptr() + slot.numel()  # the shard is in the slot
            assert runtime.locate(shard) is not None
        assert runtime.stats().offloaded_bytes == sum(leaf_bytes(param) for param in offloaded.values())
    finally:
        dist.destroy_process_group()


def test_two_ranks_offload_their_own_shards_and_match_the_single_process_model():
    mp.spawn(_rank_main, args=(_free_port(),), nprocs=WORLD, join=True)

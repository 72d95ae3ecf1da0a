"""Tensor parallel plus offload: each rank keeps half of every layer, and offloads some of its half.

The model is sharded with PyTorch's own tensor parallelism
(``torch.distributed.tensor.parallel.parallelize_module``: q/k/v and gate/up
column-wise, o and down row-wise), so its Linear weights are DTensors whose
local shard is this rank's slice. ``torch.compile(backend="prefetch_offload")``
then offloads, on every rank, only that rank's shards: its pinned host arena
holds its own slice of the offloaded layers, and its copies run on its own copy
stream, never waiting for another rank's.

Run on two GPUs (NCCL) or, to try it without any, on the CPU (gloo)::

    torchrun --nproc-per-node 2 examples/tp_offload.py             # CUDA if present, else CPU
    torchrun --nproc-per-node 2 examples/tp_offload.py --device cpu --layers 4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_like  # noqa: E402

# Column-wise layers split their output features (each rank computes some heads / some of the MLP);
# row-wise layers split their input features and all-reduce their output.
LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel(),
    "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(),
    "self_attn.o_proj": RowwiseParallel(),
    "mlp.gate_proj": ColwiseParallel(),
    "mlp.up_proj": ColwiseParallel(),
    "mlp.down_proj": RowwiseParallel(),
}


def tensor_parallel(model: llama_like.LlamaLikeDecoder, mesh: DeviceMesh) -> llama_like.LlamaLikeDecoder:
    """Shard every decoder block of ``model`` over ``mesh`` in place; embedding, norms and head stay replicated."""
    world = mesh.size()
    shape = model.shape
    if shape.kv_heads % world:
        raise ValueError(f"kv_heads={shape.kv_heads} must be a multiple of the tensor-parallel size {world}")
    for block in model.layers:
        parallelize_module(block, mesh, LAYER_PLAN)
        # Each rank now computes heads / world query heads and kv_heads / world key/value heads.
        block.self_attn.heads = shape.heads // world
        block.self_attn.kv_heads = shape.kv_heads // world
    return model


def init_distributed(device_type: str) -> DeviceMesh:
    """The process group torchrun (or a test) set up through the environment, and a 1-D mesh over it."""
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return init_device_mesh(device_type, (dist.get_world_size(),))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=2, help="offload the last layer of every group of this many")
    args = parser.parse_args(argv)

    mesh = init_distributed(args.device)
    rank = dist.get_rank()
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    shape = llama_like.tiny_shape(layers=args.layers)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = llama_like.build(shape, device, dtype, seed=0)  # same seed: every rank starts from the same weights
    tokens = llama_like.sample_tokens(shape, batch=2, seq=16, device=device)
    with torch.no_grad():
        reference = model(tokens)  # the whole model on this rank, before sharding
        tensor_parallel(model, mesh)
        compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": args.group_size})
        logits = compiled(tokens)

    import prefetch_compile

    stats = prefetch_compile.runtime_of(model).stats()
    difference = (logits.float() - reference.float()).abs().max().item()
    print(
        f"rank {rank}: offloaded {stats.offloaded_layers}/{stats.total_layers} layers, "
        f"{stats.offloaded_bytes:,} bytes of this rank's shards to host; "
        f"max |TP+offload - single-process| = {difference:.2e}",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

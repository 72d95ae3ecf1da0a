"""The one-line use: compile a Llama-shaped model with the prefetch_offload backend.

Offloads the last layer of every group of two to (pinned) host memory, runs a
forward, checks it against an untouched copy, and prints what moved where.
Runs on a CUDA device when there is one, else on the CPU (synchronous copies).

    python examples/quickstart.py [--layers 8] [--group-size 2] [--prefetch-step 1]
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from llama_like import build, sample_tokens, tiny_shape

import prefetch_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--num-in-group", type=int, default=1)
    parser.add_argument("--prefetch-step", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = tiny_shape(layers=args.layers)
    model = build(shape, device, dtype, seed=0)
    reference = copy.deepcopy(model)

    compiled = torch.compile(
        model,
        backend="prefetch_offload",
        options={"group_size": args.group_size, "num_in_group": args.num_in_group, "prefetch_step": args.prefetch_step},
    )
    tokens = sample_tokens(shape, batch=2, seq=16, device=device)
    with torch.inference_mode():
        logits = compiled(tokens)
        expected = reference(tokens)

    runtime = prefetch_compile.runtime_of(model)
    stats = runtime.stats()
    offloaded = ", ".join(layer.name for layer in runtime.offloaded)
    print(f"device: {device}, {shape.layers} layers, {shape.num_params():,} parameters")
    print(f"offloaded layers: {offloaded}")
    print(
        f"bytes: {stats.offloaded_bytes:,} moved to host ({stats.host_pinned_bytes:,} pinned), "
        f"slot pool {stats.slot_pool_bytes:,}, device bytes saved {stats.device_bytes_saved:,}"
    )
    error = (logits.float() - expected.float()).abs().max().item()
    print(f"max |compiled - original| = {error:.2e}")


if __name__ == "__main__":
    main()

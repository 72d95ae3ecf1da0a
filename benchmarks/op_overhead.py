"""Host time of one ``wait_prefetch`` / ``start_prefetch`` call, in microseconds (no copy involved).

Every offloaded layer fits its own slot here (``prefetch_step`` = layers), so the
calls find their layer resident and do no copy: what is left is the dispatcher's
path into the op and the runtime's bookkeeping, which a forward without CUDA
graphs pays twice per offloaded layer, or twice per chunk with chunked copies
(the ``*_chunk_us`` numbers: ops that name one piece of a chunked plan).

``edit_check_per_layer_us`` is the look for in-place edits that the runtime
makes once each time it is entered (a compiled graph, a replay, an eager block
call; see ``prefetch_compile/edits.py``), on 32 offloaded blocks of nine
parameters each (a Llama decoder block's count), divided by the 32 blocks.

    python benchmarks/op_overhead.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import add_repo_to_path, device_name  # noqa: E402

add_repo_to_path()


def microseconds_per_call(fn, args: tuple, calls: int = 20000) -> float:
    for _ in range(calls // 10):
        fn(*args)
    began = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - began) / calls * 1e6


def _nine_linears() -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8, bias=False) for _ in range(9)))


def main() -> dict:
    import prefetch_compile
    from prefetch_compile.ops import START, WAIT

    device = "cuda" if torch.cuda.is_available() else "cpu"
    whole, chunked = (
        prefetch_compile.offload(
            nn.Sequential(nn.ModuleList(nn.Linear(64, 64) for _ in range(4))),
            device, group_size=1, prefetch_step=4, layers="0", chunked_copies=chunks,
        )
        for chunks in (False, True)
    )
    nine_per_block = prefetch_compile.offload(
        nn.Sequential(nn.ModuleList(_nine_linears() for _ in range(32))),
        device, group_size=1, prefetch_step=1, layers="0",
    )
    params = [whole.offloaded_params[p.name] for p in whole.offloaded[0].params]
    piece = [chunked.offloaded_params[chunked.offloaded[0].params[0].name]]  # the weight: piece 0 of 2
    live = [torch.randn(4, device=device)]
    with torch.inference_mode():
        result = {
            "device": device_name(torch.device(device)),
            "torch": torch.__version__,
            "wait_us": microseconds_per_call(WAIT, (params,)),
            "start_us": microseconds_per_call(START, (params, [], live)),
            "wait_chunk_us": microseconds_per_call(WAIT, (piece,)),
            "start_chunk_us": microseconds_per_call(START, (piece, [], live)),
            "runtime_wait_body_us": microseconds_per_call(whole.wait, (0,)),
            "edit_check_per_layer_us": microseconds_per_call(nine_per_block.settle_edits, ()) / 32,
        }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

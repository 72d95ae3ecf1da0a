"""Tensor parallel plus offload on several GPUs: ms per forward against the per-rank link limit and TP resident.

Every rank builds the same Llama-8B-shaped model (same seed), shards it with
``examples/tp_offload.py``'s plan (q/k/v, gate/up column-wise; o, down
row-wise), and times, per case (decode ``[batch, 1]``, prefill ``[1, seq]``):

* ``tp-resident``: the sharded model compiled with stock Inductor;
* ``tp-offload``: the same model compiled with ``prefetch_offload``, the last
  layer of every ``--group-size`` offloaded (2: half the layers), each rank
  offloading only its own shards.

The per-rank link limit is ``max(tp-resident time, bytes a rank copies per forward /
pinned H2D bandwidth)``, the bandwidth measured on all ranks at once (they may
share a host link). Each forward is checked against ``tp-resident``'s logits.
Rank 0 prints a table and writes ``--out``/bench_tp.json.

Two GPUs::

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --out bench_tp_out

CPU smoke test::

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --device cpu --tiny --layers 4 --iters 2 --out /tmp/bench_tp
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import add_repo_to_path, bench_shape, device_name, measure_h2d_bandwidth, peak_bytes, reset_peak, time_calls  # noqa: E402

add_repo_to_path()
import llama_like  # noqa: E402
import tp_offload  # noqa: E402

import prefetch_compile  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes instead of Llama-8B (smoke test)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--prefetch-step", type=int, default=1)
    parser.add_argument("--cases", default="decode-b1:1x1,decode-b16:16x1,prefill-512:1x512", help="name:BATCHxSEQ,...")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench_tp_out"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mesh = tp_offload.init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    shape = bench_shape(args.layers, args.tiny)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cases = [(name, *map(int, size.split("x"))) for name, size in (item.split(":") for item in args.cases.split(","))]

    dist.barrier()  # all ranks copy at once, as they will while running
    bandwidth = measure_h2d_bandwidth(device, 1 << 30 if args.device == "cuda" else 1 << 24)["bytes_per_s"]
    model = tp_offload.tensor_parallel(llama_like.build(shape, device, dtype, seed=0), mesh)
    records: list[dict] = []
    reference: dict[str, torch.Tensor] = {}
    for system in ("tp-resident", "tp-offload"):
        torch._dynamo.reset()
        if system == "tp-resident":
            compiled = torch.compile(model, backend="inductor")
        else:
            options = {"group_size": args.group_size, "prefetch_step": args.prefetch_step}
            compiled = torch.compile(model, backend="prefetch_offload", options=options)
        for name, batch, seq in cases:
            tokens = llama_like.sample_tokens(shape, batch, seq, device)
            with torch.inference_mode():
                logits = compiled(tokens)[:, -1].float()  # warm-up, includes compilation
                reset_peak(device)
                dist.barrier()
                times = time_calls(lambda: compiled(tokens), args.iters, device)
            reference.setdefault(name, logits)
            runtime = prefetch_compile.runtime_of(model)
            records.append(
                {
                    "rank": rank,
                    "system": system,
                    "case": name,
                    "time_s": statistics.median(times),
                    "offloaded_bytes": runtime.stats().offloaded_bytes if runtime else 0,
                    "copied_bytes": runtime.plan.copied_bytes_per_forward() if runtime else 0,
                    "host_pinned_bytes": runtime.stats().host_pinned_bytes if runtime else 0,
                    "peak_bytes": peak_bytes(device),
                    "max_abs_diff_vs_resident": (logits - reference[name]).abs().max().item(),
                    "same_argmax_as_resident": bool(torch.equal(logits.argmax(-1), reference[name].argmax(-1))),
                }
            )
    for record in records:
        resident = next(r["time_s"] for r in records if r["system"] == "tp-resident" and r["case"] == record["case"])
        record["limit_s"] = max(resident, record["copied_bytes"] / bandwidth)
        record["efficiency"] = record["limit_s"] / record["time_s"]
        record["h2d_bytes_per_s"] = bandwidth

    gathered: list[list[dict]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, records)
    if rank == 0:
        everything = [record for rank_records in gathered for record in rank_records]
        meta = {"world": world, "device": device_name(device), "torch": torch.__version__, "shape": repr(shape),
                "group_size": args.group_size, "prefetch_step": args.prefetch_step}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_tp.json").write_text(json.dumps({"meta": meta, "results": everything}, indent=1))
        print(meta)
        print(
            f"{'rank':>4} {'system':<12} {'case':<12} {'ms':>9} {'limit ms':>9} {'eff':>6} "
            f"{'offl GiB':>9} {'peak GiB':>9} {'diff':>8} argmax"
        )
        for r in everything:
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
            print(
                f"{r['rank']:>4} {r['system']:<12} {r['case']:<12} {r['time_s'] * 1e3:9.2f} {r['limit_s'] * 1e3:9.2f} "
                f"{r['efficiency']:6.2f} {r['offloaded_bytes'] / 2**30:9.2f} {peak:>9} "
                f"{r['max_abs_diff_vs_resident']:8.1e} {r['same_argmax_as_resident']}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""CUDA graphs against none for one offload plan, the two variants timed in alternation in one process.

Issue 8 asks that decode with ``cuda_graphs=True`` be never slower than without.
At the link limit the two differ by tenths of a percent, which is about what two
fresh builds of the same variant differ by when run one after the other
(``bench_offload.py`` runs its systems in turn). Here both variants of a plan live
at once, each its own model instance with its own runtime and compiled graphs,
and are timed in rounds of ``--per-round`` back-to-back forwards, A then B, then
B then A, so that drift over the run (clocks, the host) falls on both alike.
Per case: each variant's median ms per forward over all its forwards, and the
per-round ratio graphs / none (median, min, max, rounds with graphs slower).

GPU::

    python3 benchmarks/graphs_ab.py --layers 16 --out out/graphs_ab

CPU smoke test::

    python benchmarks/graphs_ab.py --device cpu --tiny --layers 4 --rounds 2 --per-round 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import (  # noqa: E402
    add_shape_arguments,
    bench_device,
    bench_shape,
    log,
    measure_h2d_bandwidth,
    release_memory,
    run_meta,
    time_calls,
)

import llama_like  # noqa: E402  (examples/, on the path after bench_util)

PLANS = {"s1": {"prefetch_step": 1}, "s2": {"prefetch_step": 2}}  # s1 chunks its copies by default ("auto")
CASES = {"decode1": (1, 1), "decode64": (64, 1)}


def variant(shape, device: torch.device, dtype: torch.dtype, plan: dict, cuda_graphs: bool):
    """A fresh model with every other layer offloaded, compiled through the README's one line."""
    model = llama_like.build(shape, device=device, dtype=dtype, seed=0)
    options = {"group_size": 2, "num_in_group": 1, **plan, "cuda_graphs": cuda_graphs}
    return model, torch.compile(model, backend="prefetch_offload", options=options)


def run_plan(args: argparse.Namespace, device: torch.device, plan_name: str, started: float) -> list[dict]:
    shape = bench_shape(args.layers, args.tiny)
    dtype = getattr(torch, args.dtype)
    (model_a, none), (model_b, graphs) = (
        variant(shape, device, dtype, PLANS[plan_name], cuda_graphs) for cuda_graphs in (False, True)
    )
    results = []
    with torch.inference_mode():
        for case in args.cases.split(","):
            batch, seq = CASES[case]
            x = torch.randint(0, shape.vocab, (batch, seq), device=device)
            for fn in (none, graphs):
                for _ in range(3):  # compile; capture; replay
                    fn(x)
            max_diff = float((graphs(x).float() - none(x).float()).abs().max())
            # Each variant compiles its own graphs (Dynamo guards on the backend), never the other's.
            graphs_compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            times: dict[str, list[float]] = {"none": [], "graphs": []}
            ratios = []
            for round_ in range(args.rounds):
                order = (("none", none), ("graphs", graphs)) if round_ % 2 == 0 else (("graphs", graphs), ("none", none))
                medians = {}
                for name, fn in order:
                    measured = time_calls(lambda: fn(x), args.per_round, device)
                    times[name] += measured
                    medians[name] = statistics.median(measured)
                ratios.append(medians["graphs"] / medians["none"])
            result = {
                "plan": plan_name,
                "case": case,
                "none_ms": 1e3 * statistics.median(times["none"]),
                "graphs_ms": 1e3 * statistics.median(times["graphs"]),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "rounds_graphs_slower": sum(r > 1 for r in ratios),
                "rounds": args.rounds,
                "times_s": times,
                "ratios": ratios,
                "dynamo_graphs_so_far": graphs_compiled,
                "max_output_diff": max_diff,
            }
            results.append(result)
            log(
                f"{plan_name} {case}: none {result['none_ms']:.2f} ms, graphs {result['graphs_ms']:.2f} ms, "
                f"graphs/none per round median {result['ratio_median']:.4f} [{result['ratio_min']:.4f}, "
                f"{result['ratio_max']:.4f}], graphs slower in {result['rounds_graphs_slower']}/{args.rounds} rounds; "
                f"outputs differ by {max_diff:.3g}; Dynamo graphs so far {graphs_compiled}",
                started,
            )
    del none, graphs, model_a, model_b
    release_memory(device)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, "decoder layers (every other one offloaded)")
    p.add_argument("--plans", default="s1,s2", help=f"comma list from {list(PLANS)}")
    p.add_argument("--cases", default="decode1,decode64", help=f"comma list from {list(CASES)}")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--per-round", type=int, default=5, help="back-to-back forwards per variant per round")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=None, help="directory for graphs_ab.json")
    args = p.parse_args(argv)
    device = bench_device(args.device)
    started = time.perf_counter()
    report = {
        "meta": run_meta(device, args, h2d=measure_h2d_bandwidth(device, 256 << 20)),
        "results": [row for plan in args.plans.split(",") for row in run_plan(args, device, plan, started)],
    }
    print("\n| plan | case | no graphs ms | graphs ms | graphs / none per round: median [min, max] | rounds graphs slower |")
    print("|---|---|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['plan']} | {r['case']} | {r['none_ms']:.2f} | {r['graphs_ms']:.2f} | {r['ratio_median']:.4f} "
              f"[{r['ratio_min']:.4f}, {r['ratio_max']:.4f}] | {r['rounds_graphs_slower']}/{r['rounds']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graphs_ab.json").write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()

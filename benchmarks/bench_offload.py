"""Offloaded inference of a Llama-8B-shaped decoder: ours against resident, peers and the bandwidth limit.

For each system (see offload_systems.py) the model is built afresh, set up,
and run on each case, decode (``[batch, 1]`` tokens) and prefill (``[1, seq]``):
median seconds per forward over back-to-back CUDA-event-timed iterations after
a warm-up (which includes compilation), tokens/s, peak device memory during the
timed iterations, pinned host bytes, and the overlap efficiency
``limit / measured`` where ``limit = max(best resident time, bytes copied per
forward / pinned H2D bandwidth)``, the bandwidth measured in the same run (a peer
copies every offloaded layer each forward; ours copies what its plan says,
``OffloadPlan.copied_bytes_per_forward``: a layer alone in its slot stays).

Systems run in priority order (resident; then for each fraction, ours with
prefetch_step 1 and no CUDA graphs, naive, accelerate, FSDP2 and diffusers;
resident-eager; ours' other variants, the chunked ones (``--chunked-steps``)
first, resident-cg before the CUDA-graph ones)
and a time budget (``--budget-s``) skips what is left once spent, so
one run always ends with results. A failing case is recorded with its error.

Outputs in ``--out``: ``bench.json`` (every number, rewritten after every
system), ``bench.png`` (time against offload fraction, one panel per case) and
the table on stdout.

GPU::

    PYTHONPATH=. python benchmarks/bench_offload.py --out bench_out

One slot with chunked copies against one and two slots with whole-layer copies::

    PYTHONPATH=. python benchmarks/bench_offload.py --layers 16 --systems resident,ours --fractions 2,4 \
        --cases decode1,prefill2048 --prefetch-steps 1,2 --chunked-steps 1 --cuda-graphs 0 --out bench_chunked

CPU smoke test::

    python benchmarks/bench_offload.py --device cpu --tiny --quick --layers 2 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import (  # noqa: E402
    add_shape_arguments,
    bench_device,
    bench_shape,
    add_repo_to_path,
    allocated_bytes,
    device_name,
    gib,
    git_commit,
    log,
    measure_h2d_bandwidth,
    peak_bytes,
    release_memory,
    reset_peak,
    time_calls,
    wall_time,
)
from offload_systems import (  # noqa: E402
    ALL_KINDS,
    PEER_KINDS,
    RESIDENT_KINDS,
    Skip,
    SystemSpec,
    destroy_process_group,
    prepare,
)

add_repo_to_path()
import llama_like  # noqa: E402  (examples/llama_like.py)
from prefetch_compile.discovery import is_offloaded_layer  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def phase(self) -> str:
        return "decode" if self.seq == 1 else "prefill"


CASES = {
    "decode1": Case("decode1", 1, 1),
    "decode8": Case("decode8", 8, 1),
    "decode64": Case("decode64", 64, 1),
    "prefill512": Case("prefill512", 1, 512),
    "prefill2048": Case("prefill2048", 1, 2048),
    "prefill8192": Case("prefill8192", 1, 8192),
}
MISMATCH_REL_ERR = 0.1  # flag a system whose last-position logits differ from eager's by more (bf16 noise is far less)
QUICK = {"cases": "decode1,prefill512", "fractions": "2", "prefetch_steps": "1", "cuda_graphs": "0", "iters": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, "decoder layers (32 = Llama 8B, fits resident on an H100)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list from {list(CASES)}")
    p.add_argument("--systems", default=",".join(ALL_KINDS), help=f"comma list from {list(ALL_KINDS)}")
    p.add_argument("--fractions", default="2,8,4",
                   help="offload 1 of every N layers, comma list of N, run in this order (extremes first)")
    p.add_argument("--prefetch-steps", default="1,2", help="ours: prefetch_step values")
    p.add_argument("--cuda-graphs", default="0,1", help="ours: cuda_graphs values (0/1)")
    p.add_argument("--chunked-steps", default="",
                   help="ours: also run chunked_copies=True at these prefetch steps (comma list, e.g. 1); "
                        "plain ours copies whole layers")
    p.add_argument("--iters", type=int, default=20, help="most timed iterations per case")
    p.add_argument("--min-iters", type=int, default=3, help="fewest timed iterations per case")
    p.add_argument("--case-seconds", type=float, default=0.6, help="aim for this much timed work per case")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what is left once this many seconds are spent")
    p.add_argument("--dynamic", default="auto", choices=["auto", "false"],
                   help="torch.compile dynamic=None (auto: about 3 graphs for the 6 cases) or dynamic=False")
    p.add_argument("--peer-compile", action="store_true", help="also torch.compile the peers (default: eager)")
    p.add_argument("--fsdp-prefetch", action="store_true", help="FSDP2: chain set_modules_to_forward_prefetch")
    p.add_argument("--bw-bytes", type=int, default=None, help="bytes per bandwidth-measuring copy (default 1 GiB)")
    p.add_argument("--no-check", action="store_true", help="skip checking outputs against the eager model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse, if available)")
    p.add_argument("--out", default="bench_out", help="output directory (bench.json, bench.png)")
    p.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {action.dest: action.default for action in p._actions}
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:  # an explicit flag still wins
                setattr(args, key, value)
    return args


def system_plan(args: argparse.Namespace) -> list[SystemSpec]:
    """Every system to run, most important first (the budget cuts from the end)."""
    kinds = _csv(args.systems)
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise SystemExit(f"unknown --systems {sorted(unknown)}; known: {list(ALL_KINDS)}")
    groups = [int(n) for n in _csv(args.fractions)]
    steps = [int(n) for n in _csv(args.prefetch_steps)]
    graphs = [bool(int(n)) for n in _csv(args.cuda_graphs)]
    chunked_steps = [int(n) for n in _csv(args.chunked_steps)]
    whole = [(step, cg, False) for cg in graphs for step in steps]  # (1, no cg) first
    ours = whole[:1] + [(step, cg, True) for cg in graphs for step in chunked_steps] + whole[1:]
    plan: list[SystemSpec] = []
    if "resident" in kinds:
        plan.append(SystemSpec("resident"))
    for g in groups:  # fraction by fraction, so a budget cut leaves whole comparisons
        if "ours" in kinds and ours:
            plan.append(SystemSpec("ours", g, *ours[0]))
        plan += [SystemSpec(kind, g) for kind in PEER_KINDS if kind in kinds]
    if "resident-eager" in kinds:
        plan.append(SystemSpec("resident-eager"))  # the eager peers' ceiling; cheap (nothing to compile)
    variants = [SystemSpec("ours", g, *variant) for variant in ours[1:] for g in groups] if "ours" in kinds else []
    plan += [spec for spec in variants if not spec.cuda_graphs]
    if "resident-cg" in kinds:
        plan.append(SystemSpec("resident-cg"))  # the ceiling for the CUDA-graph variants
    plan += [spec for spec in variants if spec.cuda_graphs]
    return plan


def _csv(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = bench_device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.shape = bench_shape(args.layers, args.tiny)
        self.cases = [CASES[name] for name in _csv(args.cases)]
        self.plan = system_plan(args)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.results: list[dict] = []
        self.meta: dict = {}
        self.reference: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        args = self.args
        self.meta = {
            "device": device_name(self.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
            "commit": git_commit(args.commit),
            "shape": {**asdict(self.shape), "head_dim": self.shape.head_dim, "params": self.shape.num_params()},
            "dtype": args.dtype,
            "layer_bytes": self.shape.layer_params() * self.dtype.itemsize,
            "args": vars(args),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for key in ("device", "torch", "cuda", "commit"):
            log(f"{key}: {self.meta[key]}")
        log(f"model: {self.shape} ({self.shape.num_params() / 1e6:,.1f}M params, "
            f"{self.meta['layer_bytes'] / 1e6:,.1f} MB per layer), dtype {args.dtype}")
        log(f"{len(self.plan)} systems x {len(self.cases)} cases, budget {args.budget_s:.0f}s", self.started)
        bw_bytes = args.bw_bytes or (2**30 if self.device.type == "cuda" else 2**26)
        self.meta["h2d_bandwidth"] = measure_h2d_bandwidth(self.device, bw_bytes)
        self.meta["h2d_bandwidth_one_layer"] = measure_h2d_bandwidth(self.device, self.meta["layer_bytes"])
        log(f"H2D bandwidth: {self.meta['h2d_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s in {gib(bw_bytes)} GiB copies, "
            f"{self.meta['h2d_bandwidth_one_layer']['bytes_per_s'] / 1e9:.1f} GB/s in one-layer copies "
            f"({self.meta['h2d_bandwidth']['what']}); the limit uses the first", self.started)
        try:
            self.compute_reference()
            for spec in self.plan:
                try:
                    self.run_system(spec)
                except Exception as error:  # e.g. a broken CUDA context while cleaning up
                    for record in self.results:
                        if record["system"] == spec.name and record["status"] == "pending":
                            record.update(status="error", **_error_fields(error))
                    log(f"{spec.name}: FAILED {type(error).__name__}: {_short(error)}", self.started)
                self.save_json()
        finally:
            for record in self.results:
                if record["status"] == "pending":
                    record["status"] = "not run"
            destroy_process_group()
            self.finish()

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s

    def base_record(self, spec: SystemSpec, case: Case) -> dict:
        indices = [
            index for index in range(self.shape.layers)
            if spec.group_size is not None and is_offloaded_layer(index, spec.group_size, 1)
        ]
        return {
            "system": spec.name, "kind": spec.kind, "label": spec.label,
            "fraction": spec.fraction, "fraction_label": spec.fraction_label, "group_size": spec.group_size,
            "prefetch_step": spec.prefetch_step if spec.kind == "ours" else None,
            "cuda_graphs": spec.cuda_graphs if spec.kind == "ours" else spec.kind == "resident-cg",
            "chunked_copies": spec.chunked if spec.kind == "ours" else None,
            "case": case.name, "phase": case.phase, "batch": case.batch, "seq": case.seq, "tokens": case.tokens,
            "offloaded_layers": len(indices), "offloaded_bytes": len(indices) * self.meta["layer_bytes"],
            "status": "pending", "notes": [],
        }

    def run_system(self, spec: SystemSpec) -> None:
        records = [self.base_record(spec, case) for case in self.cases]
        self.results += records
        if self.over_budget():
            for record in records:
                record.update(status="skipped", notes=["time budget spent"])
            log(f"{spec.name}: skipped (time budget spent)", self.started)
            return
        release_memory(self.device)
        model = prepared = None
        try:
            began = time.perf_counter()
            model = llama_like.build(self.shape, self.device, self.dtype, seed=self.args.seed)
            built = time.perf_counter() - began
            prepared = prepare(spec, model, self.device, peer_compile=self.args.peer_compile,
                               fsdp_prefetch=self.args.fsdp_prefetch,
                               compile_kwargs={} if self.args.dynamic == "auto" else {"dynamic": False})
            setup = time.perf_counter() - began
            at_rest = allocated_bytes(self.device)
            log(f"{spec.name}: built in {built:.1f}s, set up in {setup:.1f}s, device memory at rest "
                f"{gib(at_rest)} GiB, pinned {gib(prepared.host_pinned_bytes)} GiB", self.started)
            for record in records:
                record.update(setup_s=setup, device_bytes_at_rest=at_rest, host_pinned_bytes=prepared.host_pinned_bytes,
                              host_bytes=prepared.host_bytes, notes=list(prepared.notes), **prepared.extra)
        except Skip as skip:
            for record in records:
                record.update(status="skipped", notes=[str(skip)])
            log(f"{spec.name}: skipped: {skip}", self.started)
            return
        except Exception as error:
            for record in records:
                record.update(status="error", **_error_fields(error))
            log(f"{spec.name}: set-up failed: {type(error).__name__}: {_short(error)}", self.started)
            del model, prepared
            release_memory(self.device)
            return
        for case, record in zip(self.cases, records):
            if self.over_budget():
                record.update(status="skipped", notes=record["notes"] + ["time budget spent"])
                continue
            self.run_case(spec, case, prepared, record)
        del model, prepared
        release_memory(self.device)

    def run_case(self, spec: SystemSpec, case: Case, prepared, record: dict) -> None:
        args = self.args
        try:
            tokens = llama_like.sample_tokens(self.shape, case.batch, case.seq, self.device, seed=self.args.seed)
            with prepared.grad_mode():
                first = wall_time(lambda: prepared.forward(tokens), self.device)  # compiles
                for _ in range(prepared.warmup - 2):
                    prepared.forward(tokens)
                # The last warm-up call: check the steady state (prefetch chains set up, CUDA graphs
                # replaying) against eager, and size the timed loop from its time.
                outputs: list[torch.Tensor] = []
                warm = wall_time(lambda: outputs.append(prepared.forward(tokens)), self.device)
                record.update(self.check_output(case, outputs.pop()))
                iters = max(args.min_iters, min(args.iters, math.ceil(args.case_seconds / max(warm, 1e-6))))
                reset_peak(self.device)
                times = time_calls(lambda: prepared.forward(tokens), iters, self.device)
                peak = peak_bytes(self.device)
            median = statistics.median(times)
            record.update(
                status="ok", time_s=median, mean_s=statistics.fmean(times), min_s=min(times), max_s=max(times),
                iters=iters, times_s=times, tokens_per_s=case.tokens / median, peak_device_bytes=peak, first_call_s=first,
            )
            mismatch = record.get("rel_err") is not None and record["rel_err"] > MISMATCH_REL_ERR
            if mismatch:
                record["notes"] = record["notes"] + [f"OUTPUT MISMATCH: rel err {record['rel_err']:.3f} vs eager"]
            log(f"{spec.name} {case.name}: {median * 1e3:.2f} ms ({case.tokens / median:,.0f} tok/s, "
                f"{iters} iters, first call {first:.1f}s), peak {gib(peak)} GiB"
                + (f", rel err {record['rel_err']:.1e}" if record.get("rel_err") is not None else "")
                + (" OUTPUT MISMATCH" if mismatch else ""), self.started)
        except Exception as error:
            record.update(status="error", **_error_fields(error))
            log(f"{spec.name} {case.name}: FAILED {type(error).__name__}: {_short(error)}", self.started)
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize(self.device)
                    torch.cuda.empty_cache()
                except Exception as cleanup_error:
                    log(f"  (cleanup after the failure failed too: {_short(cleanup_error)})", self.started)

    def compute_reference(self) -> None:
        """Last-position logits of each case from the plain eager model, to check every system against."""
        self.reference = {}
        if self.args.no_check:
            return
        began = time.perf_counter()
        release_memory(self.device)
        model = llama_like.build(self.shape, self.device, self.dtype, seed=self.args.seed)
        with torch.inference_mode():
            for case in self.cases:
                tokens = llama_like.sample_tokens(self.shape, case.batch, case.seq, self.device, seed=self.args.seed)
                self.reference[case.name] = model(tokens)[:, -1].float().cpu()
        del model
        release_memory(self.device)
        log(f"eager reference outputs in {time.perf_counter() - began:.1f}s", self.started)

    def check_output(self, case: Case, output: torch.Tensor) -> dict:
        want = self.reference.get(case.name)
        if want is None:
            return {}
        got = output[:, -1].float().cpu()
        err = (got - want).abs().max().item()
        return {"max_abs_err": err, "rel_err": err / max(want.abs().max().item(), 1e-12)}

    # ------------------------------------------------------------- outputs
    def compute_limits(self) -> None:
        bandwidth = self.meta.get("h2d_bandwidth", {}).get("bytes_per_s")
        for case in self.cases:
            resident = [r["time_s"] for r in self.results
                        if r["case"] == case.name and r["kind"] in RESIDENT_KINDS and r["status"] == "ok"]
            best = min(resident) if resident else None
            for record in self.results:
                if record["case"] != case.name:
                    continue
                # Peers copy every offloaded layer each forward; ours says what its plan copies.
                copied = record.get("copied_bytes", record["offloaded_bytes"])
                transfer = copied / bandwidth if bandwidth else None
                parts = [value for value in (best, transfer) if value is not None]
                limit = max(parts) if (best is not None and parts) else None
                record.update(resident_best_s=best, transfer_s=transfer, limit_s=limit)
                if record["status"] == "ok" and limit is not None:
                    record["efficiency"] = limit / record["time_s"]

    def save_json(self) -> None:
        self.compute_limits()
        payload = {"meta": {**self.meta, "elapsed_s": time.perf_counter() - self.started}, "results": self.results}
        path = self.out / "bench.json"
        path.write_text(json.dumps(payload, indent=1, default=str))

    def finish(self) -> None:
        self.save_json()
        print_table(self.results, self.meta)
        try:
            plot(self.results, self.cases, self.meta, self.out / "bench.png")
            log(f"wrote {self.out / 'bench.json'} and {self.out / 'bench.png'}", self.started)
        except Exception as error:
            log(f"plot failed: {type(error).__name__}: {error}; wrote {self.out / 'bench.json'}", self.started)


def _error_fields(error: BaseException) -> dict:
    return {"error": f"{type(error).__name__}: {error}"[:4000],
            "traceback": "".join(traceback.format_exception(error)[-6:])[-4000:]}


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:300]


def print_table(results: list[dict], meta: dict) -> None:
    from tabulate import tabulate

    rows = []
    budget_skipped = [r for r in results if r["status"] == "skipped" and "time budget spent" in r.get("notes", [])]
    for r in results:
        if r in budget_skipped:
            continue
        note = " ".join((r.get("error") or "; ".join(r.get("notes", []))).split())
        rows.append([
            r["case"], r["label"], r["fraction_label"],
            f"{r['time_s'] * 1e3:.2f}" if r.get("time_s") else r["status"],
            f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "",
            f"{r['limit_s'] * 1e3:.2f}" if r.get("limit_s") else "",
            f"{r['efficiency']:.2f}" if r.get("efficiency") else "",
            gib(r.get("peak_device_bytes")) if r.get("peak_device_bytes") else "",
            gib(r.get("host_pinned_bytes")) if r.get("host_pinned_bytes") else "",
            f"{r['first_call_s']:.1f}" if r.get("first_call_s") else "",
            f"{r['rel_err']:.0e}" if r.get("rel_err") is not None else "",
            note[:70],
        ])
    order = {name: index for index, name in enumerate(CASES)}
    rows.sort(key=lambda row: order.get(row[0], 99))  # stable: run order within a case
    print()
    print(f"device {meta.get('device')} | torch {meta.get('torch')} | commit {meta.get('commit')} | "
          f"H2D {meta.get('h2d_bandwidth', {}).get('bytes_per_s', 0) / 1e9:.1f} GB/s")
    print(tabulate(rows, headers=["case", "system", "frac", "ms", "tok/s", "limit ms", "eff", "peak GiB",
                                  "pinned GiB", "1st call s", "rel err", "note"], disable_numparse=True))
    if budget_skipped:
        names = list(dict.fromkeys(r["system"] for r in budget_skipped))
        print(f"time budget spent before {len(budget_skipped)} case(s) of: {', '.join(names)}")
    sys.stdout.flush()


def plot(results: list[dict], cases: list[Case], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["fraction"] for r in results if r["fraction"] > 0})
    if not fractions:
        return
    columns = min(3, len(cases))
    rows = math.ceil(len(cases) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in results if r["kind"] not in RESIDENT_KINDS))
    cmap = plt.get_cmap("tab10")
    colors = {label: cmap(i % 10) for i, label in enumerate(labels)}
    for ax, case in zip(axes.flat, cases):
        mine = [r for r in results if r["case"] == case.name]
        for label in labels:
            points = sorted((r["fraction"], r["time_s"] * 1e3) for r in mine
                            if r["label"] == label and r["status"] == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", label=label, color=colors[label],
                        linestyle="-" if label.startswith("ours") else "--")
        limit = sorted({(r["fraction"], r["limit_s"] * 1e3) for r in mine if r["fraction"] > 0 and r.get("limit_s")})
        if limit:
            ax.plot(*zip(*limit), color="black", linewidth=2.5, alpha=0.5, marker="D", label="limit")
        for kind, color, style in (("resident", "black", ":"), ("resident-cg", "dimgray", "-."),
                                   ("resident-eager", "darkgray", (0, (4, 2)))):
            value = [r["time_s"] * 1e3 for r in mine if r["kind"] == kind and r["status"] == "ok"]
            if value:
                ax.axhline(value[0], color=color, linestyle=style, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xticks(fractions, [f"1/{round(1 / f)}" for f in fractions])
        ax.set_yscale("log")
        ax.set_title(f"{case.phase}: batch {case.batch} x {case.seq} tokens")
        ax.set_xlabel("fraction of layers offloaded")
        ax.set_ylabel("ms per forward")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    handles, names = {}, []
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in handles:
                handles[name] = handle
                names.append(name)
    fig.legend([handles[n] for n in names], names, loc="lower center", ncol=min(6, len(names)), fontsize=9)
    bandwidth = meta.get("h2d_bandwidth", {}).get("bytes_per_s", 0) / 1e9
    fig.suptitle(f"{meta.get('device')} | torch {meta.get('torch')} | commit {meta.get('commit')} | "
                 f"{meta.get('shape', {}).get('layers')} layers {meta.get('dtype')} | H2D {bandwidth:.1f} GB/s")
    fig.tight_layout(rect=(0, 0.08 if len(names) > 6 else 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # an outer `timeout` still gets the table, JSON and plot
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt as interrupt:
        log(f"interrupted ({interrupt}); partial results written", bench.started)


if __name__ == "__main__":
    main()

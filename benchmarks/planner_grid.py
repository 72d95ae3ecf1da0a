"""The budget planner against a measured grid: is its plan the fastest that fits, and is its prediction right?

For a Llama-8B-shaped model (``examples/llama_like.py``), each case (decode
b1, decode b64, prefill 2048 by default) and each budget (fractions of the
resident model's bytes, or sizes like ``6GiB``):

* the planner's plan, from a cost table built in this run (pinned bandwidth
  from the per-device cache, per-layer compute from a calibration that compiles
  one block at the case's shape, the rest from the roofline), and the
  activations of a fake-tensor trace;
* a grid of group patterns (the last ``n`` of every ``g`` layers, ``g`` up to
  8) x ``prefetch_step`` x {all parameters, MLP only}: for each (step,
  parameters) pair the ``--grid-per-cell`` patterns that fit the budget with the
  fewest offloaded layers (fewer copies are never slower at equal spacing), so
  the grid stays small enough to compile;
* each distinct plan is built once, compiled once per case and measured: median
  time per forward (CUDA events), peak device memory (``max_memory_allocated``
  during the timed calls), and the planner's predicted time for it; then three
  more forwards with ``runtime.start_recording()``, whose ``runtime.report()``
  stall per forward is set against the measured time minus the resident one,
  and minus the resident forward replayed as one CUDA graph (no host gaps).

Compilation dominates the run, so by default the decoder blocks are compiled
one by one (``Module.compile``; embedding and head run eagerly, the same for
every plan): Dynamo compiles one graph per shape, shared by all blocks, instead
of the whole stack per plan. In that mode the offload's eager hooks wait for
each offloaded block before it runs and start the next copy after it, which is
the same schedule at block granularity (a block graph compiled for an offloaded
block also holds the pass's ops; its waits then find the layer in, and
``runtime.report()`` counts forwards, not waits). The cost tables therefore
drop their read spans (a copy is needed at its block's start, as the hooks do)
so that predictions describe what runs.
``--compile model`` compiles the whole forward with the pass (the product's
path, read spans kept), at a much higher compile cost per plan.

Writes ``--out/planner_grid.json`` (rewritten after every plan) and prints a
markdown table: per (case, budget) the planner's plan, predicted and measured
ms, peak vs budget, the grid's best plan and the ratio.

GPU, 16 layers (about 6 minutes on an H100; at 16 layers the embedding and head
are a quarter of the model, so a 25% budget is below the smallest plan)::

    python benchmarks/planner_grid.py --layers 16 --budgets 0.4,0.55,0.75 --out out/planner16

GPU, the issue's 32 layers and 25/50/75% (block compiles do not grow with the
layer count; the forwards and the weight moves do)::

    python benchmarks/planner_grid.py --layers 32 --out out/planner32

CPU smoke test::

    python benchmarks/planner_grid.py --device cpu --tiny --layers 4 --cases decode1,prefill64 \\
        --budgets 0.6,0.8 --compiler aot_eager --iters 2 --out /tmp/planner
"""

from __future__ import annotations

import argparse
import json
import signal
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
    device_name,
    git_commit,
    log,
    peak_bytes,
    release_memory,
    reset_peak,
    time_calls,
)

add_repo_to_path()
import llama_like  # noqa: E402  (examples/llama_like.py)

from prefetch_compile.calibration import (  # noqa: E402
    calibrated_cost_table,
    chunk_reads,
    device_profile,
    read_spans,
    roofline_cost_table,
    trace_forward,
)
from prefetch_compile.cost_model import CostTable  # noqa: E402
from prefetch_compile.config import OptionError, PlanOptions, parse_bytes  # noqa: E402
from prefetch_compile.offload import offload_with_options  # noqa: E402
from prefetch_compile.planner import (  # noqa: E402
    MAX_GROUP,
    copied_bytes,
    device_bytes,
    group_indices,
    measure_footprint,
    options_for,
    plan_for_budget,
    predict,
)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int


def parse_case(name: str) -> Case:
    """decodeN: N sequences of one token; prefillN: one sequence of N tokens."""
    for prefix in ("decode", "prefill"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            size = int(name[len(prefix):])
            return Case(name, size, 1) if prefix == "decode" else Case(name, 1, size)
    raise SystemExit(f"bad case {name!r}: use decodeN or prefillN")


@dataclass(frozen=True)
class PlanKey:
    """One plan of the search space: offloaded layers, parameter filter, slots. Empty layers: resident."""

    names: tuple[str, ...]
    indices: tuple[int, ...]
    step: int

    @property
    def label(self) -> str:
        if not self.indices:
            return "resident"
        what = "mlp" if self.names else "all"
        return f"{len(self.indices)} layers {list(self.indices)} {what} s{self.step}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, "decoder layers (32 = Llama 8B)")
    p.add_argument("--cases", default="decode1,decode64,prefill2048")
    p.add_argument("--budgets", default="0.25,0.5,0.75",
                   help="comma list: fractions (< 1) of the resident model's bytes, or sizes such as 6GiB")
    p.add_argument("--steps", default="1,2", help="grid: prefetch_step values")
    p.add_argument("--grid-per-cell", type=int, default=1,
                   help="grid: fitting patterns per (budget, case, step, parameters), fewest offloaded layers first")
    p.add_argument("--calibrate", type=int, default=1, help="1: compile and time one block per case; 0: roofline only")
    p.add_argument("--compile", default="block", choices=["block", "model"])
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--iters", type=int, default=10, help="timed forwards per plan and case")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip the plans left once this many seconds are spent")
    p.add_argument("--plan-only", action="store_true", help="print the planner's plans and the grid; measure nothing")
    p.add_argument("--cache-dir", default=None, help="device profile cache (default ~/.cache/prefetch_compile)")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default="planner_out")
    return p.parse_args(argv)


class PlannerGrid:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = bench_device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.shape = bench_shape(args.layers, args.tiny)
        self.cases = [parse_case(name.strip()) for name in args.cases.split(",") if name.strip()]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.meta: dict = {}
        self.costs: dict = {}
        self.activations: dict[str, int] = {}
        self.cells: list[dict] = []  # one per (case, budget): the planner's plan and this cell's grid
        self.measured: dict[tuple[PlanKey, str], dict] = {}
        self.reference: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ planning
    def prepare(self) -> None:
        args = self.args
        with torch.device("meta"):
            model = llama_like.LlamaLikeDecoder(self.shape).to(self.dtype)
        self.footprint = measure_footprint(model, self.device.type)
        profile = device_profile(self.device, cache_dir=args.cache_dir)
        self.meta = {
            "device": device_name(self.device),
            "torch": torch.__version__,
            "commit": git_commit(args.commit),
            "shape": asdict(self.shape),
            "dtype": args.dtype,
            "args": vars(args),
            "resident_bytes": self.footprint.resident_bytes,
            "profile": asdict(profile),
            "compile": args.compile,
        }
        log(f"{self.meta['device']} | torch {self.meta['torch']} | commit {self.meta['commit']} | "
            f"{self.shape.layers} layers, resident {self.footprint.resident_bytes / 2**30:.2f} GiB | H2D "
            f"{profile.h2d.bytes_per_s[-1] / 1e9:.1f} GB/s at {profile.h2d.sizes[-1] >> 20} MiB", self.started)
        # Every block is the same kind: calibrate on a one-layer model (built on the host, one block copied over).
        one_layer = llama_like.build(llama_like.LlamaShape(**{**asdict(self.shape), "layers": 1}), "cpu", self.dtype)
        for case in self.cases:
            tokens = torch.zeros(case.batch, case.seq, dtype=torch.long, device="meta")
            trace = trace_forward(model, (tokens,), device=self.device)
            self.activations[case.name] = trace.activation_bytes
            cost = roofline_cost_table(trace, profile)
            if args.calibrate:
                one = calibrated_cost_table(one_layer, trace_forward(one_layer, (tokens,)), profile, self.device, args.compiler)
                layers = one.layer_seconds * self.shape.layers
                spans = {names: read_spans(trace, profile, layers, names) for names in self.footprint.blocks}
                chunks = {names: chunk_reads(trace, profile, layers, names) for names in self.footprint.blocks}
                cost = CostTable(cost.bandwidth, layers, cost.outside_seconds, one.source, spans, chunks)
            if args.compile == "block":  # the eager hooks wait at the block's start and start after its end
                cost = CostTable(cost.bandwidth, cost.layer_seconds, cost.outside_seconds, cost.source)
            self.costs[case.name] = cost
            cost.to_json(self.out / f"cost_{case.name}.json")  # to re-plan offline: CostTable.from_json
            log(f"{case.name}: activations {trace.activation_bytes / 2**20:.1f} MiB, layer "
                f"{cost.layer_seconds[0] * 1e3:.3f} ms ({cost.source}), outside {cost.outside_seconds * 1e3:.3f} ms "
                f"(roofline)", self.started)
        del one_layer
        release_memory(self.device)  # also drops the calibration's compiled blocks

        for budget_text in (b.strip() for b in args.budgets.split(",") if b.strip()):
            budget = self._budget_bytes(budget_text)
            for case in self.cases:
                self.cells.append(self._cell(case, budget_text, budget))

    def _budget_bytes(self, text: str) -> int:
        try:
            fraction = float(text)
        except ValueError:
            return parse_bytes(text)
        if not 0 < fraction < 1:
            raise SystemExit(f"budget fraction {text} must lie between 0 and 1")
        return int(fraction * self.footprint.resident_bytes)

    def _cell(self, case: Case, label: str, budget: int) -> dict:
        cost, activations = self.costs[case.name], self.activations[case.name]
        cell = {"case": case.name, "budget_label": label, "budget_bytes": budget, "grid": []}
        try:
            chosen = plan_for_budget(self.footprint, cost, budget, activations)
        except OptionError as error:
            cell["planner_error"] = str(error)
            log(f"{case.name} @ {label}: {error}", self.started)
            return cell
        planner_key = self._key(chosen.options)
        cell["planner"] = planner_key
        cell["planner_options"] = str(chosen.options)
        steps = [int(s) for s in self.args.steps.split(",")]
        for names in self.footprint.blocks:
            for step in steps:
                fitting = []
                for group in range(1, min(MAX_GROUP, self.shape.layers) + 1):
                    for count in range(1, group + 1):
                        indices = group_indices(self.shape.layers, group, count)
                        if step > len(indices):
                            continue
                        if device_bytes(self.footprint, names, indices, step, activations) <= budget:
                            fitting.append((len(indices), group, PlanKey(names, indices, step)))
                for _, _, key in sorted(fitting, key=lambda item: item[:2])[: self.args.grid_per_cell]:
                    if key not in cell["grid"]:
                        cell["grid"].append(key)
        log(f"{case.name} @ {label} ({budget / 2**30:.2f} GiB): planner {planner_key.label}, predicted "
            f"{chosen.schedule.forward_seconds * 1e3:.2f} ms; grid {[key.label for key in cell['grid']]}", self.started)
        return cell

    def _key(self, options: PlanOptions | None) -> PlanKey:
        if options is None:
            return PlanKey((), (), 1)
        indices = options.offload_layers or group_indices(self.shape.layers, options.group_size, options.num_in_group)
        return PlanKey(options.offload_params, tuple(indices), options.prefetch_step)

    # ------------------------------------------------------------ measuring
    def run(self) -> None:
        self.prepare()
        wanted: dict[PlanKey, list[str]] = {PlanKey((), (), 1): [case.name for case in self.cases]}
        for cell in self.cells:  # the planner's plans before the grid's, so a time-out cuts grid plans first
            if "planner" in cell:
                wanted.setdefault(cell["planner"], []).append(cell["case"])
        # Grid plans the model predicts closest to the planner's go first: a time-out then cuts the ones
        # least likely to beat it (and says so in the table), not an arbitrary tail.
        closeness: dict[PlanKey, float] = {}
        for cell in self.cells:
            if "planner" not in cell:
                continue
            cost = self.costs[cell["case"]]
            planner_s = predict(self.footprint, cost, cell["planner"].names, cell["planner"].indices, cell["planner"].step)
            for key in cell["grid"]:
                ratio = predict(self.footprint, cost, key.names, key.indices, key.step).forward_seconds
                ratio /= planner_s.forward_seconds
                closeness[key] = min(closeness.get(key, ratio), ratio)
        for key in sorted(closeness, key=lambda k: (closeness[k], k.label)):
            for cell in self.cells:
                if key in cell["grid"]:
                    wanted.setdefault(key, []).append(cell["case"])
        log(f"{len(wanted)} distinct plans to measure, {sum(map(len, wanted.values()))} (plan, case) runs", self.started)
        if self.args.plan_only:
            return
        for key, cases in wanted.items():
            cases = [case for case in self.cases if case.name in cases]
            if time.perf_counter() - self.started > self.args.budget_s:
                for case in cases:
                    self.measured[(key, case.name)] = {"status": "skipped", "note": "time budget spent"}
                continue
            try:
                self.measure(key, cases)
            except Exception as error:  # noqa: BLE001 - record and go on with the next plan
                for case in cases:
                    self.measured.setdefault((key, case.name), {
                        "status": "error", "error": f"{type(error).__name__}: {error}"[:2000],
                        "traceback": traceback.format_exc()[-3000:]})
                log(f"{key.label}: {type(error).__name__}: {error}", self.started)
            release_memory(self.device)
            self.save()

    def measure(self, key: PlanKey, cases: list[Case]) -> None:
        model = llama_like.build(self.shape, self.device, self.dtype)
        runtime = None
        if key.indices:
            options = options_for(self.footprint, key.names, key.indices, key.step)
            runtime = offload_with_options(model, self.device, options)
            if self.args.compile == "block":
                # The hooks run eagerly around each compiled block; Dynamo would otherwise compile the runtime
                # calls they make, guarding on slot ownership, and recompile on every change of it.
                runtime.start = torch.compiler.disable(runtime.start)
                runtime.wait = torch.compiler.disable(runtime.wait)
        backend = "prefetch_offload" if runtime is not None else self.args.compiler
        compile_options = {"compiler": self.args.compiler} if runtime is not None else None
        kwargs = {"backend": backend, "dynamic": False}
        if compile_options:
            kwargs["options"] = compile_options
        if self.args.compile == "block":
            for block in model.layers:
                block.compile(**kwargs)
            forward = model
        else:
            forward = torch.compile(model, **kwargs)
        for case in cases:
            tokens = llama_like.sample_tokens(self.shape, case.batch, case.seq, self.device)
            with torch.inference_mode():
                began = time.perf_counter()
                last = forward(tokens)[:, -1].float().cpu()  # no logits stay alive into the measured peak
                first_call = time.perf_counter() - began
                forward(tokens)
                reset_peak(self.device)
                times = time_calls(lambda: forward(tokens), self.args.iters, self.device)
                peak = peak_bytes(self.device)
                copies = None
                gpu_only = None if key.indices else self._graphed_seconds(forward, tokens)
                if runtime is not None:  # a few more forwards with the copy recorder on, for runtime.report()
                    runtime.start_recording()
                    time_calls(lambda: forward(tokens), 3, self.device)
                    copies = runtime.report()
                    runtime.stop_recording()
            if not key.indices:
                self.reference[case.name] = last
            reference = self.reference.get(case.name)
            cost = self.costs[case.name]
            schedule = predict(self.footprint, cost, key.names, key.indices, key.step) if key.indices else None
            predicted = schedule.forward_seconds if schedule else cost.outside_seconds + sum(cost.layer_seconds)
            record = {
                "status": "ok",
                "plan": key.label,
                "time_s": sorted(times)[len(times) // 2],
                "times_s": times,
                "first_call_s": first_call,
                "peak_device_bytes": peak,
                "predicted_s": predicted,
                "predicted_device_bytes": device_bytes(
                    self.footprint, key.names, key.indices, key.step, self.activations[case.name]
                ) if key.indices else self.footprint.resident_bytes + self.activations[case.name],
                "copied_bytes": copied_bytes(self.footprint, key.names, key.indices, key.step) if key.indices else 0,
                "predicted_stall_s": schedule.stall_seconds if schedule else 0.0,
                "rel_err_vs_resident": (
                    float((last - reference).norm() / reference.norm()) if reference is not None and key.indices else None
                ),
                "gpu_only": gpu_only,
                "stats": asdict(runtime.stats()) if runtime is not None else None,
                "report": None if copies is None else {
                    "forwards": copies.forwards, "copies": copies.copies, "copied_bytes": copies.copied_bytes,
                    "bandwidth": copies.bandwidth, "stall_per_forward_s": copies.stall_per_forward,
                    "misses": copies.misses, "table": copies.render(),
                },
            }
            resident = self.measured.get((PlanKey((), (), 1), case.name), {})
            if copies is not None and resident.get("time_s") is not None:
                # The report's stalls should add up to what offloading cost: measured minus compute-only.
                record["excess_over_resident_s"] = record["time_s"] - resident["time_s"]
                if (resident.get("gpu_only") or {}).get("time_s") is not None:
                    record["excess_over_gpu_only_s"] = record["time_s"] - resident["gpu_only"]["time_s"]
            self.measured[(key, case.name)] = record
            stall = "" if copies is None else (
                f", report: stall {copies.stall_per_forward * 1e3:.2f} ms/forward vs measured-resident "
                f"{record.get('excess_over_resident_s', float('nan')) * 1e3:.2f} ms, {copies.misses} misses")
            log(f"{key.label} {case.name}: {record['time_s'] * 1e3:.2f} ms (predicted {predicted * 1e3:.2f}), peak "
                f"{(peak or 0) / 2**30:.2f} GiB (predicted {record['predicted_device_bytes'] / 2**30:.2f}), first call "
                f"{first_call:.1f} s{stall}", self.started)

    def _graphed_seconds(self, forward, tokens: torch.Tensor) -> dict | None:
        """The resident forward as one CUDA graph: its time without the host's launch gaps (None on the CPU).

        Blocks compiled one by one leave decode host-bound (the GPU waits for
        Python between blocks), so the resident forward's time is not its compute
        time; an offloaded forward hides part of that host time in its stalls.
        A replay of the whole forward has no host gaps: it is the compute-only
        time that the report's stalls are set against (``excess_over_gpu_only_s``).
        """
        if self.device.type != "cuda":
            return None
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward(tokens)
            times = time_calls(graph.replay, self.args.iters, self.device)
            del graph
            return {"time_s": sorted(times)[len(times) // 2], "times_s": times}
        except Exception as error:  # recorded, never fatal: the eager-resident comparison still stands
            return {"error": f"{type(error).__name__}: {error}"[:500]}

    # ------------------------------------------------------------ reporting
    def summary(self) -> list[dict]:
        rows = []
        for cell in self.cells:
            row = {"case": cell["case"], "budget": cell["budget_label"], "budget_bytes": cell["budget_bytes"]}
            if "planner_error" in cell:
                rows.append({**row, "planner": cell["planner_error"]})
                continue
            mine = self.measured.get((cell["planner"], cell["case"]), {})
            row.update(planner=cell["planner"].label, planner_options=cell["planner_options"],
                       planner_status=mine.get("status", "not run"))
            if mine.get("status") == "ok":
                row.update(predicted_s=mine["predicted_s"], measured_s=mine["time_s"],
                           prediction_error=mine["predicted_s"] / mine["time_s"] - 1,
                           peak_bytes=mine["peak_device_bytes"],
                           within_budget=mine["peak_device_bytes"] is None or mine["peak_device_bytes"] <= cell["budget_bytes"],
                           report_stall_s=(mine["report"] or {}).get("stall_per_forward_s"),
                           excess_over_resident_s=mine.get("excess_over_resident_s"),
                           excess_over_gpu_only_s=mine.get("excess_over_gpu_only_s"))
            grid = []
            for key in cell["grid"]:
                result = self.measured.get((key, cell["case"]), {})
                fits = result.get("status") == "ok" and (
                    result["peak_device_bytes"] is None or result["peak_device_bytes"] <= cell["budget_bytes"])
                grid.append({"plan": key.label, "status": result.get("status", "not run"), "time_s": result.get("time_s"),
                             "peak_bytes": result.get("peak_device_bytes"), "fits": fits})
            row["grid"] = grid
            fitting = [g for g in grid if g["fits"]]
            if fitting:
                best = min(fitting, key=lambda g: g["time_s"])
                row.update(grid_best=best["plan"], grid_best_s=best["time_s"])
                if "measured_s" in row:
                    row["planner_vs_grid"] = row["measured_s"] / best["time_s"]
            rows.append(row)
        return rows

    def save(self) -> None:
        payload = {
            "meta": {**self.meta, "elapsed_s": time.perf_counter() - self.started},
            "costs": {name: cost.to_dict() for name, cost in self.costs.items()},
            "activation_bytes": self.activations,
            "measured": [{"plan": key.label, "case": case, "offload_params": list(key.names),
                          "layers": list(key.indices), "prefetch_step": key.step, **record}
                         for (key, case), record in self.measured.items()],
            "summary": self.summary(),
        }
        (self.out / "planner_grid.json").write_text(json.dumps(payload, indent=1, default=str))

    def print_table(self) -> None:
        print()
        print(f"device {self.meta.get('device')} | torch {self.meta.get('torch')} | commit {self.meta.get('commit')} | "
              f"{self.shape.layers} layers | compile {self.args.compile}, grid per cell {self.args.grid_per_cell}")
        print()
        print("| case | budget GiB | planner plan | predicted ms | measured ms | error | peak GiB | grid best | grid ms "
              "| planner/grid | report stall / (measured - resident) ms | ... / (measured - resident graphed) ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in self.summary():
            budget = f"{row['budget_bytes'] / 2**30:.2f} ({row['budget']})"
            if "planner_options" not in row:
                print(f"| {row['case']} | {budget} | {row['planner']} | | | | | | | | |")
                continue
            cells = [row["case"], budget, row["planner"]]
            if "measured_s" in row:
                cells += [f"{row['predicted_s'] * 1e3:.2f}", f"{row['measured_s'] * 1e3:.2f}",
                          f"{row['prediction_error']:+.1%}",
                          "-" if row["peak_bytes"] is None else
                          f"{row['peak_bytes'] / 2**30:.2f}" + ("" if row["within_budget"] else " OVER")]
            else:
                cells += [row["planner_status"], "", "", ""]
            if "grid_best_s" in row:
                cells += [row["grid_best"], f"{row['grid_best_s'] * 1e3:.2f}",
                          f"{row['planner_vs_grid']:.3f}" if "planner_vs_grid" in row else ""]
            else:
                cells += ["(none measured fits)", "", ""]
            for excess in ("excess_over_resident_s", "excess_over_gpu_only_s"):
                if row.get("report_stall_s") is not None and row.get(excess) is not None:
                    cells.append(f"{row['report_stall_s'] * 1e3:.2f} / {row[excess] * 1e3:.2f}")
                else:
                    cells.append("")
            print("| " + " | ".join(cells) + " |")
        print()
        print(f"wrote {self.out / 'planner_grid.json'} after {time.perf_counter() - self.started:.0f} s")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # an outer `timeout` still gets the JSON and the table
    grid = PlannerGrid(args)
    try:
        grid.run()
    except KeyboardInterrupt as interrupt:
        log(f"interrupted ({interrupt}); partial results written", grid.started)
    finally:
        grid.save()
        grid.print_table()


if __name__ == "__main__":
    main()

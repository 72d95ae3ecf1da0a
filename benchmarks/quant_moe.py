"""Quantized and mixture-of-experts models in HF ``generate``: offloaded vs resident compiled, against the link limit.

Issue 13's GPU check, in one process; every variant is a fresh build from one seed, run, then freed:

* ``quant:KIND``: ``LlamaForCausalLM`` with Llama-8B layer shapes (``--layers`` of them), its decoder
  layers' ``Linear`` weights quantized by torchao's ``quantize_`` (embedding and head stay dense):
  ``int4`` = ``Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")``
  (tinygemm's layout; on the CPU ``IntxWeightOnlyConfig`` int4, torchao's CPU path), ``float8`` =
  ``Float8WeightOnlyConfig()``, ``int8`` = ``Int8WeightOnlyConfig()``.
* ``moe``: ``MixtralForCausalLM`` (``Qwen3MoeForCausalLM`` if Mixtral does not build) with
  ``--experts`` experts per layer, top ``--top-k``, its default ``experts_implementation``
  (``grouped_mm``; recent transformers' ``generate`` runs the decoding steps on a GPU with
  ``batched_mm`` instead, which gathers the chosen experts' weights; ``--experts-implementation``
  sets it, e.g. to check ``batched_mm`` on the CPU).

Systems, each compiling ``model.forward`` (``generate`` calls the model, not a compiled wrapper):

* ``resident``: ``torch.compile(model.forward)``, Inductor's default mode, nothing offloaded;
* ``ours``: the README's one line, ``backend="prefetch_offload"``, the last layer of every 2
  offloaded, ``prefetch_step`` 2, experts only for the MoE (``offload_params=["experts"]``);
  ``+ graphs`` adds ``cuda_graphs=True``.

Per variant, greedy ``generate`` with a static cache and ``--tokens`` new tokens on a fixed prompt:
the first generate compiles; the second warms up (and captures, with graphs) and keeps its logits;
ms per token is the best of ``--repeats`` more, CUDA-synchronised wall clock over the generate
divided by its forwards (the prefill is one of them, and like every decoding step it copies each
offloaded layer once). Link limit = bytes copied per forward (the quantized leaves' bytes of the
layers that share a slot, ``runtime.plan.copied_bytes_per_forward()``) / pinned host-to-device
bandwidth measured in the same run;
efficiency = limit / measured. Tokens are compared with the resident variant of the same family;
where they part, the resident model's logit margin between the two tokens, next to the largest logit
difference up to that step, says whether it was a near-tie that a rounding difference flipped.

torchao's ``quantize_`` sets Inductor flags for the whole process by default (coordinate-descent
tuning, which lengthens every later compile); they are left off (``set_inductor_config=False``), so
every variant compiles with Inductor's defaults; ``--torchao-inductor-config`` turns them on.

Each variant runs in try/except: its error goes into the JSON and the next one runs. Variants run in
order of what the issue needs most (the first ``--quant`` kind and the MoE first), and one whose
expected time (the longest finished variant of its kind) would end past ``--budget-s`` is skipped.
The JSON (``--out``/quant_moe.json) is rewritten after every variant.

GPU (torchao on PYTHONPATH; the default budget keeps int4 and the MoE, ``--budget-s 420`` adds float8)::

    python3 benchmarks/quant_moe.py --out out/quant_moe

CPU smoke test::

    python benchmarks/quant_moe.py --device cpu --tiny --quant int8,int4 --out /tmp/quant_moe
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import (  # noqa: E402
    add_repo_to_path,
    allocated_bytes,
    bench_device,
    device_name,
    git_commit,
    log,
    measure_h2d_bandwidth,
    peak_bytes,
    release_memory,
    reset_peak,
    timed_call,
)

add_repo_to_path()
import prefetch_compile  # noqa: E402
from prefetch_compile.leaves import leaf_bytes, tensor_leaves  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
LLAMA_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
MOE_VOCAB, MOE_VOCAB_TINY = 32000, 512
PROMPT_VOCAB = 512  # prompt tokens are drawn below every family's vocabulary
OFFLOAD_PLAN = {"group_size": 2, "num_in_group": 1}
QUANT_KINDS = ("int4", "float8", "int8")


@dataclass(frozen=True)
class Variant:
    family: str  # "quant:int4", "quant:float8", "moe"
    system: str  # "resident" or "ours"
    cuda_graphs: bool = False

    @property
    def name(self) -> str:
        return f"{self.family} {self.system}{' + graphs' if self.cuda_graphs else ''}"

    @property
    def cost_key(self) -> tuple[str, str]:
        """What predicts a variant's time: quantized Llama or MoE, and the system."""
        return self.family.split(":")[0], self.system


def variant_order(args: argparse.Namespace) -> list[Variant]:
    """Most needed first: one quantized family and the MoE, each resident then ours; extras after them,
    so that a budget cut drops the extras."""
    quants = [f"quant:{kind}" for kind in args.quant]
    quant_graphs, moe_graphs = args.quant_cuda_graphs, args.cuda_graphs

    def pair(family: str, graphs: bool) -> list[Variant]:
        return [Variant(family, "resident"), Variant(family, "ours", graphs)]

    variants = [variant for family in quants[:1] for variant in pair(family, quant_graphs[0])]
    if args.moe_layers:
        variants += pair("moe", moe_graphs[0]) + [Variant("moe", "ours", graphs) for graphs in moe_graphs[1:]]
    variants += [variant for family in quants[1:] for variant in pair(family, quant_graphs[0])]
    variants += [Variant(family, "ours", graphs) for family in quants for graphs in quant_graphs[1:]]
    return variants


# ----------------------------------------------------------------------------- models
def _instantiate(config: Any, args: argparse.Namespace, device: torch.device) -> nn.Module:
    import transformers

    torch.manual_seed(args.seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=args.dtype).eval()


def build_llama(args: argparse.Namespace, device: torch.device) -> nn.Module:
    import transformers

    dims = LLAMA_TINY if args.tiny else LLAMA_8B
    config = transformers.LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, **dims)
    return _instantiate(config, args, device)


def moe_config(args: argparse.Namespace, model: str) -> Any:
    import transformers

    hidden, intermediate = (64, 128) if args.tiny else (args.moe_hidden, args.moe_intermediate)
    heads = 4 if args.tiny else hidden // 128
    dims = dict(
        vocab_size=MOE_VOCAB_TINY if args.tiny else MOE_VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.moe_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4) if not args.tiny else 2,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4096,
    )
    if args.experts_implementation:
        dims["experts_implementation"] = args.experts_implementation
    if model == "mixtral":
        return transformers.MixtralConfig(num_local_experts=args.experts, **dims)
    # Every layer sparse, each expert as wide as Mixtral's would be.
    return transformers.Qwen3MoeConfig(
        num_experts=args.experts, moe_intermediate_size=intermediate, head_dim=hidden // heads,
        decoder_sparse_step=1, mlp_only_layers=[], **dims,
    )


def build_moe(args: argparse.Namespace, device: torch.device) -> nn.Module:
    if args.moe_model == "qwen3_moe":
        return _instantiate(moe_config(args, "qwen3_moe"), args, device)
    try:
        return _instantiate(moe_config(args, "mixtral"), args, device)
    except Exception as error:  # the issue accepts either model; say which one ran
        log(f"MixtralForCausalLM did not build ({type(error).__name__}: {error}); using Qwen3MoeForCausalLM")
        release_memory(device)
        return _instantiate(moe_config(args, "qwen3_moe"), args, device)


def quant_config(kind: str, device: torch.device, set_inductor_config: bool) -> Any:
    from torchao import quantization

    flags = {"set_inductor_config": set_inductor_config}
    if kind == "int8":
        return quantization.Int8WeightOnlyConfig(**flags)
    if kind == "float8":
        return quantization.Float8WeightOnlyConfig(**flags)
    if device.type == "cuda":
        # tinygemm's layout (torch's own _weight_int4pack_mm); the default "plain" format needs the mslk package.
        return quantization.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d", **flags)
    from torchao.quantization.granularity import PerGroup

    # torchao's CPU int4 weight-only path: 4-bit values stored unpacked in int8, per-group scales.
    return quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def build_quantized(kind: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    from torchao.quantization import quantize_

    model = build_llama(args, device)
    in_layers = lambda module, fqn: isinstance(module, nn.Linear) and fqn.startswith("model.layers.")  # noqa: E731
    quantize_(model, quant_config(kind, device, args.torchao_inductor_config), filter_fn=in_layers)
    return model


def build(family: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    if family == "moe":
        return build_moe(args, device)
    return build_quantized(family.split(":")[1], args, device)


def fingerprint(model: nn.Module) -> float:
    """Sum of every leaf's absolute values: the same for each build of a family, or its variants ran different weights."""
    with torch.no_grad():
        return sum(leaf.float().abs().sum(dtype=torch.float64).item() for p in model.parameters() for _, leaf in tensor_leaves(p))


def compile_forward(model: nn.Module, variant: Variant, args: argparse.Namespace) -> None:
    if variant.system == "resident":
        model.forward = torch.compile(model.forward, backend=args.compiler)
        return
    options: dict[str, Any] = {**OFFLOAD_PLAN, "prefetch_step": args.prefetch_step, "cuda_graphs": variant.cuda_graphs}
    if variant.family == "moe":
        options["offload_params"] = ["experts"]
    if args.compiler != "inductor":
        options["compiler"] = args.compiler
    model.forward = torch.compile(model.forward, backend="prefetch_offload", options=options)


# ----------------------------------------------------------------------------- one variant
@dataclass
class Outcome:
    """What one variant measured (``record``, for the JSON) and what the comparison needs (not in the JSON)."""

    record: dict[str, Any]
    tokens: list[int]
    logits: torch.Tensor  # [tokens, vocab], float32, on the CPU


def run_variant(variant: Variant, args: argparse.Namespace, device: torch.device, prompt: torch.Tensor,
                runtimes: list[weakref.ref]) -> Outcome:
    """Build, compile, generate; ``runtimes`` receives a weak reference to the offload runtime, to check it is freed."""
    reset_peak(device)
    build_s, model = timed_call(lambda: build(variant.family, args, device), device)
    record: dict[str, Any] = {
        "model": type(model).__name__,
        "build_s": build_s,
        "parameter_bytes": sum(leaf_bytes(p) for p in model.parameters()),
        "fingerprint": fingerprint(model),
    }
    if variant.family == "moe":
        record["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    compile_forward(model, variant, args)
    settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                    cache_implementation="static", pad_token_id=0)
    generate: Callable[..., Any] = lambda **extra: model.generate(prompt, **settings, **extra)  # noqa: E731
    with torch.inference_mode():
        record["first_generate_s"], _ = timed_call(generate, device)  # compiles
        checked = generate(return_dict_in_generate=True, output_logits=True)  # warm-up; captures with graphs
        runtime = prefetch_compile.runtime_of(model)
        if runtime is not None:
            runtimes.append(weakref.ref(runtime))
            runtime.counters.reset()
        times, repeats_equal = [], True
        tokens = checked.sequences[0, prompt.shape[1]:].tolist()
        for _ in range(args.repeats):
            seconds, out = timed_call(generate, device)
            times.append(seconds)
            repeats_equal &= out[0, prompt.shape[1]:].tolist() == tokens
    record.update(
        ms_per_token=1e3 * min(times) / args.tokens,
        ms_per_token_all=[1e3 * t / args.tokens for t in times],
        repeats_equal_to_warmup=repeats_equal,
        peak_device_bytes=peak_bytes(device),
    )
    if runtime is not None:
        record.update(runtime_record(runtime, forwards=args.repeats * args.tokens))
    logits = torch.stack(checked.logits)[:, 0].float().cpu()
    return Outcome(record, tokens, logits)


def runtime_record(runtime: prefetch_compile.PrefetchRuntime, forwards: int) -> dict[str, Any]:
    """The runtime's stats, and its copy counters over the timed generates (``forwards`` forwards).

    Copies inside a CUDA graph replay run no Python and are not counted; without graphs each forward
    should copy every offloaded layer once, with no ensure-path misses.
    """
    stats = runtime.stats()
    counters = runtime.counters
    return {
        "offloaded_layers": stats.offloaded_layers,
        "total_layers": stats.total_layers,
        "offloaded_bytes": stats.offloaded_bytes,
        "copied_bytes": runtime.plan.copied_bytes_per_forward(),
        "host_pinned_bytes": stats.host_pinned_bytes,
        "slot_pool_bytes": stats.slot_pool_bytes,
        "kept_device_bytes": stats.kept_device_bytes,
        "offloaded_params_sample": sorted(runtime.offloaded_params)[:4],
        "graphs_compiled": len(runtime.compiles),
        "timed_copies": counters.copies,
        "timed_copies_per_forward": counters.copies / forwards,
        "timed_ensure_misses": counters.ensure_misses,
        "timed_restores": counters.restores,
    }


def compare(got: Outcome, want: Outcome) -> dict[str, Any]:
    """Greedy tokens against the resident ones; where they part, whether the logits explain it.

    Step t's logits come from the prompt and the first t new tokens, so up to the first differing
    token both models saw the same inputs and their logits are comparable.
    """
    count = min(len(got.tokens), len(want.tokens))
    parted = next((i for i in range(count) if got.tokens[i] != want.tokens[i]), None)
    shared = count if parted is None else parted + 1
    result: dict[str, Any] = {
        "new_tokens_equal": sum(a == b for a, b in zip(got.tokens, want.tokens)),
        "new_tokens": count,
        "first_divergence": parted,
        "max_logit_diff": (got.logits[:shared] - want.logits[:shared]).abs().max().item(),
        "logit_scale": want.logits[:shared].abs().max().item(),
    }
    if parted is not None:
        # How close the resident model was to choosing our token: a near-tie if below max_logit_diff.
        row = want.logits[parted]
        result["resident_margin_at_divergence"] = (row[want.tokens[parted]] - row[got.tokens[parted]]).item()
    return result


# ----------------------------------------------------------------------------- driver
class Budget:
    """Skips a variant that would end past the budget, judged by the longest finished variant of its kind."""

    def __init__(self, seconds: float, started: float) -> None:
        self.seconds, self.started = seconds, started
        self.durations: dict[tuple[str, str], float] = {}

    def expected(self, variant: Variant) -> float:
        return self.durations.get(variant.cost_key, max(self.durations.values(), default=0.0))

    def allows(self, variant: Variant) -> bool:
        return time.perf_counter() - self.started + self.expected(variant) <= self.seconds

    def finished(self, variant: Variant, seconds: float) -> None:
        self.durations[variant.cost_key] = max(seconds, self.durations.get(variant.cost_key, 0.0))


def attempt(
    variant: Variant, args: argparse.Namespace, device: torch.device, prompt: torch.Tensor
) -> tuple[dict, Outcome | None]:
    """Run one variant, never raising: a failure is recorded with its traceback, then the memory is released either way."""
    runtimes: list[weakref.ref] = []
    began = time.perf_counter()
    try:
        outcome = run_variant(variant, args, device, prompt, runtimes)
        record = {"status": "ok", **outcome.record}
    except Exception as error:  # noqa: BLE001 - one variant's failure must not cost the others
        outcome = None
        record = {"status": "error", "error": f"{type(error).__name__}: {error}"[:2000],
                  "traceback": traceback.format_exc()[-6000:]}
    try:  # after a CUDA error even this may raise; the record must still reach the JSON
        release_memory(device)
        record["device_bytes_after_release"] = allocated_bytes(device)
    except Exception as error:  # noqa: BLE001
        record["release_error"] = f"{type(error).__name__}: {error}"[:2000]
    record["seconds"] = time.perf_counter() - began
    record["runtime_freed"] = all(ref() is None for ref in runtimes) if runtimes else None
    return record, outcome


def bandwidth(device: torch.device) -> dict:
    return measure_h2d_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 24)


def versions() -> dict[str, str | None]:
    import transformers

    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "torchao": torchao_version,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def write_report(out: Path, report: dict) -> None:
    """Atomically, so that a run killed mid-write leaves the previous complete file."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "quant_moe.json.partial"
    partial.write_text(json.dumps(report, indent=1, default=str))
    partial.replace(out / "quant_moe.json")


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(records: list[dict]) -> str:
    lines = [
        "| variant | ms/token | link limit ms | efficiency | x resident | new tokens equal (first divergence) "
        "| offloaded GB | copies/forward | first generate s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["status"] != "ok":
            reason = r["error"].splitlines()[0][:120] if r["status"] == "error" else "budget"
            lines.append(f"| {r['variant']} | {r['status']}: {reason} | | | | | | | | |")
            continue
        match = r.get("match")
        equal = f"{match['new_tokens_equal']}/{match['new_tokens']} ({match['first_divergence']})" if match else "-"
        peak, offloaded = r["peak_device_bytes"], r.get("offloaded_bytes")
        cells = [
            r["variant"], _cell(r["ms_per_token"]), _cell(r.get("limit_ms_per_token")), _cell(r.get("efficiency")),
            _cell(r.get("x_resident")), equal, _cell(offloaded / 1e9 if offloaded else None),
            _cell(r.get("timed_copies_per_forward"), 1), _cell(r["first_generate_s"], 1),
            _cell(None if peak is None else peak / 2**30, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_limits(report: dict, link_bytes_per_s: float) -> None:
    """Each offloaded variant's link limit (bytes copied per forward over the link) and efficiency."""
    report["h2d_bytes_per_s"] = link_bytes_per_s
    for record in report["variants"]:
        if record["status"] == "ok" and record.get("copied_bytes"):
            record["limit_ms_per_token"] = 1e3 * record["copied_bytes"] / link_bytes_per_s
            record["efficiency"] = record["limit_ms_per_token"] / record["ms_per_token"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = lambda text: [bool(int(x)) for x in text.split(",")]  # noqa: E731
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke test)")
    p.add_argument("--quant", default="int4,float8", help=f"comma list of {', '.join(QUANT_KINDS)}; empty: none")
    p.add_argument("--layers", type=int, default=None, help="quantized Llama layers (default 16, tiny 8)")
    p.add_argument("--moe-layers", type=int, default=None, help="MoE layers (default 8, tiny 8); 0: no MoE")
    p.add_argument("--moe-model", choices=("mixtral", "qwen3_moe"), default="mixtral")
    p.add_argument("--moe-hidden", type=int, default=4096)
    p.add_argument("--moe-intermediate", type=int, default=4096, help="each expert's intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts-implementation", default=None,
                   help="HF's experts_implementation (default: the model's, grouped_mm; HF generate may switch its "
                        "decoding steps to batched_mm on a GPU)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generate")
    p.add_argument("--prompt", type=int, default=16, help="prompt length")
    p.add_argument("--repeats", type=int, default=3, help="timed generates per variant (after two untimed)")
    p.add_argument("--prefetch-step", type=int, default=2)
    p.add_argument("--cuda-graphs", type=flags, default=[False, True], help="ours on the MoE: 0,1 = without and with")
    p.add_argument("--quant-cuda-graphs", type=flags, default=[False], help="ours on the quantized models")
    p.add_argument("--compiler", default="inductor", help="resident backend and ours' inner compiler (CPU: aot_eager is faster)")
    p.add_argument("--torchao-inductor-config", action="store_true", help="let quantize_ set its Inductor flags")
    p.add_argument("--budget-s", type=float, default=220.0, help="skip variants expected to end past this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("quant_moe_out"))
    args = p.parse_args(argv)
    args.quant = [kind for kind in args.quant.split(",") if kind]
    if unknown := sorted(set(args.quant) - set(QUANT_KINDS)):
        p.error(f"--quant: unknown kind(s) {unknown}; choose from {QUANT_KINDS}")
    args.layers = args.layers if args.layers is not None else (8 if args.tiny else 16)
    args.moe_layers = args.moe_layers if args.moe_layers is not None else 8
    if args.device == "cpu":  # cuda_graphs is ignored on the CPU: the variants would repeat
        args.cuda_graphs, args.quant_cuda_graphs = [False], [False]
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = bench_device(args.device)
    budget = Budget(args.budget_s, started)
    h2d_before = bandwidth(device)
    prompt = torch.randint(3, PROMPT_VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    report: dict[str, Any] = {
        "device": device_name(device), **versions(), "commit": git_commit(None),
        "args": {key: value for key, value in vars(args).items() if key != "out"}, "h2d_before": h2d_before,
        "variants": [],
    }
    log(f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}, torchao {report['torchao']}; "
        f"pinned H2D {h2d_before['bytes_per_s'] / 1e9:.1f} GB/s", started)
    references: dict[str, Outcome] = {}
    for variant in variant_order(args):
        record: dict[str, Any] = {"variant": variant.name, "family": variant.family, "system": variant.system,
                                  "cuda_graphs": variant.cuda_graphs}
        if not budget.allows(variant):
            record.update(status="skipped", expected_s=budget.expected(variant))
            log(f"{variant.name}: skipped, expected {budget.expected(variant):.0f}s would pass the "
                f"{args.budget_s:.0f}s budget", started)
        else:
            result, outcome = attempt(variant, args, device, prompt)
            record.update(result)
            budget.finished(variant, record["seconds"])
            if outcome is not None and variant.system == "resident":
                references[variant.family] = outcome
            elif outcome is not None and variant.family in references:
                record["match"] = compare(outcome, references[variant.family])
                record["resident_fingerprint_equal"] = record["fingerprint"] == references[variant.family].record["fingerprint"]
                record["x_resident"] = record["ms_per_token"] / references[variant.family].record["ms_per_token"]
            log(f"{variant.name}: {record['status']} in {record['seconds']:.0f}s "
                + (f"{record['ms_per_token']:.2f} ms/token, first generate {record['first_generate_s']:.1f}s, "
                   f"match {record.get('match')}" if outcome else record.get("error", "")), started)
        report["variants"].append(record)
        add_limits(report, h2d_before["bytes_per_s"])
        write_report(args.out, report)
    try:
        report["h2d_after"] = bandwidth(device)
        # The faster of the two measurements gives the lower limit, so that efficiency is never flattered.
        link = max(h2d_before["bytes_per_s"], report["h2d_after"]["bytes_per_s"])
    except Exception as error:  # noqa: BLE001 - a CUDA error in a variant must not cost the table
        report["h2d_after"] = {"error": f"{type(error).__name__}: {error}"}
        link = h2d_before["bytes_per_s"]
    add_limits(report, link)
    report["wall_s"] = time.perf_counter() - started
    write_report(args.out, report)
    print(f"\n{report['device']}, pinned H2D {link / 1e9:.1f} GB/s, {args.tokens} new tokens, wall {report['wall_s']:.0f}s\n")
    print(table(report["variants"]))
    return report


if __name__ == "__main__":
    main()

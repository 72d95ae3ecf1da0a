"""HF ``LlamaForCausalLM.generate`` with a static KV cache: ms per token, offloaded vs resident, graphs vs none.

The workload a serving user runs: Llama-8B layer shapes (``--layers`` of them,
bf16), greedy ``generate`` with ``cache_implementation="static"``, its
``forward`` compiled. Variants:

* ``resident``: nothing offloaded, ``torch.compile(model.forward)`` (Inductor,
  ``mode="default"``: ``reduce-overhead`` segfaulted on this decode in torch 2.11);
* ``sN`` / ``sN+cg``: ``backend="prefetch_offload"`` with every other layer
  offloaded (``group_size=2``), ``prefetch_step=N``, without and with ``cuda_graphs``;
* ``--peers`` (``accelerate``, ``diffusers``): the same layers offloaded by
  ``accelerate.cpu_offload`` or diffusers' block-level group offloading with a
  stream (set up as in ``offload_systems.py``), ``forward`` compiled by Inductor,
  their best supported mode. A peer that cannot run is reported and left out.

All variants live in one process, each its own model, and are timed in rounds,
one ``generate`` each per round, in turn and then in reverse order, so that drift
over the run (clocks, the host) falls on all alike; a variant run after the
others in a fresh build can differ from them by a few percent (2026-12-02). Per
step, the per-round ratio graphs / none says whether graphs lose.

Tokens are checked against the resident model's on ``--prompts`` seeded prompts.
Where a variant's greedy tokens part from the resident model's, the logits of
both at that step say whether it was a near-tie (see :func:`parting`). The link
limit is the bytes copied per token (those of the offloaded layers that share a
slot: a layer alone in its slot is copied once and stays) over the pinned
host-to-device bandwidth measured in the same run; overlap efficiency is limit /
measured.

    python benchmarks/hf_decode.py --layers 8 --out bench_out
    python benchmarks/hf_decode.py --tiny --layers 4 --tokens 6 --rounds 2 --prompts 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import device_name, git_commit, log, measure_h2d_bandwidth, timed_call  # noqa: E402
from offload_systems import offloaded_indices, param_bytes, prepare_peer  # noqa: E402
from prefetch_compile.timeline import COPY, export_trace, read_gpu_events  # noqa: E402


def build(layers: int, tiny: bool, device: torch.device, dtype: torch.dtype):
    import transformers

    if tiny:
        dims = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    else:
        dims = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    config = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, **dims)
    torch.manual_seed(0)
    with device:
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    return model


def copy_stream_use(events: list, tokens: int) -> dict:
    """How busy the host-to-device copies kept the link over a profiled generate, per token.

    Idle is the time between one copy's end and the next one's start, from the
    first copy to the last: where graphs and none differ at the link limit, this
    says whether copies waited (late issue, a late slot) rather than ran slower.
    """
    copies = sorted((e for e in events if e.kind == COPY), key=lambda e: e.start)
    gaps = [max(0.0, b.start - (a.start + a.duration)) for a, b in zip(copies, copies[1:])]
    return {
        "copies_per_token": len(copies) / tokens,
        "busy_ms_per_token": sum(e.duration for e in copies) / 1e3 / tokens,
        "idle_ms_per_token": sum(gaps) / 1e3 / tokens,
        "longest_idle_ms": max(gaps, default=0.0) / 1e3,
    }


def variant_name(variant: dict) -> str:
    if variant["kind"] != "ours":
        return variant["kind"]
    return f"s{variant['step']}{'+cg' if variant['graphs'] else ''}"


def compiled_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, variant: dict):
    """A fresh model with its ``forward`` compiled as the README says for ``generate``."""
    model = build(args.layers, args.tiny, device, dtype)
    if variant["kind"] == "resident":
        model.forward = torch.compile(model.forward)
    elif variant["kind"] != "ours":
        original = model.forward
        layers = [model.model.layers[index] for index in offloaded_indices(model, group_size=2)]
        variant["copied_bytes_per_token"] = sum(param_bytes(layer) for layer in layers)  # all, every forward
        prepared = prepare_peer(variant["kind"], original, layers, device)
        # A function, not the peer's wrapper module (a module assigned to ``forward`` would become a submodule
        # and leave the method in place); ``wraps`` keeps the signature that ``generate`` inspects.
        forward = functools.wraps(original)(lambda *args, **kwargs: prepared.forward(*args, **kwargs))
        model.forward = torch.compile(forward)
        variant["notes"] = prepared.notes
    else:
        options = {"group_size": 2, "num_in_group": 1, "prefetch_step": variant["step"], "cuda_graphs": variant["graphs"]}
        model.forward = torch.compile(model.forward, backend="prefetch_offload", options=options)
    return model


def parting(resident: dict, variant: dict) -> dict | None:
    """Where a variant's greedy tokens first differ from the resident model's, and how close that step was.

    ``resident_margin``: the resident logit of its own token minus that of the variant's;
    ``variant_margin``: the same on the variant's logits, the other way round;
    ``max_diff_before``: the largest logit difference of the two over the steps before,
    the size of the rounding differences between them; ``scale``: the largest logit
    there. A margin below ``max_diff_before`` is a near-tie that rounding can flip.
    """
    new_resident, new_variant = resident["tokens"], variant["tokens"]
    step = next((i for i, (a, b) in enumerate(zip(new_resident, new_variant)) if a != b), None)
    if step is None:
        return None
    mine, theirs = new_resident[step], new_variant[step]
    ours, ref = variant["logits"], resident["logits"]
    return {
        "new_token": step,
        "resident_margin": float(ref[step, mine] - ref[step, theirs]),
        "variant_margin": float(ours[step, theirs] - ours[step, mine]),
        "max_diff_before": float((ours[:step] - ref[:step]).abs().max()) if step else 0.0,
        "scale": float(ref[: step + 1].abs().max()),
    }


def scored(model, prompt: torch.Tensor, settings: dict) -> dict:
    out = model.generate(prompt, **settings, return_dict_in_generate=True, output_logits=True)
    return {"tokens": out.sequences[0, prompt.shape[1]:].tolist(), "logits": torch.cat(out.logits).float().cpu()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=40, help="new tokens per generate")
    p.add_argument("--prompt", type=int, default=16, help="prompt length")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds, one generate per variant each")
    p.add_argument("--prompts", type=int, default=6, help="seeded prompts whose tokens are checked")
    p.add_argument("--steps", default="1,2")
    p.add_argument("--peers", default="accelerate,diffusers", help="comma list of peers to time too ('' for none)")
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    p.add_argument("--trace-tokens", type=int, default=0,
                   help="CUDA: after timing, profile one generate of this many new tokens per offloaded variant "
                        "and report the copy stream's busy and idle time per token (0: skip)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Every variant compiles LlamaForCausalLM.forward again (Dynamo guards on the instance): never fall back to eager.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    started = time.perf_counter()
    bandwidth = measure_h2d_bandwidth(device, 256 * 2**20)["bytes_per_s"]
    prompts = []
    for seed in range(args.prompts):
        torch.manual_seed(seed)
        prompts.append(torch.randint(0, 512, (1, args.prompt), device=device))
    variants = [{"kind": "resident"}]
    for step in (int(s) for s in args.steps.split(",")):
        variants += [{"kind": "ours", "step": step, "graphs": False}, {"kind": "ours", "step": step, "graphs": True}]
    variants += [{"kind": peer} for peer in args.peers.split(",") if peer]
    settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, cache_implementation="static")
    import prefetch_compile

    skipped: dict[str, str] = {}
    models = {}
    for variant in list(variants):
        name = variant_name(variant)
        try:
            model = compiled_model(args, device, dtype, variant)  # outside inference_mode, as users build
            with torch.inference_mode():
                first_s, _ = timed_call(lambda: model.generate(prompts[0], **settings), device)  # compiles, captures
                model.generate(prompts[0], **settings)
        except Exception as error:
            if variant["kind"] in ("resident", "ours"):
                raise
            log(f"{name}: left out, {type(error).__name__}: {error}", started)
            variants.remove(variant)
            skipped[name] = f"{type(error).__name__}: {error}"
            continue
        models[name] = model
        variant["first_generate_s"] = first_s
        log(f"{name}: built, first generate {first_s:.1f}s", started)

    with torch.inference_mode():
        checks = {name: [scored(model, prompt, settings) for prompt in prompts] for name, model in models.items()}

        times: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(args.rounds):
            order = list(models.items()) if round_ % 2 == 0 else list(reversed(models.items()))
            for name, model in order:
                seconds, _ = timed_call(lambda: model.generate(prompts[0], **settings), device)
                times[name].append(seconds / args.tokens)

    results = []
    for variant in variants:
        name = variant_name(variant)
        runtime = prefetch_compile.runtime_of(models[name])
        partings = [parting(ref, mine) for ref, mine in zip(checks["resident"], checks[name])]
        moved = runtime.plan.copied_bytes_per_forward() if runtime else variant.get("copied_bytes_per_token", 0)
        results.append({
            **variant,
            "name": name,
            "ms_per_token_median": 1e3 * statistics.median(times[name]),
            "ms_per_token_min": 1e3 * min(times[name]),
            "ms_per_token_rounds": [1e3 * t for t in times[name]],
            "limit_ms_per_token": 1e3 * moved / bandwidth,
            "tokens_equal": [sum(a == b for a, b in zip(ref["tokens"], mine["tokens"])) for ref, mine in zip(checks["resident"], checks[name])],
            "partings": partings,
            "counters": vars(runtime.counters).copy() if runtime else None,
            "notes": variant.get("notes", []),
        })
    if args.trace_tokens and device.type == "cuda":
        traced = dict(settings, max_new_tokens=args.trace_tokens, min_new_tokens=args.trace_tokens)
        with torch.inference_mode(), tempfile.TemporaryDirectory() as traces:  # tens of MB each: not kept
            for r in results:
                if r["kind"] != "ours":
                    continue
                path = Path(traces) / f"{r['name']}.json"
                export_trace(lambda: models[r["name"]].generate(prompts[0], **traced), path)
                r["copy_stream"] = copy_stream_use(read_gpu_events(path), args.trace_tokens)
    ratios = {}
    for step in (int(s) for s in args.steps.split(",")):
        per_round = [g / n for g, n in zip(times[f"s{step}+cg"], times[f"s{step}"])]
        ratios[f"s{step}"] = {
            "median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "rounds_graphs_slower": sum(r > 1 for r in per_round), "rounds": len(per_round), "per_round": per_round,
        }

    print(f"\n| variant | ms/token median [min] over {args.rounds} rounds | link limit | efficiency (limit / median) "
          f"| new tokens equal to resident, {args.prompts} prompts |")
    print("|---|---|---|---|---|")
    for r in results:
        limit = r["limit_ms_per_token"]
        efficiency = f"{limit / r['ms_per_token_median']:.3f}" if limit else "-"
        equal = " ".join(f"{n}/{args.tokens}" for n in r["tokens_equal"])
        print(f"| {r['name']} | {r['ms_per_token_median']:.2f} [{r['ms_per_token_min']:.2f}] | {limit:.2f} | {efficiency} | {equal} |")
    print("\n| plan | graphs / none per round: median [min, max] | rounds graphs slower |")
    print("|---|---|---|")
    for plan, ratio in ratios.items():
        print(f"| {plan} | {ratio['median']:.4f} [{ratio['min']:.4f}, {ratio['max']:.4f}] | {ratio['rounds_graphs_slower']}/{ratio['rounds']} |")
    if any("copy_stream" in r for r in results):
        print(f"\n| variant | copies per token | copy busy ms/token | copy idle ms/token | longest idle ms |"
              f" ({args.trace_tokens}-token generate, profiled)")
        print("|---|---|---|---|---|")
        for r in results:
            if "copy_stream" in r:
                use = r["copy_stream"]
                print(f"| {r['name']} | {use['copies_per_token']:.1f} | {use['busy_ms_per_token']:.3f} "
                      f"| {use['idle_ms_per_token']:.3f} | {use['longest_idle_ms']:.3f} |")
    for name, why in skipped.items():
        print(f"{name}: left out ({why})")
    for r in results:
        for seed, parted in enumerate(r["partings"]):
            if parted:
                print(f"{r['name']} parts from resident on prompt {seed}: {parted}")
    report = {
        "device": device_name(device), "torch": torch.__version__, "commit": git_commit(None), "args": vars(args),
        "h2d_bytes_per_s": bandwidth, "results": results, "graphs_over_none": ratios, "left_out": skipped,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hf_decode.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

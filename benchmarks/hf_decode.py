"""HF ``LlamaForCausalLM.generate`` with a static KV cache: ms per token, offloaded vs resident, graphs vs none.

The workload a serving user runs: Llama-8B layer shapes (``--layers`` of them,
bf16), greedy ``generate`` with ``cache_implementation="static"``, its
``forward`` compiled. Variants, side by side in one run:

* ``resident``: nothing offloaded, ``torch.compile(model.forward)`` (Inductor,
  ``mode="default"``: ``reduce-overhead`` segfaulted on this decode in torch 2.11);
* ``ours sN``: ``backend="prefetch_offload"`` with every other layer offloaded
  (``group_size=2``), ``prefetch_step=N``, without and with ``cuda_graphs``.

Each variant's tokens are checked against the resident model's. The link limit
is the offloaded bytes per token over the pinned host-to-device bandwidth
measured in the same run; overlap efficiency is limit / measured.

    python benchmarks/hf_decode.py --layers 8 --out bench_out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import add_repo_to_path, device_name, git_commit, log, measure_h2d_bandwidth, release_memory  # noqa: E402

add_repo_to_path()


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


def run_variant(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, variant: dict, prompt: torch.Tensor) -> dict:
    import prefetch_compile

    release_memory(device)
    model = build(args.layers, args.tiny, device, dtype)
    if variant["kind"] == "resident":
        model.forward = torch.compile(model.forward)
    else:
        model.forward = torch.compile(
            model.forward,
            backend="prefetch_offload",
            options={"group_size": 2, "num_in_group": 1, "prefetch_step": variant["step"], "cuda_graphs": variant["graphs"]},
        )
    settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, cache_implementation="static")
    with torch.inference_mode():
        began = time.perf_counter()
        model.generate(prompt, **settings)  # compiles, captures
        warm_s = time.perf_counter() - began
        model.generate(prompt, **settings)
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            began = time.perf_counter()
            out = model.generate(prompt, **settings)
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            times.append(time.perf_counter() - began)
        # One more, untimed, for the logits of every step: where tokens part, they say whether it was a near-tie.
        scored = model.generate(prompt, **settings, return_dict_in_generate=True, output_logits=True)
    runtime = prefetch_compile.runtime_of(model)
    result = {
        **variant,
        "ms_per_token": 1e3 * min(times) / args.tokens,
        "ms_per_token_all": [1e3 * t / args.tokens for t in times],
        "first_generate_s": warm_s,
        "tokens": out[0].tolist(),
        "scored_tokens_equal": scored.sequences[0].tolist() == out[0].tolist(),
        "logits": torch.cat(scored.logits).float().cpu(),  # [new tokens, vocab]; dropped from the JSON
        "offloaded_bytes": runtime.stats().offloaded_bytes if runtime else 0,
        "counters": vars(runtime.counters).copy() if runtime else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del model
    return result


def parting(resident: dict, variant: dict, prompt_len: int) -> dict | None:
    """Where a variant's greedy tokens first differ from the resident model's, and how close that step was.

    ``resident_margin``: the resident logit of its own token minus that of the variant's;
    ``variant_margin``: the same on the variant's logits, the other way round;
    ``max_diff_before``: the largest logit difference of the two over the steps before,
    the size of the rounding differences between them; ``scale``: the largest logit
    there. A margin below ``max_diff_before`` is a near-tie that rounding can flip.
    """
    new_resident, new_variant = resident["tokens"][prompt_len:], variant["tokens"][prompt_len:]
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48, help="new tokens per generate")
    p.add_argument("--prompt", type=int, default=16, help="prompt length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", default="1,2")
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    p.add_argument("--seed", type=int, default=0, help="the prompt's")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    bandwidth = measure_h2d_bandwidth(device, 256 * 2**20)["bytes_per_s"]
    torch.manual_seed(args.seed)
    prompt = torch.randint(0, 512, (1, args.prompt), device=device)
    variants = [{"kind": "resident"}]
    for step in (int(s) for s in args.steps.split(",")):
        variants += [{"kind": "ours", "step": step, "graphs": False}, {"kind": "ours", "step": step, "graphs": True}]
    results = []
    for variant in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = run_variant(args, device, dtype, variant, prompt)
        result["limit_ms_per_token"] = 1e3 * result["offloaded_bytes"] / bandwidth
        results.append(result)
        log(f"{variant}: {result['ms_per_token']:.2f} ms/token (limit {result['limit_ms_per_token']:.2f}), "
            f"first generate {result['first_generate_s']:.1f}s, counters {result['counters']}", started)
    reference = results[0]["tokens"]
    for result in results[1:]:
        result["parted"] = parting(results[0], result, args.prompt)
    print("\n| variant | ms/token | link limit | efficiency | tokens equal to resident | peak GiB |")
    print("|---|---|---|---|---|---|")
    for result in results:
        name = "resident (compiled)" if result["kind"] == "resident" else f"ours s{result['step']}{' + graphs' if result['graphs'] else ''}"
        limit = result["limit_ms_per_token"]
        efficiency = f"{limit / result['ms_per_token']:.2f}" if limit else "-"
        equal = sum(a == b for a, b in zip(result["tokens"], reference))
        print(f"| {name} | {result['ms_per_token']:.2f} | {limit:.2f} | {efficiency} | {equal}/{len(reference)} | "
              f"{result['peak_gib'] or 0:.1f} |")
    for result in results[1:]:
        if result["parted"]:
            print(f"ours s{result['step']}{' + graphs' if result['graphs'] else ''} parts from resident: {result['parted']}")
    for result in results:
        del result["logits"]
    report = {
        "device": device_name(device), "torch": torch.__version__, "commit": git_commit(None),
        "layers": args.layers, "tokens": args.tokens, "h2d_bytes_per_s": bandwidth, "results": results,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hf_decode.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

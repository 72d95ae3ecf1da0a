"""How much of torch.compile's time is the prefetch pass, on a deep (80-layer) model.

Builds a Llama-like decoder with many layers but a small hidden size (the pass
works per graph node, so depth is what matters, not width), offloads it with
``prefetch_compile.offload`` and times the first call of the compiled model,
which is the whole compilation (Dynamo, AOT, Inductor and the pass), against
``runtime.compiles``, the seconds spent inside the pass per compiled graph. The same model compiled by plain Inductor, untouched, is
timed too, so the backend's overhead beyond the pass shows. Both are timed
with Inductor's whole-graph caches off and its kernel cache warmed by a
2-layer compile first, so neither pays for building kernels the other reused.

``--graph-cache`` instead keeps Inductor's FX graph cache (and AOT autograd's) on
and warms nothing: run it twice in two processes with one fresh
``TORCHINDUCTOR_CACHE_DIR`` for the cold and the warm start of a new process,
which is what a server restart pays (``--llama8b``: the Llama-8B layer shape).

    PYTHONPATH=. python benchmarks/compile_time.py --out bench_out
    export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
    python benchmarks/compile_time.py --graph-cache --llama8b --layers 32 --out cold
    python benchmarks/compile_time.py --graph-cache --llama8b --layers 32 --out warm
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import add_repo_to_path, device_name, git_commit, log, release_memory, wall_time  # noqa: E402

add_repo_to_path()
import llama_like  # noqa: E402  (examples/llama_like.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: tiny_shape's 64)")
    p.add_argument("--group-size", type=int, default=2, help="offload 1 of every N layers")
    p.add_argument("--prefetch-step", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--cold", action="store_true", help="skip the kernel-cache warm-up (first compile pays kernel builds)")
    p.add_argument("--skip-resident", action="store_true", help="do not time plain Inductor for comparison")
    p.add_argument("--graph-cache", action="store_true",
                   help="keep Inductor's FX graph cache on and warm nothing (cold/warm start of a process)")
    p.add_argument("--llama8b", action="store_true", help="the Llama-8B layer shape instead of the tiny one")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="directory for compile_time.json")
    return p.parse_args(argv)


def shape_for(args: argparse.Namespace) -> llama_like.LlamaShape:
    if args.llama8b:
        return llama_like.llama8b_shape(args.layers)
    shape = llama_like.tiny_shape(args.layers)
    if args.hidden:
        heads = max(1, args.hidden // 16)
        shape = llama_like.LlamaShape(vocab=shape.vocab, hidden=args.hidden, intermediate=2 * args.hidden,
                                      heads=heads, kv_heads=max(1, heads // 2), layers=args.layers)
    return shape


def time_compile(model: torch.nn.Module, compiled, tokens: torch.Tensor, device: torch.device) -> dict:
    with torch.inference_mode():
        first = wall_time(lambda: compiled(tokens), device)
        steady = min(wall_time(lambda: compiled(tokens), device) for _ in range(3))
    return {"first_call_s": first, "steady_call_s": steady, "compile_s": first - steady}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = shape_for(args)
    started = time.perf_counter()
    log(f"device {device_name(device)} | torch {torch.__version__} | commit {git_commit(args.commit)}")
    log(f"model: {shape}, dtype {args.dtype}, tokens [{args.batch}, {args.seq}]")
    tokens = llama_like.sample_tokens(shape, args.batch, args.seq, device)
    report: dict = {
        "device": device_name(device), "torch": torch.__version__, "commit": git_commit(args.commit),
        "layers": shape.layers, "hidden": shape.hidden, "group_size": args.group_size,
        "prefetch_step": args.prefetch_step, "graph_cache": args.graph_cache,
    }

    # Same footing for both compilers: no whole-graph caches (the prefetch pass opts out of them anyway),
    # and a warm kernel cache, filled by compiling a 2-layer model first (its kernels are the deep model's).
    if args.graph_cache:
        torch._inductor.config.fx_graph_cache = True
    else:
        torch._inductor.config.fx_graph_cache = False
        with contextlib.suppress(Exception):
            torch._functorch.config.enable_autograd_cache = False
    if not args.cold and not args.graph_cache:
        began = time.perf_counter()
        warm_shape = dataclasses.replace(shape, layers=2)
        warm_model = llama_like.build(warm_shape, device, dtype)
        with torch.inference_mode():
            torch.compile(warm_model)(llama_like.sample_tokens(warm_shape, args.batch, args.seq, device))
        del warm_model
        report["kernel_cache_warmup_s"] = time.perf_counter() - began
        log(f"kernel cache warmed with a 2-layer model in {report['kernel_cache_warmup_s']:.1f}s", started)

    if not args.skip_resident:
        release_memory(device)
        model = llama_like.build(shape, device, dtype)
        report["inductor"] = time_compile(model, torch.compile(model), tokens, device)
        log(f"plain Inductor: compile {report['inductor']['compile_s']:.2f}s", started)
        del model

    import prefetch_compile

    release_memory(device)
    model = llama_like.build(shape, device, dtype)
    runtime = prefetch_compile.offload(model, device=str(device), group_size=args.group_size,
                                       num_in_group=1, prefetch_step=args.prefetch_step)
    compiled = torch.compile(model, backend="prefetch_offload")
    ours = time_compile(model, compiled, tokens, device)
    passes = [record.seconds for record in runtime.compiles]
    ours.update(pass_s=sum(passes), pass_s_per_graph=passes, graphs=len(passes),
                pass_share=sum(passes) / ours["compile_s"] if ours["compile_s"] > 0 else None)
    report["ours"] = ours
    del compiled, model, runtime
    log(f"prefetch_offload: compile {ours['compile_s']:.2f}s, of which the pass {ours['pass_s'] * 1e3:.1f} ms "
        f"over {ours['graphs']} graph(s) ({100 * (ours['pass_share'] or 0):.2f}%)", started)
    if "inductor" in report:
        extra = ours["compile_s"] - report["inductor"]["compile_s"]
        report["backend_overhead_s"] = extra
        log(f"prefetch_offload compile minus plain Inductor compile: {extra:+.2f}s", started)

    try:
        breakdown = torch._dynamo.utils.compile_times(repr="str")
        report["dynamo_compile_times"] = breakdown
    except Exception:
        pass
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile_time.json").write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {out / 'compile_time.json'}", started)
    return report


if __name__ == "__main__":
    main()

"""``python -m prefetch_compile MODULE:FACTORY``: what would be offloaded, before committing a GPU to it.

Builds the model on the CPU and prints the plan table and its totals. With
``--dump-dir`` it also offloads on the CPU, compiles with ``aot_eager`` (the
ATen graph Inductor would get, no GPU needed), runs one forward and writes the
graph dumps. With ``--timeline PNG`` it does the same on CUDA with Inductor,
profiles one warm forward and draws the overlap of compute and copies.

Mistakes in the command line (an unimportable module, a bare factory name that
needs arguments, a factory that returns no ``nn.Module``, a bad knob) are
reported as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Sequence

import torch
from torch import nn

from .config import OptionError, PlanOptions
from .offload import offload_with_options
from .plan import build_plan, log_plan_choice
from .plan_table import plan_rows, plan_summary, render_plan_table, render_summary

INPUT_DTYPES = MappingProxyType({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "long": torch.long})
TOKEN_IDS = 100  # random token ids are drawn below this, which any vocabulary covers
TIMELINE_WARMUP_CALLS = 2


class CliError(Exception):
    """A command-line mistake, reported as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (CliError, OptionError) as error:
        print(f"prefetch_compile: error: {error}", file=sys.stderr)
        return 2
    return 0


def load_model(spec: str) -> nn.Module:
    """Import ``MODULE:FACTORY`` and build the model.

    FACTORY is either a name, called with no arguments, or a call expression
    evaluated in the module's namespace, such as ``build(tiny_shape(), dtype=torch.float32)``.
    """
    module_name, _, factory = spec.partition(":")
    if not module_name or not factory:
        raise CliError(f"expected MODULE:FACTORY, e.g. my_models:build, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CliError(f"cannot import module {module_name!r}: {error}") from None
    if factory.isidentifier():
        function = getattr(module, factory, None)
        if not callable(function):
            raise CliError(f"module {module_name!r} has no callable {factory!r}")
        _check_takes_no_arguments(function, spec)
        call = function
    else:
        try:
            code = compile(factory, spec, "eval")
        except SyntaxError as error:
            raise CliError(f"cannot evaluate {factory!r} in module {module_name!r}: {error}") from None
        call = functools.partial(eval, code, vars(module))
    try:
        model = call()
    except NameError as error:
        raise CliError(f"cannot evaluate {factory!r} in module {module_name!r}: {error}") from None
    except Exception as error:  # the factory's own failure (a bad argument, say): one line, as for the CLI's
        raise CliError(f"{spec} raised {type(error).__name__}: {error} (call it in Python for the traceback)") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _check_takes_no_arguments(function: object, spec: str) -> None:
    """Refuse, in one line, a bare factory name that needs arguments (a model class that takes a config, say).

    Checked on the signature rather than by catching the call's TypeError, which
    would also swallow a TypeError raised inside a factory that takes none.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call decide
        return
    try:
        signature.bind()
    except TypeError as error:
        raise CliError(f"{spec} cannot be called without arguments ({error}); pass a call instead, such as {spec}(...)") from None


def make_input(shape: tuple[int, ...], dtype: str, device: torch.device) -> torch.Tensor:
    """Random activations, or random token ids for ``long``."""
    if INPUT_DTYPES[dtype] == torch.long:
        return torch.randint(0, TOKEN_IDS, shape, device=device)
    return torch.randn(shape, dtype=INPUT_DTYPES[dtype], device=device)


def _run(args: argparse.Namespace) -> None:
    if args.timeline is not None and not torch.cuda.is_available():
        raise CliError("--timeline needs a CUDA device")
    model = load_model(args.factory)
    options = PlanOptions(
        group_size=args.group_size,
        num_in_group=args.num_in_group,
        prefetch_step=args.prefetch_step,
        offload_params=args.offload_params,
        layers=args.layers,
    )
    plan = build_plan(model, options)
    log_plan_choice(model, plan)  # a plan that offloads nothing, or saves nothing, is a WARNING here too
    print(f"{args.factory}: {type(model).__name__}, {options}\n")
    print(render_plan_table(plan_rows(plan, dict(model.named_parameters()))))
    print()
    print(render_summary(plan_summary(plan)))
    if args.dump_dir is not None or args.timeline is not None:
        _offload_compile_and_run(model, options, args)


def _offload_compile_and_run(model: nn.Module, options: PlanOptions, args: argparse.Namespace) -> None:
    from .timeline import draw_timeline, export_trace, recorded_copies

    device = torch.device("cuda" if args.timeline is not None else "cpu")
    runtime = offload_with_options(model, device, options)
    compile_options: dict[str, object] = {"compiler": "inductor" if args.timeline is not None else "aot_eager"}
    if args.dump_dir is not None:
        compile_options["dump_dir"] = str(args.dump_dir)
    compiled = torch.compile(model, backend="prefetch_offload", options=compile_options)
    example = make_input(args.input_shape, args.input_dtype, device)
    with torch.no_grad():
        try:
            compiled(example)
        except Exception as error:  # the model's own complaint about the random input, in one line
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise CliError(
                f"{type(model).__name__} failed on a random {args.input_dtype} input of shape "
                f"{','.join(map(str, args.input_shape))}: {reason[:300]}; pass the model's input with --input-shape "
                "and --input-dtype (token ids: --input-dtype long). The CLI passes one tensor, as the forward's "
                "first argument: for a model that needs more (an encoder-decoder's decoder inputs), compile it from "
                "Python with options={'dump_dir': ...}"
            ) from None
        if args.timeline is not None:
            for _ in range(TIMELINE_WARMUP_CALLS):
                compiled(example)
            trace = args.timeline.with_suffix(".json")
            runtime.start_recording()
            export_trace(lambda: compiled(example), trace)
    if args.dump_dir is not None:
        print(f"\ndumps of {len(runtime.compiles)} graph(s) in {args.dump_dir}:")
        for record in runtime.compiles:
            stem = "graph_" + record.graph.replace("/", "_")
            print(f"  {stem}_before.py  {stem}_after.py  {stem}_plan.txt")
    if args.timeline is not None:
        labels = draw_timeline(trace, args.timeline, recorded_copies(runtime))
        copied = ", ".join(label for label in labels if label is not None) or "none"
        print(f"\ntimeline: {args.timeline} (trace {trace}); layer copies in issue order: {copied}")


def _parser() -> argparse.ArgumentParser:
    defaults = PlanOptions()
    parser = argparse.ArgumentParser(
        prog="python -m prefetch_compile",
        description="Show what prefetch_offload would offload from a model; optionally dump its compiled graphs.",
    )
    parser.add_argument(
        "factory",
        metavar="MODULE:FACTORY",
        help="a zero-argument callable returning the nn.Module, or a call such as build(tiny_shape())",
    )
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--num-in-group", type=int, default=defaults.num_in_group)
    parser.add_argument("--prefetch-step", type=int, default=defaults.prefetch_step)
    parser.add_argument("--offload-params", type=_names, default=defaults.offload_params, metavar="A,B")
    parser.add_argument("--layers", default=defaults.layers, metavar="PATH", help="dotted path of the block list")
    parser.add_argument("--dump-dir", type=Path, help="offload on the CPU, compile with aot_eager, write graph dumps")
    parser.add_argument("--timeline", type=Path, metavar="PNG", help="run on CUDA with Inductor and draw the overlap")
    parser.add_argument("--input-shape", type=_shape, default=(2, 16), metavar="2,16")
    parser.add_argument("--input-dtype", choices=sorted(INPUT_DTYPES), default="float32")
    return parser


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name for name in text.split(",") if name)
    if not names:  # as offload_params=[] is refused: an empty list read as "all" would offload what was not asked
        raise argparse.ArgumentTypeError("names no parameter; leave --offload-params out to offload every parameter")
    return names


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 2,16, got {text!r}") from None

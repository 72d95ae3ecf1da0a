"""Option parsing and validation for the ``prefetch_offload`` backend.

Every option is checked up front, so a typo or a bad value fails with a message
that names the option and what it accepts, instead of surfacing later as a
silent misconfiguration deep inside compilation.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

COMPILERS = ("inductor", "aot_eager", "eager")
DUMP_DIR_ENV = "PREFETCH_COMPILE_DUMP_DIR"


class OptionError(ValueError):
    """A backend option has an unknown name or an unacceptable value."""


@dataclass(frozen=True)
class PlanOptions:
    """The knobs that decide which parameters are offloaded and how deep the prefetch runs.

    They keep the meaning of the reference offloader: of every ``group_size``
    consecutive layers the last ``num_in_group`` are offloaded, and
    ``prefetch_step`` offloaded layers are in flight (one GPU slot each).
    ``offload_layers``, when given, names the offloaded layers by index instead
    of the group pattern: the budget planner spreads a number of offloaded
    layers evenly, which no group pattern expresses unless it divides the stack.
    ``filter_fn(block, fqn)``, when given, decides per layer instead, as the
    ``filter_fn`` of torchao's ``quantize_`` does per module.

    ``chunked_copies`` cuts each layer's block into pieces at the parameter
    boundaries that every offloaded layer shares, so that a layer's copy into a
    shared slot can move piece by piece, each as soon as the previous occupant's
    readers of those bytes have run (see ``passes/prefetch.py``).
    ``"auto"`` does so where it pays: one slot (``prefetch_step=1``) shared by
    several layers, each block at least ``plan.AUTO_CHUNK_MIN_BYTES``.

    The one definition of the knobs: ``offload()``, ``load_checkpoint()`` and the
    backend's ``options`` take them by these names, through :func:`plan_options`.
    """

    group_size: int = 4
    num_in_group: int = 1
    prefetch_step: int = 1
    offload_params: tuple[str, ...] = ()
    layers: str | None = None
    offload_layers: tuple[int, ...] | None = None
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    chunked_copies: bool | str = "auto"

    def __post_init__(self) -> None:
        require_int("group_size", self.group_size, minimum=1)
        require_int("num_in_group", self.num_in_group, minimum=1)
        if self.num_in_group > self.group_size:
            raise OptionError(
                f"num_in_group={self.num_in_group} must be <= group_size={self.group_size}: "
                "it counts the offloaded layers inside each group"
            )
        require_int("prefetch_step", self.prefetch_step, minimum=1)
        if not isinstance(self.offload_params, (tuple, list)) or not all(
            isinstance(name, str) and name.strip(".") for name in self.offload_params
        ):
            raise OptionError(
                f"offload_params must be a list of non-empty parameter-name pieces such as "
                f"['mlp', 'self_attn.q_proj'], got {self.offload_params!r}"
            )
        if self.layers is not None and (not isinstance(self.layers, str) or not self.layers):
            raise OptionError(
                f"layers must be the dotted path of the model's block list (e.g. 'model.layers'), "
                f"got {self.layers!r}"
            )
        if self.offload_layers is not None and (
            not isinstance(self.offload_layers, tuple)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.offload_layers)
            or list(self.offload_layers) != sorted(set(self.offload_layers))
        ):
            raise OptionError(
                f"offload_layers must be increasing, distinct layer indices >= 0 such as [3, 7, 11], "
                f"got {self.offload_layers!r}"
            )
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise OptionError(f"filter_fn must be a callable (block, fqn) -> bool, got {self.filter_fn!r}")
        if self.filter_fn is not None and self.offload_layers is not None:
            raise OptionError("pass offload_layers or filter_fn, not both: each one chooses the offloaded layers")
        if not isinstance(self.chunked_copies, bool) and self.chunked_copies != "auto":
            raise OptionError(f"chunked_copies must be True, False or 'auto', got {self.chunked_copies!r}")


@dataclass(frozen=True, eq=False)  # example_inputs may hold tensors, which do not compare to a bool
class BudgetOptions:
    """A device-memory budget for the planner (see :mod:`prefetch_compile.budget`), instead of plan knobs.

    The budget covers what ``torch.cuda.max_memory_allocated`` counts during a
    forward: kept weights and buffers, the slot pool, and the activations of
    ``example_inputs`` (only their shapes and dtypes are used: a tuple of
    positional arguments, or a mapping of keyword arguments) or
    ``activation_bytes``. ``cost_table`` (a :class:`~prefetch_compile.cost_model.CostTable`
    or the path of one saved as JSON) replaces every measurement; without it the
    pinned bandwidth comes from the per-device cache and the per-layer compute
    times from a short calibration on the device (``calibrate=True``) or from a
    roofline estimate.
    """

    budget: int
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None
    activation_bytes: int | None = None
    cost_table: Any = None
    calibrate: bool = True

    def __post_init__(self) -> None:
        if self.activation_bytes is not None:
            require_int("activation_bytes", self.activation_bytes, minimum=0)
        if not isinstance(self.calibrate, bool):
            raise OptionError(f"calibrate must be True or False, got {self.calibrate!r}")

    def require_activations(self) -> None:
        """Refuse to plan without activations; asked only when planning, so the same budget may confirm a plan."""
        if self.example_inputs is None and self.activation_bytes is None:
            raise OptionError(
                "budget needs the activations it must leave room for: pass example_inputs (the forward's "
                "arguments, or tensors of their shapes on the meta device), or activation_bytes together with "
                "a cost_table (without example_inputs nothing says how long each layer computes)"
            )


def parse_bytes(value: Any, name: str = "budget") -> int:
    """Bytes from an int or a string such as ``"24GiB"``, ``"500MB"``, ``"1.5 GiB"`` or ``"4096"``.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024 and decimal ones (KB,
    MB, GB, TB) powers of 1000, as on the labels of the tools that report them.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise OptionError(f"{name} must be a positive number of bytes, got {value}")
        return value
    match = re.fullmatch(r"\s*(-?)(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B|B)?\s*", value) if isinstance(value, str) else None
    if match is not None and match.group(1):
        raise OptionError(f"{name} must be a positive number of bytes, got {value!r}")
    if match is None:
        raise OptionError(
            f"{name} must be a number of bytes (int) or a string such as '24GiB', '500MB' or '1.5 GiB' "
            f"(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}"
        )
    number, unit = float(match.group(2)), match.group(3) or "B"
    scale = 1 if unit == "B" else (1024 if "i" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    nbytes = int(number * scale)
    if nbytes <= 0:
        least = "at least one byte" if number > 0 else "a positive number of bytes"  # "0.5 B" is positive, yet no byte
        raise OptionError(f"{name} must be {least}, got {value!r}")
    return nbytes


@dataclass(frozen=True)
class CompileOptions:
    """How the compiled graphs are built and inspected; no effect on the plan."""

    compiler: str = "inductor"
    dump_dir: Path | None = None
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise OptionError(f"compiler must be one of {COMPILERS}, got {self.compiler!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise OptionError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")


@dataclass(frozen=True)
class BackendOptions:
    """All options of one ``torch.compile(..., backend="prefetch_offload", options=...)`` call.

    ``plan`` is None when the options name no plan knob, so that a model already
    placed by :func:`prefetch_compile.offload` keeps its plan. ``budget`` is set
    when the options ask the planner to choose the plan instead.
    """

    plan: PlanOptions | None
    compile: CompileOptions = field(default_factory=CompileOptions)
    budget: BudgetOptions | None = None
    named_knobs: tuple[str, ...] = ()  # the plan knobs the options name: only these must agree with a placed plan


PLAN_KNOBS = tuple(f.name for f in fields(PlanOptions))
_COMPILE_KEYS = tuple(f.name for f in fields(CompileOptions))
_BUDGET_KEYS = tuple(f.name for f in fields(BudgetOptions))


def parse_backend_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate the raw ``options`` dict handed to the backend by ``torch.compile``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(PLAN_KNOBS) - set(_COMPILE_KEYS) - set(_BUDGET_KEYS))
    if unknown:
        raise OptionError(
            f"unknown prefetch_offload option(s) {unknown}; "
            f"allowed: {sorted(PLAN_KNOBS + _COMPILE_KEYS + _BUDGET_KEYS)}"
        )
    plan_values = {key: options[key] for key in PLAN_KNOBS if key in options}
    plan = plan_options(plan_values) if plan_values else None
    budget = parse_budget_options({key: options[key] for key in _BUDGET_KEYS if key in options})
    check_budget_alone(plan_values, budget)

    dump_dir = options.get("dump_dir", os.environ.get(DUMP_DIR_ENV) or None)
    if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
        raise OptionError(f"dump_dir must be a directory path, got {dump_dir!r}")
    compile_options = CompileOptions(
        compiler=options.get("compiler", "inductor"),
        dump_dir=Path(dump_dir) if dump_dir is not None else None,
        cuda_graphs=options.get("cuda_graphs", False),
    )
    return BackendOptions(plan=plan, compile=compile_options, budget=budget, named_knobs=tuple(plan_values))


def plan_options(knobs: Mapping[str, Any]) -> PlanOptions:
    """The plan from knobs given by name (keyword arguments, or the backend's options dict).

    Any iterable of names (``offload_params``) or of layer indices
    (``offload_layers``: list, range, set) is accepted where the plan holds a
    tuple; an unknown name raises :class:`OptionError` listing the knobs.
    """
    unknown = sorted(set(knobs) - set(PLAN_KNOBS))
    if unknown:
        raise OptionError(f"unknown plan knob(s) {unknown}; the plan knobs are {list(PLAN_KNOBS)}")
    chooser = [name for name in ("offload_layers", "filter_fn") if knobs.get(name) is not None]
    pattern = [name for name in ("group_size", "num_in_group") if name in knobs]
    if chooser and pattern:
        raise OptionError(f"{chooser[0]} chooses the offloaded layers itself, so {pattern} would be ignored; drop "
                          f"{' and '.join(pattern)} or drop {chooser[0]}")
    values = dict(knobs)
    if "offload_params" in values:
        values["offload_params"] = _as_name_tuple(values["offload_params"])
        if values["offload_params"] == ():
            raise OptionError(
                "offload_params=[] names no parameter: leave it out to offload every parameter of the offloaded "
                "layers, or name pieces such as ['mlp']"
            )
    if values.get("offload_layers") is not None:
        values["offload_layers"] = _as_index_tuple(values["offload_layers"])
    return PlanOptions(**values)


def check_budget_alone(knobs: Mapping[str, Any], budget: BudgetOptions | None) -> None:
    """A budget chooses the plan itself: refuse plan knobs next to it, except the block list's path."""
    chosen = sorted(set(knobs) - {"layers"})
    if budget is not None and chosen:
        raise OptionError(f"budget chooses the plan itself; drop {chosen} or drop budget")


def parse_budget_options(options: Mapping[str, Any]) -> BudgetOptions | None:
    """The budget options of a backend or ``offload()`` call; None when no budget is asked for.

    A value of None means "not given", so ``offload()`` can pass its keyword
    arguments through unchanged.
    """
    options = dict(options)
    if options.get("budget") is None:
        stray = sorted(key for key, value in options.items() if key != "budget" and value is not None)
        if stray:
            raise OptionError(f"{stray} only apply with a budget; pass budget='24GiB' (say) as well")
        return None
    example_inputs = options.get("example_inputs")
    if isinstance(example_inputs, Mapping):  # keyword arguments, as Hugging Face models are called
        if not all(isinstance(key, str) for key in example_inputs):
            raise OptionError(f"example_inputs as a mapping are keyword arguments: its keys must be names, got "
                              f"{sorted(map(repr, example_inputs))}")
        example_inputs = dict(example_inputs)
    elif example_inputs is not None:
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return BudgetOptions(
        budget=parse_bytes(options["budget"]),
        example_inputs=example_inputs,
        activation_bytes=options.get("activation_bytes"),
        cost_table=options.get("cost_table"),
        calibrate=True if options.get("calibrate") is None else options["calibrate"],
    )


def _as_index_tuple(value: Any) -> Any:
    """Accept any iterable of layer indices (list, range, set), sorted; PlanOptions checks the values."""
    if isinstance(value, (list, tuple, range, set, frozenset)):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    return value


def _as_name_tuple(value: Any) -> Any:
    """Accept any iterable of names (list, set, tuple) but not a bare string."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    return value


def require_int(name: str, value: Any, *, minimum: int) -> None:
    """Raise :class:`OptionError` naming ``name`` unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name} must be an integer >= {minimum}, got {value!r}")

"""Option parsing and validation for the ``prefetch_offload`` backend.

Every option is checked up front, so a typo or a bad value fails with a message
that names the option and what it accepts, instead of surfacing later as a
silent misconfiguration deep inside compilation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

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
    """

    group_size: int = 4
    num_in_group: int = 1
    prefetch_step: int = 1
    offload_params: tuple[str, ...] = ()
    layers: str | None = None

    def __post_init__(self) -> None:
        _require_int("group_size", self.group_size, minimum=1)
        _require_int("num_in_group", self.num_in_group, minimum=1)
        if self.num_in_group > self.group_size:
            raise OptionError(
                f"num_in_group={self.num_in_group} must be <= group_size={self.group_size}: "
                "it counts the offloaded layers inside each group"
            )
        _require_int("prefetch_step", self.prefetch_step, minimum=1)
        if isinstance(self.offload_params, str) or not all(
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
    placed by :func:`prefetch_compile.offload` keeps its plan.
    """

    plan: PlanOptions | None
    compile: CompileOptions = field(default_factory=CompileOptions)


_PLAN_KEYS = tuple(f.name for f in fields(PlanOptions))
_COMPILE_KEYS = tuple(f.name for f in fields(CompileOptions))


def parse_backend_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate the raw ``options`` dict handed to the backend by ``torch.compile``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_PLAN_KEYS) - set(_COMPILE_KEYS))
    if unknown:
        raise OptionError(
            f"unknown prefetch_offload option(s) {unknown}; allowed: {sorted(_PLAN_KEYS + _COMPILE_KEYS)}"
        )
    plan_values = {key: options[key] for key in _PLAN_KEYS if key in options}
    if "offload_params" in plan_values:
        plan_values["offload_params"] = _as_name_tuple(plan_values["offload_params"])
    plan = PlanOptions(**plan_values) if plan_values else None

    dump_dir = options.get("dump_dir", os.environ.get(DUMP_DIR_ENV) or None)
    if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
        raise OptionError(f"dump_dir must be a directory path, got {dump_dir!r}")
    compile_options = CompileOptions(
        compiler=options.get("compiler", "inductor"),
        dump_dir=Path(dump_dir) if dump_dir is not None else None,
        cuda_graphs=options.get("cuda_graphs", False),
    )
    return BackendOptions(plan=plan, compile=compile_options)


def _as_name_tuple(value: Any) -> Any:
    """Accept any iterable of names (list, set, tuple) but not a bare string."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    return value


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name} must be an integer >= {minimum}, got {value!r}")

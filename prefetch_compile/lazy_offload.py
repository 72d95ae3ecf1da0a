"""Which module the one-line path offloads: the model Dynamo names, never a block of it.

``torch.compile(model, backend="prefetch_offload", options=...)`` without
``offload()`` first offloads the model at the first graph that reads its
parameters. The backend sees only that graph, so the model is the module whose
frame Dynamo compiled it from: the root of the graph inputs' sources
(``L['self']``), read off Dynamo's own record of the frame (see
``_torch_internals.parameter_owners``), not guessed from the Python call stack.

A graph break inside a model's layer loop makes Dynamo run the model's own
forward eagerly and compile the modules it calls one frame at a time: a block,
a block's experts, a norm. Such a module is never taken for the model, even when
it holds a list of its own (one layer's experts):

* a part of a model that is offloaded already belongs to that model's plan;
* a module that lies in a block list of a module enclosing it is a block;
* a module without a block list is not a model.

Each graph compiled without offloading for the last two reasons says so in a
warning. The model is then offloaded at the first graph that Dynamo compiles for
the model itself (for a Hugging Face model, the part of its forward after the
decoder layers), or not at all.
"""

from __future__ import annotations

import logging

from torch import fx, nn

from . import _torch_internals
from .config import BudgetOptions, OptionError, PlanOptions
from .discovery import enclosing_modules, find_layer_list
from .offload import RESIDENT_FLAG, is_part_of_offloaded, runtime_of

log = logging.getLogger("prefetch_compile")

_BREAK_HINT = (
    ". After a graph break inside a model's layer loop Dynamo runs the model's forward eagerly and compiles the "
    "modules it calls on their own; the model is offloaded at the first graph compiled for the model itself, if "
    "any. To offload from the first call, call prefetch_compile.offload(model, ...) before torch.compile"
)


def model_to_offload(gm: fx.GraphModule, plan: PlanOptions | None, budget: BudgetOptions | None) -> nn.Module | None:
    """The model to offload for graph ``gm`` (whose parameters no runtime owns yet), or None: nothing to offload."""
    owners = _torch_internals.parameter_owners(gm)
    if len(owners) != 1:
        named = sorted(type(owner).__name__ for owner in owners) or "no module"
        _warn(f"Dynamo names {named} as the owner of its parameters, so no one model")
        return None
    module = owners[0]
    if _settled(module, plan, budget):
        return None
    enclosing = enclosing_modules(module)
    if any(_settled(outer, plan, budget) for outer in enclosing):
        return None
    lists = [position for position, outer in enumerate(enclosing) if isinstance(outer, (nn.ModuleList, nn.Sequential))]
    if lists:
        block_list = enclosing[lists[0]]
        holder = enclosing[lists[0] + 1] if lists[0] + 1 < len(enclosing) else block_list
        _warn(
            f"Dynamo compiles it for {type(module).__name__}, which lies in a {type(block_list).__name__} of "
            f"{len(block_list)} blocks of {type(holder).__name__}: a block, never offloaded as a model" + _BREAK_HINT
        )
        return None
    try:
        find_layer_list(module, plan.layers if plan else None)
    except OptionError as error:
        is_root = all(_torch_internals.is_compiled_wrapper(outer) for outer in enclosing)
        if is_root and plan is not None and plan.layers is not None:
            raise  # the model itself lacks the block list asked for: a wrong path, not a graph break
        # Inside a larger model (a graph break compiled a part of it), the `layers` advice of the error misleads:
        # a path names a submodule of the model, not of this part.
        detail = f": {error}" if is_root else " of its own"
        _warn(f"Dynamo compiles it for {type(module).__name__}, which has no block list{detail}" + _BREAK_HINT)
        return None
    return module


def _settled(module: nn.Module, plan: PlanOptions | None, budget: BudgetOptions | None) -> bool:
    """Whether ``module`` is (part of, or holds) an offloaded model, or a model a budget left resident.

    A budget's resident verdict stands for a compile with the same budget or with
    no plan of its own (the default knobs would offload a model known to fit);
    plan knobs or another budget ask for a new plan.
    """
    if is_part_of_offloaded(module) or runtime_of(module) is not None:
        return True
    resident_within = getattr(module, RESIDENT_FLAG, None)
    if resident_within is None:
        return False
    return budget.budget == resident_within if budget is not None else plan is None


def _warn(why: str) -> None:
    log.warning("prefetch_compile: nothing offloaded for graph %s: %s", _torch_internals.compile_id(), why)

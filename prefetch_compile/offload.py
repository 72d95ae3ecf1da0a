"""``offload()``: place a model so that it never needs all of its weights on the device at once.

Offloaded parameters are copied into the pinned host arena and their device
storage replaced by views of the slot pool (leaf by leaf, for a tensor-subclass
parameter: see ``leaves.py``); everything else moves to the
device one tensor at a time. The model object stays the same, so
``torch.compile`` afterwards traces it as usual and the backend finds the plan
through the parameters themselves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .budget import plan_within_budget
from .config import BudgetOptions, OptionError, PlanOptions, check_budget_alone, parse_budget_options, plan_options
from .edits import check_counted
from .leaves import get_inner, set_inner
from .memory import HostArena, SlotPool, aliased_param_view, param_view
from .plan import OffloadPlan, build_plan, log_plan_choice
from .model_hooks import install_model_hooks
from .runtime import PrefetchRuntime, describe, runtime_of_tensor

if TYPE_CHECKING:
    from .disk_tier import DiskTier

log = logging.getLogger("prefetch_compile")

# Set on every module of an offloaded model, to the module's own id: a block (or any part) of the model
# that Dynamo compiles on its own after a graph break is then known to belong to an offloaded model, even
# when none of its own parameters is offloaded. An id rather than a flag: a copy of such a module (a kept
# block may be copied) carries the original's id, not its own, so the copy is not taken for a part.
PART_OF_OFFLOADED = "_prefetch_compile_part_of_offloaded"
# Set on a model that a budget left resident (to that budget, in bytes): a later compile with the same budget,
# or with no plan of its own, leaves it resident instead of planning again or offloading by default knobs.
RESIDENT_FLAG = "_prefetch_compile_resident_within"


def offload(
    model: nn.Module,
    device: str | torch.device = "cuda",
    *,
    budget: int | str | None = None,
    example_inputs: Any = None,
    activation_bytes: int | None = None,
    cost_table: Any = None,
    calibrate: bool = True,
    **plan: Any,
) -> PrefetchRuntime | None:
    """Offload some layers of ``model`` to pinned host memory, as the plan knobs ``plan`` choose.

    The knobs are the fields of :class:`~prefetch_compile.PlanOptions`, by name:
    by default the last ``num_in_group=1`` of every ``group_size=4`` layers are
    offloaded, through ``prefetch_step=1`` slots; ``offload_layers`` names the
    offloaded layers by index instead, and ``filter_fn(block, fqn)`` decides for
    each block of the layer list (say, ``lambda block, fqn: int(fqn.rsplit(".",
    1)[1]) >= 16``); ``offload_params`` and ``layers`` narrow the parameters and
    name the block list; ``chunked_copies`` lets a layer's copy into a shared
    slot move chunk by chunk, each once the slot's previous layer has read the
    same bytes (``"auto"``: one slot, blocks of 16 MiB or more). ``model`` may live on the CPU (for a model larger than
    the device) or already on ``device``. Returns the model's runtime;
    ``runtime.stats()`` reports the bytes moved. Compile the model afterwards with
    ``torch.compile(model, backend="prefetch_offload")``.

    Host memory: each offloaded parameter is copied into the arena and its old
    storage freed before the next, and the arena commits pages only as they
    are written, so a model on the host never needs more than its own size
    plus its largest offloaded parameter while it is placed. (The source's
    storage can only be freed if nothing else holds it.) To skip the host
    copy altogether, use :func:`prefetch_compile.load_checkpoint`.

    With ``budget`` (bytes, or a string such as ``"24GiB"``) the planner chooses
    the layers, the parameters and ``prefetch_step`` instead (see
    :mod:`prefetch_compile.budget`); ``example_inputs`` (or ``activation_bytes``)
    states the activations to leave room for; of the plan knobs only ``layers``
    may come with it. A model that fits the budget whole is moved to ``device``
    and left resident, and None is returned: compile it with a plain backend.
    """
    options = plan_options(plan)
    budget_options = parse_budget_options(
        {
            "budget": budget,
            "example_inputs": example_inputs,
            "activation_bytes": activation_bytes,
            "cost_table": cost_table,
            "calibrate": None if calibrate is True else calibrate,  # the default counts as not given
        }
    )
    check_budget_alone(plan, budget_options)
    if budget_options is None:
        return offload_with_options(model, torch.device(device), options)
    return offload_within_budget(model, torch.device(device), budget_options, options.layers)


def offload_within_budget(
    model: nn.Module, device: torch.device, budget: BudgetOptions, layers: str | None = None, compiler: str = "inductor"
) -> PrefetchRuntime | None:
    """Offload with the plan the budget planner chooses; None (and the model moved to ``device``) if it fits whole.

    Either way the model remembers the budget: a resident one in ``RESIDENT_FLAG``,
    an offloaded one in ``runtime.budget``, against which a later compile's options are checked.
    An offloaded one also keeps the cost table it was planned from in ``runtime.cost_table``:
    saved with ``to_json`` and passed back as ``cost_table``, it spares the next run the calibration.
    """
    device = _check_device(device)
    _check_not_offloaded(model)  # before the planner's calibration, not after
    _check_weights_real(model)
    chosen, cost = plan_within_budget(model, device, budget, layers, compiler)
    if chosen.options is None:
        if any(t.device != device for t in [*model.parameters(), *model.buffers()]):
            model.to(device)  # not when there already: inside the backend it cannot swap a subclass parameter
        setattr(model, RESIDENT_FLAG, budget.budget)
        return None
    runtime = offload_with_options(model, device, chosen.options)
    runtime.budget = budget.budget
    runtime.cost_table = cost
    return runtime


def is_part_of_offloaded(module: nn.Module) -> bool:
    """Whether ``module`` is an offloaded model or one of its modules (kept blocks and their parts included)."""
    return getattr(module, PART_OF_OFFLOADED, None) == id(module)


def runtime_of(model: nn.Module) -> PrefetchRuntime | None:
    """The runtime that owns this model's offloaded parameters, if it was offloaded."""
    for param in model.parameters():
        runtime = runtime_of_tensor(param)
        if runtime is not None:
            return runtime
    return None


@torch.inference_mode(False)
def offload_with_options(model: nn.Module, device: torch.device, options: PlanOptions) -> PrefetchRuntime:
    """Offload as ``options`` say. Outside inference_mode, whatever the caller's mode: the arena, the slots and
    their views are made as normal tensors, whose version counters the runtime watches (see ``edits.py``)."""
    device = _check_device(device)
    _check_not_offloaded(model)
    _check_weights_real(model)
    plan = build_plan(model, options)
    check_counted(plan, dict(model.named_parameters()))
    log_plan_choice(model, plan)
    host = HostArena(plan)
    offloaded = _move_offloaded_to_host(model, plan, host)
    _move_to_device(model, device)  # kept weights and buffers; the offloaded ones are empty placeholders by now
    return assemble_runtime(model, plan, device, host, offloaded)


def assemble_runtime(
    model: nn.Module,
    plan: OffloadPlan,
    device: torch.device,
    host: HostArena,
    offloaded: dict[str, nn.Parameter],
    disk: DiskTier | None = None,
) -> PrefetchRuntime:
    """Finish placing a model whose kept tensors are on ``device`` and whose offloaded ones fill ``host``.

    Page-locks the arena, points the offloaded parameters at the slot pool,
    and builds the runtime and the eager hooks. Shared by :func:`offload` and
    :func:`prefetch_compile.load_checkpoint`, which differ only in where the
    bytes come from (``disk``: the layers that the checkpoint files hold instead of ``host``).
    """
    if device.type == "cuda":
        host.pin()
    slots = SlotPool(plan, device)
    for layer in plan.offloaded:
        block = slots.block(layer)
        for placement in layer.params:
            view = aliased_param_view(block, placement) if placement.inner else param_view(block, placement)
            set_inner(offloaded[placement.param_name], placement.inner, view)
    kept = {
        name: tensor
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if name not in offloaded
    }
    runtime = PrefetchRuntime(plan, device, host, slots, offloaded, kept, disk)
    runtime.bind_model(model)
    for offload_index in range(plan.num_slots):
        runtime.start(offload_index)
    for module in model.modules():
        setattr(module, PART_OF_OFFLOADED, id(module))
    install_model_hooks(model, plan, runtime)
    log.info(describe(runtime.stats(), plan))
    return runtime


def _check_not_offloaded(model: nn.Module) -> None:
    if runtime_of(model) is not None:
        raise OptionError(
            f"{type(model).__name__} is already offloaded (by offload() or load_checkpoint()): a model is offloaded "
            "once. To give it new weights, use model.load_state_dict(...) or runtime.load_weights(...)"
        )


def _check_weights_real(model: nn.Module) -> None:
    """A model built on the meta device has no weights to move: say where they come from instead."""
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise OptionError(
            f"{type(model).__name__} has tensors on the meta device ({meta}, ...): offload() moves weights that "
            "exist. To fill a model built on the meta device from a checkpoint, use "
            "prefetch_compile.load_checkpoint(model, checkpoint, device, ...)"
        )


def _check_device(device: torch.device) -> torch.device:
    if device.type not in ("cuda", "cpu"):
        raise OptionError(f"device must be a CUDA device or the CPU, got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device='cuda' was asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _move_offloaded_to_host(model: nn.Module, plan: OffloadPlan, host: HostArena) -> dict[str, nn.Parameter]:
    """Copy each offloaded leaf into its host block and drop its old storage right away; returns the parameters by name."""
    params = dict(model.named_parameters())
    moved: dict[str, nn.Parameter] = {}
    for layer in plan.offloaded:
        block = host.block(layer)
        for placement in layer.params:
            param = params[placement.param_name]
            leaf = get_inner(param, placement.inner)
            param_view(block, placement).copy_(leaf.detach())
            set_inner(param, placement.inner, torch.empty(0, dtype=leaf.dtype, device=leaf.device))
            moved[placement.param_name] = param
    return moved


def _move_to_device(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)``, skipped when everything is there already.

    ``Module.to`` converts a tensor-subclass parameter with ``swap_tensors`` even
    when it stays on its device, and that fails while Dynamo holds references to
    the parameter (offloading at the first compiled call). A swap keeps the
    parameter object, so the objects held for offloaded parameters stay valid.
    """
    if any(tensor.device != device for tensor in [*model.parameters(), *model.buffers()]):
        model.to(device)

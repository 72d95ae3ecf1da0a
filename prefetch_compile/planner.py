"""The budget planner: the fastest plan whose device memory fits a budget, from a cost table.

The search is exhaustive over a small, structured space, so the answer is the
true optimum of the cost model within it, and the same for the same inputs:

* which layers: every group pattern (the last ``n`` of every ``g`` layers,
  ``g`` up to ``MAX_GROUP``) and, for every count ``m``, ``m`` layers spread
  evenly over the stack (which a group pattern expresses only when ``m``
  divides the stack);
* which parameters: all of a layer's, or only those under a name in
  ``PARAM_FILTERS`` (MLP or expert weights: the bulk of the bytes, read last in
  the layer);
* how many slots: ``prefetch_step`` from 1 to ``max_prefetch_step``.

Device memory of a plan = every parameter and buffer as the device allocator
charges it, less what the plan offloads, plus the slot pool, plus the
activations. Among plans that fit, the fastest predicted one wins; ties go to
fewer bytes copied per forward, then less memory. A model that fits whole stays
resident: offloading it could only be slower.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import OptionError, PlanOptions
from .cost_model import CostTable, Schedule, simulate
from .discovery import find_layer_list
from .plan import build_plan
from .runtime import format_bytes

MAX_GROUP = 8
PARAM_FILTERS: tuple[tuple[str, ...], ...] = ((), ("mlp",), ("experts",))
MAX_PREFETCH_STEP = 4
# The CUDA caching allocator charges every tensor in 512-byte steps, and a slot (one large
# buffer) in up to 2 MiB steps, as SlotPool measures; the CPU charges exact bytes.
CUDA_TENSOR_ROUNDING = 512
CUDA_SLOT_ROUNDING = 2 * 1024 * 1024


@dataclass(frozen=True)
class Footprint:
    """A model's bytes as the planner needs them, for each parameter filter that selects something."""

    layer_list_path: str
    resident_bytes: int  # all parameters and buffers as the allocator charges them
    blocks: dict[tuple[str, ...], tuple[int, ...]]  # filter -> packed block bytes per layer (0: nothing selected)
    saved: dict[tuple[str, ...], tuple[int, ...]]  # filter -> device bytes freed per layer by offloading it
    slot_rounding: int  # the allocator's granularity for one slot buffer

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.blocks.values())))


@dataclass(frozen=True)
class BudgetPlan:
    """The planner's choice: the plan knobs (None: stay resident) and what it predicts for them."""

    options: PlanOptions | None
    schedule: Schedule
    device_bytes: int  # predicted peak device memory: kept weights + slots + activations
    budget: int
    activation_bytes: int
    copied_bytes: int  # host-to-device bytes per steady-state forward
    candidates: int  # plans that fit and were simulated

    def describe(self) -> str:
        if self.options is None:
            return (
                f"prefetch_compile: the model fits the budget of {format_bytes(self.budget)} whole "
                f"({format_bytes(self.device_bytes)} with activations); nothing offloaded"
            )
        what = ",".join(self.options.offload_params) or "all"
        layers = self.options.offload_layers
        pattern = (
            f"layers {list(layers)}"
            if layers is not None
            else f"group_size={self.options.group_size}, num_in_group={self.options.num_in_group}"
        )
        return (
            f"prefetch_compile: budget {format_bytes(self.budget)}: offload {pattern}, params {what}, "
            f"prefetch_step={self.options.prefetch_step}; predicted {self.schedule.forward_seconds * 1e3:.2f} ms "
            f"per forward (compute {self.schedule.compute_seconds * 1e3:.2f} ms), device "
            f"{format_bytes(self.device_bytes)} (activations {format_bytes(self.activation_bytes)}), "
            f"{len(self.schedule.copies)} layers, {format_bytes(self.copied_bytes)} copied per forward"
        )


def measure_footprint(
    model: nn.Module,
    device_type: str,
    layers: str | None = None,
    filters: tuple[tuple[str, ...], ...] = PARAM_FILTERS,
) -> Footprint:
    """Bytes per layer under each filter, from the same packing the offload itself will use.

    Filters that select nothing in the layer list, or everything (then the same
    as offloading all), are left out. Bytes are counted as the allocator of
    ``device_type`` ("cuda" or "cpu") charges them.
    """
    tensor_rounding, slot_rounding = (CUDA_TENSOR_ROUNDING, CUDA_SLOT_ROUNDING) if device_type == "cuda" else (1, 1)
    path, layer_list = find_layer_list(model, layers)
    every_layer = tuple(range(len(layer_list)))
    blocks: dict[tuple[str, ...], tuple[int, ...]] = {}
    saved: dict[tuple[str, ...], tuple[int, ...]] = {}
    for names in filters:
        plan = build_plan(model, PlanOptions(layers=path, offload_params=names, offload_layers=every_layer))
        selected = tuple(layer.nbytes for layer in plan.layers)
        if names and (not any(selected) or all(layer.kept_param_bytes == 0 for layer in plan.layers)):
            continue
        blocks[names] = selected
        saved[names] = tuple(sum(_round_up(p.nbytes, tensor_rounding) for p in layer.params) for layer in plan.layers)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    resident = sum(_round_up(t.numel() * t.element_size(), tensor_rounding) for t in tensors)
    return Footprint(path, resident, blocks, saved, slot_rounding)


def plan_for_budget(
    footprint: Footprint,
    cost: CostTable,
    budget: int,
    activation_bytes: int,
    max_prefetch_step: int = MAX_PREFETCH_STEP,
) -> BudgetPlan:
    """The fastest predicted plan whose device memory stays within ``budget``; OptionError if none fits."""
    if len(cost.layer_seconds) != footprint.num_layers:
        raise ValueError(
            f"the cost table has {len(cost.layer_seconds)} layer times but '{footprint.layer_list_path}' "
            f"has {footprint.num_layers} layers"
        )
    resident = footprint.resident_bytes + activation_bytes
    if resident <= budget:
        schedule = simulate(cost.layer_seconds, (), (), 1, cost.outside_seconds)
        return BudgetPlan(None, schedule, resident, budget, activation_bytes, 0, 1)
    best: tuple | None = None
    smallest = None
    fitting = 0
    for filter_rank, (names, blocks) in enumerate(footprint.blocks.items()):
        saved = footprint.saved[names]
        for origin, indices in _layer_sets(blocks):
            for step in range(1, min(max_prefetch_step, len(indices)) + 1):
                device = resident - sum(saved[i] for i in indices) + _slot_pool(footprint, blocks, indices, step)
                smallest = device if smallest is None else min(smallest, device)
                if device > budget:
                    continue
                fitting += 1
                copies = [cost.bandwidth.copy_seconds(blocks[i]) for i in indices]
                schedule = simulate(cost.layer_seconds, indices, copies, step, cost.outside_seconds)
                copied = sum(blocks[i] for i in indices) if len(indices) > step else 0
                key = (schedule.forward_seconds, copied, device, filter_rank, step, indices)
                if best is None or key < best[0]:
                    best = (key, names, origin, indices, step, schedule, device, copied)
    if best is None:
        raise OptionError(
            f"budget {budget:,} bytes ({format_bytes(budget)}) is below the smallest plan for this model: "
            f"{smallest:,} bytes ({format_bytes(smallest)}), of which activations {format_bytes(activation_bytes)}; "
            f"the budget must be at least {smallest:,} bytes"
        )
    _, names, origin, indices, step, schedule, device, copied = best
    return BudgetPlan(
        _plan_options(footprint.layer_list_path, names, origin, indices, step),
        schedule,
        device,
        budget,
        activation_bytes,
        copied,
        fitting,
    )


def spread_evenly(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer indices spread evenly over ``num_layers``, the last layer always among them.

    The gaps differ by at most one layer, so every copy gets about the same
    compute to hide behind; for ``count`` dividing ``num_layers`` this is the
    group pattern that offloads the last layer of each group.
    """
    return tuple((k + 1) * num_layers // count - 1 for k in range(count))


def _layer_sets(blocks: tuple[int, ...]) -> list[tuple[tuple, tuple[int, ...]]]:
    """Candidate offloaded-layer sets, each once, with where it came from: ("group", g, n) or ("spread",)."""
    num_layers = len(blocks)
    seen: set[tuple[int, ...]] = set()
    sets = []
    groups = [("group", g, n) for g in range(1, min(MAX_GROUP, num_layers) + 1) for n in range(1, g + 1)]
    spreads = [("spread", m) for m in range(1, num_layers + 1)]
    for origin in groups + spreads:
        if origin[0] == "group":
            _, g, n = origin
            indices = tuple(i for i in range(num_layers) if i % g >= g - n)
        else:
            indices = spread_evenly(num_layers, origin[1])
        indices = tuple(i for i in indices if blocks[i])  # a layer the filter selects nothing of stays kept
        if indices and indices not in seen:
            seen.add(indices)
            sets.append((origin, indices))
    return sets


def _slot_pool(footprint: Footprint, blocks: tuple[int, ...], indices: tuple[int, ...], step: int) -> int:
    slots = min(step, len(indices))
    sizes = [0] * slots
    for k, layer in enumerate(indices):
        sizes[k % slots] = max(sizes[k % slots], blocks[layer])
    return sum(_round_up(size, footprint.slot_rounding) for size in sizes)


def _plan_options(path: str, names: tuple[str, ...], origin: tuple, indices: tuple[int, ...], step: int) -> PlanOptions:
    """Group knobs where the chosen layers are a group pattern (the log reads as usual), else explicit indices."""
    if origin[0] == "group":
        return PlanOptions(group_size=origin[1], num_in_group=origin[2], prefetch_step=step, offload_params=names, layers=path)
    return PlanOptions(prefetch_step=step, offload_params=names, layers=path, offload_layers=indices)


def _round_up(nbytes: int, step: int) -> int:
    return (nbytes + step - 1) // step * step

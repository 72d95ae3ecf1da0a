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
* how many slots: ``prefetch_step`` from 1 to ``max_prefetch_step``; where the
  plan will chunk its copies (one slot, large blocks: ``plan.chunks_copies``),
  the prediction prices them chunk by chunk, so a chunked step 1 that hides its
  copies as well as step 2 wins on memory.

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
from .cost_model import ChunkCopy, CostTable, Schedule, simulate, simulate_chunks
from .discovery import find_layer_list
from .leaves import tensor_leaves
from .plan import build_plan, chunks_copies
from .runtime import format_bytes

MAX_GROUP = 8
PARAM_FILTERS: tuple[tuple[str, ...], ...] = ((), ("mlp",), ("experts",))
MAX_PREFETCH_STEP = 4
# The CUDA caching allocator charges every tensor in 512-byte steps, and a slot (one large
# buffer) in up to 2 MiB steps, as SlotPool measures; the CPU charges exact bytes.
CUDA_TENSOR_ROUNDING = 512
CUDA_SLOT_ROUNDING = 2 * 1024 * 1024
# cuBLAS and cuBLASLt keep workspaces (32 MiB each on Hopper by default) that the allocator counts
# as allocated for as long as the process runs; a budget that ignored them would be missed by that much.
CUDA_WORKSPACE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Footprint:
    """A model's bytes as the planner needs them, for each parameter filter that selects something."""

    layer_list_path: str
    resident_bytes: int  # all parameters and buffers as the allocator charges them, plus library workspaces
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
    cuda = device_type == "cuda"
    tensor_rounding, slot_rounding = (CUDA_TENSOR_ROUNDING, CUDA_SLOT_ROUNDING) if cuda else (1, 1)
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
    # Leaf by leaf: a quantized subclass parameter holds its packed data and scales, not numel() of its dtype.
    resident = sum(
        _round_up(leaf.numel() * leaf.element_size(), tensor_rounding) for t in tensors for _, leaf in tensor_leaves(t)
    )
    resident += CUDA_WORKSPACE_BYTES if cuda else 0
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
    for filter_rank, names in enumerate(footprint.blocks):
        for indices in _layer_sets(footprint.blocks[names]):
            for step in range(1, min(max_prefetch_step, len(indices)) + 1):
                device = device_bytes(footprint, names, indices, step, activation_bytes)
                smallest = device if smallest is None else min(smallest, device)
                if device > budget:
                    continue
                fitting += 1
                schedule = predict(footprint, cost, names, indices, step)
                copied = copied_bytes(footprint, names, indices, step)
                key = (schedule.forward_seconds, copied, device, filter_rank, step, indices)
                if best is None or key < best[0]:
                    best = (key, names, indices, step, schedule, device, copied)
    if best is None:
        raise OptionError(
            f"budget {budget:,} bytes ({format_bytes(budget)}) is below the smallest plan for this model: "
            f"{smallest:,} bytes ({format_bytes(smallest)}), of which activations {format_bytes(activation_bytes)}; "
            f"the budget must be at least {smallest:,} bytes"
        )
    _, names, indices, step, schedule, device, copied = best
    options = options_for(footprint, names, indices, step)
    return BudgetPlan(options, schedule, device, budget, activation_bytes, copied, fitting)


def device_bytes(
    footprint: Footprint, names: tuple[str, ...], indices: tuple[int, ...], step: int, activation_bytes: int
) -> int:
    """Predicted peak device memory of offloading ``indices`` (filtered by ``names``) with ``step`` slots."""
    blocks = footprint.blocks[names]
    slots = min(step, len(indices))
    sizes = [0] * slots
    for k, layer in enumerate(indices):
        sizes[k % slots] = max(sizes[k % slots], blocks[layer])
    slot_pool = sum(_round_up(size, footprint.slot_rounding) for size in sizes)
    saved = sum(footprint.saved[names][i] for i in indices)
    return footprint.resident_bytes - saved + slot_pool + activation_bytes


def predict(footprint: Footprint, cost: CostTable, names: tuple[str, ...], indices: tuple[int, ...], step: int) -> Schedule:
    """The steady-state schedule of one plan under ``cost``.

    Where the plan will chunk its copies (the planner's plans leave
    ``chunked_copies`` at its default, ``"auto"``) and the table says how each
    layer reads its chunks, the copies are priced chunk by chunk, each chunk at
    the bandwidth of its own size; otherwise whole layers.
    """
    blocks = [footprint.blocks[names][i] for i in indices]
    chunks = cost.chunks(names, indices) if chunks_copies(PlanOptions.chunked_copies, step, blocks) else None
    if chunks is None:
        copies = [cost.bandwidth.copy_seconds(nbytes) for nbytes in blocks]
        return simulate(cost.layer_seconds, indices, copies, step, cost.outside_seconds, cost.spans(names, indices))
    chunk_copies = [
        tuple(ChunkCopy(cost.bandwidth.copy_seconds(round(chunk.share * nbytes)), chunk.first, chunk.last) for chunk in layer)
        for nbytes, layer in zip(blocks, chunks)
    ]
    return simulate_chunks(cost.layer_seconds, indices, chunk_copies, step, cost.outside_seconds)


def copied_bytes(footprint: Footprint, names: tuple[str, ...], indices: tuple[int, ...], step: int) -> int:
    """Host-to-device bytes per steady-state forward (none once every offloaded layer has its own slot)."""
    return sum(footprint.blocks[names][i] for i in indices) if len(indices) > step else 0


def group_indices(num_layers: int, group_size: int, num_in_group: int) -> tuple[int, ...]:
    """The layers the group knobs offload: the last ``num_in_group`` of every ``group_size``."""
    return tuple(i for i in range(num_layers) if i % group_size >= group_size - num_in_group)


def options_for(footprint: Footprint, names: tuple[str, ...], indices: tuple[int, ...], step: int) -> PlanOptions:
    """Plan knobs for a layer set: group knobs where it is a group pattern (the log reads as usual), else indices."""
    for group, count in _groups(footprint.num_layers):
        if _selected(footprint.blocks[names], group_indices(footprint.num_layers, group, count)) == indices:
            return PlanOptions(
                group_size=group, num_in_group=count, prefetch_step=step, offload_params=names, layers=footprint.layer_list_path
            )
    return PlanOptions(prefetch_step=step, offload_params=names, layers=footprint.layer_list_path, offload_layers=indices)


def spread_evenly(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer indices spread evenly over ``num_layers``, the last layer always among them.

    The gaps differ by at most one layer, so every copy gets about the same
    compute to hide behind; for ``count`` dividing ``num_layers`` this is the
    group pattern that offloads the last layer of each group.
    """
    return tuple((k + 1) * num_layers // count - 1 for k in range(count))


def _layer_sets(blocks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Candidate offloaded-layer sets, each once: the group patterns, then the even spreads."""
    num_layers = len(blocks)
    groups = [group_indices(num_layers, g, n) for g, n in _groups(num_layers)]
    spreads = [spread_evenly(num_layers, m) for m in range(1, num_layers + 1)]
    sets = [_selected(blocks, indices) for indices in groups + spreads]
    return [indices for position, indices in enumerate(sets) if indices and indices not in sets[:position]]


def _groups(num_layers: int) -> list[tuple[int, int]]:
    return [(g, n) for g in range(1, min(MAX_GROUP, num_layers) + 1) for n in range(1, g + 1)]


def _selected(blocks: tuple[int, ...], indices: tuple[int, ...]) -> tuple[int, ...]:
    """A layer the filter selects nothing of stays kept."""
    return tuple(i for i in indices if blocks[i])


def _round_up(nbytes: int, step: int) -> int:
    return (nbytes + step - 1) // step * step

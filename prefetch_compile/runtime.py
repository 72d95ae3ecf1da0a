"""The prefetch runtime of one offloaded model: copy stream, slot ownership, and copy events.

Invariant kept between forwards: slot ``s`` holds (or is being filled with)
offloaded layer ``s``. Every forward, eager, compiled or replayed from a CUDA
graph, ends by prefetching those first layers again, so a captured graph, whose
copies replay blindly, always finds the slots in the state it was captured in.

``start`` and ``wait`` are the bodies of the custom ops that the graph pass
inserts. ``wait`` is an "ensure": if nobody prefetched the layer (its reader sits
in an unexpected place, or a graph break split a layer), it copies the layer
itself, so a misplaced prefetch costs speed, never correctness.

On CPU the same code runs with synchronous copies, which makes any ordering
mistake of the pass show up as wrong numbers.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch

from .memory import HostArena, SlotPool, param_view
from .plan import LayerPlan, OffloadPlan

if TYPE_CHECKING:
    from .report import CopyRecorder, CopyReport

log = logging.getLogger("prefetch_compile")

_RUNTIMES: dict[int, weakref.ReferenceType[PrefetchRuntime]] = {}
_NEXT_ID = itertools.count()


def runtime_by_id(runtime_id: int) -> PrefetchRuntime:
    """The live runtime a compiled graph's custom op refers to."""
    runtime = _RUNTIMES.get(runtime_id, lambda: None)()
    if runtime is None:
        raise RuntimeError(f"prefetch runtime {runtime_id} no longer exists (its model was freed)")
    return runtime


def live_runtimes() -> list[PrefetchRuntime]:
    return [rt for ref in list(_RUNTIMES.values()) if (rt := ref()) is not None]


@dataclass(frozen=True)
class OffloadStats:
    """What offloading moved where, in layers and bytes."""

    total_layers: int
    offloaded_layers: int
    offloaded_bytes: int  # parameter bytes that no longer live on the device
    host_pinned_bytes: int  # the host arena (blocks are padded to the plan's alignment)
    slot_pool_bytes: int  # device memory spent on the slots
    kept_device_bytes: int  # parameters and buffers that stay on the device

    @property
    def device_bytes_saved(self) -> int:
        return self.offloaded_bytes - self.slot_pool_bytes


@dataclass
class _InFlight:
    """A copy issued on the copy stream and not yet waited for by the compute stream."""

    done: torch.cuda.Event
    in_capture: bool  # recorded inside a CUDA graph capture: only usable inside that capture


class PrefetchRuntime:
    """Moves offloaded layers between the host arena and the slot pool, in stream order."""

    def __init__(
        self,
        plan: OffloadPlan,
        device: torch.device,
        host: HostArena,
        slots: SlotPool,
        offloaded_params: Mapping[str, torch.nn.Parameter],
        kept_tensors: Mapping[str, torch.Tensor],
    ) -> None:
        if device.type == "cuda" and host.nbytes and not host.buffer.is_pinned():
            raise ValueError(
                "the host arena must be page-locked for a CUDA device: a non_blocking copy from pageable "
                "memory synchronises the stream, which breaks the copy/compute ordering and the overlap"
            )
        self.id = next(_NEXT_ID)
        self.plan = plan
        self.device = device
        self.host = host
        self.slots = slots
        self.layers: tuple[LayerPlan, ...] = plan.offloaded
        self.offloaded_params = dict(offloaded_params)
        self.kept_tensors = dict(kept_tensors)
        self._param_locations = {
            id(self.offloaded_params[placement.name]): (layer.offload_index, placement.name)
            for layer in self.layers
            for placement in layer.params
        }
        self._cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._slot_owner: list[int | None] = [None] * plan.num_slots
        self._in_flight: dict[int, _InFlight] = {}
        self.recorder: CopyRecorder | None = None  # set by start_recording(); told of every copy and wait
        _RUNTIMES[self.id] = weakref.ref(self)
        weakref.finalize(self, _RUNTIMES.pop, self.id, None)

    # ----------------------------------------------------------------- queries
    def locate(self, tensor: torch.Tensor) -> tuple[int, str] | None:
        """(offload index, parameter name) of an offloaded parameter, by identity; None otherwise."""
        return self._param_locations.get(id(tensor))

    def layer_of(self, param: torch.Tensor) -> int | None:
        """The offload index of the layer owning ``param`` (by tensor identity); None for a kept tensor."""
        location = self.locate(param)
        return None if location is None else location[0]

    def stats(self) -> OffloadStats:
        return OffloadStats(
            total_layers=len(self.plan.layers),
            offloaded_layers=len(self.layers),
            offloaded_bytes=self.plan.offloaded_bytes(),
            host_pinned_bytes=self.host.nbytes if self.host.pinned else 0,
            slot_pool_bytes=self.slots.nbytes,
            kept_device_bytes=sum(t.numel() * t.element_size() for t in self.kept_tensors.values()),
        )

    # -------------------------------------------------------------- the ops
    def start(self, offload_index: int) -> None:
        """Begin copying a layer into its slot, after all work already queued on the compute stream."""
        layer = self.layers[offload_index]
        if self._slot_owner[layer.slot] == offload_index:
            return
        self._slot_owner[layer.slot] = offload_index
        destination, source = self.slots.block(layer), self.host.block(layer)
        recorder = self.recorder
        if not self._cuda:
            if recorder is not None:
                recorder.copy_issued(offload_index, None)
                recorder.copy_began(offload_index, None)
            destination.copy_(source)
            if recorder is not None:
                recorder.copy_ended(offload_index, None)
            return
        compute = torch.cuda.current_stream(self.device)
        # The fork event orders the copy after the last reader of the slot's previous
        # layer, and inside a capture it is what pulls the copy stream into the graph.
        fork = torch.cuda.Event()
        fork.record(compute)
        if recorder is not None:
            recorder.copy_issued(offload_index, compute)
        self.copy_stream.wait_event(fork)
        with torch.cuda.stream(self.copy_stream):
            if recorder is not None:
                recorder.copy_began(offload_index, self.copy_stream)
            destination.copy_(source, non_blocking=True)
            if recorder is not None:
                recorder.copy_ended(offload_index, self.copy_stream)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self._in_flight[offload_index] = _InFlight(done, torch.cuda.is_current_stream_capturing())

    def wait(self, offload_index: int) -> None:
        """Make the compute stream wait until the layer is resident in its slot."""
        layer = self.layers[offload_index]
        missed = self._slot_owner[layer.slot] != offload_index
        if missed:
            self.start(offload_index)
        if self.recorder is None:
            self._wait_for_copy(offload_index)
            return
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        self.recorder.wait_began(offload_index, compute, missed)
        self._wait_for_copy(offload_index)
        self.recorder.wait_ended(offload_index, compute)

    def _wait_for_copy(self, offload_index: int) -> None:
        copy = self._in_flight.pop(offload_index, None)
        if copy is None:
            return
        if torch.cuda.is_current_stream_capturing() and not copy.in_capture:
            # Issued before this capture began; whoever began the capture synchronised
            # with it, and an event from outside the capture cannot be waited on inside.
            return
        torch.cuda.current_stream(self.device).wait_event(copy.done)

    def start_recording(self) -> CopyRecorder:
        """Record every copy and wait from now on, for :meth:`report` (a few microseconds per copy)."""
        from .report import CopyRecorder

        self.recorder = CopyRecorder(self.layers, self.device)
        return self.recorder

    def report(self) -> CopyReport:
        """Per offloaded layer: bytes, copy time, the window that hid it, the stall; and totals.

        Covers the forwards since :meth:`start_recording`; ``print(report.render())`` shows it.
        """
        if self.recorder is None:
            raise RuntimeError("nothing recorded: call runtime.start_recording() before the forwards to report on")
        return self.recorder.report()

    def join_capture(self) -> None:
        """Before a capture ends, fold every copy it started back into the capturing stream."""
        if not self._cuda or not torch.cuda.is_current_stream_capturing():
            return
        compute = torch.cuda.current_stream(self.device)
        for index, copy in list(self._in_flight.items()):
            if copy.in_capture:
                compute.wait_event(copy.done)
                del self._in_flight[index]

    def synchronize_copies(self) -> None:
        """Order all issued copies before later compute-stream work (before a capture or a weight update)."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._in_flight.clear()

    # ----------------------------------------------------------- weights
    def load_weights(self, new_values: Mapping[str, torch.Tensor]) -> None:
        """Overwrite parameters in place, offloaded or kept; later eager calls and graph replays see them.

        Every name, shape and dtype is checked before anything is written, so a
        bad update leaves the model as it was.
        """
        for name, value in new_values.items():
            current = self.offloaded_params.get(name, self.kept_tensors.get(name))
            if current is None:
                raise KeyError(f"load_weights: {name!r} is not a parameter or buffer of the offloaded model")
            if tuple(value.shape) != tuple(current.shape) or value.dtype != current.dtype:
                raise ValueError(
                    f"load_weights: {name!r} expects shape {tuple(current.shape)} and dtype {current.dtype}, "
                    f"got {tuple(value.shape)} and {value.dtype}"
                )
        self.synchronize_copies()
        placements = {p.name: (layer, p) for layer in self.layers for p in layer.params}
        for name, value in new_values.items():
            if name not in placements:
                self.kept_tensors[name].data.copy_(value)
                continue
            layer, placement = placements[name]
            param_view(self.host.block(layer), placement).copy_(value)
            if self._slot_owner[layer.slot] == layer.offload_index:
                # The slot already holds this layer: refresh it in place so the next read sees the update.
                param_view(self.slots.block(layer), placement).copy_(value)


def describe(stats: OffloadStats, plan: OffloadPlan) -> str:
    """The one log line of an offload."""
    return (
        f"prefetch_compile: offloaded {stats.offloaded_layers}/{stats.total_layers} layers of "
        f"'{plan.layer_list_path}' ({_pattern(plan)}), "
        f"{format_bytes(stats.offloaded_bytes)} to host, slot pool {plan.num_slots} slot(s) = {format_bytes(stats.slot_pool_bytes)}, "
        f"device bytes saved {format_bytes(stats.device_bytes_saved)}"
    )


def _pattern(plan: OffloadPlan) -> str:
    if plan.options.offload_layers is not None:
        return f"offload_layers={list(plan.options.offload_layers)}"
    return f"group_size={plan.options.group_size}, num_in_group={plan.options.num_in_group}"


def format_bytes(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"

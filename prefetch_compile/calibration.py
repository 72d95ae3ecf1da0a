"""Where the cost table's numbers come from: the device's copy and compute speeds, and the model's forward.

* :func:`device_profile` measures pinned host-to-device bandwidth at a few copy
  sizes, matmul throughput and device memory bandwidth, once per device: the
  result is cached as JSON under ``~/.cache/prefetch_compile/`` (or
  ``$PREFETCH_COMPILE_CACHE_DIR``), since a bandwidth sweep costs seconds and
  the link does not change between runs.
* :func:`trace_forward` runs the forward once on fake tensors (no memory,
  no compute): it records the peak of live activation bytes, the FLOPs inside
  and outside each layer, and each layer's inputs, for the planner's memory
  accounting, the roofline and the calibration.
* :func:`calibrate_layers` compiles a copy of one layer per distinct kind and
  times it on the device with inputs of the traced shapes.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import re
import statistics
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from ._torch_internals import (
    TorchDispatchMode,
    fake_tensor_mode,
    pytree,
    quiet_meta_kernel_failures,
    returns_new_memory,
)
from .cost_model import BandwidthCurve, ChunkRead, CostTable
from .discovery import find_layer_list, matches_offload_params
from .passes.prefetch import CHUNKS_PER_LAYER
from .planner import PARAM_FILTERS

log = logging.getLogger("prefetch_compile")

CACHE_ENV = "PREFETCH_COMPILE_CACHE_DIR"
PROFILE_VERSION = 1


@dataclass(frozen=True)
class DeviceProfile:
    """One device's speeds: the copy link as a curve, and the two roofline ceilings."""

    device: str
    h2d: BandwidthCurve
    matmul_flops_per_s: float  # measured on a large matmul in the model dtype family (bf16 on CUDA, fp32 on CPU)
    memory_bytes_per_s: float  # device memory read + write bandwidth of a large copy

    def roofline_seconds(self, flops: float, nbytes: float) -> float:
        """The slower of doing the math and moving the bytes: a lower bound that large kernels approach."""
        return max(flops / self.matmul_flops_per_s, nbytes / self.memory_bytes_per_s)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's geometry, recorded where the tensor itself must not be kept alive."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class OpCost:
    """One ATen op inside a layer, in the order the forward ran them."""

    flops: int
    nbytes: int  # parameter bytes it reads and bytes it creates
    reads: frozenset[str]  # dotted names of the parameters it reads (directly or through views)


@dataclass(frozen=True)
class ForwardTrace:
    """What one forward at the traced shapes does, per layer of the layer list and outside it."""

    layer_list_path: str
    activation_bytes: int  # peak live bytes of inputs and everything the forward allocates
    layer_flops: tuple[int, ...]
    layer_param_bytes: tuple[int, ...]
    layer_written_bytes: tuple[int, ...]  # bytes of the tensors each layer creates (eager, unfused)
    outside_flops: int
    outside_param_bytes: int
    outside_written_bytes: int
    layer_inputs: tuple[tuple[tuple, dict], ...]  # each layer's (args, kwargs), tensors replaced by TensorSpecs
    layer_ops: tuple[tuple[OpCost, ...], ...]  # where in each layer its parameters are read
    param_bytes: Mapping[str, int]  # bytes of each parameter by dotted name (what OpCost.reads names)


def device_profile(device: torch.device, cache_dir: str | Path | None = None, refresh: bool = False) -> DeviceProfile:
    """The device's profile from the cache, measured and written there on first use (or with ``refresh``)."""
    name = _device_name(device)
    path = _cache_dir(cache_dir) / f"device-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.json"
    if not refresh and path.exists():
        raw = json.loads(path.read_text())
        if raw.get("version") == PROFILE_VERSION and raw.get("device") == name:
            return DeviceProfile(
                name,
                BandwidthCurve(tuple(raw["h2d"]["sizes"]), tuple(raw["h2d"]["bytes_per_s"])),
                raw["matmul_flops_per_s"],
                raw["memory_bytes_per_s"],
            )
    profile = measure_device(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"version": PROFILE_VERSION, **asdict(profile)}, indent=1))
    temporary.replace(path)  # atomic: two processes measuring at once each write a whole file
    return profile


def measure_device(device: torch.device) -> DeviceProfile:
    """Measure the copy curve and the roofline ceilings (a few seconds on a GPU)."""
    cuda = device.type == "cuda"
    sizes = [2**p for p in range(20, 31, 2)] if cuda else [2**p for p in range(16, 27, 2)]
    bandwidths = [size / seconds for size, seconds in zip(sizes, _copy_seconds(sizes, device, cuda))]
    target, other = (torch.empty(sizes[-1], dtype=torch.uint8, device=device) for _ in range(2))
    memory = 2 * sizes[-1] / _median_seconds(lambda: other.copy_(target), device, reps=5)
    side, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(side, side, dtype=dtype, device=device)
    b = torch.randn(side, side, dtype=dtype, device=device)
    matmul = 2 * side**3 / _median_seconds(lambda: torch.mm(a, b), device, reps=5)
    return DeviceProfile(_device_name(device), BandwidthCurve(tuple(sizes), tuple(bandwidths)), matmul, memory)


def _copy_seconds(sizes: list[int], device: torch.device, pinned: bool) -> list[float]:
    """Median seconds of one host-to-device copy of each size, from one pinned buffer of the largest."""
    host = torch.empty(sizes[-1], dtype=torch.uint8, pin_memory=pinned).fill_(1)
    target = torch.empty(sizes[-1], dtype=torch.uint8, device=device)
    return [
        _median_seconds(lambda size=size: target[:size].copy_(host[:size], non_blocking=pinned), device, reps=5)
        for size in sizes
    ]


def trace_forward(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    layers: str | None = None,
    device: torch.device | None = None,
) -> ForwardTrace:
    """Run ``model(*example_inputs)`` (``model(**example_inputs)`` for a mapping) on fake tensors and record what
    each layer does.

    Parameters, buffers and inputs are swapped for fake tensors (shapes, dtypes
    and a device, no data) through ``torch.func.functional_call``, so the model
    itself is not touched and the trace costs no memory; only the inputs'
    shapes and dtypes matter. Fake rather than meta tensors, because models
    read them the way they read a compiled forward, which is how the plan will
    run: Hugging Face's mask and cache code sees a fake tensor as a trace
    (``is_tracing``) and takes its compile path, where on the meta device it
    took the eager shortcuts that ask a mask for its values (``.all()``, which
    a meta tensor cannot answer); and a fake tensor has the device the model
    will run on (``device``, else that of the model's parameters), so code that
    picks a kernel by device picks the one the device runs. A compiled ``forward``
    (``model.forward = torch.compile(...)``) runs eagerly here.

    Where an op's fake kernel refuses what the device's kernel runs (on the
    CPU, ``torch._grouped_mm`` in float32, which Hugging Face MoE layers call
    outside torch.compile), the forward is measured instead: run once for real
    where the model's weights are, at the same shapes, with the same recorder.
    That costs one eager forward and no weight memory beyond the model's own.
    """
    path, blocks = find_layer_list(model, layers)
    where = next(iter(model.parameters())).device
    device = device if device is not None else where
    call = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    try:
        with fake_tensor_mode() as fake:
            tensors = {name: _fake_like(t, device) for name, t in _named_tensors(model)}
            inputs = pytree.tree_map(lambda value: _fake_like(value, device), call)
        with quiet_meta_kernel_failures():
            return _record(model, path, blocks, tensors, inputs, fake)
    except Exception as error:  # noqa: BLE001  (any refusal of a fake kernel; the real forward re-raises real errors)
        log.info(
            "prefetch_compile: the fake-tensor trace of the forward failed (%s: %s); measuring it with one real "
            "forward on %s instead",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            where,
        )
    inputs = pytree.tree_map(lambda value: _real_like(value, where), call)
    return _record(model, path, blocks, dict(_named_tensors(model)), inputs, contextlib.nullcontext())


def _record(
    model: nn.Module,
    path: str,
    blocks: nn.ModuleList | nn.Sequential,
    tensors: dict[str, torch.Tensor],
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    mode: contextlib.AbstractContextManager,
) -> ForwardTrace:
    """Run the forward on ``inputs`` (positional and keyword arguments) with ``tensors`` as its parameters and
    buffers, in ``mode``, and record it."""
    recorder = _LiveBytes({id(tensor): name for name, tensor in tensors.items()})
    recorder.live = sum(_nbytes(t) for t in pytree.tree_flatten(inputs)[0] if isinstance(t, torch.Tensor))
    recorder.peak = recorder.live
    layer_inputs: list[tuple[tuple, dict] | None] = [None] * len(blocks)
    handles = []
    for index, block in enumerate(blocks):
        def before(module: nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
            # Geometry only (holding tensors would keep them live), taken now: a KV cache among the
            # arguments is updated in place by this layer and the ones after it.
            layer_inputs[index] = _map_tensors((args, kwargs), _spec)
            recorder.layer = index

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            recorder.layer = None

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), mode:
            with _FusedAttention(recorder), FlopCounterMode(display=False) as flops, recorder:
                torch.func.functional_call(model, tensors, *inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [index for index, recorded in enumerate(layer_inputs) if recorded is None]
    if missing:
        raise ValueError(f"the traced forward never called layers {missing} of '{path}'")
    counts = {name: sum(per_op.values()) for name, per_op in flops.get_flop_counts().items()}
    prefix = type(model).__name__ + (f".{path}" if path else "")
    layer_flops = tuple(
        counts.get(f"{prefix}.{index}", 0) + recorder.attention_flops.get(index, 0) for index in range(len(blocks))
    )
    layer_params = tuple(sum(_nbytes(p) for p in block.parameters()) for block in blocks)
    all_params = sum(_nbytes(p) for p in {id(p): p for p in model.parameters()}.values())
    return ForwardTrace(
        layer_list_path=path,
        activation_bytes=recorder.peak,
        layer_flops=layer_flops,
        layer_param_bytes=layer_params,
        layer_written_bytes=tuple(recorder.written.get(index, 0) for index in range(len(blocks))),
        outside_flops=counts.get("Global", 0) + sum(recorder.attention_flops.values()) - sum(layer_flops),
        outside_param_bytes=all_params - sum(layer_params),
        outside_written_bytes=recorder.written.get(None, 0),
        layer_inputs=tuple(layer_inputs),
        layer_ops=tuple(tuple(recorder.ops.get(index, ())) for index in range(len(blocks))),
        param_bytes={name: _nbytes(tensor) for name, tensor in model.named_parameters()},
    )


def roofline_cost_table(
    trace: ForwardTrace, profile: DeviceProfile, filters: tuple[tuple[str, ...], ...] = PARAM_FILTERS
) -> CostTable:
    """Compute times from FLOPs and bytes alone: each layer reads its weights and writes and reads its tensors once."""
    layers = tuple(
        profile.roofline_seconds(flops, params + 2 * written)
        for flops, params, written in zip(trace.layer_flops, trace.layer_param_bytes, trace.layer_written_bytes)
    )
    outside = profile.roofline_seconds(trace.outside_flops, trace.outside_param_bytes + 2 * trace.outside_written_bytes)
    spans = {names: read_spans(trace, profile, layers, names) for names in filters}
    chunks = {names: chunk_reads(trace, profile, layers, names) for names in filters}
    return CostTable(profile.h2d, layers, outside, source="roofline", read_spans=spans, chunk_reads=chunks)


def calibrated_cost_table(
    model: nn.Module,
    trace: ForwardTrace,
    profile: DeviceProfile,
    device: torch.device,
    compiler: str = "inductor",
    filters: tuple[tuple[str, ...], ...] = PARAM_FILTERS,
) -> CostTable:
    """Measured compute time per layer; the compute outside the layer list from the roofline."""
    roofline = roofline_cost_table(trace, profile)
    layers = calibrate_layers(model, trace, device, compiler)
    spans = {names: read_spans(trace, profile, layers, names) for names in filters}
    chunks = {names: chunk_reads(trace, profile, layers, names) for names in filters}
    return CostTable(
        profile.h2d, layers, roofline.outside_seconds, source="calibrated", read_spans=spans, chunk_reads=chunks
    )


def read_spans(
    trace: ForwardTrace, profile: DeviceProfile, layer_seconds: Sequence[float], names: tuple[str, ...]
) -> tuple[tuple[float, float], ...]:
    """Per layer, the compute before the first and after the last read of the parameters ``names`` selects.

    The layer's time is split between its ops in proportion to their roofline
    times. An MLP-only plan's copy may still arrive while the attention runs,
    and a whole layer's copy may start while its last elementwise ops run.
    """
    spans = []
    for ops, seconds in zip(trace.layer_ops, layer_seconds):
        windows = _op_windows(ops, seconds, profile)
        reads = [i for i, op in enumerate(ops) if any(matches_offload_params(name, names) for name in op.reads)]
        if not reads or windows is None:
            spans.append((0.0, 0.0))
            continue
        spans.append((windows[reads[0]][0], windows[-1][1] - windows[reads[-1]][1]))
    return tuple(spans)


def chunk_reads(
    trace: ForwardTrace, profile: DeviceProfile, layer_seconds: Sequence[float], names: tuple[str, ...]
) -> tuple[tuple[ChunkRead, ...], ...]:
    """Per layer, the chunks a chunked copy would move the parameters ``names`` selects in, and when each is read.

    As the prefetch pass cuts them: parameters in first-read order, consecutive
    ones merged while a chunk stays within ``1 / CHUNKS_PER_LAYER`` of the
    layer's read bytes (the pass also needs them adjacent in the block, which
    holds for the registration order of the decoder blocks it chunks). Times
    are placed as in :func:`read_spans`. A layer that reads nothing selected
    has no chunks.
    """
    layers = []
    for ops, seconds in zip(trace.layer_ops, layer_seconds):
        windows = _op_windows(ops, seconds, profile) or [(0.0, 0.0)] * len(ops)
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, op in enumerate(ops):
            for name in op.reads:
                if matches_offload_params(name, names):
                    first.setdefault(name, i)
                    last[name] = i
        order = sorted(first, key=lambda name: (first[name], name))
        read_bytes = sum(trace.param_bytes[name] for name in order)
        runs: list[list[str]] = []
        run_bytes: list[int] = []
        for name in order:
            size = trace.param_bytes[name]
            if runs and run_bytes[-1] + size <= read_bytes / CHUNKS_PER_LAYER:
                runs[-1].append(name)
                run_bytes[-1] += size
            else:
                runs.append([name])
                run_bytes.append(size)
        layers.append(
            tuple(
                ChunkRead(
                    share=nbytes / read_bytes,
                    first=windows[min(first[n] for n in run)][0],
                    last=windows[max(last[n] for n in run)][1],
                )
                for run, nbytes in zip(runs, run_bytes)
            )
        )
    return tuple(layers)


def _op_windows(ops: Sequence[OpCost], seconds: float, profile: DeviceProfile) -> list[tuple[float, float]] | None:
    """When each op runs within a layer of ``seconds``: the time split in proportion to the ops' roofline times.

    None when the ops have no roofline time to split by.
    """
    costs = [profile.roofline_seconds(op.flops, op.nbytes) for op in ops]
    total = sum(costs)
    if not total:
        return None
    ends = [seconds * done / total for done in itertools.accumulate(costs)]
    return list(zip([0.0, *ends[:-1]], ends))


def calibrate_layers(
    model: nn.Module, trace: ForwardTrace, device: torch.device, compiler: str = "inductor", reps: int = 10
) -> tuple[float, ...]:
    """Seconds per layer: one compiled copy per distinct layer kind (class, parameter shapes, input shapes), timed.

    A copy, so the model's own layers are neither moved nor compiled; layers of
    one kind share the measurement, so a stack of identical blocks costs one
    compile. A layer that updates a KV cache among its arguments gets a fresh
    copy of the cache object for every call (its tensors shared, materialised
    once), so each timed call sees the cache as the traced forward left it for
    that layer, not grown by the calls before.
    """
    _, blocks = find_layer_list(model, trace.layer_list_path)
    measured: dict[tuple, float] = {}
    seconds = []
    warmups = 2
    for block, inputs in zip(blocks, trace.layer_inputs):
        kind = _layer_kind(block, inputs)
        if kind not in measured:
            replica = copy.deepcopy(block).to(device).eval()
            template = _map_tensors(inputs, lambda spec: _materialise(spec, device), _is_spec)
            calls = iter([_map_tensors(template, _same) for _ in range(warmups + 1 + reps)])
            compiled = torch.compile(replica, backend=compiler, dynamic=False)

            def call() -> object:
                args, kwargs = next(calls)
                return compiled(*args, **kwargs)

            with torch.no_grad():
                for _ in range(warmups):
                    call()
                measured[kind] = _median_seconds(call, device, reps)
            del replica, compiled, template, calls
        seconds.append(measured[kind])
    return tuple(seconds)


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensors that ops create, their peak, what each layer wrote, and its ops.

    A tensor counts from the op that creates it (views and in-place results are
    not new memory) until it is freed, which a weak reference reports. Views of
    a parameter are followed, so the op that reads a transposed weight counts
    as reading the weight.
    """

    def __init__(self, parameters: dict[int, str]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.layer: int | None = None
        self.written: dict[int | None, int] = {}
        self.attention_flops: dict[int | None, int] = {}
        self.ops: dict[int, list[OpCost]] = {}
        self.parameters = parameters  # id of a parameter (or of a live view of one) -> its dotted name

    def __torch_dispatch__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        reads = {self.parameters[id(t)]: t for t in inputs if id(t) in self.parameters}
        outputs = [t for t in pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        fresh = returns_new_memory(func)
        if not fresh and reads:
            for tensor in outputs:  # a view of a parameter: its readers read the parameter
                if id(tensor) not in self.parameters:
                    self.parameters[id(tensor)] = next(iter(reads))
                    weakref.finalize(tensor, self.parameters.pop, id(tensor), None)
        created = sum(_nbytes(t) for t in outputs) if fresh else 0
        if self.layer is not None:
            flops = _matmul_flops(func, inputs, outputs)
            param_bytes = sum(_nbytes(t) for t in reads.values())
            self.ops.setdefault(self.layer, []).append(OpCost(flops, param_bytes + created, frozenset(reads)))
        if not fresh:
            return out
        for tensor in outputs:
            nbytes = _nbytes(tensor)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.written[self.layer] = self.written.get(self.layer, 0) + nbytes
            weakref.finalize(tensor, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


class _FusedAttention(TorchFunctionMode):
    """Scaled dot-product attention as a fused kernel runs it, not as the fake (meta) kernels' math fallback.

    On fake tensors attention decomposes into matmuls that materialise the
    whole score matrix (gigabytes at long sequences), which no GPU kernel does.
    Here it returns an empty output of the right shape and books the FLOPs of a
    fused kernel (half of them skipped when causal) to the current layer.
    """

    def __init__(self, recorder: _LiveBytes) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        flops = 2 * query.shape[:-1].numel() * key.shape[-2] * (query.shape[-1] + value.shape[-1])
        if kwargs.get("is_causal", args[5] if len(args) > 5 else False):
            flops //= 2
        layer = self.recorder.layer
        self.recorder.attention_flops[layer] = self.recorder.attention_flops.get(layer, 0) + flops
        if layer is not None:
            moved = sum(_nbytes(t) for t in (query, key, value)) + _nbytes(query) // query.shape[-1] * value.shape[-1]
            self.recorder.ops.setdefault(layer, []).append(OpCost(flops, moved, frozenset()))
        return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _matmul_flops(func: Callable, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
    """2 x multiply-adds of the matmul-like ATen ops a linear layer lowers to; 0 for the rest."""
    name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
    if name not in ("mm", "addmm", "bmm", "baddbmm") or not outputs:
        return 0
    left = inputs[-2]  # (bias,) left, right
    return 2 * outputs[0].numel() * left.shape[-1]


def time_calls(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn``, back to back, ``iters`` times (the benchmarks time with it too).

    On CUDA each call is bracketed by events on the current stream, so the
    numbers are the device timeline, including any time the device waits for
    the host (a hook that blocks on a copy shows up, as it should). On the CPU,
    wall-clock time.
    """
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """The median of ``reps`` timed calls, after one untimed warm-up call."""
    fn()
    return statistics.median(time_calls(fn, reps, device))


def _layer_kind(block: nn.Module, inputs: tuple[tuple, dict]) -> tuple:
    """What decides a layer's time: its class, parameter shapes and argument geometry.

    An object argument (a KV cache) counts by its class, not its contents: the
    traced forward fills the cache layer by layer, but each layer reads its own
    entry, which every layer of one forward finds in the same state.
    """
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in block.named_parameters())
    leaves = tuple(
        leaf if isinstance(leaf, (TensorSpec, *_PLAIN)) else type(leaf) for leaf in pytree.tree_flatten(inputs)[0]
    )
    return type(block), params, leaves


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _is_spec(value: Any) -> bool:
    return isinstance(value, TensorSpec)


def _same(value: Any) -> Any:
    return value


def _spec(value: Any) -> Any:
    return TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype) if isinstance(value, torch.Tensor) else value


def _materialise(value: Any, device: torch.device) -> Any:
    """A device tensor of a recorded geometry: random floats, zero integers (valid indices)."""
    if not isinstance(value, TensorSpec):
        return value
    real = torch.empty_strided(value.shape, value.stride, dtype=value.dtype, device=device)
    return real.normal_() if real.is_floating_point() else real.zero_()


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _real_like(value: Any, device: torch.device) -> Any:
    """An input for the measured forward: a real tensor on ``device`` (a meta one materialised), other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type == "meta":
        return _materialise(_spec(value), device)
    return value.to(device)


def _fake_like(value: Any, device: torch.device) -> Any:
    """A fake tensor of ``value``'s geometry on ``device``; other values as they are.

    Called inside the fake mode, where a factory function makes a fake tensor.
    """
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)


def _map_tensors(value: Any, fn: Callable[[Any], Any], is_tensor: Callable[[Any], bool] = torch.is_tensor) -> Any:
    """A snapshot of ``value``: ``fn`` applied to every tensor in it, containers and plain objects copied.

    A KV cache (``DynamicCache``, ``StaticCache``) is an object holding a list
    of per-layer objects that a layer fills or replaces in place, which pytree
    does not enter. Each plain object (one with a ``__dict__``; not a module, a
    class or a function) is copied with ``copy.copy`` and its attributes mapped,
    so the snapshot keeps the state of the moment, and a layer that updates it
    leaves the original, and the next snapshot, as they were. ``is_tensor`` says
    what counts as a tensor (a :class:`TensorSpec`, to map back).
    """
    return _mapped(value, fn, is_tensor, {})


def _mapped(value: Any, fn: Callable[[Any], Any], is_tensor: Callable[[Any], bool], memo: dict[int, Any]) -> Any:
    leaves, spec = pytree.tree_flatten(value)
    return pytree.tree_unflatten([_mapped_leaf(leaf, fn, is_tensor, memo) for leaf in leaves], spec)


def _mapped_leaf(leaf: Any, fn: Callable[[Any], Any], is_tensor: Callable[[Any], bool], memo: dict[int, Any]) -> Any:
    if is_tensor(leaf):
        return fn(leaf)
    state = getattr(leaf, "__dict__", None)
    if not isinstance(state, dict) or isinstance(leaf, (type, nn.Module)) or callable(leaf):
        return leaf
    if id(leaf) not in memo:  # an object reached twice (or from itself) is copied once
        memo[id(leaf)] = replica = copy.copy(leaf)
        vars(replica).update({name: _mapped(attribute, fn, is_tensor, memo) for name, attribute in state.items()})
    return memo[id(leaf)]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _cache_dir(explicit: str | Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prefetch_compile")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu-{platform.machine()}-{platform.processor() or 'unknown'}-{os.cpu_count()}"

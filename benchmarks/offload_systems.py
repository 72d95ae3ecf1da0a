"""The systems that bench_offload.py compares, each set up on a freshly built model.

Every offloading system offloads the same layers, the last of every
``group_size`` (the rule of ``prefetch_compile``'s ``num_in_group=1``), so all
of them run within the same device-memory budget for weights:

- ``resident``: ``torch.compile`` (Inductor), nothing offloaded: the ceiling.
  ``resident-cg`` is the same with ``mode="reduce-overhead"`` (CUDA graphs);
  ``resident-eager`` is the plain model, the ceiling for the eager peers.
- ``ours``: ``prefetch_compile.offload`` + the ``prefetch_offload`` backend, each
  layer copied whole (``chunked_copies=False``); ``ours sN chunked`` is the same
  with ``chunked_copies=True`` (each layer's copy cut at its parameters, each chunk
  started once the slot's previous layer has read those bytes).
- ``naive``: a few lines of our own: before each offloaded layer, one
  stream-ordered copy of its weights from pinned host memory into a shared
  device buffer, then compute, all on one stream (no overlap).
- ``accelerate``: ``accelerate.cpu_offload`` on each offloaded layer, its
  state dict kept in pinned memory.
- ``fsdp2``: ``fully_shard(layer, offload_policy=CPUOffloadPolicy(pin_memory=True))``
  on each offloaded layer, in a one-rank process group.
- ``diffusers``: ``apply_group_offloading(offload_type="block_level",
  num_blocks_per_group=1, use_stream=True, record_stream=True)`` over the
  offloaded layers only (see :func:`_prepare_diffusers`).

The peers run eagerly (their hooks are Python; ``--peer-compile`` wraps them in
``torch.compile`` too). A system that cannot run here raises :class:`Skip`.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

RESIDENT_KINDS = ("resident", "resident-cg", "resident-eager")
PEER_KINDS = ("naive", "accelerate", "fsdp2", "diffusers")
ALL_KINDS = (*RESIDENT_KINDS, "ours", *PEER_KINDS)


class Skip(Exception):
    """This system cannot run in this environment; the message says why."""


@dataclass(frozen=True)
class SystemSpec:
    kind: str
    group_size: int | None = None  # offload 1 of every group_size layers; None: nothing offloaded
    prefetch_step: int = 1  # ours only
    cuda_graphs: bool = False  # ours only
    chunked: bool = False  # ours only: chunked_copies

    @property
    def label(self) -> str:
        """The curve this point belongs to (the fraction is the x axis)."""
        if self.kind == "ours":
            return f"ours s{self.prefetch_step}" + (" chunked" if self.chunked else "") + (" cg" if self.cuda_graphs else "")
        return self.kind

    @property
    def fraction(self) -> float:
        return 0.0 if self.group_size is None else 1.0 / self.group_size

    @property
    def fraction_label(self) -> str:
        return "0" if self.group_size is None else f"1/{self.group_size}"

    @property
    def name(self) -> str:
        return self.label if self.group_size is None else f"{self.label} @{self.fraction_label}"


@dataclass
class Prepared:
    """A system ready to run: call ``forward(tokens)`` inside ``grad_mode()``."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    grad_mode: Callable[[], ContextManager] = torch.inference_mode
    host_pinned_bytes: int = 0
    host_bytes: int = 0  # host memory that holds offloaded weights (pinned or not)
    warmup: int = 2  # calls before the timed ones, the first (compiling) call and the checked one included
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    keep: list = field(default_factory=list)  # objects that must outlive the forward (runtimes, wrappers)


def offloaded_indices(model: nn.Module, group_size: int | None) -> list[int]:
    """The layers prefetch_compile's plan offloads at this group size (num_in_group=1): every peer gets the same ones."""
    if group_size is None:
        return []
    from prefetch_compile import PlanOptions
    from prefetch_compile.plan import build_plan

    return [layer.index for layer in build_plan(model, PlanOptions(group_size=group_size)).offloaded]


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def prepare(
    spec: SystemSpec,
    model: nn.Module,
    device: torch.device,
    *,
    peer_compile: bool = False,
    fsdp_prefetch: bool = False,
    compile_kwargs: dict | None = None,
) -> Prepared:
    """Set ``spec`` up on ``model`` (freshly built, on ``device``); may raise :class:`Skip`.

    ``compile_kwargs`` go to every ``torch.compile`` call (e.g. ``{"dynamic": False}``).
    """
    kw = dict(compile_kwargs or {})
    indices = offloaded_indices(model, spec.group_size)
    if spec.group_size is not None and not indices:
        raise Skip(f"no layer is offloaded at {spec.fraction_label} with {len(model.layers)} layers")
    if spec.kind == "resident":
        return Prepared(torch.compile(model, **kw))
    if spec.kind == "resident-cg":
        _need_cuda(device, "CUDA graphs")
        return Prepared(torch.compile(model, mode="reduce-overhead", **kw), warmup=3)
    if spec.kind == "resident-eager":
        return Prepared(model)
    if spec.kind == "ours":
        return _prepare_ours(spec, model, device, kw)
    prepared = prepare_peer(spec.kind, model, [model.layers[index] for index in indices], device,
                            fsdp_prefetch=fsdp_prefetch)
    prepared.notes.insert(0, "eager" if not peer_compile else "torch.compile")
    if peer_compile:
        prepared.forward = torch.compile(prepared.forward, **kw)
    return prepared


def prepare_peer(
    kind: str, model: Callable[..., object], layers: list[nn.Module], device: torch.device, *, fsdp_prefetch: bool = False
) -> Prepared:
    """Set peer ``kind`` up to offload ``layers`` of ``model``; compiling is left to the caller.

    ``model`` is the model (``naive`` and ``fsdp2`` read its layers), or for
    ``accelerate`` and ``diffusers`` whatever a forward calls: an HF model's
    bound ``forward``, when ``generate`` drives it.
    """
    preparers = {
        "naive": _prepare_naive,
        "accelerate": _prepare_accelerate,
        "fsdp2": lambda *a: _prepare_fsdp2(*a, prefetch=fsdp_prefetch),
        "diffusers": _prepare_diffusers,
    }
    if kind not in preparers:
        raise ValueError(f"unknown system {kind!r}; known: {ALL_KINDS}")
    return preparers[kind](model, layers, device)


def _need_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} needs CUDA")


# ---------------------------------------------------------------------- ours
def _prepare_ours(spec: SystemSpec, model: nn.Module, device: torch.device, compile_kwargs: dict) -> Prepared:
    if spec.cuda_graphs:
        _need_cuda(device, "cuda_graphs=True")
    import prefetch_compile

    runtime = prefetch_compile.offload(
        model, device=str(device), group_size=spec.group_size, num_in_group=1, prefetch_step=spec.prefetch_step,
        chunked_copies=spec.chunked,
    )
    stats = runtime.stats()
    compiled = torch.compile(
        model, backend="prefetch_offload", options={"cuda_graphs": spec.cuda_graphs}, **compile_kwargs
    )
    stats_dict = {name: getattr(stats, name) for name in (
        "offloaded_layers", "total_layers", "offloaded_bytes", "host_pinned_bytes", "slot_pool_bytes", "kept_device_bytes"
    ) if hasattr(stats, name)}
    stats_dict["pieces_per_layer"] = len(runtime.plan.piece_starts)
    return Prepared(
        compiled,
        host_pinned_bytes=stats_dict.get("host_pinned_bytes", 0),
        host_bytes=stats_dict.get("host_pinned_bytes") or stats_dict.get("offloaded_bytes", 0),
        warmup=3 if spec.cuda_graphs else 2,
        # A layer alone in its slot is copied once and stays: the link limit counts only the others.
        extra={"stats": stats_dict, "copied_bytes": runtime.plan.copied_bytes_per_forward()},
        keep=[runtime],
    )


# --------------------------------------------------------------------- naive
def _prepare_naive(model: nn.Module, layers: list[nn.Module], device: torch.device) -> Prepared:
    """One device buffer shared by all offloaded layers; a pre-hook copies each layer in before it runs."""
    from prefetch_compile import PlanOptions
    from prefetch_compile.plan import build_plan

    pin = device.type == "cuda"
    plan = build_plan(model, PlanOptions(group_size=1))  # every layer's packing, as ours packs it
    packing = {layer.index: layer for layer in plan.offloaded}
    params = dict(model.named_parameters())
    plans = []  # per layer: (host block, [(param, offset, nbytes)])
    for layer in layers:
        packed = packing[list(model.layers).index(layer)]
        placed = [(params[p.name], p.offset, p.nbytes) for p in packed.params]
        plans.append((torch.empty(packed.nbytes, dtype=torch.uint8, pin_memory=pin), placed))
    buffer = torch.empty(max(host.numel() for host, _ in plans), dtype=torch.uint8, device=device)

    def view(block: torch.Tensor, param: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
        return block[offset : offset + nbytes].view(param.dtype).view(param.shape)

    for layer, (host, placed) in zip(layers, plans):
        for param, offset, nbytes in placed:
            view(host, param, offset, nbytes).copy_(param.detach())
            param.data = view(buffer, param, offset, nbytes)  # the layer's old device storage is freed here

        @torch.compiler.disable  # with --peer-compile: a graph break, not a traced copy into an aliased buffer
        def onload(module: nn.Module, args: object, host: torch.Tensor = host) -> None:
            # Same stream as the compute: ordered after the previous layer's reads, before this layer's.
            buffer[: host.numel()].copy_(host, non_blocking=pin)

        layer.register_forward_pre_hook(onload)
    pinned = sum(host.numel() for host, _ in plans) if pin else 0
    return Prepared(
        model,
        host_pinned_bytes=pinned,
        host_bytes=sum(host.numel() for host, _ in plans),
        notes=["one shared device buffer, copy then compute on one stream"],
        keep=[buffer],
    )


# ---------------------------------------------------------------- accelerate
def _prepare_accelerate(model: nn.Module, layers: list[nn.Module], device: torch.device) -> Prepared:
    try:
        from accelerate import cpu_offload
    except Exception as error:
        raise Skip(f"accelerate does not import: {type(error).__name__}: {error}") from error
    pin = device.type == "cuda"
    host_bytes = 0
    for layer in layers:
        state = {name: t.detach().to("cpu") for name, t in layer.state_dict().items()}
        if pin:
            state = {name: t.pin_memory() for name, t in state.items()}
        host_bytes += sum(t.numel() * t.element_size() for t in state.values())
        cpu_offload(layer, execution_device=device, state_dict=state)
    return Prepared(
        model,
        grad_mode=torch.no_grad,
        host_pinned_bytes=host_bytes if pin else 0,
        host_bytes=host_bytes,
        notes=["cpu_offload per offloaded layer, state dict pinned" if pin else "cpu_offload per offloaded layer"],
    )


# --------------------------------------------------------------------- FSDP2
_PROCESS_GROUP_NOTE: list[str] = []


def ensure_process_group(device: torch.device) -> str:
    """A one-rank default process group (NCCL on CUDA if it starts, else Gloo), made once per process."""
    import torch.distributed as dist

    if dist.is_initialized():
        return _PROCESS_GROUP_NOTE[0] if _PROCESS_GROUP_NOTE else dist.get_backend()
    backends = ["cpu:gloo,cuda:nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    errors = []
    for backend in backends:
        store_path = tempfile.mktemp(prefix="bench_offload_pg_")
        try:
            store = dist.FileStore(store_path, 1)
            kwargs = {"device_id": device} if device.type == "cuda" and "nccl" in backend else {}
            dist.init_process_group(backend, store=store, rank=0, world_size=1, **kwargs)
            _PROCESS_GROUP_NOTE.append(backend)
            return backend
        except Exception as error:
            errors.append(f"{backend}: {type(error).__name__}: {error}")
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    raise Skip("could not start a one-rank process group: " + "; ".join(errors))


def destroy_process_group() -> None:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _prepare_fsdp2(model: nn.Module, layers: list[nn.Module], device: torch.device, prefetch: bool = False) -> Prepared:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    except Exception as error:
        raise Skip(f"FSDP2 does not import: {type(error).__name__}: {error}") from error
    backend = ensure_process_group(device)
    mesh = init_device_mesh(device.type, (1,))
    pin = device.type == "cuda"
    host_bytes = sum(param_bytes(layer) for layer in layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=pin), reshard_after_forward=True)
    notes = [f"fully_shard per offloaded layer, 1 rank ({backend})"]
    if prefetch:
        for current, following in zip(layers, layers[1:]):
            current.set_modules_to_forward_prefetch([following])
        notes.append("explicit forward prefetch chain")
    return Prepared(
        model,
        grad_mode=torch.no_grad,
        host_pinned_bytes=host_bytes if pin else 0,
        host_bytes=host_bytes,
        notes=notes,
    )


# ----------------------------------------------------------------- diffusers
class _OffloadedLayers(nn.Module):
    """Hands diffusers only the offloaded layers, while a forward still runs the whole model.

    ``apply_group_offloading(block_level)`` makes one group per block of each
    ``nn.ModuleList`` child, and one extra group of everything else owned by the
    module it is applied to. Applied to the model itself, that extra group
    would be the embedding, the kept layers and the head, moved on and off the
    device every forward: not the same memory budget. Here the only other
    tensor is a one-element anchor buffer, whose group carries diffusers' lazy
    prefetch hook: on the first forward it records the order the layers run in
    and then chains each layer's copy (on diffusers' stream) to the one before.
    """

    def __init__(self, model: Callable[..., object], layers: list[nn.Module], device: torch.device) -> None:
        super().__init__()
        self.offloaded = nn.ModuleList(layers)
        self.register_buffer("anchor", torch.zeros(1, device=device))
        self._model = [model]  # in a list: not a submodule, so diffusers leaves its other weights alone

    def forward(self, *args: object, **kwargs: object) -> object:
        return self._model[0](*args, **kwargs)


def _prepare_diffusers(model: Callable[..., object], layers: list[nn.Module], device: torch.device) -> Prepared:
    """``model`` is what a forward runs: the model, or (HF ``generate``) its original bound ``forward``."""
    try:
        from diffusers.hooks import apply_group_offloading
    except Exception as error:
        raise Skip(f"diffusers does not import: {type(error).__name__}: {error}") from error
    wrapper = _OffloadedLayers(model, layers, device)
    use_stream = device.type == "cuda"
    notes = ["block_level, num_blocks_per_group=1, offloaded layers only"]
    if use_stream:
        notes.append("use_stream=True, record_stream=True")
    else:
        notes.append("use_stream=False (streams need CUDA)")
    apply_group_offloading(
        wrapper,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=use_stream,
        record_stream=use_stream,
    )
    host_bytes = sum(param_bytes(layer) for layer in layers)
    return Prepared(
        wrapper,
        grad_mode=torch.no_grad,
        host_pinned_bytes=host_bytes if use_stream else 0,
        host_bytes=host_bytes,
        notes=notes,
        warmup=3,  # the first forward only records the execution order
        keep=[wrapper],
    )

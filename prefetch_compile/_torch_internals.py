"""Every private PyTorch API the project touches, in one place.

These differ between torch releases (2.11 on the GPU machine, 2.13 in CI); a
change there should need an edit here only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import fx, nn


def parameter_owners(gm: fx.GraphModule) -> list[nn.Module]:
    """The modules Dynamo read the graph's parameters from, each once: the module the compiled frame runs on.

    Dynamo records for every graph input its ``Source``, the access path from a
    local or global of the frame being compiled, e.g.
    ``L['self']._modules['layers']._modules['3']._parameters['weight']``, or
    ``L['args'][0]._modules[...]`` when the frame is a decorator's wrapper of a
    forward. The owner is the first ``nn.Module`` on that path, followed from the
    frame's locals or globals as Dynamo holds them. A path that reaches no module
    through locals, globals, items and attributes (a closure cell, say) names none.
    """
    from torch._dynamo.source import AttrSource, DictGetItemSource, GetItemSource, GlobalSource, LocalSource
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._guards import ChainedSource

    translator = InstructionTranslator.current_tx()
    if translator is None:
        return []
    owners: dict[int, nn.Module] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        if arg is None or arg.source is None or not isinstance(arg.example, nn.Parameter):
            continue
        path = [arg.source]
        while isinstance(path[-1], ChainedSource):
            path.append(path[-1].base)
        root, steps = path[-1], reversed(path[:-1])
        if isinstance(root, LocalSource) and root.local_name in translator.f_locals:
            value = translator.f_locals[root.local_name]
        elif isinstance(root, GlobalSource) and root.global_name in translator.f_globals:
            value = translator.f_globals[root.global_name]
        else:
            continue
        for step in steps:
            if isinstance(value, nn.Module):
                break
            try:
                if isinstance(step, (GetItemSource, DictGetItemSource)):
                    value = value[step.index]
                elif isinstance(step, AttrSource):
                    value = getattr(value, step.member)
                else:
                    break
            except (LookupError, AttributeError, TypeError):
                break
        if isinstance(value, nn.Module):
            owners[id(value)] = value
    return list(owners.values())


def is_traceable_wrapper_subclass(value: object) -> bool:
    """Whether ``value`` is a tensor subclass that Dynamo and AOT autograd see through ``__tensor_flatten__``."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass as check

    return check(value)


def aot_placeholder_sources(dynamo_inputs: Sequence[Any]) -> list[tuple[int, tuple[str, ...] | None]]:
    """For each placeholder of AOT autograd's graph, the Dynamo input it comes from and the inner path inside it.

    AOT replaces each traceable subclass input by its inner values, depth first
    in ``__tensor_flatten__`` order, followed by one placeholder per symbolic
    size, then per symbolic stride, of the subclass (path ``None``). Plain
    inputs map to themselves (path ``()``). ``dynamo_inputs`` must be Dynamo's
    fake values (``example_value`` of its placeholders), whose sizes say which
    are symbolic; the real example inputs do not.

    This mirrors ``unwrap_tensor_subclasses(..., append_symints=True)`` of
    ``torch/_functorch/_aot_autograd/subclass_utils.py``; the backend checks each
    placeholder's fake value against the input it is mapped to, so a change of
    that order fails loudly instead of misplacing an offloaded weight.
    """
    from .leaves import flatten

    sources: list[tuple[int, tuple[str, ...] | None]] = []
    for index, value in enumerate(dynamo_inputs):
        sources.extend((index, path) for path, _ in flatten(value))
        if is_traceable_wrapper_subclass(value):
            symbolic = [s for s in (*value.size(), *value.stride()) if _is_symbolic(s)]
            sources.extend((index, None) for _ in symbolic)
    return sources


def _is_symbolic(size: object) -> bool:
    return isinstance(size, torch.SymInt) and not size.node.is_nested_int()


def static_fake(tensor: torch.Tensor) -> torch.Tensor:
    """A fake of ``tensor`` with static sizes, strides and storage offset, in the fake mode Dynamo is tracing with."""
    from torch._guards import TracingContext

    return TracingContext.get().fake_mode.from_tensor(tensor.detach(), static_shapes=True)


class CudaCalls(NamedTuple):
    """The C functions behind ``torch.cuda``'s stream and event wrappers, for the runtime's copy path.

    The runtime's copies and waits run between an Inductor graph's kernel
    launches, where each Python frame costs several times what it does in a
    loop (the caches are cold), and the wrappers add one or two frames per call
    (``Event.record`` over ``_CudaEventBase.record``, ``Stream.wait_event`` over
    ``Event.wait``, ``set_device``'s parsing of its argument). Calling these directly,
    with the ops' one-lookup resolution of their parameters, halved a waiting
    ``wait_prefetch`` inside a forward on the H100 (28.7 to 14.4 µs, ``f0061da``
    beside ``e09a925``, BENCHMARKS.md). The copy path uses them; everything
    else uses the public wrappers.
    """

    current_stream_handle: Callable[[int], int]  # the raw cudaStream_t of a device's current stream, no Stream made
    is_capturing: Callable[[], bool]  # torch.cuda.is_current_stream_capturing
    record: Callable[[torch.cuda.Event, torch.cuda.Stream], None]  # event.record(stream)
    wait: Callable[[torch.cuda.Event, torch.cuda.Stream], None]  # event.wait(stream)
    current_device: Callable[[], int]  # torch.cuda.current_device, CUDA already initialised
    set_device: Callable[[int], None]  # torch.cuda.set_device, by index


def cuda_calls() -> CudaCalls:
    """The CUDA build's entry points (absent from a CPU build: call only for a CUDA device)."""
    C = torch._C
    return CudaCalls(
        C._cuda_getCurrentRawStream,
        C._cuda_isCurrentStreamCapturing,
        C._CudaEventBase.record,
        C._CudaEventBase.wait,
        C._cuda_getDevice,
        C._cuda_setDevice,
    )


def is_compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile(model)`` wraps a model in (it holds the model)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule)


def compile_id() -> str:
    """Dynamo's id of the graph being compiled (``frame/recompile``, as in ``TORCH_LOGS`` and tlparse), or ``"eager"``."""
    from torch._guards import CompileContext

    current = CompileContext.current_compile_id()
    return str(current) if current is not None else "eager"


def forget_traced_path() -> None:
    """Clear the speculation log of the frame Dynamo is tracing, as Dynamo does where a restart may trace differently.

    On a restart of a frame's analysis Dynamo replays the frame against that log
    and fails (``SpeculationLogDivergence``) where the new trace takes another
    path. Dynamo clears it itself before a restart it knows diverges (compile
    collectives); an empty log costs at most one more restart at a graph break.
    """
    from torch._dynamo import symbolic_convert

    tracer = getattr(symbolic_convert.tls, "current_tx", None)
    if isinstance(tracer, symbolic_convert.InstructionTranslator):
        tracer.speculation_log.clear()


def never_compiled_as_a_frame(fn: Callable) -> Callable:
    """Keep Dynamo from compiling ``fn`` as a frame of its own, while it still inlines ``fn`` where it traces a call.

    Eager code that runs inside a compiled region (after a graph break) has every
    Python function it calls caught and compiled by Dynamo, module hooks included.
    ``torch.compiler.disable`` would stop that, but also turn each traced call
    of ``fn`` into a graph break. Skipping the code object only affects the
    frame Dynamo is handed; inlining checks the function, not its code. The code
    is shared by every closure made from one ``def``, so this covers them all.
    """
    from torch._dynamo.eval_frame import skip_code

    skip_code(fn.__code__)
    return fn


def has_static_address(value: object) -> bool:
    """Whether Dynamo was told the tensor keeps its address (``torch._dynamo.mark_static_address``)."""
    return isinstance(value, torch.Tensor) and hasattr(value, "_dynamo_static_input_type")


def storage_use_count(tensor: torch.Tensor) -> int:
    """How many tensors (and storage objects) share ``tensor``'s storage: a view the caller kept of it counts too.

    A weak reference to the tensor object cannot tell whether its memory is still
    in use, since a view (``logits[:, -1]``) keeps the storage and not the tensor.
    """
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def fake_result(graph: fx.Graph, target: Any, args: tuple) -> Any:
    """Run ``target``'s fake implementation on the fake values of ``args`` (nodes), in their fake mode.

    Returns None when some value is missing or the values are not fakes of one mode
    (a hand-built graph in a test, nodes added after tracing).
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_leaves, tree_map

    def fake(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return value.meta.get("val", value.meta.get("example_value"))
        return value

    fake_args = tree_map(fake, args)
    if any(isinstance(node, fx.Node) and fake(node) is None for node in tree_leaves(args)):
        return None  # a node without a fake value (made by a pass after tracing)
    tensors = [leaf for leaf in tree_leaves(fake_args) if isinstance(leaf, torch.Tensor)]
    modes = {id(leaf.fake_mode): leaf.fake_mode for leaf in tensors if isinstance(leaf, FakeTensor)}
    if len(modes) != 1 or len(tensors) != sum(isinstance(leaf, FakeTensor) for leaf in tensors):
        return None
    with next(iter(modes.values())):
        return target(*fake_args)


def emit_artifact(name: str, text: Callable[[], str]) -> None:
    """Put a text artifact into PyTorch's structured trace (``TORCH_TRACE``, read by tlparse); built only if traced."""
    torch._logging.trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=text)


def inductor_freezing_enabled() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)


# The modules besides passes/ whose code decides what the pass writes into a graph.
_PASS_MODULES = ("ops.py", "backend.py", "leaves.py", "_torch_internals.py")


def pass_source_files() -> tuple[str, ...]:
    """The files whose code the pass's output depends on, hashed into its FX-graph-cache key.

    The passes package is found through its own ``__file__``: in a source
    checkout (an editable install) it is ``passes/``, not below ``prefetch_compile/``.
    """
    from . import passes

    package = Path(__file__).resolve().parent
    files = [*Path(passes.__file__).resolve().parent.glob("*.py"), *(package / name for name in _PASS_MODULES)]
    return tuple(sorted(str(path) for path in files))


def compile_with_inductor(
    gm: fx.GraphModule, example_inputs: list[Any], graph_pass: Callable[[fx.Graph], None], cache_key: str | None
) -> Callable:
    """Inductor, with ``graph_pass`` run on the post-grad ATen graph (after the user's own post pass, if any).

    ``cache_key`` names everything the pass's output depends on beyond the graph;
    with the source of the pass and the ops it becomes the pass's uuid, so that
    Inductor's FX graph cache serves a compiled graph again only where the pass
    would have produced the same code. A None key bypasses the cache.

    Inductor's ``reorder_for_locality`` is off for these graphs: it runs before the
    post-grad hook and moves compute of one block (say, a diffusion transformer
    block's modulation matmul, which reads only that block's weights and the time
    embedding) next to its last user, past the next block's first read. Two
    layers sharing a slot would then really interleave, and the pass could only
    refuse them (SlotConflictError). The scheduler still fuses as before; only
    the pre-fusion node order is left as the model wrote it.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    user_pass = inductor_config.post_grad_custom_post_pass
    sources = pass_source_files()

    class ChainedPostGradPass(CustomGraphPass):
        """Inductor's post-grad hook: the user's own post pass, then ``graph_pass``, with one cache key for both."""

        def __call__(self, graph: fx.Graph) -> None:
            if user_pass is not None:
                user_pass(graph)
            graph_pass(graph)

        def uuid(self) -> Any:
            user_uuid = user_pass.uuid() if isinstance(user_pass, CustomGraphPass) else None
            if cache_key is None or (user_pass is not None and user_uuid is None):
                return None  # the user's pass cannot be cached, so neither can the pair
            return (get_hash_for_files(sources).hex(), cache_key, user_uuid)

    patches = {"post_grad_custom_post_pass": ChainedPostGradPass(), "reorder_for_locality": False}
    return compile_fx(gm, example_inputs, config_patches=patches)


def compile_with_aot_eager(gm: fx.GraphModule, example_inputs: list[Any], graph_pass: Callable[[fx.Graph], None]) -> Callable:
    """AOT autograd's ATen graph, run by the FX interpreter after ``graph_pass``: Inductor's IR, without Inductor."""
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(aten_gm: fx.GraphModule, aten_inputs: list[Any]) -> Callable:
        graph_pass(aten_gm.graph)
        aten_gm.recompile()
        return aten_gm

    return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)


# The budget planner's fake-tensor trace (prefetch_compile/calibration.py): a dispatch mode that
# sees every op's outputs, and pytree helpers to walk nested arguments.
from torch.utils import _pytree as pytree  # noqa: E402, F401  (re-exported)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402, F401  (re-exported)


def fake_tensor_mode() -> TorchDispatchMode:
    """A fresh fake-tensor mode with static shapes, for the planner's trace of a forward.

    Inside it factory functions make fake tensors (any device, no memory, no
    data), and a real tensor that meets a fake one (a module's plain tensor
    attribute) is faked on the fly instead of refused.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


@contextmanager
def quiet_meta_kernel_failures() -> Iterator[None]:
    """Drop the traceback that fake-tensor mode logs, at ERROR, when an op's meta kernel raises.

    The planner's trace catches that error and measures the forward for real
    instead (``calibration.trace_forward``); printed first, the traceback read as
    a crash to users (a Hugging Face MoE layer's ``_grouped_mm`` on the CPU).
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed while attempting to run meta")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def returns_new_memory(op: Callable) -> bool:
    """Whether an ATen op's outputs are fresh tensors, not views or in-place results of its inputs.

    Read from the schema's alias annotations: below autograd, where a dispatch
    mode runs, a view does not say it is one. ``_unsafe_view`` is a view whose
    schema claims a fresh tensor.
    """
    schema = getattr(op, "_schema", None)
    if schema is None or schema.name == "aten::_unsafe_view":
        return False
    return all(ret.alias_info is None for ret in schema.returns)

"""The ``prefetch_offload`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point).

For each graph Dynamo hands over, the backend finds the runtime that owns the
graph's offloaded parameters (offloading the model first if nobody has: the
one-line path, whose choice of module is ``lazy_offload.py``'s), refuses what
it cannot run correctly (gradients, parameters moved out of their slots,
Inductor freezing), runs the inner compiler with the prefetch pass at the level
that compiler schedules (ATen for Inductor and aot_eager, Dynamo's graph for
eager), and returns a callable that holds the runtime owning the parameters it
is called with while the graph runs, and joins the copy stream into an
enclosing CUDA graph capture; with ``cuda_graphs=True``, that callable is
captured and replayed.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable

import torch
from torch import fx, nn

from . import _torch_internals
from .config import BackendOptions, OptionError, PlanOptions, parse_backend_options
from .graphs import graphed
from .leaves import InnerPath, get_inner
from .lazy_offload import model_to_offload
from .offload import offload_with_options, offload_within_budget
from .ops import OFFLOADED_BLOCK, START, WAIT
from .passes import ParamInput, PrefetchPassResult, node_value, prefetch_pass
from .plan import OffloadPlan
from .runtime import PrefetchRuntime, runtime_of_tensor

log = logging.getLogger("prefetch_compile")


def prefetch_offload_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None) -> Callable:
    parsed = parse_backend_options(options)
    if parsed.compile.compiler == "inductor" and _torch_internals.inductor_freezing_enabled():
        raise OptionError(
            "torch._inductor.config.freezing is on: Inductor would fold the offloaded weights into constants "
            "and never read the slots; turn freezing off for prefetch_offload"
        )
    _remove_tripwires(gm)
    runtime, offloaded_now = _runtime_for(gm, example_inputs, parsed)
    if runtime is None:
        return _inner_compile(gm, example_inputs, parsed, lambda graph: None)
    _check_inference(example_inputs)
    runtime.compiling()
    runtime.check_placement([location[1] for value in example_inputs if (location := runtime.locate(value))])
    runtime.check_not_replaced()
    if parsed.compile.cuda_graphs and runtime.disk is not None:
        raise OptionError(
            f"cuda_graphs=True cannot be used with a disk tier: {len(runtime.disk.layout.layers)} offloaded layers of "
            "this model are read from the checkpoint files at every forward (load_checkpoint(host_budget=...)), "
            "and a CUDA graph replay cannot read a file. Compile without cuda_graphs, or load with a host_budget "
            "that holds every offloaded layer"
        )
    graph_name = _torch_internals.compile_id()
    # Inductor and aot_eager hand the pass AOT's graph, in which each tensor-subclass input is
    # flattened into its inner tensors; eager hands it Dynamo's graph, one placeholder per input.
    sources = None
    if parsed.compile.compiler != "eager":
        sources = _torch_internals.aot_placeholder_sources(_dynamo_fakes(gm, example_inputs))

    def graph_pass(graph: fx.Graph) -> None:
        """What the inner compiler runs on its graph: the prefetch pass, recorded on the runtime and dumped."""
        before = graph.python_code("self").src if parsed.compile.dump_dir is not None else ""
        began = time.perf_counter()
        result = run_prefetch_pass(graph, runtime, example_inputs, sources)
        seconds = time.perf_counter() - began
        waits = len({op.offload_index for op in result.inserted if op.kind == "wait"})  # layers, not chunks
        record = runtime.record_compile(graph_name, waits, len(result.inserted), seconds)
        log.info("prefetch_compile: %s", record)
        from .dumps import emit_graph_dump

        emit_graph_dump(parsed.compile.dump_dir, graph_name, before, graph, result, runtime)

    compile_inputs = example_inputs
    if offloaded_now:
        # Dynamo made fake tensors of these parameters before they moved into the slots.
        # Re-fakified from scratch, a slot view (nonzero storage offset) would get a
        # symbolic offset with no source, which breaks Dynamo's guard building; static
        # fakes of the new views keep the inner compiler exact and the guards buildable.
        compile_inputs = [
            _torch_internals.static_fake(value) if runtime.locate(value) else value for value in example_inputs
        ]
        # The trace that led here saw the model without its block hooks. A restart of this frame's analysis
        # (AOT's tensorify pass restarts one under dynamic=True) traces it with them, and Dynamo would take
        # that for a diverging trace and fail: it must forget what the first trace recorded.
        _torch_internals.forget_traced_path()
    # A dump needs the pass to run, so a graph compiled for one bypasses Inductor's FX graph cache.
    cache_key = _pass_key(runtime, example_inputs) if parsed.compile.dump_dir is None else None
    compiled = _inner_compile(gm, compile_inputs, parsed, graph_pass, cache_key)

    graphs = parsed.compile.cuda_graphs and runtime.device.type == "cuda"
    run = _ServedGraph(compiled, runtime, graph_name, example_inputs, graphs)
    return graphed(run, runtime, example_inputs) if graphs else run


class _ServedGraph:
    """A compiled graph, run under the runtime that owns the offloaded parameters it is called with.

    Dynamo may serve this graph to another instance of the same model class: the
    guards of a graph compiled on the one-line path were built before its model
    was offloaded, so they hold for a twin, offloaded or not. The parameters the
    graph then receives belong to no runtime (the ops do nothing: right answers,
    but no memory saved, which is said once), or to another runtime. The graph's
    waits and starts were placed for this runtime's plan, so it runs for another
    only if that one lays the graph's inputs out the same way (the same inputs
    offloaded, as the same pieces of the same layers, in the same slots): then
    under that runtime's lock, since the ops find their runtime through the
    parameters. A twin offloaded otherwise is refused: the graph would read its
    offloaded weights without waiting for them. So is any twin under CUDA graphs,
    whose replay guard is bound to this graph's runtime.
    """

    def __init__(
        self, compiled: Callable, runtime: PrefetchRuntime, name: str, example_inputs: list[Any], cuda_graphs: bool
    ) -> None:
        self._compiled = compiled
        self._runtime = runtime
        self._name = f"graph {name}"
        self._cuda_graphs = cuda_graphs
        self._probe = next((i for i, value in enumerate(example_inputs) if runtime.locate(value)), None)
        self._layout = _offload_layout(runtime, example_inputs)
        self._same_layout: weakref.WeakSet[PrefetchRuntime] = weakref.WeakSet()  # twins checked against _layout
        self._warned = False

    def __call__(self, *args: Any) -> Any:
        runtime = self._runtime
        if self._probe is not None and runtime_of_tensor(args[self._probe]) is not runtime:
            runtime = self._other_owner(args)
        if runtime is None:
            return self._compiled(*args)
        # acquire/release rather than the serving() context manager: its generator costs a microsecond or two
        # at every call of every graph.
        try:
            runtime.acquire(self._name)  # holds the lock even when it raises (a refused edit): released below
            outputs = self._compiled(*args)
            runtime.join_capture()
        finally:
            runtime.release()
        return outputs

    def _other_owner(self, args: tuple[Any, ...]) -> PrefetchRuntime | None:
        """The runtime of a twin's parameters, once it is known to lay them out as this graph expects."""
        owners = list({id(owner): owner for value in args if (owner := runtime_of_tensor(value))}.values())
        if not owners:
            if not self._warned:
                self._warned = True
                log.warning(
                    "prefetch_compile: %s was compiled for an offloaded model and Dynamo now runs it for a module "
                    "whose parameters are not offloaded (another instance of the same class, reusing the compiled "
                    "graph): nothing is offloaded for it. Call prefetch_compile.offload(model, ...) on each model "
                    "before torch.compile, or torch._dynamo.reset() before compiling the next one",
                    self._name,
                )
            return None
        reused = f"{self._name} was compiled for one offloaded model and Dynamo now runs it for another (an instance "
        if len(owners) > 1:
            raise RuntimeError(f"{reused}whose parameters belong to {len(owners)} offloaded models): refused")
        owner = owners[0]
        if self._cuda_graphs:
            raise RuntimeError(
                f"{reused}of the same class); with cuda_graphs=True each model needs its own compiled function: "
                "torch.compile each model separately after offloading it, or call torch._dynamo.reset() in between"
            )
        if owner not in self._same_layout:
            if _offload_layout(owner, args) != self._layout:
                raise RuntimeError(
                    f"{reused}of the same class) that is offloaded with another plan ({_plan_summary(owner.plan)}, "
                    f"where the graph was compiled for {_plan_summary(self._runtime.plan)}): its prefetch ops would "
                    "not wait for every weight it reads. Offload instances of one class alike, or call "
                    "torch._dynamo.reset() before compiling the next one"
                )
            self._same_layout.add(owner)
        return owner


def _offload_layout(runtime: PrefetchRuntime, values: Any) -> tuple:
    """What a graph's prefetch ops were placed for: which inputs are which pieces of which layers, in which slots."""
    plan = runtime.plan
    inputs = tuple(
        (position, location, runtime.piece_of(value))
        for position, value in enumerate(values)
        if (location := runtime.locate(value)) is not None
    )
    return inputs, tuple(plan.piece_starts), tuple(layer.slot for layer in plan.offloaded)


def _plan_summary(plan: OffloadPlan) -> str:
    layers = [layer.index for layer in plan.offloaded]
    parameters = sum(len(layer.params) for layer in plan.offloaded)
    return (
        f"layers {layers} offloaded, {parameters} parameters, {plan.num_slots} slot(s), "
        f"{len(plan.piece_starts)} piece(s) each"
    )


def run_prefetch_pass(
    graph: fx.Graph,
    runtime: PrefetchRuntime,
    example_inputs: list[Any],
    sources: list[tuple[int, InnerPath | None]] | None = None,
) -> PrefetchPassResult:
    """The prefetch pass on a graph compiled from Dynamo's ``example_inputs``, against ``runtime``'s plan.

    Finds which placeholders are which offloaded parameters (by identity, through
    the runtime), then runs :func:`prefetch_compile.passes.prefetch_pass`.
    ``sources`` maps each placeholder to the example input it comes from and the
    inner path of the leaf inside it (``aot_placeholder_sources``, for AOT's
    flattened graphs; ``None`` for a symbolic size); without it placeholders line
    up with ``example_inputs`` one to one.
    """
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if sources is None:
        sources = [(index, ()) for index in range(len(example_inputs))]
    if len(placeholders) != len(sources):
        raise RuntimeError(
            f"prefetch pass: the graph has {len(placeholders)} inputs but Dynamo's {len(example_inputs)} inputs "
            f"flatten into {len(sources)}; cannot tell which inputs are offloaded parameters"
        )
    param_inputs: dict[fx.Node, ParamInput] = {}
    static_inputs: set[fx.Node] = set()
    subclass_params: dict[fx.Node, list[InnerPath]] = {}  # Dynamo-level subclass placeholders -> offloaded leaves
    for node, (index, inner) in zip(placeholders, sources):
        if inner is None:
            continue
        value = get_inner(example_inputs[index], inner)
        if isinstance(example_inputs[index], nn.Parameter):
            static_inputs.add(node)
        location = runtime.locate(value)
        if location is None:
            continue
        _check_placeholder(node, value, location[1])
        param_inputs[node] = ParamInput(*location, runtime.piece_of(value))
        inners = [p.inner for p in runtime.offloaded[location[0]].params if p.param_name == location[1] and p.inner]
        if inners:
            subclass_params[node] = inners

    leaves = _LeafNodes(graph, subclass_params)
    plan = runtime.plan
    return prefetch_pass(
        graph,
        param_inputs,
        static_inputs,
        next_in_slot=plan.next_in_slot,
        slot_of=lambda offload_index: runtime.offloaded[offload_index].slot,
        piece_bytes=lambda offload_index: [end - begin for begin, end in plan.pieces(runtime.offloaded[offload_index])],
        make_wait=lambda graph, params: _op_node(graph, WAIT, (leaves.of(params),)),
        make_start=lambda graph, released, incoming, live: _op_node(
            graph, START, (leaves.of(released), leaves.of(incoming), live)
        ),
    )


def _check_placeholder(node: fx.Node, value: torch.Tensor, name: str) -> None:
    """The placeholder mapped to an offloaded leaf must have the leaf's geometry: a wrong mapping fails here, loudly."""
    fake = node_value(node)
    if fake is None:
        return
    geometry = (tuple(value.shape), value.stride(), value.dtype)
    if not isinstance(fake, torch.Tensor) or (tuple(fake.shape), fake.stride(), fake.dtype) != geometry:
        raise RuntimeError(
            f"prefetch pass: graph input {node.name} was mapped to offloaded {name} "
            f"(shape {tuple(value.shape)}, {value.dtype}) but holds {fake!r}; "
            "AOT autograd flattened the inputs in an unexpected order"
        )


class _LeafNodes:
    """The op arguments for parameter placeholders: plain tensors, so a subclass's dispatch never sees our ops.

    In AOT's graphs every placeholder is a plain tensor already. In Dynamo's
    graph (the eager compiler) a subclass parameter is one placeholder, and its
    offloaded leaves are read out with getattr nodes, made once each, right after
    the placeholders: they must exist before the first op that takes them, and
    are made after the pass's analysis, which therefore never counts them as
    readers of the weights.
    """

    def __init__(self, graph: fx.Graph, subclass_params: dict[fx.Node, list[InnerPath]]) -> None:
        self._subclass_params = subclass_params
        self._anchor = next(node for node in graph.nodes if node.op != "placeholder")  # the output, at least
        self._made: dict[tuple[fx.Node, InnerPath], fx.Node] = {}

    def of(self, params: list[fx.Node]) -> list[fx.Node]:
        return [self._leaf(node, inner) for node in params for inner in self._subclass_params.get(node, [()])]

    def _leaf(self, node: fx.Node, inner: InnerPath) -> fx.Node:
        if not inner:
            return node
        if (node, inner) not in self._made:
            owner = self._leaf(node, inner[:-1])
            with node.graph.inserting_before(self._anchor):
                self._made[(node, inner)] = node.graph.call_function(getattr, (owner, inner[-1]))
        return self._made[(node, inner)]


def _dynamo_fakes(gm: fx.GraphModule, example_inputs: list[Any]) -> list[Any]:
    """Dynamo's fake value of each graph input (symbolic sizes included), or the example input where it has none."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return list(example_inputs)
    return [node.meta.get("example_value", value) for node, value in zip(placeholders, example_inputs)]


def _remove_tripwires(gm: fx.GraphModule) -> None:
    """Take out the ``offloaded_block`` ops that offloaded blocks' hooks put into Dynamo's graph (see ops.py)."""
    tripwires = list(gm.graph.find_nodes(op="call_function", target=OFFLOADED_BLOCK))
    for node in tripwires:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    if tripwires:
        gm.recompile()


def _op_node(graph: fx.Graph, target: Any, args: tuple) -> fx.Node:
    """An op node with the metadata Inductor's own passes give theirs: the fake result of running it."""
    node = graph.call_function(target, args)
    node.meta["val"] = _torch_internals.fake_result(graph, target, args)
    return node


def _pass_key(runtime: PrefetchRuntime, example_inputs: list[Any]) -> str:
    """What the pass's output depends on, beyond the graph itself: the key of Inductor's FX graph cache.

    That is where each offloaded input lives (its layer, slot, the next layer of
    the slot and its piece) and the plan's piece boundaries and block sizes, which
    decide the chunks. None would bypass the cache. The ops carry no
    process-specific value (they find their runtime through the parameters), so
    the compiled code can be reused by another process, or by another model,
    whenever the same inputs are the same offloaded layers in the same slots.
    """
    layout = []
    for position, value in enumerate(example_inputs):
        location = runtime.locate(value)
        if location is not None:
            layer = runtime.offloaded[location[0]]
            next_in_slot = runtime.plan.next_in_slot(layer.offload_index)
            layout.append((position, layer.offload_index, layer.slot, next_in_slot, runtime.piece_of(value), layer.nbytes))
        elif isinstance(value, nn.Parameter):
            layout.append((position, "static"))
    return repr((runtime.plan.piece_starts, layout))


def _runtime_for(
    gm: fx.GraphModule, example_inputs: list[Any], parsed: BackendOptions
) -> tuple[PrefetchRuntime | None, bool]:
    """The runtime owning these inputs' offloaded parameters, and whether the model was offloaded just now."""
    plan, budget = parsed.plan, parsed.budget
    runtimes = {id(rt): rt for value in example_inputs if (rt := runtime_of_tensor(value)) is not None}
    if len(runtimes) > 1:
        raise OptionError("one compiled graph reads the offloaded parameters of two different models")
    if runtimes:
        runtime = next(iter(runtimes.values()))
        placed = runtime.plan.options
        # Knobs the options leave out keep their defaults in ``plan``; the placed plan may hold others
        # (load_checkpoint's disk tier turns chunked_copies off), which the options do not contradict.
        differ = [knob for knob in parsed.named_knobs if getattr(plan, knob) != getattr(placed, knob)]
        if differ:
            asked = ", ".join(f"{knob}={getattr(plan, knob)!r}" for knob in differ)
            held = ", ".join(f"{knob}={getattr(placed, knob)!r}" for knob in differ)
            raise OptionError(
                f"the model was offloaded with {held}, but torch.compile options ask for {asked}; an offloaded "
                "model keeps its plan, whether offload(), load_checkpoint() or an earlier torch.compile with this "
                "backend placed it: leave the plan knobs out of torch.compile's options, or pass the same values"
            )
        if budget is not None and budget.budget != runtime.budget:
            planned = (
                f"within a budget of {runtime.budget:,} bytes" if runtime.budget is not None
                else f"with {runtime.plan.options}, not within a budget"
            )
            raise OptionError(
                f"the model was offloaded {planned}, but torch.compile options ask for a budget of "
                f"{budget.budget:,} bytes, which would not be applied; pass the budget to offload() only"
            )
        return runtime, False
    if not any(isinstance(value, nn.Parameter) for value in example_inputs):
        return None, False
    model = model_to_offload(gm, plan, budget)
    if model is None:
        return None, False
    _check_inference(example_inputs)
    device = next(model.parameters()).device
    if budget is not None:
        runtime = offload_within_budget(model, device, budget, plan and plan.layers, parsed.compile.compiler)
        return runtime, runtime is not None
    return offload_with_options(model, device, plan or PlanOptions()), True


def _check_inference(example_inputs: list[Any]) -> None:
    """Offloaded weights are overwritten as soon as they are read: nothing may keep them for a backward."""
    if torch.is_grad_enabled() and any(isinstance(value, torch.Tensor) and value.requires_grad for value in example_inputs):
        raise RuntimeError(
            "prefetch_offload is for inference: this graph would record gradients (an input or a parameter "
            "requires grad and grad mode is on), and an offloaded weight is overwritten as soon as it is read. "
            "Run it under torch.no_grad() or torch.inference_mode(), or call requires_grad_(False) on the "
            "model and its inputs"
        )


def _inner_compile(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: BackendOptions,
    graph_pass: Callable[[fx.Graph], None],
    cache_key: str | None = None,
) -> Callable:
    compiler = options.compile.compiler
    if compiler == "inductor":
        return _torch_internals.compile_with_inductor(gm, example_inputs, graph_pass, cache_key)
    if compiler == "aot_eager":
        return _torch_internals.compile_with_aot_eager(gm, example_inputs, graph_pass)
    graph_pass(gm.graph)
    gm.recompile()
    return gm.forward

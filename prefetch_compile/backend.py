"""The ``prefetch_offload`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point).

For each graph Dynamo hands over, the backend finds the runtime that owns the
graph's offloaded parameters (offloading the model first if nobody has), runs
the inner compiler with the prefetch pass at the level that compiler
schedules (ATen for Inductor and aot_eager, Dynamo's graph for eager), and
returns a callable that also joins the copy stream into an enclosing CUDA graph
capture.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import fx, nn

from . import _torch_internals
from .breakable_graph import BreakableGraphed
from .config import BackendOptions, OptionError, PlanOptions, parse_backend_options
from .discovery import find_layer_list
from .offload import offload_with_options, offload_within_budget, runtime_of
from .ops import START, WAIT
from .passes import ParamInput, PrefetchPassResult, insert_prefetch_ops
from .runtime import PrefetchRuntime, live_runtimes

log = logging.getLogger("prefetch_compile")

# Set on a model that a budget left resident (to that many bytes), so later graphs do not plan again.
RESIDENT_FLAG = "_prefetch_compile_resident_within"

# Seconds spent in the prefetch pass, one entry per compiled graph (read by benchmarks/compile_time.py).
PASS_TIMINGS: list[float] = []


def prefetch_offload_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None) -> Callable:
    parsed = parse_backend_options(options)
    if parsed.compile.compiler == "inductor" and _torch_internals.inductor_freezing_enabled():
        raise OptionError(
            "torch._inductor.config.freezing is on: Inductor would fold the offloaded weights into constants "
            "and never read the slots; turn freezing off for prefetch_offload"
        )
    runtime, offloaded_now = _runtime_for(example_inputs, parsed)
    if runtime is None:
        return _inner_compile(gm, example_inputs, parsed, lambda graph: None)
    _check_inference(runtime, example_inputs)
    graph_index = len(PASS_TIMINGS)

    def prefetch_pass(graph: fx.Graph) -> None:
        dump_dir = parsed.compile.dump_dir
        before = graph.python_code("self").src if dump_dir is not None else ""
        began = time.perf_counter()
        result = apply_prefetch_pass(graph, runtime, example_inputs)
        PASS_TIMINGS.append(time.perf_counter() - began)
        log.info(
            "prefetch_compile: graph %d: %d offloaded layers read, %d ops inserted in %.1f ms",
            graph_index,
            sum(1 for op in result.inserted if op.kind == "wait"),
            len(result.inserted),
            PASS_TIMINGS[-1] * 1e3,
        )
        if dump_dir is not None:
            from .dumps import write_graph_dump

            write_graph_dump(dump_dir, graph_index, before, graph, result, runtime)

    compile_inputs = example_inputs
    if offloaded_now:
        # Dynamo made fake tensors of these parameters before they moved into the slots.
        # Re-fakified from scratch, a slot view (nonzero storage offset) would get a
        # symbolic offset with no source, which breaks Dynamo's guard building; static
        # fakes of the new views keep the inner compiler exact and the guards buildable.
        compile_inputs = [
            _torch_internals.static_fake(value) if runtime.locate(value) else value for value in example_inputs
        ]
    compiled = _inner_compile(gm, compile_inputs, parsed, prefetch_pass)

    def run(*args: Any) -> Any:
        outputs = compiled(*args)
        runtime.join_capture()
        return outputs

    if parsed.compile.cuda_graphs and runtime.device.type == "cuda":
        return _graphed(run, runtime, example_inputs)
    return run


def _graphed(run: Callable, runtime: PrefetchRuntime, example_inputs: list[Any]) -> Callable:
    """Capture ``run`` as a (breakable) CUDA graph per input signature, and replay it.

    Weights are read in place; other inputs are copied into static buffers. Before
    each capture or replay the compute stream waits for copies issued outside the
    graph (by an eager call, say), because the graph itself only waits for the
    copies it captured; at each segment's end the copies it started are joined.
    """
    model_tensors = {id(t) for t in [*runtime.offloaded_params.values(), *runtime.kept_tensors.values()]}
    static = [index for index, value in enumerate(example_inputs) if id(value) in model_tensors]
    graphed = BreakableGraphed(run, static_inputs=static, on_segment_end=runtime.join_capture)

    def replay(*args: Any) -> Any:
        runtime.synchronize_copies()
        return graphed(*args)

    return replay


def apply_prefetch_pass(graph: fx.Graph, runtime: PrefetchRuntime, example_inputs: list[Any]) -> PrefetchPassResult:
    """Insert the runtime's ops into ``graph``, whose placeholders line up with ``example_inputs``."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise RuntimeError(
            f"prefetch pass: the graph has {len(placeholders)} inputs but Dynamo passed {len(example_inputs)}; "
            "cannot tell which inputs are offloaded parameters"
        )
    param_inputs: dict[fx.Node, ParamInput] = {}
    static_inputs: set[fx.Node] = set()
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, nn.Parameter):
            static_inputs.add(node)
        location = runtime.locate(value)
        if location is not None:
            param_inputs[node] = ParamInput(*location)

    def make_wait(graph: fx.Graph, params: list[fx.Node]) -> fx.Node:
        return _op_node(graph, WAIT, (params, runtime.id))

    def make_start(graph: fx.Graph, params: list[fx.Node], live: list[fx.Node]) -> fx.Node:
        return _op_node(graph, START, (params, live, runtime.id))

    return insert_prefetch_ops(
        graph,
        param_inputs,
        static_inputs,
        next_in_slot=runtime.plan.next_in_slot,
        slot_of=lambda layer: runtime.layers[layer].slot,
        make_wait=make_wait,
        make_start=make_start,
    )


def _op_node(graph: fx.Graph, target: Any, args: tuple) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta["val"] = None
    return node


def _runtime_for(example_inputs: list[Any], parsed: BackendOptions) -> tuple[PrefetchRuntime | None, bool]:
    """The runtime owning these inputs' offloaded parameters, and whether the frame's model was offloaded just now."""
    plan, budget = parsed.plan, parsed.budget
    runtimes = {id(rt): rt for rt in live_runtimes() for value in example_inputs if rt.locate(value) is not None}
    if len(runtimes) > 1:
        raise OptionError("one compiled graph reads the offloaded parameters of two different models")
    if runtimes:
        runtime = next(iter(runtimes.values()))
        if plan is not None and plan != runtime.plan.options:
            raise OptionError(
                f"the model was offloaded with {runtime.plan.options}, but torch.compile options ask for {plan}; "
                "pass the plan knobs to offload() only"
            )
        return runtime, False
    params = {id(value) for value in example_inputs if isinstance(value, nn.Parameter)}
    if not params:
        return None, False
    for module in _torch_internals.frame_modules():
        if runtime_of(module) is not None:
            return None, False  # offloaded already, but this graph reads none of the offloaded parameters
        if budget is not None and getattr(module, RESIDENT_FLAG, None) == budget.budget:
            return None, False  # the budget planner left this model resident at an earlier graph
        if _layer_list_holds(module, params, plan):
            device = next(module.parameters()).device
            if budget is not None:
                runtime = offload_within_budget(module, device, budget, plan and plan.layers, parsed.compile.compiler)
                if runtime is None:
                    setattr(module, RESIDENT_FLAG, budget.budget)
                return runtime, runtime is not None
            return offload_with_options(module, device, plan or PlanOptions()), True
    if plan is not None or budget is not None:
        raise OptionError(
            "prefetch_offload could not find the nn.Module being compiled; "
            "call prefetch_compile.offload(model, ...) before torch.compile"
        )
    return None, False


def _layer_list_holds(module: nn.Module, param_ids: set[int], plan: PlanOptions | None) -> bool:
    """Whether ``module`` is a model whose layer list owns some of the graph's parameters."""
    try:
        _, blocks = find_layer_list(module, plan.layers if plan else None)
    except OptionError:
        return False
    return any(id(param) in param_ids for block in blocks for param in block.parameters())


def _check_inference(runtime: PrefetchRuntime, example_inputs: list[Any]) -> None:
    if torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad and runtime.locate(value) is not None
        for value in example_inputs
    ):
        raise RuntimeError(
            "prefetch_offload is for inference: this graph would record gradients through offloaded parameters. "
            "Run it under torch.no_grad() or torch.inference_mode(), or call requires_grad_(False) on the model"
        )


def _inner_compile(
    gm: fx.GraphModule, example_inputs: list[Any], options: BackendOptions, graph_pass: Callable[[fx.Graph], None]
) -> Callable:
    compiler = options.compile.compiler
    if compiler == "inductor":
        return _torch_internals.compile_with_inductor(gm, example_inputs, graph_pass)
    if compiler == "aot_eager":
        return _torch_internals.compile_with_aot_eager(gm, example_inputs, graph_pass)
    graph_pass(gm.graph)
    gm.recompile()
    return gm.forward

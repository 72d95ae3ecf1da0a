"""Every private PyTorch API the project touches, in one place.

These differ between torch releases (2.11 on the GPU machine, 2.13 in CI); a
change there should need an edit here only.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn


def frame_modules() -> Iterator[nn.Module]:
    """nn.Modules in scope of the code Dynamo is compiling, innermost first.

    First the locals of the frame being compiled (``self`` of a forward), then
    those of its callers: when Dynamo skips a model's forward (say, for a graph
    break inside its layer loop) and compiles each block alone, the model itself
    is only found in the caller's frame.
    """
    from torch._dynamo.symbolic_convert import InstructionTranslator

    translator = InstructionTranslator.current_tx()
    if translator is not None:
        yield from (value for value in translator.f_locals.values() if isinstance(value, nn.Module))
    frame = sys._getframe(1)
    while frame is not None:
        yield from (value for value in frame.f_locals.values() if isinstance(value, nn.Module))
        frame = frame.f_back


def static_fake(tensor: torch.Tensor) -> torch.Tensor:
    """A fake of ``tensor`` with static sizes, strides and storage offset, in the fake mode Dynamo is tracing with."""
    from torch._guards import TracingContext

    return TracingContext.get().fake_mode.from_tensor(tensor.detach(), static_shapes=True)


def inductor_freezing_enabled() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)


def compile_with_inductor(gm: fx.GraphModule, example_inputs: list[Any], graph_pass: Callable[[fx.Graph], None]) -> Callable:
    """Inductor, with ``graph_pass`` run on the post-grad ATen graph (after the user's own post pass, if any)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass

    user_pass = inductor_config.post_grad_custom_post_pass

    class PostGradPass(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            if user_pass is not None:
                user_pass(graph)
            graph_pass(graph)

        def uuid(self) -> None:
            # The pass depends on live runtime state (which tensors are offloaded), so
            # results must not be shared through Inductor's FX graph cache.
            return None

    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": PostGradPass()})


def compile_with_aot_eager(gm: fx.GraphModule, example_inputs: list[Any], graph_pass: Callable[[fx.Graph], None]) -> Callable:
    """AOT autograd's ATen graph, run by the FX interpreter after ``graph_pass``: Inductor's IR, without Inductor."""
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(aten_gm: fx.GraphModule, aten_inputs: list[Any]) -> Callable:
        graph_pass(aten_gm.graph)
        aten_gm.recompile()
        return aten_gm

    return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)


# The budget planner's meta-device trace (prefetch_compile/calibration.py): a dispatch mode that
# sees every op's outputs, and pytree helpers to walk nested arguments.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402, F401  (re-exported)
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402, F401  (re-exported)


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

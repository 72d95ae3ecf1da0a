"""Finding a model's repeated blocks and the parameters of each that may be offloaded.

Offloading works at the granularity of the model's repeated blocks (decoder
layers): they are what runs one after another, so one block's weights can be
copied while the block before it computes.
"""

from __future__ import annotations

from torch import nn

from .config import OptionError


def find_layer_list(model: nn.Module, path: str | None = None) -> tuple[str, list[nn.Module]]:
    """Return the dotted path and the blocks of the model's layer list.

    With ``path`` given, that attribute is used (an ``nn.ModuleList`` or
    ``nn.Sequential``). Otherwise the longest ``nn.ModuleList`` whose blocks own
    parameters is chosen (ties: the first in module order), which is the stack
    of decoder layers in every transformer we know of.
    """
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError as error:
            raise OptionError(f"layers={path!r} names no submodule of {type(model).__name__}") from error
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise OptionError(
                f"layers={path!r} is a {type(container).__name__}; it must be an nn.ModuleList or nn.Sequential"
            )
        return path, list(container)

    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(True for _ in block.parameters()) for block in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise OptionError(
            f"found no nn.ModuleList of blocks with parameters in {type(model).__name__}; "
            "pass options={'layers': 'dotted.path.to.blocks'}"
        )
    return best[0], list(best[1])


def is_offloaded_layer(index: int, group_size: int, num_in_group: int) -> bool:
    """The reference's rule: offload the last ``num_in_group`` of every ``group_size`` layers."""
    return index % group_size >= group_size - num_in_group


def matches_offload_params(param_name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a parameter's dotted name contains one of ``patterns`` as whole name components.

    ``mlp`` matches ``mlp.up_proj.weight`` and ``up_proj`` matches it too, but
    ``up_proj`` does not match ``gate_up_proj.weight``. No patterns match everything.
    """
    if not patterns:
        return True
    dotted = f".{param_name}."
    return any(f".{pattern.strip('.')}." in dotted for pattern in patterns)

"""From a device-memory budget to a plan: gather the model's bytes, its activations and a cost table, then search.

The pieces live elsewhere (:mod:`.planner` searches, :mod:`.cost_model`
predicts, :mod:`.calibration` measures); this module decides where each input
comes from. An injected cost table wins over every measurement, which is what
makes a plan reproducible: the same model, budget and table give the same plan.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .calibration import calibrated_cost_table, device_profile, roofline_cost_table, trace_forward
from .config import BudgetOptions, OptionError
from .cost_model import CostTable
from .planner import BudgetPlan, measure_footprint, plan_for_budget

log = logging.getLogger("prefetch_compile")


def plan_within_budget(
    model: nn.Module, device: torch.device, options: BudgetOptions, layers: str | None = None, compiler: str = "inductor"
) -> tuple[BudgetPlan, CostTable]:
    """The planner's choice for ``model`` on ``device``, and the cost table it chose from; logs the choice at INFO.

    Activations come from ``options.activation_bytes`` or a fake-tensor trace
    of ``options.example_inputs`` as ``device`` would run it; compute times from ``options.cost_table``, or
    a calibration of one compiled layer per kind (``calibrate=True``), or the
    roofline of the traced FLOPs and bytes.
    """
    options.require_activations()
    footprint = measure_footprint(model, device.type, layers)
    trace = None
    if options.example_inputs is not None:
        trace = trace_forward(model, options.example_inputs, footprint.layer_list_path, device)
    activation_bytes = options.activation_bytes if options.activation_bytes is not None else trace.activation_bytes
    cost = _cost_table(model, device, options, trace, compiler)
    chosen = plan_for_budget(footprint, cost, options.budget, activation_bytes)
    log.info("%s (compute times: %s)", chosen.describe(), cost.source)
    return chosen, cost


def _cost_table(
    model: nn.Module, device: torch.device, options: BudgetOptions, trace: object, compiler: str
) -> CostTable:
    if isinstance(options.cost_table, CostTable):
        return options.cost_table
    if isinstance(options.cost_table, (str, os.PathLike)):
        try:
            return CostTable.from_json(options.cost_table)
        except (OSError, ValueError, KeyError, TypeError) as error:  # missing, unreadable, not JSON, not a table
            raise OptionError(
                f"cost_table={str(options.cost_table)!r} could not be read as a cost table saved with "
                f"CostTable.to_json: {type(error).__name__}: {error}"
            ) from error
    if options.cost_table is not None:
        raise OptionError(
            f"cost_table must be a prefetch_compile.cost_model.CostTable or the path of one saved with to_json, "
            f"got {type(options.cost_table).__name__}"
        )
    if trace is None:
        raise OptionError(
            "budget without a cost_table needs example_inputs: the compute times that hide the copies "
            "depend on the input shape"
        )
    profile = device_profile(device)
    if options.calibrate:
        return calibrated_cost_table(model, trace, profile, device, compiler)
    return roofline_cost_table(trace, profile)

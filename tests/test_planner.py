"""The budget planner: budgets that fit, that need offloading, that cannot be met; the simulator; determinism."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prefetch_compile
from prefetch_compile import calibration
from prefetch_compile.config import OptionError, parse_backend_options, parse_bytes
from prefetch_compile.cost_model import BandwidthCurve, ChunkRead, CostTable, simulate
from prefetch_compile.offload import offload_with_options
from prefetch_compile.runtime import format_bytes
from prefetch_compile.planner import (
    CUDA_WORKSPACE_BYTES,
    Footprint,
    device_bytes,
    measure_footprint,
    plan_for_budget,
    predict,
    spread_evenly,
)
from toy_models import HeterogeneousStack

WIDTH = 16


class Block(nn.Module):
    """Attention-like and MLP parts, so that 'all' and 'mlp only' differ."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.attn(x)[:, None]  # [batch, 1 head, seq, width]
        x = x + F.scaled_dot_product_attention(q, q, q, is_causal=True)[:, 0]
        return x + self.mlp(x)


class Model(nn.Module):
    def __init__(self, layers: int = 8, width: int = WIDTH) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def table(layers: int, layer_s: float = 1e-3, bandwidth: float = 1e6, outside_s: float = 0.0) -> CostTable:
    return CostTable(BandwidthCurve.constant(bandwidth), (layer_s,) * layers, outside_s)


ACTIVATIONS = 1000


# ------------------------------------------------------------------ budget strings
@pytest.mark.parametrize(
    "text,expected",
    [("24GiB", 24 * 2**30), ("500MB", 500 * 10**6), ("1.5 GiB", 3 * 2**29), ("4096", 4096), ("64KiB", 65536),
     ("2TB", 2 * 10**12), (123, 123)],
)
def test_budget_strings(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("value", ["24 gigs", "GiB", "", "1e9", 2.5, True, None])
def test_bad_budget_strings_name_the_accepted_forms(value):
    with pytest.raises(OptionError, match="budget must be a number of bytes .* got"):
        parse_bytes(value)


@pytest.mark.parametrize("value", ["-5GiB", "-5", -1, 0, "0MB"])
def test_budgets_of_no_bytes_or_fewer_are_refused_as_such(value):
    with pytest.raises(OptionError, match="budget must be a positive number of bytes"):
        parse_bytes(value)


@pytest.mark.parametrize("value", ["0.5 B", "0.0001KB"])
def test_a_budget_under_one_byte_is_refused_as_such(value):
    with pytest.raises(OptionError, match=f"budget must be at least one byte, got '{value}'"):
        parse_bytes(value)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"budget": "24 gigs", "activation_bytes": 0}, "budget must be a number of bytes"),
        ({"budget": "1GiB", "activation_bytes": 0, "group_size": 2}, "budget chooses the plan itself; drop ['group_size']"),
        ({"example_inputs": (torch.zeros(2),)}, "['example_inputs'] only apply with a budget"),
        ({"budget": "1GiB", "activation_bytes": -1}, "activation_bytes must be an integer >= 0"),
        ({"budget": "1GiB", "activation_bytes": 0, "calibrate": "no"}, "calibrate must be True or False"),
        ({"offload_layers": [3, 1]}, "offload_layers must be increasing, distinct layer indices"),
        ({"offload_layers": [1, 3], "group_size": 2}, "offload_layers chooses the offloaded layers itself, so ['group_size']"),
        ({"filter_fn": lambda block, fqn: True, "num_in_group": 2}, "drop num_in_group or drop filter_fn"),
    ],
)
def test_bad_budget_options(options, message):
    with pytest.raises(OptionError) as error:
        parse_backend_options(options)
    assert message in str(error.value)


def test_a_second_offload_with_a_budget_is_refused_before_planning(monkeypatch):
    model = Model()
    prefetch_compile.offload(model, "cpu", group_size=2)
    module = importlib.import_module("prefetch_compile.offload")  # the package's `offload` is the function
    monkeypatch.setattr(module, "plan_within_budget", lambda *args: pytest.fail("planned anyway"))
    with pytest.raises(OptionError, match="Model is already offloaded \\(by offload\\(\\) or load_checkpoint\\(\\)\\)"):
        prefetch_compile.offload(model, "cpu", budget="1GiB", activation_bytes=0, cost_table=table(8))


def test_offload_refuses_budget_with_plan_knobs():
    with pytest.raises(OptionError, match=r"budget chooses the plan itself; drop \[.prefetch_step.\] or drop budget"):
        prefetch_compile.offload(Model(), "cpu", budget="1MB", activation_bytes=0, prefetch_step=2)


# ------------------------------------------------------------------ explicit layer indices
def test_offload_layers_picks_exactly_those_layers(caplog):
    options = prefetch_compile.PlanOptions(offload_layers=(0, 3, 7), prefetch_step=2)
    with caplog.at_level("INFO", logger="prefetch_compile"):
        runtime = offload_with_options(Model(layers=8), torch.device("cpu"), options)
    assert [layer.index for layer in runtime.offloaded] == [0, 3, 7]
    assert [layer.slot for layer in runtime.offloaded] == [0, 1, 0]
    assert any("offloaded 3/8 layers of 'layers' (offload_layers=[0, 3, 7])" in r.getMessage() for r in caplog.records)


def test_offload_takes_layer_indices_too():
    runtime = prefetch_compile.offload(Model(layers=8), "cpu", offload_layers=[2, 5])
    assert [layer.index for layer in runtime.offloaded] == [2, 5]


def test_offload_layers_out_of_range_is_refused():
    with pytest.raises(OptionError, match=r"offload_layers=\[2, 8\] names layer 8, but 'layers' has 8 layers"):
        offload_with_options(Model(layers=8), torch.device("cpu"), prefetch_compile.PlanOptions(offload_layers=(2, 8)))


# ------------------------------------------------------------------ the simulator, by hand
def test_bandwidth_curve_interpolates_in_log_size_and_clamps():
    curve = BandwidthCurve((2**20, 2**22), (1e9, 3e9))
    assert curve.bandwidth(2**21) == pytest.approx(2e9)
    assert curve.bandwidth(10) == 1e9 and curve.bandwidth(2**30) == 3e9
    assert curve.copy_seconds(2**22) == pytest.approx(2**22 / 3e9)
    assert curve.copy_seconds(0) == 0.0


def test_one_slot_copies_hide_behind_one_kept_layer_only():
    # L0 kept, L1 off, L2 kept, L3 off; copies of 3 against 1 of compute: each copy is issued after the
    # other offloaded layer ends and hides behind the one kept layer in between: 2 of stall each.
    schedule = simulate([1, 1, 1, 1], [1, 3], [3, 3], slots=1)
    assert schedule.forward_seconds == 8.0 and schedule.compute_seconds == 4.0
    assert [(c.began, c.needed, c.stall) for c in schedule.copies] == [(0.0, 1.0, 2.0), (4.0, 5.0, 2.0)]


def test_as_many_slots_as_offloaded_layers_copy_nothing():
    schedule = simulate([1, 1, 1, 1], [1, 3], [3, 3], slots=2)
    assert schedule.forward_seconds == 4.0 and schedule.stall_seconds == 0.0


def test_copy_bound_forward_runs_at_link_speed():
    # Every layer offloaded, two slots, copies of 1.5 against 1 of compute: 4 x 1.5 per forward.
    schedule = simulate([1, 1, 1, 1], [0, 1, 2, 3], [1.5] * 4, slots=2)
    assert schedule.forward_seconds == 6.0
    assert [c.stall for c in schedule.copies] == [0.5] * 4


def test_uneven_layers_and_the_wrap_around_copy():
    # Compute 1, 2, 1, 2 and 0.5 outside; copies 2.5 (layer 1) and 1 (layer 3), one slot. Layer 3's copy
    # starts when layer 1 ends and is just done when layer 3 starts; layer 1's copy for the next forward
    # starts when layer 3 ends and has only the 0.5 outside plus layer 0 to hide in: 1 of stall.
    schedule = simulate([1, 2, 1, 2], [1, 3], [2.5, 1.0], slots=1, outside_seconds=0.5)
    assert schedule.forward_seconds == 7.5 and schedule.compute_seconds == 6.5
    assert [(c.began, c.needed, c.stall) for c in schedule.copies] == [(-0.5, 1.0, 1.0), (4.0, 5.0, 0.0)]


def test_a_later_first_read_gives_the_copy_more_time():
    # As the one-slot case above, but each offloaded layer first reads its (MLP) weights halfway through:
    # the copy has half a layer more to hide in, so 1.5 of stall each instead of 2.
    schedule = simulate([1, 1, 1, 1], [1, 3], [3, 3], slots=1, read_spans=[(0.5, 0.0), (0.5, 0.0)])
    assert schedule.forward_seconds == 7.0
    assert [(c.began, c.needed, c.stall) for c in schedule.copies] == [(0.0, 1.5, 1.5), (3.5, 5.0, 1.5)]


def test_an_earlier_last_read_starts_the_next_copy_sooner():
    # The slot's layer is done with its weights 0.5 before it ends: the next copy starts then.
    schedule = simulate([1, 1, 1, 1], [1, 3], [3, 3], slots=1, read_spans=[(0.0, 0.5), (0.0, 0.5)])
    assert schedule.forward_seconds == 7.0
    assert [(c.began, c.stall) for c in schedule.copies] == [(-0.5, 1.5), (3.0, 1.5)]


def test_simulator_refuses_inconsistent_input():
    with pytest.raises(ValueError, match="2 offloaded layers but 1 copy times"):
        simulate([1, 1], [0, 1], [1.0], slots=1)
    with pytest.raises(ValueError, match="increasing indices"):
        simulate([1, 1], [1, 0], [1.0, 1.0], slots=1)
    with pytest.raises(ValueError, match="2 offloaded layers but 1 read spans"):
        simulate([1, 1], [0, 1], [1.0, 1.0], slots=1, read_spans=[(0.0, 0.0)])


def test_spread_evenly_matches_the_group_pattern_when_it_divides():
    assert spread_evenly(16, 4) == (3, 7, 11, 15)
    assert spread_evenly(16, 16) == tuple(range(16))
    assert spread_evenly(10, 3) == (2, 5, 9)


# ------------------------------------------------------------------ budgets
def test_a_model_that_fits_stays_resident_with_a_log_line(caplog):
    model = Model()
    budget = nbytes(model) + ACTIVATIONS
    with caplog.at_level("INFO", logger="prefetch_compile"):
        runtime = prefetch_compile.offload(
            model, "cpu", budget=budget, activation_bytes=ACTIVATIONS, cost_table=table(8)
        )
    assert runtime is None and prefetch_compile.runtime_of(model) is None
    assert all(p.numel() > 0 for p in model.parameters())
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "the model fits the budget of" in lines[0] and "nothing offloaded" in lines[0]


def test_a_budget_that_needs_offloading_is_met_exactly_as_predicted():
    model = Model()
    budget = nbytes(model) // 2
    footprint = measure_footprint(model, "cpu")
    chosen = plan_for_budget(footprint, table(8), budget, ACTIVATIONS)
    assert chosen.options is not None and chosen.device_bytes <= budget
    runtime = prefetch_compile.offload(model, "cpu", budget=budget, activation_bytes=ACTIVATIONS, cost_table=table(8))
    stats = runtime.stats()
    # On the CPU bytes are exact: what stays plus the slots plus the activations is the prediction.
    assert stats.kept_device_bytes + stats.slot_pool_bytes + ACTIVATIONS == chosen.device_bytes
    assert runtime.plan.options == chosen.options


def test_example_inputs_state_the_activations(caplog):
    model, x = Model(), torch.randn(2, 5, WIDTH)
    activations = calibration.trace_forward(model, (x,)).activation_bytes
    budget = nbytes(model) // 2
    chosen = plan_for_budget(measure_footprint(model, "cpu"), table(8), budget, activations)
    with caplog.at_level("INFO", logger="prefetch_compile"):
        runtime = prefetch_compile.offload(model, "cpu", budget=budget, example_inputs=x, cost_table=table(8))
    stats = runtime.stats()
    assert stats.kept_device_bytes + stats.slot_pool_bytes + activations == chosen.device_bytes <= budget
    assert f"(activations {format_bytes(activations)})" in caplog.records[0].getMessage()


def test_a_budget_below_the_smallest_plan_states_the_minimum():
    model = Model()
    footprint = measure_footprint(model, "cpu")
    layer_bytes = [nbytes(layer) for layer in model.layers]
    # Smallest plan: every layer offloaded, one slot as large as one layer's block.
    minimum = nbytes(model) - sum(layer_bytes) + max(footprint.blocks[()]) + ACTIVATIONS
    with pytest.raises(OptionError) as error:
        plan_for_budget(footprint, table(8), minimum - 1, ACTIVATIONS)
    assert f"is below the smallest plan for this model: {minimum:,} bytes" in str(error.value)
    assert f"the budget must be at least {minimum:,} bytes" in str(error.value)
    smallest = plan_for_budget(footprint, table(8), minimum, ACTIVATIONS)
    assert smallest.device_bytes == minimum and len(smallest.schedule.copies) == 8


def test_the_error_reaches_offload_and_leaves_the_model_alone():
    model = Model()
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(OptionError, match="the budget must be at least"):
        prefetch_compile.offload(model, "cpu", budget=100, activation_bytes=0, cost_table=table(8))
    assert [p.data_ptr() for p in model.parameters()] == before


def test_the_plan_is_deterministic_for_a_cost_table():
    model = Model()
    footprint = measure_footprint(model, "cpu")
    cost = CostTable(BandwidthCurve((1024, 65536), (2e6, 8e6)), tuple(1e-3 * (1 + i % 3) for i in range(8)), 2e-3)
    plans = [plan_for_budget(measure_footprint(Model(), "cpu"), cost, nbytes(model) // 2, ACTIVATIONS) for _ in range(3)]
    assert all(plan == plans[0] for plan in plans)
    assert plan_for_budget(footprint, cost, nbytes(model) // 2, ACTIVATIONS) == plans[0]


def test_the_chosen_plan_is_no_slower_than_any_group_pattern_that_fits():
    model = Model()
    footprint = measure_footprint(model, "cpu")
    cost = table(8, layer_s=1e-3, bandwidth=3e6)
    budget = nbytes(model) * 6 // 10
    chosen = plan_for_budget(footprint, cost, budget, ACTIVATIONS)
    for group in range(1, 9):
        for step in (1, 2, 3):
            indices = tuple(i for i in range(8) if i % group == group - 1)
            blocks = footprint.blocks[()]
            slots = [max(blocks[i] for i in indices[s::step]) for s in range(min(step, len(indices)))]
            device = footprint.resident_bytes - sum(footprint.saved[()][i] for i in indices) + sum(slots) + ACTIVATIONS
            if device > budget:
                continue
            other = simulate(cost.layer_seconds, indices, [cost.bandwidth.copy_seconds(blocks[i]) for i in indices], step)
            assert chosen.schedule.forward_seconds <= other.forward_seconds


def test_mlp_only_is_a_candidate_and_wins_when_copies_are_the_bottleneck():
    model = Model()
    footprint = measure_footprint(model, "cpu")
    assert set(footprint.blocks) == {(), ("mlp",)}  # nothing here is named 'experts'
    mlp, whole = footprint.blocks[("mlp",)][0], footprint.blocks[()][0]
    assert (mlp, whole) == (8 * WIDTH * WIDTH * 4, 9 * WIDTH * WIDTH * 4)
    # Save six MLP blocks net of one slot: seven MLP-only layers do it (7 MLP blocks copied per forward);
    # whole layers need seven too, which copy 7 whole blocks. Copy-bound, the MLP-only plan is faster.
    budget = nbytes(model) + ACTIVATIONS - 6 * mlp
    chosen = plan_for_budget(footprint, table(8, layer_s=1e-6, bandwidth=1e6), budget, ACTIVATIONS)
    assert chosen.options.offload_params == ("mlp",) and chosen.options.prefetch_step == 1
    assert len(chosen.schedule.copies) == 7 and chosen.copied_bytes == 7 * mlp


def test_heterogeneous_layers_share_slots_by_their_largest_block():
    model = HeterogeneousStack([16, 64, 8, 48, 16, 32, 16])
    footprint = measure_footprint(model, "cpu")
    sizes = [nbytes(layer) for layer in model.layers]
    cost = CostTable(BandwidthCurve.constant(1e7), tuple(s / 1e9 for s in sizes), 0.0)
    chosen = plan_for_budget(footprint, cost, sum(sizes) * 7 // 10, 0)
    runtime = prefetch_compile.offload(model, "cpu", budget=sum(sizes) * 7 // 10, activation_bytes=0, cost_table=cost)
    stats = runtime.stats()
    assert stats.kept_device_bytes + stats.slot_pool_bytes == chosen.device_bytes <= sum(sizes) * 7 // 10


def test_cost_table_mismatch_and_json_round_trip(tmp_path):
    model = Model()
    with pytest.raises(ValueError, match="the cost table has 3 layer times but 'layers' has 8 layers"):
        plan_for_budget(measure_footprint(model, "cpu"), table(3), 10**9, 0)
    cost = CostTable(BandwidthCurve((1, 1024), (1e6, 2e6)), (1e-3, 2e-3), 5e-4, "calibrated", {("mlp",): ((2e-4, 0.0),) * 2})
    cost.to_json(tmp_path / "cost.json")
    assert CostTable.from_json(tmp_path / "cost.json") == cost
    runtime = prefetch_compile.offload(
        Model(layers=2), "cpu", budget=nbytes(Model(layers=2)) * 7 // 10, activation_bytes=0, cost_table=str(tmp_path / "cost.json")
    )
    assert runtime is not None


@pytest.mark.parametrize("content", [None, "not json", '{"bandwidth": {}}'])
def test_a_cost_table_path_that_is_not_a_table_is_an_option_error(tmp_path, content):
    path = tmp_path / "cost.json"
    if content is not None:
        path.write_text(content)
    budget = nbytes(Model(layers=2)) * 7 // 10
    with pytest.raises(OptionError, match=r"cost_table='.*cost\.json' could not be read as a cost table"):
        prefetch_compile.offload(Model(layers=2), "cpu", budget=budget, activation_bytes=0, cost_table=str(path))


# ------------------------------------------------------------------ through torch.compile
def test_budget_through_the_backend_offloads_as_planned():
    model = Model()
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        expected = model(x)
    budget = nbytes(model) // 2
    chosen = plan_for_budget(measure_footprint(model, "cpu"), table(8), budget, ACTIVATIONS)
    options = {"budget": budget, "activation_bytes": ACTIVATIONS, "cost_table": table(8), "compiler": "eager"}
    with torch.no_grad():
        out = torch.compile(model, backend="prefetch_offload", options=options)(x)
    torch.testing.assert_close(out, expected)
    runtime = prefetch_compile.runtime_of(model)
    assert runtime is not None and runtime.plan.options == chosen.options


def test_budget_through_the_backend_leaves_a_fitting_model_alone():
    model = Model()
    options = {"budget": "1GiB", "activation_bytes": 0, "cost_table": table(8), "compiler": "eager"}
    with torch.no_grad():
        torch.compile(model, backend="prefetch_offload", options=options)(torch.randn(2, 5, WIDTH))
    assert prefetch_compile.runtime_of(model) is None


def test_a_budget_in_the_options_of_a_model_offloaded_otherwise_is_refused():
    """A budget would silently not apply: the model already has its plan."""
    x = torch.randn(2, 5, WIDTH)
    by_knobs = Model()
    prefetch_compile.offload(by_knobs, "cpu", group_size=4)
    options = {"budget": nbytes(by_knobs) // 2, "activation_bytes": ACTIVATIONS, "cost_table": table(8), "compiler": "eager"}
    with torch.no_grad(), pytest.raises(Exception, match="offloaded with .* not within a budget.*ask for a budget"):
        torch.compile(by_knobs, backend="prefetch_offload", options=options)(x)
    by_budget = Model()
    budget = nbytes(by_budget) // 2
    prefetch_compile.offload(by_budget, "cpu", budget=budget, activation_bytes=ACTIVATIONS, cost_table=table(8))
    torch._dynamo.reset()
    with torch.no_grad():  # the same budget: its plan, as offload() made it
        torch.compile(by_budget, backend="prefetch_offload", options={**options, "budget": budget})(x)
        with pytest.raises(Exception, match=f"within a budget of {budget:,} bytes"):
            torch._dynamo.reset()
            torch.compile(by_budget, backend="prefetch_offload", options={**options, "budget": budget - 1})(x)


def test_a_budget_without_activations_is_refused_when_it_must_plan():
    with pytest.raises(OptionError, match="budget needs the activations it must leave room for"):
        prefetch_compile.offload(Model(), "cpu", budget="1GiB")
    with pytest.raises(Exception, match="budget needs the activations it must leave room for"), torch.no_grad():
        torch.compile(Model(), backend="prefetch_offload", options={"compiler": "eager", "budget": "1GiB"})(
            torch.randn(2, 5, WIDTH))


@pytest.mark.parametrize("budget", ["1GiB", "40KiB"])
def test_the_same_budget_confirms_a_plan_without_example_inputs(budget):
    """README: a model planned with a budget stays as planned when compiled with the same budget, nothing to plan."""
    model = Model()
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        expected = model(x)
    runtime = prefetch_compile.offload(model, "cpu", budget=budget, activation_bytes=0, cost_table=table(8))
    assert (runtime is None) == (budget == "1GiB")  # fits whole, or offloaded within 40 KiB
    with torch.no_grad():
        out = torch.compile(model, backend="prefetch_offload", options={"compiler": "eager", "budget": budget})(x)
    torch.testing.assert_close(out, expected)
    assert prefetch_compile.runtime_of(model) is runtime


def test_a_resident_verdict_of_offload_stands_for_a_compile_without_a_plan_of_its_own():
    """offload(budget=...) found the model fits; the README line with no options must not offload it by default."""
    model = Model()
    x = torch.randn(2, 5, WIDTH)
    assert prefetch_compile.offload(model, "cpu", budget="1GiB", activation_bytes=0, cost_table=table(8)) is None
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend="prefetch_offload", options={"compiler": "eager"})(x)
    torch.testing.assert_close(out, expected)
    assert prefetch_compile.runtime_of(model) is None
    torch._dynamo.reset()
    with torch.no_grad():  # plan knobs of its own: offloaded as they say
        torch.compile(model, backend="prefetch_offload", options={"compiler": "eager", "group_size": 2})(x)
    assert prefetch_compile.runtime_of(model).plan.options.group_size == 2


# ------------------------------------------------------------------ measurements
def test_meta_trace_counts_flops_per_layer_and_fused_attention():
    model, batch, seq = Model(layers=3), 2, 5
    trace = calibration.trace_forward(model, (torch.randn(batch, seq, WIDTH),))
    tokens = batch * seq
    matmuls = 2 * tokens * (WIDTH * WIDTH + 2 * WIDTH * 4 * WIDTH)
    attention = 2 * batch * seq * seq * (2 * WIDTH) // 2  # causal: half of the score matrix
    assert trace.layer_flops == (matmuls + attention,) * 3
    assert trace.outside_flops == 2 * tokens * (WIDTH * WIDTH + WIDTH * 4)
    assert trace.layer_param_bytes == (nbytes(model.layers[0]),) * 3
    # The input, the MLP's widest tensors and the residual stream are live at once; nothing near a weight's size.
    assert 4 * tokens * WIDTH * 4 < trace.activation_bytes < 4 * tokens * WIDTH * 16
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_calibration_measures_one_layer_per_kind(monkeypatch):
    model = HeterogeneousStack([16, 32, 32, 32, 16])
    trace = calibration.trace_forward(model, (torch.randn(4, 16),))
    compiled = []
    real_compile = torch.compile

    def counting_compile(module, **kwargs):
        compiled.append(module)
        return real_compile(module, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    seconds = calibration.calibrate_layers(model, trace, torch.device("cpu"), compiler="eager", reps=3)
    assert len(seconds) == 4 and seconds[1] == seconds[2]  # layers 1 and 2 are the same kind: one measurement
    assert len(compiled) == 3 and all(s > 0 for s in seconds)


def test_device_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []
    profile = calibration.DeviceProfile("cpu-test", BandwidthCurve((1, 2), (1.0, 2.0)), 3.0, 4.0)
    monkeypatch.setattr(calibration, "_device_name", lambda device: "cpu-test")
    monkeypatch.setattr(calibration, "measure_device", lambda device: calls.append(device) or profile)
    first = calibration.device_profile(torch.device("cpu"), cache_dir=tmp_path)
    second = calibration.device_profile(torch.device("cpu"), cache_dir=tmp_path)
    assert first == second == profile and len(calls) == 1
    assert json.loads((tmp_path / "device-cpu-test.json").read_text())["matmul_flops_per_s"] == 3.0
    calibration.device_profile(torch.device("cpu"), cache_dir=tmp_path, refresh=True)
    assert len(calls) == 2


def test_read_spans_place_the_mlp_reads_after_the_attention():
    model = Model(layers=2)
    trace = calibration.trace_forward(model, (torch.randn(2, 8, WIDTH),))
    profile = calibration.DeviceProfile("x", BandwidthCurve.constant(1.0), matmul_flops_per_s=1e9, memory_bytes_per_s=1e9)
    cost = calibration.roofline_cost_table(trace, profile)
    reads = [sorted(op.reads) for op in trace.layer_ops[0] if op.reads]
    assert reads[0] == ["layers.0.attn.weight"] and reads[-1] == ["layers.0.mlp.2.weight"]
    (all_pre, _), (mlp_pre, mlp_post) = cost.read_spans[()][0], cost.read_spans[("mlp",)][0]
    assert all_pre == 0.0 and 0.0 < mlp_pre < cost.layer_seconds[0]
    assert 0.0 <= mlp_post < mlp_pre  # only the residual add follows the last MLP weight


def test_roofline_table_is_the_slower_of_math_and_bytes():
    model = Model(layers=2)
    trace = calibration.trace_forward(model, (torch.randn(1, 3, WIDTH),))
    profile = calibration.DeviceProfile("x", BandwidthCurve.constant(1.0), matmul_flops_per_s=1.0, memory_bytes_per_s=1e18)
    cost = calibration.roofline_cost_table(trace, profile)
    assert cost.layer_seconds == tuple(float(f) for f in trace.layer_flops) and cost.source == "roofline"


def test_cuda_accounting_rounds_like_the_caching_allocator():
    with torch.device("meta"):
        model = Model(layers=4)
    footprint = measure_footprint(model, "cuda")
    rounded = sum((p.numel() * p.element_size() + 511) // 512 * 512 for p in model.parameters())
    assert footprint.resident_bytes == rounded + CUDA_WORKSPACE_BYTES
    one_slot = device_bytes(footprint, (), (3,), 1, 0)
    assert one_slot == footprint.resident_bytes - footprint.saved[()][3] + 2 * 1024 * 1024  # one block, one 2 MiB step


def test_hf_llama_is_traced_and_planned():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    trace = calibration.trace_forward(model, (ids,))
    assert trace.layer_list_path == "model.layers" and len(set(trace.layer_flops)) == 1 and trace.layer_flops[0] > 0
    runtime = prefetch_compile.offload(
        model, "cpu", budget=nbytes(model) * 8 // 10, example_inputs=(ids,), cost_table=table(4)
    )
    assert runtime.stats().offloaded_layers > 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)


# ------------------------------------------------------------------ chunked copies in the prediction
MIB = 2**20
CHUNKED_BLOCK = 32 * MIB  # above plan.AUTO_CHUNK_MIN_BYTES: "auto" chunks such blocks at prefetch_step=1


def chunked_footprint(layers: int = 4) -> Footprint:
    """Four blocks of 32 MiB and 8 MiB outside them, on the CPU (exact bytes)."""
    blocks = (CHUNKED_BLOCK,) * layers
    return Footprint("layers", layers * CHUNKED_BLOCK + 8 * MIB, {(): blocks}, {(): blocks}, 1)


def spread_chunks(layers: int = 4, chunks: int = 4) -> tuple[tuple[ChunkRead, ...], ...]:
    """Each layer reads its chunks one after the other over its 1 s of compute (a decoder block's projections)."""
    return ((tuple(ChunkRead(1 / chunks, j / chunks, (j + 1) / chunks) for j in range(chunks))),) * layers


def one_reader_chunks(layers: int = 4, chunks: int = 4) -> tuple[tuple[ChunkRead, ...], ...]:
    """One op reads the whole block from the layer's start to its end: no chunk is free before the last."""
    return ((tuple(ChunkRead(1 / chunks, 0.0, 1.0) for _ in range(chunks))),) * layers


def test_chunked_step_1_is_predicted_faster_when_reads_are_spread():
    # Layers 1 and 3 offloaded into one slot, 1 s of compute each, a 32 MiB copy takes 2 s. Whole layers:
    # each copy starts when the other layer ends and has one kept layer to hide behind: 1 s of stall each.
    # Chunked: chunk j (0.5 s) starts once the outgoing layer has read its chunk j (0.25 s apart), so the
    # incoming chunks arrive at 0.75, 1.25, 1.75, 2.25 s after the outgoing layer began, before the
    # incoming layer (which begins 2 s after it) reads them at 2, 2.25, 2.5, 2.75 s: no stall at all.
    footprint = chunked_footprint()
    whole = CostTable(BandwidthCurve.constant(CHUNKED_BLOCK / 2.0), (1.0,) * 4)
    chunked = CostTable(whole.bandwidth, whole.layer_seconds, chunk_reads={(): spread_chunks()})
    assert predict(footprint, whole, (), (1, 3), 1).forward_seconds == pytest.approx(6.0)
    schedule = predict(footprint, chunked, (), (1, 3), 1)
    assert schedule.forward_seconds == pytest.approx(4.0) and schedule.stall_seconds == pytest.approx(0.0)
    assert [copy.seconds for copy in schedule.copies] == pytest.approx([2.0, 2.0])
    # At prefetch_step 2 the plan does not chunk, so the chunk table changes nothing there.
    assert predict(footprint, chunked, (), (0, 1, 2, 3), 2) == predict(footprint, whole, (), (0, 1, 2, 3), 2)


def test_chunked_step_1_equals_whole_layers_when_one_reader_reads_the_whole_layer():
    footprint = chunked_footprint()
    whole = CostTable(BandwidthCurve.constant(CHUNKED_BLOCK / 2.0), (1.0,) * 4)
    chunked = CostTable(whole.bandwidth, whole.layer_seconds, chunk_reads={(): one_reader_chunks()})
    for indices in [(1, 3), (0, 1, 2, 3)]:
        expected = predict(footprint, whole, (), indices, 1)
        got = predict(footprint, chunked, (), indices, 1)
        assert got.forward_seconds == pytest.approx(expected.forward_seconds)
        assert [c.stall for c in got.copies] == pytest.approx([c.stall for c in expected.copies])


def test_chunking_lets_the_planner_take_step_1_where_it_is_as_fast_as_step_2():
    # Every copy takes 1 s against 1 s of compute per layer. Budget: the resident model less two blocks.
    # Whole layers at prefetch_step=1 stall on every copy (it starts when the slot's layer ends, which is
    # when the next one needs it), so the planner pays a second slot for prefetch_step=2, which hides them.
    # Chunked, step 1 hides them too (each chunk streams in while the outgoing layer reads the rest),
    # so the planner keeps one slot: as fast, and it offloads three layers instead of four for the same bytes.
    footprint = chunked_footprint()
    budget = footprint.resident_bytes - 2 * CHUNKED_BLOCK
    whole = CostTable(BandwidthCurve.constant(CHUNKED_BLOCK / 1.0), (1.0,) * 4)
    chunked = CostTable(whole.bandwidth, whole.layer_seconds, chunk_reads={(): spread_chunks()})
    without = plan_for_budget(footprint, whole, budget, 0)
    assert without.options.prefetch_step == 2 and without.schedule.forward_seconds == pytest.approx(4.0)
    chosen = plan_for_budget(footprint, chunked, budget, 0)
    assert chosen.options.prefetch_step == 1 and chosen.options.chunked_copies == "auto"
    assert chosen.schedule.forward_seconds == pytest.approx(without.schedule.forward_seconds)
    assert chosen.device_bytes <= without.device_bytes <= budget and chosen.copied_bytes < without.copied_bytes
    # The same layers at prefetch_step=2 are no faster and need a second slot.
    layers = tuple(copy.layer for copy in chosen.schedule.copies)
    assert predict(footprint, chunked, (), layers, 2).forward_seconds == pytest.approx(chosen.schedule.forward_seconds)
    assert device_bytes(footprint, (), layers, 2, 0) == chosen.device_bytes + CHUNKED_BLOCK > budget
    # Deterministic for the table: planning again gives the same plan.
    assert plan_for_budget(chunked_footprint(), chunked, budget, 0) == chosen


def test_chunk_reads_round_trip_through_json(tmp_path):
    cost = CostTable(BandwidthCurve.constant(1e9), (1.0,) * 4, chunk_reads={(): spread_chunks(), ("mlp",): one_reader_chunks()})
    cost.to_json(tmp_path / "cost.json")
    assert CostTable.from_json(tmp_path / "cost.json") == cost


def test_traced_chunks_follow_the_first_reads():
    """The roofline table's chunks of a layer: in first-read order, covering its bytes, read later and later."""
    model = Model(layers=2)
    trace = calibration.trace_forward(model, (torch.randn(2, 8, WIDTH),))
    profile = calibration.DeviceProfile("x", BandwidthCurve.constant(1.0), matmul_flops_per_s=1e9, memory_bytes_per_s=1e9)
    cost = calibration.roofline_cost_table(trace, profile)
    chunks = cost.chunk_reads[()][0]
    # attn (16x16), mlp.0 (64x16), mlp.2 (16x64): the attention weight alone, then one MLP weight per chunk.
    assert [chunk.share for chunk in chunks] == pytest.approx([1 / 9, 4 / 9, 4 / 9])
    assert all(a.first <= a.last <= b.first for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1].last <= cost.layer_seconds[0]


def test_a_quantized_model_is_measured_by_its_leaves_and_left_resident_on_the_one_line_path():
    """An int8 model was counted at its float32 size (its parameters' numel() x dtype), so budgets it fits were
    refused; and the backend's resident verdict called model.to(device), which cannot swap a subclass parameter
    that Dynamo holds: the compile failed."""
    quantization = pytest.importorskip("torchao.quantization")
    from prefetch_compile.leaves import leaf_bytes

    model = Model()
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    quantized_bytes = sum(leaf_bytes(p) for p in model.parameters())
    assert quantized_bytes < nbytes(model) // 2
    assert measure_footprint(model, "cpu").resident_bytes == quantized_bytes
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        expected = model(x)
        options = {"budget": quantized_bytes + ACTIVATIONS, "activation_bytes": ACTIVATIONS, "cost_table": table(8),
                   "compiler": "aot_eager"}
        got = torch.compile(model, backend="prefetch_offload", options=options)(x)
    assert prefetch_compile.runtime_of(model) is None
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

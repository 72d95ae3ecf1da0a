"""The budget planner on Hugging Face decoders: traced on fake tensors, calibrated, and through ``generate``.

The path users take: ``budget`` on the one-line ``torch.compile(model.forward, ...)``, then ``generate`` with
a dynamic and with a static cache, and ``offload(model, "cpu", budget=...)``; tokens and logits equal the
un-offloaded model's and the plan's peak (kept weights + slots + traced activations) stays within the budget.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import prefetch_compile
from model_zoo import BY_NAME, MIXTRAL
from prefetch_compile import budget as budget_module
from prefetch_compile import calibration

pytest.importorskip("transformers")

MODELS = {"llama": BY_NAME["llama"], "qwen2": BY_NAME["qwen2"], "mixtral": MIXTRAL}


@pytest.fixture(autouse=True)
def _private_profile_cache(tmp_path_factory, monkeypatch):
    """The CPU's copy and compute profile is measured once for this file, not written under ~/.cache."""
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "profiles"))


def nbytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prompt_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the mask code must build a real mask, not skip it
    return ids, mask


def assert_within_budget(model: torch.nn.Module, budget: int, activations: int) -> None:
    runtime = prefetch_compile.runtime_of(model)
    assert runtime is not None and runtime.stats().offloaded_layers > 0
    stats = runtime.stats()
    # On the CPU bytes are exact: what stays, the slots and the traced activations are the plan's peak.
    assert stats.kept_device_bytes + stats.slot_pool_bytes + activations <= budget


@pytest.mark.parametrize("name", MODELS)
def test_fake_trace_of_a_padded_batch_takes_the_compiled_mask_path(name):
    """With an attention mask, Hugging Face's mask code asks the mask for its values outside a trace; on fake
    tensors it takes the path it takes under torch.compile, so the trace runs (on meta tensors it raised)."""
    model = MODELS[name].build()
    ids, mask = prompt_and_mask()
    trace = calibration.trace_forward(model, (ids, mask))
    assert trace.layer_list_path == "model.layers" and all(flops > 0 for flops in trace.layer_flops)
    cache = trace.layer_inputs[1][1]["past_key_values" if "past_key_values" in trace.layer_inputs[1][1] else "cache"]
    # Layer 1's arguments as they were when it was called: layer 0's cache entry filled, its own still empty.
    assert isinstance(cache.layers[0].keys, calibration.TensorSpec) and cache.layers[1].keys is None
    assert trace.activation_bytes > sum(t.numel() * t.element_size() for t in (ids, mask))
    assert all(p.device.type == "cpu" and not isinstance(p, torch._subclasses.FakeTensor) for p in model.parameters())


def test_a_fake_kernel_refusal_falls_back_to_a_real_forward_without_a_logged_traceback(caplog):
    """Mixtral's experts call ``_grouped_mm``, whose fake kernel refuses float32 on the CPU: the trace measures
    the forward for real, saying so at INFO; fake-tensor mode's ERROR traceback of the refusal read as a crash."""
    ids, mask = prompt_and_mask()
    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")  # torch's loggers do not propagate to caplog
    fake_tensor_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            trace = calibration.trace_forward(MIXTRAL.build(), (ids, mask))
    finally:
        fake_tensor_log.removeHandler(caplog.handler)
    assert all(flops > 0 for flops in trace.layer_flops)
    assert any("measuring it with one real forward" in r.getMessage() for r in caplog.records if r.name == "prefetch_compile")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("name", MODELS)
def test_offload_with_a_budget_calibrates_and_matches(name):
    model = MODELS[name].build()
    reference = copy.deepcopy(model)
    ids, mask = prompt_and_mask()
    budget = nbytes(model) * 8 // 10
    activations = calibration.trace_forward(reference, (ids, mask)).activation_bytes
    runtime = prefetch_compile.offload(model, "cpu", budget=budget, example_inputs=(ids, mask))
    assert runtime is not None
    assert_within_budget(model, budget, activations)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("name", MODELS)
def test_budget_on_the_one_line_path_generates_the_same_tokens(name):
    """``options={"budget": ...}`` on ``model.forward``: the first generate step plans (calibrating one layer
    per kind with the same compiler), offloads and compiles; greedy tokens equal the un-offloaded model's with
    the dynamic cache and then the static one."""
    model = MODELS[name].build()
    reference = copy.deepcopy(model)
    ids, mask = prompt_and_mask()
    budget = nbytes(model) * 8 // 10
    activations = calibration.trace_forward(reference, (ids, mask)).activation_bytes
    options = {"budget": budget, "example_inputs": (ids, mask), "compiler": "aot_eager"}
    model.forward = torch.compile(model.forward, backend="prefetch_offload", options=options)
    settings = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        dynamic = model.generate(ids, **settings)
        assert_within_budget(model, budget, activations)
        static = model.generate(ids, cache_implementation="static", **settings)
        expected_dynamic = reference.generate(ids, **settings)
        expected_static = reference.generate(ids, cache_implementation="static", **settings)
    assert dynamic.shape == (2, ids.shape[1] + 4)
    assert torch.equal(dynamic, expected_dynamic) and torch.equal(static, expected_static)


def test_example_inputs_as_keyword_arguments_plan_as_positional_ones():
    """HF models are called by keyword: a mapping of example_inputs is the forward's keyword arguments (it was
    passed as one positional argument, and the trace failed in the model's embedding with no word of
    example_inputs). The plan equals the one made from the same tensors passed positionally. Roofline costs
    (calibrate=False), so that only the traces can set the plans apart: two timed calibrations can rank close plans
    differently on a loaded machine, and did in CI."""
    ids, mask = prompt_and_mask()
    plans = []
    for example_inputs in ((ids, mask), {"input_ids": ids, "attention_mask": mask}):
        model = BY_NAME["llama"].build()
        budget = nbytes(model) * 8 // 10
        runtime = prefetch_compile.offload(model, "cpu", budget=budget, example_inputs=example_inputs, calibrate=False)
        plans.append([(layer.index, [p.param_name for p in layer.params]) for layer in runtime.offloaded])
    assert plans[0] and plans[0] == plans[1]
    with pytest.raises(prefetch_compile.OptionError, match="keys must be names"):
        prefetch_compile.offload(BY_NAME["llama"].build(), "cpu", budget="1MiB", example_inputs={0: ids})


def test_the_cost_table_a_plan_was_made_from_is_kept_and_plans_the_same_again(tmp_path, monkeypatch):
    """``runtime.cost_table``, saved with to_json and passed back as ``cost_table``, gives the same plan without
    a calibration (the README's way to plan a model again without measuring it)."""
    ids, mask = prompt_and_mask()
    model = BY_NAME["llama"].build()
    budget = nbytes(model) * 8 // 10
    runtime = prefetch_compile.offload(model, "cpu", budget=budget, example_inputs=(ids, mask))
    runtime.cost_table.to_json(tmp_path / "costs.json")
    monkeypatch.setattr(budget_module, "calibrated_cost_table", lambda *args: pytest.fail("calibrated again"))
    again = prefetch_compile.offload(
        BY_NAME["llama"].build(), "cpu", budget=budget, example_inputs=(ids, mask), cost_table=tmp_path / "costs.json"
    )
    assert again.plan.options == runtime.plan.options

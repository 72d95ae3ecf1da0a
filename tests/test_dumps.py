"""The graph dumps: annotated code that shows each prefetch op where the pass put it, and the plan table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import prefetch_compile
from prefetch_compile.flops import estimate_flops
from prefetch_compile.plan import build_plan
from prefetch_compile.plan_table import plan_rows
from toy_models import Stack


@dataclass
class Statement:
    notes: list[str]  # the comment lines the dump put above the code line
    code: str


def statements(after_py: Path) -> list[Statement]:
    """The body of a dumped ``forward``: each code line with the comments right above it."""
    result, notes = [], []
    for line in after_py.read_text().splitlines():
        if not line.startswith("    "):
            continue  # the file header and the def line
        text = line.strip()
        if text.startswith("# "):
            notes.append(text[2:])
        elif text:
            result.append(Statement(notes, text))
            notes = []
    return result


def plan_table(plan_txt: Path) -> list[dict[str, str]]:
    """The rows of a dumped plan table, by header (columns are separated by two spaces or more)."""
    lines = plan_txt.read_text().splitlines()
    rule = next(index for index, line in enumerate(lines) if line.startswith("---"))
    headers = re.split(r"\s{2,}", lines[rule - 1].strip())
    return [dict(zip(headers, re.split(r"\s{2,}", line.strip()))) for line in lines[rule + 1 :] if line.strip()]


def layer_param_bytes(model: torch.nn.Module) -> dict[str, int]:
    return {
        f"layers.{index}": sum(param.numel() * param.element_size() for param in block.parameters())
        for index, block in enumerate(model.layers)
    }


@pytest.fixture(params=["inductor", "aot_eager", "eager"])
def dumped(request, tmp_path):
    """A 4-block stack, every second block offloaded through one slot, compiled once with dumps on."""
    model = Stack(["linear"] * 4)
    expected_bytes = layer_param_bytes(model)
    options = {"group_size": 2, "compiler": request.param, "dump_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="prefetch_offload", options=options)
    with torch.no_grad():
        compiled(torch.randn(3, 16))
    (after,) = tmp_path.glob("graph_*_after.py")
    return model, expected_bytes, after


def test_each_offloaded_layer_is_waited_for_before_its_first_read_and_frees_its_slot_after_its_last(dumped):
    model, _, after = dumped
    plan = prefetch_compile.runtime_of(model).plan
    body = statements(after)
    assert [layer.name for layer in plan.offloaded] == ["layers.1", "layers.3"]
    for layer in plan.offloaded:
        reads = [index for index, statement in enumerate(body) if _noted(statement, f"reads {layer.name} (")]
        waits = [index for index, statement in enumerate(body) if _noted(statement, f"wait for {layer.name} (")]
        assert reads, f"no node annotated as reading {layer.name}"
        assert waits == [reads[0] - 1]
        assert "wait_prefetch" in body[waits[0]].code

        following = plan.offloaded[plan.next_in_slot(layer.offload_index)]
        start = body[reads[-1] + 1]
        assert _noted(start, f"prefetch {following.name} (offload {following.offload_index}, slot {layer.slot})")
        assert "start_prefetch" in start.code
        assert f"last read of offload {layer.offload_index} (same slot)" in start.notes[0]


def test_kept_layers_have_no_annotations(dumped):
    model, _, after = dumped
    plan = prefetch_compile.runtime_of(model).plan
    notes = [note for statement in statements(after) for note in statement.notes]
    for layer in plan.layers:
        if not layer.offloaded:
            assert not [note for note in notes if f"{layer.name} (" in note]


def test_before_file_is_the_graph_without_the_ops(dumped):
    _, _, after = dumped
    before = after.with_name(after.name.replace("_after.py", "_before.py")).read_text()
    assert "def forward" in before
    assert "prefetch_compile" not in before
    after_code = [s.code for s in statements(after)]
    assert sum("wait_prefetch" in code or "start_prefetch" in code for code in after_code) == 4


def test_plan_table_bytes_are_the_model_parameter_bytes(dumped):
    model, expected_bytes, after = dumped
    rows = plan_table(after.with_name(after.name.replace("_after.py", "_plan.txt")))
    assert [row["layer"] for row in rows] == list(expected_bytes)
    for row in rows:
        assert int(row["bytes"].replace(",", "")) == expected_bytes[row["layer"]]
        offloaded = row["placement"] == "offloaded"
        assert int(row["offloaded bytes"].replace(",", "")) == (expected_bytes[row["layer"]] if offloaded else 0)
        assert (row["waited for at"] != "-") == offloaded
        assert (row["prefetch starts at"] != "-") == offloaded


def test_chunked_copies_are_annotated_chunk_by_chunk(tmp_path):
    """Each chunk's wait and start say which pieces they move; the plan table spans the first start and wait."""
    model = Stack(["linear"] * 4)
    options = {"group_size": 2, "chunked_copies": True, "compiler": "aot_eager", "dump_dir": str(tmp_path)}
    with torch.no_grad():
        torch.compile(model, backend="prefetch_offload", options=options)(torch.randn(3, 16))
    (after,) = tmp_path.glob("graph_*_after.py")
    notes = [note for statement in statements(after) for note in statement.notes]
    for piece in range(3):  # fc.weight, fc.bias, gain
        assert any(note.startswith("wait for layers.1 (") and f"offload 0 piece {piece} is" in note for note in notes)
        assert any(note.startswith("prefetch layers.3 (") and f"offload 0 piece {piece} (same slot)" in note for note in notes)
    rows = {row["layer"]: row for row in plan_table(after.with_name(after.name.replace("_after.py", "_plan.txt")))}
    assert rows["layers.1"]["waited for at"] != "-" and rows["layers.1"]["prefetch starts at"] != "-"


def test_plan_rows_of_partly_offloaded_layers():
    """With offload_params, a layer keeps some parameters; its row still counts all of them."""
    model = Stack(["int8", "linear"] * 2)
    plan = build_plan(model, prefetch_compile.PlanOptions(group_size=1, offload_params=("fc",)))
    rows = {row["layer"]: row for row in plan_rows(plan, dict(model.named_parameters()))}
    fc_bytes = sum(p.numel() * p.element_size() for p in model.layers[1].fc.parameters())
    assert rows["layers.1"]["placement"] == "partly offloaded"
    assert rows["layers.1"]["offloaded bytes"] == fc_bytes
    assert rows["layers.1"]["bytes"] == layer_param_bytes(model)["layers.1"]
    assert rows["layers.1"]["dtypes"] == "float32"
    assert rows["layers.0"]["placement"] == "kept"  # nothing named fc in an int8 block
    assert rows["layers.0"]["dtypes"] == "float32,int8"


def test_flops_of_matmul_like_ops():
    def work(x, w, batch, query, image, kernel):
        return (
            torch.mm(x, w),
            torch.addmm(x[:, :1], x, w),
            torch.bmm(batch, batch.transpose(1, 2)),
            torch.nn.functional.linear(x, w.t()),
            torch.nn.functional.scaled_dot_product_attention(query, query, query),
            torch.nn.functional.conv2d(image, kernel),
            torch.relu(x),
        )

    shapes = [(4, 8), (8, 5), (3, 4, 8), (2, 3, 6, 16), (1, 2, 10, 10), (7, 2, 3, 3)]
    graph = make_fx(work, tracing_mode="fake")(*(torch.randn(shape) for shape in shapes)).graph
    flops = {node.target.__name__.split(".")[0]: estimate_flops(node) for node in graph.nodes if node.op == "call_function"}
    assert flops["mm"] == 2 * 4 * 5 * 8
    assert flops["addmm"] == 2 * 4 * 5 * 8
    assert flops["bmm"] == 2 * 3 * 4 * 4 * 8
    assert flops["_scaled_dot_product_flash_attention_for_cpu"] == 2 * (2 * 3) * 6 * 6 * (16 + 16)
    assert flops["convolution"] == 2 * (1 * 7 * 8 * 8) * (2 * 3 * 3)
    assert flops["relu"] == 0


def _noted(statement: Statement, prefix: str) -> bool:
    return any(note.startswith(prefix) for note in statement.notes)

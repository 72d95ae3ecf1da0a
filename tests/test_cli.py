"""``python -m prefetch_compile``: the plan on one screen, the dumps on request, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from prefetch_compile.cli import main
from toy_models import Stack

MODEL_SPEC = f"{__name__}:four_blocks"


def four_blocks() -> torch.nn.Module:
    """The factory the tests hand to the command line."""
    torch.manual_seed(0)
    return Stack(["linear", "int8"] * 2)


def failing_factory() -> nn.Module:
    raise RuntimeError("no GPU here")


def not_a_module() -> int:
    return 42


def block_bytes() -> dict[str, int]:
    model = four_blocks()
    return {
        f"layers.{index}": sum(param.numel() * param.element_size() for param in block.parameters())
        for index, block in enumerate(model.layers)
    }


def test_prints_offloaded_layers_and_totals(capsys):
    assert main([MODEL_SPEC, "--group-size", "2", "--prefetch-step", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("layers.")}
    sizes = block_bytes()
    assert list(rows) == list(sizes)
    for name, cells in rows.items():
        placement, params_bytes = cells[1], int(cells[3].replace(",", ""))
        assert placement == ("offloaded" if name in ("layers.1", "layers.3") else "kept")
        assert params_bytes == sizes[name]
    moved = sizes["layers.1"] + sizes["layers.3"]
    assert f"bytes moved to host  {moved:,} " in out
    assert "layers offloaded     2/4 of 'layers'" in out


def test_factory_may_be_a_call_expression(capsys):
    assert main([f"{__name__}:Stack(['linear'] * 3, width=8)", "--group-size", "3"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("layers.")] == ["kept", "kept", "offloaded"]


def test_dump_dir_compiles_on_cpu_and_writes_the_dumps(capsys, tmp_path):
    assert main([MODEL_SPEC, "--group-size", "2", "--dump-dir", str(tmp_path), "--input-shape", "3,16"]) == 0
    assert "dumps of 1 graph(s)" in capsys.readouterr().out
    (after,) = tmp_path.glob("graph_*_after.py")
    text = after.read_text()
    assert "# wait for layers.1 (offload 0, slot 0)" in text
    assert "# wait for layers.3 (offload 1, slot 0)" in text
    assert after.with_name(after.name.replace("after.py", "plan.txt")).exists()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_such_module_here:build", "cannot import module 'no_such_module_here'"),
        (f"{__name__}:missing", f"module '{__name__}' has no callable 'missing'"),
        (__name__, "expected MODULE:FACTORY"),
        (f"{__name__}:not_a_module", "returned int, not an nn.Module"),
        (f"{__name__}:four_blocks(", "cannot evaluate 'four_blocks(' in module"),
        (f"{__name__}:no_such_factory(3)", "name 'no_such_factory' is not defined"),
        # A bare name that needs arguments used to end in the factory's TypeError traceback.
        (f"{__name__}:Stack", f"{__name__}:Stack cannot be called without arguments (missing a required argument: 'kinds')"),
        # An error inside the factory used to end in its traceback, exit code 1.
        (f"{__name__}:Stack(['nosuch'])", f"{__name__}:Stack(['nosuch']) raised KeyError: 'nosuch' (call it in Python"),
        (f"{__name__}:failing_factory", f"{__name__}:failing_factory raised RuntimeError: no GPU here (call it in Python"),
    ],
)
def test_bad_factory_is_one_line_and_exit_code_2(capsys, spec, message):
    assert main([spec]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("prefetch_compile: error: ")
    assert message in line


def meta_factory():
    """A model built on the meta device, as README builds one for load_checkpoint."""
    with torch.device("meta"):
        return Stack(["linear"] * 4)


def test_dumps_of_a_meta_built_model_are_one_line_pointing_to_load_checkpoint(capsys, tmp_path):
    """The plan table needs no weights; a dump offloads the model, which has none to move."""
    assert main([f"{__name__}:meta_factory", "--group-size", "2"]) == 0
    assert main([f"{__name__}:meta_factory", "--group-size", "2", "--dump-dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("prefetch_compile: error: Stack has tensors on the meta device") and "load_checkpoint" in line


def test_an_empty_offload_params_is_refused_as_in_the_api(capsys):
    """offload_params=[] is refused; the CLI's "" read as no names at all offloaded every parameter."""
    with pytest.raises(SystemExit) as exit_:
        main([MODEL_SPEC, "--offload-params", ""])
    assert exit_.value.code == 2
    assert "--offload-params: names no parameter; leave --offload-params out" in capsys.readouterr().err


def test_bad_knob_is_one_line(capsys):
    assert main([MODEL_SPEC, "--group-size", "2", "--num-in-group", "3"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "num_in_group=3 must be <= group_size=2" in line


def test_a_model_that_rejects_the_random_input_is_one_line(capsys, tmp_path):
    """The model takes (2, 16) float activations; (2, 7) does not fit its first layer."""
    assert main([MODEL_SPEC, "--group-size", "2", "--dump-dir", str(tmp_path), "--input-shape", "2,7"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("prefetch_compile: error: ") and "failed on a random float32 input of shape 2,7" in line
    assert "--input-dtype long" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_timeline_without_cuda_is_one_line(capsys, tmp_path):
    assert main([MODEL_SPEC, "--timeline", str(tmp_path / "t.png")]) == 2
    assert capsys.readouterr().err.strip() == "prefetch_compile: error: --timeline needs a CUDA device"


def test_python_dash_m_entry_point():
    """The module entry point exits 2 without a traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "prefetch_compile", "no_such_module_here:build"], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "prefetch_compile: error: cannot import module 'no_such_module_here': No module named 'no_such_module_here'"
    ]


def test_a_plan_that_offloads_nothing_is_a_warning(capsys, caplog):
    """As on the backend's path: the plan table alone ('0/4') is easy to miss."""
    assert main([MODEL_SPEC, "--group-size", "2", "--offload-params", "nothing_matches"]) == 0
    assert "layers offloaded     0/4 of 'layers'" in capsys.readouterr().out
    (warning,) = [record for record in caplog.records if record.levelname == "WARNING"]
    assert "the plan offloads nothing from 'layers'" in warning.getMessage()
    assert "offload_params=['nothing_matches']" in warning.getMessage()

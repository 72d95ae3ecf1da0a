"""load_checkpoint(): a meta-built model filled from safetensors shards or an iterable, already offloaded."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from torch import nn

import prefetch_compile
from prefetch_compile import CheckpointError
from prefetch_compile.config import OptionError
from prefetch_compile.loading import _Progress
from model_zoo import tiny_decoder_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def llama_config(**overrides):
    return transformers.LlamaConfig(**tiny_decoder_config(**overrides))


def original_llama(**overrides):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(**overrides)).eval()


def meta_llama(**overrides):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama_config(**overrides)).eval()


def save_sharded(model, directory):
    """Hugging Face's own sharded format: several safetensors files and model.safetensors.index.json."""
    model.save_pretrained(directory, max_shard_size="100KB")
    assert len(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(directory.glob("*.safetensors"))) > 2
    return directory


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def all_meta(model):
    return all(param.is_meta for param in model.parameters())


@pytest.mark.parametrize("prefetch_step", [1, 2])
def test_sharded_checkpoint_gives_the_original_logits_eager_and_compiled(tmp_path, prefetch_step):
    original = original_llama()
    checkpoint = save_sharded(original, tmp_path)
    model = meta_llama()
    runtime = prefetch_compile.load_checkpoint(model, checkpoint, "cpu", group_size=2, prefetch_step=prefetch_step)
    assert runtime.stats().offloaded_layers == 2 and not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.model.rotary_emb.inv_freq, original.model.rotary_emb.inv_freq)
    tokens = torch.randint(0, 128, (2, 9))
    assert torch.equal(logits(model, tokens), logits(original, tokens))

    # Compiled, against the same original placed with offload(): the same graphs, so the same bits.
    placed = copy.deepcopy(original)
    prefetch_compile.offload(placed, "cpu", group_size=2, prefetch_step=prefetch_step)
    want = logits(torch.compile(placed, backend="prefetch_offload"), tokens)
    torch._dynamo.reset()
    assert torch.equal(logits(torch.compile(model, backend="prefetch_offload"), tokens), want)
    torch.testing.assert_close(want, logits(original, tokens), rtol=1e-4, atol=1e-4)


def test_single_file_mapping_and_iterable_checkpoints(tmp_path):
    original = original_llama()
    tokens = torch.randint(0, 128, (1, 5))
    original.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for checkpoint in (tmp_path / "model.safetensors", original.state_dict(), iter(original.state_dict().items())):
        model = meta_llama()
        prefetch_compile.load_checkpoint(model, checkpoint, "cpu", group_size=2)
        assert torch.equal(logits(model, tokens), logits(original, tokens))


def test_tied_weights_stay_tied(tmp_path):
    original = original_llama(tie_word_embeddings=True)
    checkpoint = save_sharded(original, tmp_path)
    stored = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in stored  # Hugging Face leaves the tied copy out
    tokens = torch.randint(0, 128, (1, 5))
    # The iterable holds both names (state_dict keeps tied duplicates): equal copies are accepted.
    for source in (checkpoint, original.state_dict().items()):
        model = meta_llama(tie_word_embeddings=True)
        prefetch_compile.load_checkpoint(model, source, "cpu", group_size=2)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(logits(model, tokens), logits(original, tokens))


def test_a_second_load_or_offload_of_a_loaded_model_points_to_the_weight_loaders(tmp_path):
    checkpoint = save_sharded(original_llama(), tmp_path)
    model = meta_llama()
    prefetch_compile.load_checkpoint(model, checkpoint, "cpu", group_size=2)
    advice = r"already offloaded \(by offload\(\) or load_checkpoint\(\)\): .* model.load_state_dict\(\.\.\.\) or runtime"
    with pytest.raises(OptionError, match=advice):
        prefetch_compile.load_checkpoint(model, checkpoint, "cpu", group_size=2)
    with pytest.raises(OptionError, match=advice):
        prefetch_compile.offload(model, "cpu", group_size=2)


@pytest.mark.parametrize("knobs", [{"group_size": 2}, {"budget": "1GiB", "activation_bytes": 0}], ids=["plan", "budget"])
def test_offload_of_a_meta_model_points_to_load_checkpoint(knobs):
    model = meta_llama()
    refusal = r"has tensors on the meta device \(model\.embed_tokens\.weight, \.\.\.\).*load_checkpoint"
    with pytest.raises(OptionError, match=refusal):
        prefetch_compile.offload(model, "cpu", **knobs)
    assert all_meta(model)


def test_tied_copies_that_differ_are_refused():
    original = original_llama(tie_word_embeddings=True)
    state = dict(original.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    model = meta_llama(tie_word_embeddings=True)
    with pytest.raises(
        CheckpointError,
        match="^lm_head.weight is tied to model.embed_tokens.weight in the model but differs from it in the checkpoint; "
        "nothing was loaded into the model$",
    ):
        prefetch_compile.load_checkpoint(model, state.items(), "cpu", group_size=2)
    assert all_meta(model)
    # The alias first (file order sorts lm_head before model.): the message names the two names all the same.
    reordered = {"lm_head.weight": state["lm_head.weight"], **{k: v for k, v in state.items() if k != "lm_head.weight"}}
    with pytest.raises(CheckpointError, match="^model.embed_tokens.weight is tied to lm_head.weight in the model"):
        prefetch_compile.load_checkpoint(meta_llama(tie_word_embeddings=True), reordered.items(), "cpu", group_size=2)


def single_file(tmp_path, state):
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({name: tensor.contiguous() for name, tensor in state.items()}, path)
    return path


UP = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda state: state.pop(UP), f"missing (in the model, not in the checkpoint): {UP}"),
        (lambda state: state.update({"model.layers.9.extra": torch.zeros(2)}), "unexpected (not in the model): model.layers.9.extra"),
        (lambda state: state.update({UP: state[UP].t()}), f"{UP}: shape (64, 128) in the checkpoint, (128, 64) in the model"),
        (
            lambda state: state.update({UP: state[UP].half()}),
            f"{UP}: dtype torch.float16 in the checkpoint, torch.float32 in the model "
            "(build the model in the checkpoint's dtype, e.g. model.to(torch.float16) on the meta device)",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_mismatched_file_is_refused_before_anything_is_read(tmp_path, edit, message):
    state = dict(original_llama().state_dict())
    edit(state)
    model = meta_llama()
    with pytest.raises(CheckpointError) as error:
        prefetch_compile.load_checkpoint(model, single_file(tmp_path, state), "cpu", group_size=2)
    assert str(error.value) == f"checkpoint does not match the model, nothing was loaded:\n  {message}"
    assert all_meta(model) and prefetch_compile.runtime_of(model) is None


def test_every_problem_is_listed_at_once(tmp_path):
    state = dict(original_llama().state_dict())
    del state[UP], state["model.norm.weight"]
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].double()
    with pytest.raises(CheckpointError) as error:
        prefetch_compile.load_checkpoint(meta_llama(), single_file(tmp_path, state), "cpu")
    lines = str(error.value).splitlines()[1:]
    assert lines[0] == f"  missing (in the model, not in the checkpoint): {UP}, model.norm.weight"
    assert lines[1].startswith("  model.embed_tokens.weight: dtype torch.float64 in the checkpoint")


def test_truncated_shard_names_the_tensors_cut_off(tmp_path):
    checkpoint = save_sharded(original_llama(), tmp_path)
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    shard = checkpoint / weight_map[UP]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    last = max(
        (name for name, file_name in weight_map.items() if file_name == shard.name),
        key=lambda name: json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])[name]["data_offsets"][1],
    )
    model = meta_llama()
    with pytest.raises(CheckpointError) as error:
        prefetch_compile.load_checkpoint(model, checkpoint, "cpu", group_size=2)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{shard} is truncated or corrupt:"
    assert len(lines) == 2 and lines[1].startswith(f"  {last}: bytes ") and lines[1].endswith(
        f"lie beyond the end of the file ({len(data) - 100} bytes)"
    )
    assert all_meta(model)


def test_missing_shard_and_bad_paths(tmp_path):
    checkpoint = save_sharded(original_llama(), tmp_path / "ckpt")
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    (checkpoint / weight_map[UP]).unlink()
    with pytest.raises(CheckpointError, match=rf"names missing shard {weight_map[UP]} \(holding .*{UP}"):
        prefetch_compile.load_checkpoint(meta_llama(), checkpoint, "cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        prefetch_compile.load_checkpoint(meta_llama(), tmp_path / "nope.safetensors", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds neither model.safetensors.index.json nor model.safetensors"):
        prefetch_compile.load_checkpoint(meta_llama(), tmp_path / "empty", "cpu")


def test_iterable_rejected_midway_leaves_the_model_unloaded():
    state = list(original_llama().state_dict().items())
    position = next(i for i, (name, _) in enumerate(state) if name == UP)
    state[position] = (UP, state[position][1][:, :3])
    model = meta_llama()
    with pytest.raises(CheckpointError) as error:
        prefetch_compile.load_checkpoint(model, iter(state), "cpu", group_size=2)
    assert str(error.value) == (
        f"checkpoint rejected at its tensor {position}, nothing was loaded into the model: "
        f"{UP}: shape (128, 3) in the checkpoint, (128, 64) in the model"
    )
    assert all_meta(model) and prefetch_compile.runtime_of(model) is None
    with pytest.raises(Exception):
        logits(model, torch.zeros(1, 2, dtype=torch.long))  # unusable, not silently wrong


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda state: state.pop(), "checkpoint ended without lm_head.weight; nothing was loaded into the model"),
        (lambda state: state.append(("nope", torch.zeros(1))), "checkpoint rejected at its tensor 39, nothing was loaded into the model: nope: not in the model"),
        (lambda state: state.append(state[0]), "checkpoint rejected at its tensor 39, nothing was loaded into the model: model.embed_tokens.weight: given twice"),
    ],
    ids=["missing", "unexpected", "twice"],
)
def test_iterable_problems(edit, message):
    state = list(original_llama().state_dict().items())
    assert len(state) == 39 and state[-1][0] == "lm_head.weight"
    edit(state)
    model = meta_llama()
    with pytest.raises(CheckpointError) as error:
        prefetch_compile.load_checkpoint(model, state, "cpu", group_size=2)
    assert str(error.value) == message
    assert all_meta(model)


def test_a_model_with_real_weights_is_refused():
    with pytest.raises(CheckpointError, match=r"^model.embed_tokens.weight is on cpu; load_checkpoint\(\) fills a model built on the meta device"):
        prefetch_compile.load_checkpoint(original_llama(), original_llama().state_dict().items(), "cpu")


class RotaryStack(nn.Module):
    """Blocks plus a non-persistent buffer computed in __init__, like a rotary embedding's inv_freq."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    @staticmethod
    def frequencies() -> torch.Tensor:
        return 1.0 / 10_000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) * self.inv_freq.repeat(2)
        return x


def test_meta_buffers_need_an_initialiser_that_computes_them():
    original = RotaryStack()
    state = original.state_dict()
    with torch.device("meta"):
        model = RotaryStack()
    with pytest.raises(
        CheckpointError,
        match=r"^buffers inv_freq are on the meta device and not in the checkpoint; build the model with real "
        r"buffers or pass init_buffers=fn\(module\) to compute them$",
    ):
        prefetch_compile.load_checkpoint(model, state.items(), "cpu", group_size=2)
    with pytest.raises(CheckpointError, match=r"^init_buffers left buffers inv_freq uncomputed$"):
        prefetch_compile.load_checkpoint(model, state.items(), "cpu", group_size=2, init_buffers=lambda module: None)
    assert model.inv_freq.is_meta  # put back: a later load must not take the placeholder for a computed value

    def init_buffers(module: nn.Module) -> None:
        module.inv_freq.copy_(RotaryStack.frequencies())

    prefetch_compile.load_checkpoint(model, state.items(), "cpu", group_size=2, init_buffers=init_buffers)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_real_buffers_are_kept():
    original = RotaryStack()
    with torch.device("meta"):
        model = RotaryStack()
    model.inv_freq = RotaryStack.frequencies()  # as built with real buffers (accelerate's init_empty_weights)
    prefetch_compile.load_checkpoint(model, original.state_dict().items(), "cpu", group_size=2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_progress_lines_and_summary(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(_Progress, "QUIET_SECONDS", 0.0)
    checkpoint = save_sharded(original_llama(), tmp_path)
    with caplog.at_level(logging.INFO, logger="prefetch_compile"):
        prefetch_compile.load_checkpoint(meta_llama(), checkpoint, "cpu", group_size=2)
    lines = [record.getMessage() for record in caplog.records]
    progress = [line for line in lines if line.startswith("prefetch_compile: loading ")]
    assert [line.split()[2] for line in progress][-1] == "100%" and 3 <= len(progress) <= 10
    summary = [line for line in lines if line.startswith("prefetch_compile: loaded ")]
    files = len(list(checkpoint.glob("*.safetensors")))
    assert len(summary) == 1 and f"loaded 39 tensors, 642.25 KiB from {files} file(s) under {checkpoint} onto cpu" in summary[0]
    assert lines[-1].startswith("prefetch_compile: offloaded 2/4 layers of 'model.layers'")


def test_no_progress_lines_for_a_quick_load(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="prefetch_compile"):
        prefetch_compile.load_checkpoint(meta_llama(), save_sharded(original_llama(), tmp_path), "cpu", group_size=2)
    assert not any(record.getMessage().startswith("prefetch_compile: loading ") for record in caplog.records)


def test_sentinel_math():
    """The markers of an uncomputed buffer cannot be mistaken for ordinary values."""
    from prefetch_compile.loading import _holds_sentinel, _sentinel

    assert math.isnan(_sentinel(torch.bfloat16)) and _sentinel(torch.int64) == torch.iinfo(torch.int64).min
    assert _holds_sentinel(torch.tensor([1.0, math.nan])) and not _holds_sentinel(torch.arange(3))


def test_readme_recipe_bf16_from_config(tmp_path):
    """The README's recipe: AutoModelForCausalLM.from_config(dtype=bfloat16) on the meta device."""
    torch.manual_seed(0)
    # Not .to(bfloat16), which would round the rotary inv_freq buffer too; from_config keeps it in float32.
    original = transformers.AutoModelForCausalLM.from_config(llama_config(), dtype=torch.bfloat16).eval()
    save_sharded(original, tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prefetch_compile.load_checkpoint(model, tmp_path, "cpu", group_size=4, num_in_group=1, prefetch_step=2)
    tokens = torch.randint(0, 128, (1, 6))
    assert torch.equal(logits(model, tokens), logits(original, tokens))


def test_reading_in_chunks_gives_the_stored_bytes(tmp_path):
    """The GPU path reads a tensor chunk by chunk (``skip``) into its staging buffers."""
    from prefetch_compile.checkpoint import FileReader, read_checkpoint_headers

    weight = torch.randn(37, 11)
    path = single_file(tmp_path, {"w": weight, "b": torch.arange(5)})
    stored = read_checkpoint_headers(path)["w"]
    assert (stored.shape, stored.dtype, stored.nbytes) == ((37, 11), torch.float32, 37 * 11 * 4)
    got = torch.empty(37, 11)
    raw = got.view(-1).view(torch.uint8)
    with FileReader() as reader:
        for start in range(0, stored.nbytes, 100):
            size = min(100, stored.nbytes - start)
            reader.read_into(stored, raw[start:].data_ptr(), size, skip=start)
    assert torch.equal(got, weight)


def test_malformed_header_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    with pytest.raises(CheckpointError, match=f"^{path} has a malformed safetensors header: "):
        prefetch_compile.load_checkpoint(meta_llama(), path, "cpu")
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=rf"^{path} is too short \(4 bytes\) to be a safetensors file$"):
        prefetch_compile.load_checkpoint(meta_llama(), path, "cpu")


def test_a_torch_save_file_is_named_as_such_and_sent_to_torch_load(tmp_path):
    """A .pt file's first bytes read as an absurd header length: the error names the format, not a truncation."""
    original = original_llama()
    path = tmp_path / "model.pt"
    torch.save(original.state_dict(), path)
    model = meta_llama()
    with pytest.raises(CheckpointError, match=rf"^{path} is a torch.save file .*torch\.load\(path"):
        prefetch_compile.load_checkpoint(model, path, "cpu")
    assert all_meta(model)
    # What the message advises loads it.
    prefetch_compile.load_checkpoint(model, torch.load(path, map_location="cpu", mmap=True), "cpu")
    tokens = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(logits(model, tokens), logits(original, tokens), rtol=0, atol=0)
    other = tmp_path / "notes.bin"
    other.write_bytes(b"hello, this is not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"^{other} is not a safetensors file: its header does not begin"):
        prefetch_compile.load_checkpoint(meta_llama(), other, "cpu")


@pytest.mark.parametrize(
    "knobs",
    [{"offload_layers": [0, 3], "prefetch_step": 2}, {"filter_fn": lambda block, fqn: fqn.endswith((".0", ".3"))}],
    ids=["offload_layers", "filter_fn"],
)
def test_load_checkpoint_takes_the_plan_knobs_of_offload(tmp_path, knobs):
    """The same knobs, by the same names, give load_checkpoint() the plan that offload() makes."""
    original = original_llama()
    original.save_pretrained(tmp_path)
    placed = copy.deepcopy(original)
    want = prefetch_compile.offload(placed, "cpu", **knobs).plan
    model = meta_llama()
    got = prefetch_compile.load_checkpoint(model, tmp_path, "cpu", **knobs).plan
    assert [layer.name for layer in got.offloaded] == ["model.layers.0", "model.layers.3"]
    assert got == want
    tokens = torch.randint(0, 128, (1, 5))
    assert torch.equal(logits(model, tokens), logits(original, tokens))


def test_an_unknown_plan_knob_is_named(tmp_path):
    with pytest.raises(prefetch_compile.OptionError, match=r"unknown plan knob\(s\) \['group_sise'\]; the plan knobs are"):
        prefetch_compile.load_checkpoint(meta_llama(), tmp_path, "cpu", group_sise=2)
    with pytest.raises(prefetch_compile.OptionError, match=r"unknown plan knob\(s\) \['budgett'\]"):
        prefetch_compile.offload(original_llama(), "cpu", budgett="1GiB")
    with pytest.raises(prefetch_compile.OptionError, match=r"load_checkpoint takes plan knobs, not a device-memory budget"):
        prefetch_compile.load_checkpoint(meta_llama(), tmp_path, "cpu", budget="1GiB")

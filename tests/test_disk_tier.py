"""The disk tier: load_checkpoint(host_budget=...) keeps the layers beyond the budget in the checkpoint files.

CPU copies are synchronous, and the reader thread is a real thread: a consumer
that copied a staging buffer before it was filled, or a reader that refilled
one before its copy had finished, gives wrong numbers here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

import prefetch_compile
from prefetch_compile import CheckpointError, OptionError
from prefetch_compile.checkpoint import read_checkpoint_headers
from prefetch_compile.direct_io import ALIGNMENT, DirectReader
from prefetch_compile.disk_layout import STAGING_BUFFERS, plan_disk_tier, read_layout, spread
from prefetch_compile.disk_tier import DiskTier, StreamStats
from prefetch_compile.plan import build_plan
from prefetch_compile.config import PlanOptions
from model_zoo import tiny_decoder_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

LAYERS = 8
PLAN = {"group_size": 1, "num_in_group": 1}  # every layer offloaded
LAYER_BYTES = 147_968  # one tiny Llama layer's packed block (float32)


def llama_config(**overrides):
    return transformers.LlamaConfig(**tiny_decoder_config(num_hidden_layers=LAYERS, **overrides))


def original_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config()).eval()


def meta_llama():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama_config()).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.fixture(scope="module")
def original():
    return original_llama()


@pytest.fixture
def checkpoint(tmp_path, original):
    original.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    return tmp_path


def staging_bytes(checkpoint) -> int:
    """One staging buffer: the largest layer's extents as read from ``checkpoint``."""
    plan, stored = build_plan(meta_llama(), PlanOptions(**PLAN)), read_checkpoint_headers(checkpoint)
    return max(read_layout(layer, stored).staging_bytes for layer in plan.offloaded)


def budget_for(checkpoint, host_layers: int, staging_buffers: int = STAGING_BUFFERS) -> int:
    """A host budget that holds ``host_layers`` layers next to the staging ring (and less than one more)."""
    return host_layers * LAYER_BYTES + staging_buffers * staging_bytes(checkpoint) + ALIGNMENT


def load(checkpoint, host_layers=2, staging_buffers=None, **knobs):
    model = meta_llama()
    budget = budget_for(checkpoint, host_layers, staging_buffers or STAGING_BUFFERS)
    ring = {} if staging_buffers is None else {"staging_buffers": staging_buffers}
    runtime = prefetch_compile.load_checkpoint(model, checkpoint, "cpu", **{**PLAN, **knobs}, host_budget=budget, **ring)
    return model, runtime


@pytest.mark.parametrize("prefetch_step", [1, 2])
def test_layers_beyond_the_budget_are_read_from_disk_and_give_the_original_logits(checkpoint, original, prefetch_step, caplog):
    with caplog.at_level(logging.INFO, logger="prefetch_compile"):
        model, runtime = load(checkpoint, prefetch_step=prefetch_step)
    stats = runtime.stats()
    assert (stats.offloaded_layers, stats.disk_layers) == (LAYERS, LAYERS - 2)
    assert sorted(runtime.disk.layout.layers) == [0, 2, 3, 4, 6, 7]  # spread evenly: 6 of 8
    assert runtime.host.nbytes == 2 * LAYER_BYTES  # the arena holds the other two only
    assert runtime.host.nbytes + stats.staging_bytes <= budget_for(checkpoint, 2)
    assert stats.disk_bytes == sum(layer.nbytes for layer in runtime.disk.layout.layers.values())
    assert (
        f"1.13 MiB off the device: {(stats.offloaded_bytes - stats.disk_bytes) / 1024:.2f} KiB in host memory, 6 layers "
        f"({stats.disk_bytes / 1024:.2f} KiB) read from disk at every forward through a {stats.staging_bytes / 1024:.2f} KiB staging ring"
    ) in caplog.records[-1].getMessage()
    tokens = torch.randint(0, 128, (2, 9))
    want = logits(original, tokens)
    assert torch.equal(logits(model, tokens), want)  # eager: the block hooks start and wait
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    assert torch.equal(logits(compiled, tokens), want)
    assert torch.equal(logits(compiled, tokens), want)
    assert runtime.counters.ensure_misses == 0 and runtime.disk.stream_stats().discarded == 0


def test_every_offloaded_layer_is_read_once_per_forward(checkpoint, original):
    model, runtime = load(checkpoint, prefetch_step=2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    tokens = torch.randint(0, 128, (1, 5))
    logits(compiled, tokens)  # compiles
    reads, copies = runtime.disk.reads, runtime.counters.copies
    forwards = 3
    for _ in range(forwards):
        assert torch.equal(logits(compiled, tokens), logits(original, tokens))
    after = runtime.disk.reads
    assert {index: after[index] - reads[index] for index in after} == dict.fromkeys(runtime.disk.layout.layers, forwards)
    assert runtime.counters.copies - copies == forwards * LAYERS  # host-resident and disk-resident alike
    assert runtime.counters.ensure_misses == 0 and runtime.disk.stream_stats().discarded == 0


def test_layers_alone_in_their_slots_are_read_once(checkpoint, original):
    """8 offloaded layers, 6 slots: layers 2-5 are alone in theirs, copied when placed and never again."""
    model, runtime = load(checkpoint, host_layers=0, prefetch_step=6)
    lone = [index for index in range(LAYERS) if runtime.plan.next_in_slot(index) == index]
    assert lone == [2, 3, 4, 5] and set(lone) <= set(runtime.disk.layout.layers)
    tokens = torch.randint(0, 128, (1, 5))
    for _ in range(3):
        assert torch.equal(logits(model, tokens), logits(original, tokens))
    reads = runtime.disk.reads
    assert all(reads[index] == 1 for index in lone)
    # Slots 0 and 1 take turns: layers 0 and 1 are placed, then re-read at the end of each forward for the
    # next; layers 6 and 7 are read once in each forward. A read is counted when it is copied, so exactly.
    assert {index: reads[index] for index in reads if index not in lone} == {0: 4, 1: 4, 6: 3, 7: 3}
    assert runtime.disk.stream_stats().discarded == 0 and runtime.counters.ensure_misses == 0


def test_generate_with_a_dynamic_cache_gives_the_original_tokens(checkpoint, original):
    model, runtime = load(checkpoint, host_layers=3)
    model.forward = torch.compile(model.forward, backend="prefetch_offload", options={"compiler": "aot_eager"})
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        tokens = model.generate(prompt, **settings)
        expected = original.generate(prompt, **settings)
    assert tokens.shape == (2, 11) and torch.equal(tokens, expected)
    assert runtime.stats().disk_layers == LAYERS - 3 and runtime.counters.ensure_misses == 0


def test_the_one_line_with_the_knobs_it_was_loaded_with_compiles(checkpoint, original):
    """A disk tier turns chunked copies off; the same knobs in torch.compile's options do not contradict that."""
    model, runtime = load(checkpoint)
    assert runtime.plan.options.chunked_copies is False
    model.forward = torch.compile(model.forward, backend="prefetch_offload", options={**PLAN, "compiler": "aot_eager"})
    tokens = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(model, tokens), logits(original, tokens), rtol=1e-5, atol=1e-5)


def write_out_of_order(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """Two shards with the layers in reverse order, and layer 5 split between them."""
    names = sorted(state, key=lambda name: (-int(name.split(".")[2]) if ".layers." in name else 99, name))
    split = next(i for i, name in enumerate(names) if ".layers.5.mlp" in name)
    shards = {"a.safetensors": names[:split], "b.safetensors": names[split:]}
    weight_map = {}
    for shard, members in shards.items():
        header, offset = {}, 0
        for name in members:
            tensor = state[name]
            header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(directory / shard, "wb") as file:
            file.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in members:  # in this order, whatever the header's
                file.write(state[name].contiguous().numpy().tobytes())
        weight_map.update(dict.fromkeys(members, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_checkpoint_out_of_layer_order_with_a_layer_split_across_shards(tmp_path, original):
    write_out_of_order(tmp_path, dict(original.state_dict()))
    stored = read_checkpoint_headers(tmp_path)
    assert stored["model.layers.7.self_attn.q_proj.weight"].offset < stored["model.layers.0.self_attn.q_proj.weight"].offset
    model, runtime = load(tmp_path, host_layers=1)
    split = runtime.disk.layout.layers[5]
    assert [extent.path.name for extent in split.extents] == ["a.safetensors", "b.safetensors"]
    assert all(len(layer.extents) == 1 for index, layer in runtime.disk.layout.layers.items() if index != 5)
    tokens = torch.randint(0, 128, (2, 7))
    assert torch.equal(logits(model, tokens), logits(original, tokens))
    assert torch.equal(logits(model, tokens), logits(original, tokens))


def test_a_budget_that_holds_every_layer_needs_no_disk(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="prefetch_compile"):
        _, runtime = load(checkpoint, host_layers=LAYERS)
    assert runtime.disk is None and runtime.stats().disk_layers == 0
    assert any("holds all 8 offloaded layers" in record.getMessage() for record in caplog.records)


def test_a_budget_too_small_for_the_staging_ring_is_refused(checkpoint):
    model = meta_llama()
    staging = staging_bytes(checkpoint)
    assert LAYER_BYTES < staging <= LAYER_BYTES + 6 * ALIGNMENT  # a layer in up to three shards: a page at each end
    with pytest.raises(OptionError) as error:
        prefetch_compile.load_checkpoint(model, checkpoint, "cpu", **PLAN, host_budget="300KB")
    assert str(error.value).startswith(
        f"host_budget=292.97 KiB is too small: with all 8 offloaded layers on disk, the staging ring alone needs "
        f"2 x {staging / 1024:.2f} KiB = {2 * staging / 1024:.2f} KiB"
    )
    assert all(param.is_meta for param in model.parameters())
    with pytest.raises(OptionError, match="host_budget must be a number of bytes"):
        prefetch_compile.load_checkpoint(meta_llama(), checkpoint, "cpu", host_budget="lots")


def test_a_deeper_staging_ring_gives_the_same_logits_and_counts_in_the_budget(checkpoint, original):
    model, runtime = load(checkpoint, host_layers=2, staging_buffers=3, prefetch_step=2)
    stats = runtime.stats()
    assert sorted(runtime.disk.layout.layers) == [0, 2, 3, 4, 6, 7] and runtime.disk.layout.staging_buffers == 3
    assert len(runtime.disk.staging_buffers) == 3 and stats.staging_bytes == 3 * staging_bytes(checkpoint)
    assert runtime.host.nbytes + stats.staging_bytes <= budget_for(checkpoint, 2, staging_buffers=3)
    tokens = torch.randint(0, 128, (2, 9))
    want = logits(original, tokens)
    assert torch.equal(logits(model, tokens), want)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    assert torch.equal(logits(compiled, tokens), want)
    reads = runtime.disk.reads
    for _ in range(3):
        assert torch.equal(logits(compiled, tokens), want)
    after = runtime.disk.reads
    assert {index: after[index] - reads[index] for index in after} == dict.fromkeys(runtime.disk.layout.layers, 3)
    assert runtime.counters.ensure_misses == 0 and runtime.disk.stream_stats().discarded == 0

    # The same budget: with two buffers it holds two layers in host memory, with three one (a buffer > a layer).
    budget = budget_for(checkpoint, 1, staging_buffers=3)
    for buffers, host_layers in [(2, 2), (3, 1)]:
        _, runtime = load_with_budget(checkpoint, budget, staging_buffers=buffers)
        assert (runtime.stats().disk_layers, runtime.host.nbytes) == (LAYERS - host_layers, host_layers * LAYER_BYTES)
        assert runtime.host.nbytes + runtime.stats().staging_bytes <= budget
        runtime.disk.close()


def load_with_budget(checkpoint, budget: int, **options):
    model = meta_llama()
    return model, prefetch_compile.load_checkpoint(model, checkpoint, "cpu", **PLAN, host_budget=budget, **options)


@pytest.mark.parametrize("bad", [1, 0, -2, 2.5, True, "3", None])
def test_a_bad_staging_buffers_is_refused_naming_it(checkpoint, bad):
    model = meta_llama()
    if bad is None:  # without a host budget there is no ring to size
        with pytest.raises(OptionError, match=r"^staging_buffers=3 only applies with a host_budget"):
            prefetch_compile.load_checkpoint(model, checkpoint, "cpu", **PLAN, staging_buffers=3)
    else:
        with pytest.raises(OptionError, match=f"^staging_buffers must be an integer >= 2, got {bad!r}$"):
            load_with_budget(checkpoint, budget_for(checkpoint, 2), staging_buffers=bad)
    assert all(param.is_meta for param in model.parameters())


def test_a_budget_too_small_for_a_deeper_ring_says_so(checkpoint):
    staging = staging_bytes(checkpoint)
    with pytest.raises(OptionError) as error:
        load_with_budget(checkpoint, 3 * staging - 1, staging_buffers=3)
    assert str(error.value) == (
        f"host_budget={(3 * staging - 1) / 1024:.2f} KiB is too small: with all 8 offloaded layers on disk, the staging "
        f"ring alone needs 3 x {staging / 1024:.2f} KiB = {3 * staging / 1024:.2f} KiB (staging_buffers=3, each buffer "
        "as large as the largest layer as read from disk); raise host_budget to at least that, or pass fewer "
        "staging_buffers (at least 2)"
    )
    _, runtime = load_with_budget(checkpoint, 3 * staging, staging_buffers=3)  # the ring alone: every layer on disk
    assert runtime.stats().disk_layers == LAYERS and runtime.host.nbytes == 0


def test_stream_stats_subtract_field_by_field():
    later = StreamStats(layers_read=5, bytes_read=100, read_s=2.0, copy_wait_s=0.5, idle_s=1.0, take_wait_s=0.25, discarded=1)
    earlier = StreamStats(layers_read=2, bytes_read=40, read_s=0.5, copy_wait_s=0.25, idle_s=0.5, take_wait_s=0.125, discarded=0)
    window = later - earlier
    assert window == StreamStats(layers_read=3, bytes_read=60, read_s=1.5, copy_wait_s=0.25, idle_s=0.5, take_wait_s=0.125, discarded=1)
    assert window.read_bytes_per_s == 40.0 and StreamStats().read_bytes_per_s is None


def disk_tier(checkpoint, staging_buffers: int) -> DiskTier:
    """A disk tier on its own: layers 0, 2, 3, 4, 6, 7 on disk, two slots (none alone), read in that order."""
    plan = build_plan(meta_llama(), PlanOptions(**PLAN, prefetch_step=2))
    layout = plan_disk_tier(plan, read_checkpoint_headers(checkpoint), budget_for(checkpoint, 2, staging_buffers), staging_buffers)
    return DiskTier(layout, plan, torch.device("cpu"))


def file_bytes(tier: DiskTier, index: int) -> int:
    """What reading layer ``index`` moves from its files: its extents, less what lies past a file's end."""
    return sum(min(extent.nbytes, extent.path.stat().st_size - extent.file_offset) for extent in tier.layout.layers[index].extents)


def settled(tier: DiskTier, layers_read: int) -> StreamStats:
    """The stream's stats once the reader has completed ``layers_read`` reads (it then idles: the ring is full)."""
    deadline = time.monotonic() + 30
    while (stats := tier.stream_stats()).layers_read < layers_read:
        assert time.monotonic() < deadline, f"the reader completed {stats.layers_read} reads, not {layers_read}"
        time.sleep(0.001)
    return stats


def test_stream_stats_count_every_read_and_its_bytes_and_the_discarded_ones(checkpoint):
    tier = disk_tier(checkpoint, staging_buffers=3)
    order = sorted(tier.layout.layers)
    assert order == [0, 2, 3, 4, 6, 7]
    first = settled(tier, 3)  # the ring full: the first three read ahead, nothing taken
    time.sleep(0.05)
    assert tier.stream_stats().layers_read == 3  # and no further: every buffer is filled
    assert first.bytes_read == sum(file_bytes(tier, index) for index in order[:3])
    assert first.copy_wait_s == 0.0 and first.take_wait_s == 0.0 and first.discarded == 0
    for _ in range(2):  # two passes over the layers, in the order the runtime asks
        for index in order:
            tier.take(index).release(None)
    window = settled(tier, 3 + 2 * len(order)) - first
    assert window.layers_read == 2 * len(order)  # the three read ahead now are the same three layers as before
    assert window.bytes_read == 2 * sum(file_bytes(tier, index) for index in order)
    assert window.discarded == 0 and tier.reads == dict.fromkeys(order, 2)

    before = tier.stream_stats()
    tier.take(4).release(None)  # out of order: the ring holds 0, 2, 3, all three dropped
    after = settled(tier, before.layers_read + 4) - before  # 4, then 6, 7 and 0 read ahead
    assert (after.layers_read, after.discarded) == (4, 3)
    assert after.bytes_read == sum(file_bytes(tier, index) for index in (4, 6, 7, 0))
    assert tier.reads == {**dict.fromkeys(order, 2), 4: 3}
    tier.close()


class LateCopy:
    """A copy that is done ``seconds`` after the reader starts waiting for it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def synchronize(self) -> None:
        time.sleep(self.seconds)


def test_stream_stats_put_the_reader_time_in_read_copy_wait_and_idle_and_the_consumer_time_in_take_wait(checkpoint, monkeypatch):
    gate, read = threading.Event(), DirectReader.read

    def gated_read(self, *args):
        gate.wait()
        return read(self, *args)

    monkeypatch.setattr(DirectReader, "read", gated_read)
    tier = disk_tier(checkpoint, staging_buffers=2)
    threading.Timer(0.2, gate.set).start()
    staged = tier.take(0)  # blocks until the gate opens: the reader is inside its first read all along
    stats = tier.stream_stats()
    assert stats.take_wait_s >= 0.15 and stats.read_s >= 0.15
    staged.release(LateCopy(0.1))  # buffer 0's next fill (layer 3) waits for this copy
    full = settled(tier, 3)  # layers 0 and 2, then 3 once buffer 0's copy is done
    assert full.copy_wait_s >= 0.1
    time.sleep(0.1)  # the ring is full (2 and 3 read ahead): the reader idles, and the snapshot counts it so far
    idle = tier.stream_stats() - full
    assert idle.idle_s >= 0.1 and (idle.layers_read, idle.read_s, idle.copy_wait_s) == (0, 0.0, 0.0)
    tier.close()


def test_an_iterable_checkpoint_cannot_have_a_disk_tier(original):
    with pytest.raises(OptionError, match="^host_budget needs a safetensors checkpoint"):
        prefetch_compile.load_checkpoint(meta_llama(), original.state_dict().items(), "cpu", host_budget="1MiB")


def test_a_truncated_shard_is_refused_at_load(checkpoint):
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    shard = checkpoint / weight_map["model.layers.6.mlp.up_proj.weight"]  # layer 6 would be read from disk
    shard.write_bytes(shard.read_bytes()[:-100])
    model = meta_llama()
    with pytest.raises(CheckpointError, match=f"^{shard} is truncated or corrupt:"):
        prefetch_compile.load_checkpoint(model, checkpoint, "cpu", **PLAN, host_budget=budget_for(checkpoint, 2))
    assert all(param.is_meta for param in model.parameters())


def test_a_shard_that_shrinks_after_loading_raises_at_the_forward_naming_it(checkpoint, original):
    model, runtime = load(checkpoint, prefetch_step=1)
    tokens = torch.randint(0, 128, (1, 4))
    assert torch.equal(logits(model, tokens), logits(original, tokens))
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    shard = checkpoint / weight_map["model.layers.4.self_attn.q_proj.weight"]
    with open(shard, "r+b") as file:
        file.truncate(shard.stat().st_size - 64)
    for _ in range(2):  # and again: the failed layer is never taken for read
        with pytest.raises(CheckpointError, match=f"^{shard} changed since load_checkpoint\\(\\) opened it"):
            logits(model, tokens)


def test_a_slow_reader_is_waited_for(checkpoint, original, monkeypatch):
    """A consumer that copied a staging buffer before its read finished would copy the previous layer's bytes."""
    read = DirectReader.read

    def slow_read(self, *args):
        time.sleep(0.01)
        return read(self, *args)

    monkeypatch.setattr(DirectReader, "read", slow_read)
    model, runtime = load(checkpoint, prefetch_step=2)
    tokens = torch.randint(0, 128, (2, 6))
    for _ in range(2):
        assert torch.equal(logits(model, tokens), logits(original, tokens))
    assert runtime.disk.stream_stats().discarded == 0


class SlowCopy:
    """A copy that runs on its own thread, a few bytes at a time, like a DMA: done once ``synchronize`` returns."""

    def __init__(self, pieces, destination: torch.Tensor) -> None:
        self._thread = threading.Thread(target=self._copy, args=(pieces, destination))
        self._thread.start()

    @staticmethod
    def _copy(pieces, destination) -> None:
        for source, offset in pieces:
            for start in range(0, source.numel(), 8192):
                end = min(start + 8192, source.numel())
                destination[offset + start : offset + end].copy_(source[start:end])
                time.sleep(0.001)

    def synchronize(self) -> None:
        self._thread.join()


def test_a_staging_buffer_is_refilled_only_after_its_copy_has_finished(checkpoint, original):
    """The reader must wait for the copy's event: refilling during the (slow, asynchronous) copy corrupts it."""
    model = meta_llama()
    plan = build_plan(model, PlanOptions(**PLAN, prefetch_step=2))
    stored = read_checkpoint_headers(checkpoint)
    layout = plan_disk_tier(plan, stored, budget_for(checkpoint, 2))
    tier = DiskTier(layout, plan, torch.device("cpu"))
    expected = {}
    for layer in plan.offloaded:
        if layer.offload_index in layout.layers:
            block = torch.zeros(layer.nbytes, dtype=torch.uint8)
            for placement in layer.params:
                value = original.get_parameter(placement.name).detach().reshape(-1).view(torch.uint8)
                block[placement.offset : placement.offset + value.numel()] = value
            expected[layer.offload_index] = block
    copies = []
    for _ in range(3):
        for index in sorted(layout.layers):  # the order the runtime asks in
            staged = tier.take(index)
            destination = torch.zeros(plan.offloaded[index].nbytes, dtype=torch.uint8)
            copy = SlowCopy(staged.pieces, destination)
            staged.release(copy)
            copies.append((index, destination, copy))
    for index, destination, copy in copies:
        copy.synchronize()
        assert torch.equal(destination, expected[index]), f"layer {index} was overwritten while it was being copied"
    assert tier.stream_stats().discarded == 0
    tier.close()


def test_an_out_of_order_request_restarts_the_ring(checkpoint, original):
    """An eager call of one block asks for a layer the ring did not read ahead: it is read, nothing stale is used."""
    model, runtime = load(checkpoint, prefetch_step=1)
    tokens = torch.randint(0, 128, (1, 4))
    assert torch.equal(logits(model, tokens), logits(original, tokens))
    hidden = torch.randn(1, 4, 64)
    position = torch.arange(4)[None]
    rotary = model.model.rotary_emb(hidden, position)
    with torch.no_grad():
        got = model.model.layers[4](hidden, position_embeddings=rotary)
        want = original.model.layers[4](hidden, position_embeddings=rotary)
    got, want = (value[0] if isinstance(value, tuple) else value for value in (got, want))
    assert torch.equal(got, want)
    assert runtime.counters.ensure_misses == 1 and runtime.disk.stream_stats().discarded >= 1
    assert torch.equal(logits(model, tokens), logits(original, tokens))


def test_cuda_graphs_are_refused_with_a_disk_tier(checkpoint):
    model, _ = load(checkpoint)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager", "cuda_graphs": True})
    with pytest.raises(Exception, match="cuda_graphs=True cannot be used with a disk tier: 6 offloaded layers") as error:
        logits(compiled, torch.randint(0, 128, (1, 4)))
    assert isinstance(getattr(error.value, "inner_exception", error.value), OptionError)  # Dynamo wraps it


def test_state_dict_reads_disk_resident_values_and_loads_into_them_are_refused(checkpoint, original):
    model, runtime = load(checkpoint)
    state = model.state_dict()
    for name, value in original.state_dict().items():
        assert torch.equal(state[name], value), name
    on_disk = "model.layers.3.mlp.up_proj.weight"
    in_host = "model.layers.1.mlp.up_proj.weight"
    assert on_disk in runtime.disk.layout.sources and in_host not in runtime.disk.layout.sources
    before = {name: value.clone() for name, value in model.state_dict().items()}
    update = {"model.norm.weight": torch.zeros(64), in_host: torch.zeros(128, 64), on_disk: torch.zeros(128, 64)}
    refusal = f"{on_disk} is read from the checkpoint files at every forward"
    with pytest.raises(ValueError, match=f"^load_state_dict: {refusal}.*nothing was written"):
        model.load_state_dict(update, strict=False)
    with pytest.raises(ValueError, match=f"^load_state_dict: {refusal}"):
        model.model.layers[3].load_state_dict({"mlp.up_proj.weight": torch.zeros(128, 64)}, strict=False)
    with pytest.raises(ValueError, match=f"^load_weights: {refusal}"):
        runtime.load_weights(update)
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    model.load_state_dict({in_host: torch.ones(128, 64)}, strict=False)  # host-resident: written as before
    assert torch.equal(model.state_dict()[in_host], torch.ones(128, 64))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_write_into_a_disk_resident_state_dict_value_is_refused_at_the_next_call(checkpoint, original, mode):
    """That value is a copy read from the file: the write cannot reach the model, so the next forward says so."""
    model, runtime = load(checkpoint)
    on_disk, in_host = "model.layers.3.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    tokens = torch.randint(0, 128, (1, 6))
    with getattr(torch, mode)():  # under inference_mode too: the values handed out still count their writes
        state = model.state_dict()
        state[in_host].mul_(2.0)  # host-resident: seen, as without offloading
        state[in_host].div_(2.0)
        state[on_disk].mul_(2.0)
    with pytest.raises(prefetch_compile.InPlaceEditError, match=f"disk-resident parameter.*{on_disk}.*changed nothing"):
        logits(model, tokens)
    assert torch.equal(logits(model, tokens), logits(original, tokens))  # refused once; the weights are the file's
    assert torch.equal(model.state_dict()[on_disk], original.state_dict()[on_disk])


def test_a_write_into_a_temporary_state_dict_value_is_refused_too(checkpoint, original):
    """README's idiom: the dict is freed as soon as the write is done, before any look at it."""
    model, runtime = load(checkpoint)
    on_disk, in_host = "model.layers.3.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    tokens = torch.randint(0, 128, (1, 6))
    model.state_dict()[in_host].copy_(torch.zeros(128, 64))  # host-resident: reaches the model
    assert torch.equal(runtime.host_value(in_host), torch.zeros(128, 64))
    model.state_dict()[on_disk].copy_(torch.zeros(128, 64))
    with pytest.raises(prefetch_compile.InPlaceEditError, match=f"disk-resident parameter.*{on_disk}.*changed nothing"):
        logits(model, tokens)
    assert torch.equal(model.state_dict()[on_disk], original.state_dict()[on_disk])


def test_state_dict_copies_are_held_until_the_next_call_one_per_parameter(checkpoint):
    """Held strongly only from a hand-out to the model's next call, and never two copies of one parameter."""
    model, runtime = load(checkpoint)
    on_disk = "model.layers.3.mlp.up_proj.weight"
    first = weakref.ref(model.state_dict()[on_disk])
    second = weakref.ref(model.state_dict()[on_disk])
    assert first() is None and second() is not None  # the second state_dict() took the first one's place
    logits(model, torch.randint(0, 128, (1, 6)))
    assert second() is None  # let go at the call: a dropped dict is freed
    kept = model.state_dict()
    logits(model, torch.randint(0, 128, (1, 6)))
    kept[on_disk].zero_()  # a dict the caller keeps is still watched after the call
    with pytest.raises(prefetch_compile.InPlaceEditError, match=on_disk):
        logits(model, torch.randint(0, 128, (1, 6)))


def test_an_in_place_edit_of_a_disk_resident_parameter_is_undone_with_disk_advice(checkpoint, original):
    """The refusal does not advise load_weights for it, which refuses disk-resident parameters too."""
    model, runtime = load(checkpoint)
    on_disk = "model.layers.3.mlp.up_proj.weight"
    tokens = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        model.get_parameter(on_disk).mul_(2.0)
    with pytest.raises(prefetch_compile.InPlaceEditError) as error:
        logits(model, tokens)
    assert f"{on_disk}: its layer is read from the checkpoint files" in str(error.value)
    assert f"{on_disk} can change only by writing the checkpoint and loading it again" in str(error.value)
    assert "load_weights" not in str(error.value)
    assert torch.equal(logits(model, tokens), logits(original, tokens))  # undone: the file's weights


def test_without_o_direct_reads_go_through_the_page_cache_and_are_dropped(checkpoint, original, monkeypatch, caplog):
    open_file, advised = os.open, []

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return open_file(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(advice))
    with caplog.at_level(logging.INFO, logger="prefetch_compile"):
        model, runtime = load(checkpoint)
    assert not runtime.disk.direct
    fallbacks = [r.getMessage() for r in caplog.records if "read through the page cache" in r.getMessage()]
    assert fallbacks and "(the filesystem refuses O_DIRECT at open)" in fallbacks[0]
    tokens = torch.randint(0, 128, (1, 4))
    assert torch.equal(logits(model, tokens), logits(original, tokens))
    assert advised and set(advised) == {os.POSIX_FADV_DONTNEED}


def test_spread_and_extents():
    assert spread(8, 6) == [0, 2, 3, 4, 6, 7] and spread(8, 4) == [1, 3, 5, 7] and spread(5, 5) == [0, 1, 2, 3, 4]
    assert spread(10, 1) == [5] and spread(3, 0) == []


def test_a_layer_is_read_in_aligned_extents_and_copied_in_pieces(checkpoint):
    model = meta_llama()
    plan = build_plan(model, PlanOptions(**PLAN))
    stored = read_checkpoint_headers(checkpoint)
    layer = plan.offloaded[2]
    reads = read_layout(layer, stored)
    for extent in reads.extents:
        assert extent.file_offset % ALIGNMENT == 0 and extent.nbytes % ALIGNMENT == 0 and extent.staging_offset % ALIGNMENT == 0
        assert extent.needed <= extent.nbytes
    # Tensors in one file that touch are one read: Hugging Face keeps a layer's tensors together.
    assert len(reads.extents) == len({stored[p.name].path for p in layer.params})
    assert sorted(piece.block_offset for piece in reads.pieces) == sorted(p.offset for p in layer.params)
    assert reads.nbytes == sum(p.nbytes for p in layer.params)


def test_a_non_contiguous_parameter_cannot_be_read_from_disk(checkpoint):
    model = meta_llama()
    weight = model.model.layers[3].mlp.up_proj.weight
    model.model.layers[3].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(64, 128, device="meta").t())
    assert weight.shape == model.model.layers[3].mlp.up_proj.weight.shape
    with pytest.raises(OptionError, match=r"^model.layers.3.mlp.up_proj.weight would be read from disk, but the model holds it with strides \(1, 128\)"):
        prefetch_compile.load_checkpoint(model, checkpoint, "cpu", **PLAN, host_budget=budget_for(checkpoint, 2))


def test_a_disk_tier_never_chunks_copies(checkpoint, original, monkeypatch):
    """A disk-resident layer is staged and copied whole: chunked_copies=True is refused, "auto" does not chunk."""
    monkeypatch.setattr("prefetch_compile.plan.AUTO_CHUNK_MIN_BYTES", 0)  # "auto" would chunk these tiny layers
    assert build_plan(meta_llama(), PlanOptions(**PLAN, prefetch_step=1)).piece_starts != (0,)
    with pytest.raises(OptionError, match="chunked_copies=True and host_budget cannot be combined"):
        prefetch_compile.load_checkpoint(
            meta_llama(), checkpoint, "cpu", **PLAN, chunked_copies=True, host_budget=budget_for(checkpoint, 2)
        )
    model, runtime = load(checkpoint, prefetch_step=1)
    assert runtime.plan.piece_starts == (0,)
    tokens = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, tokens), logits(original, tokens))

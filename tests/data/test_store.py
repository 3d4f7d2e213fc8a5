"""The disk activation store: round trip per dtype across shard boundaries, kill and resume of a
collection (bitwise equal to an uninterrupted one), incomplete and damaged stores refused, and the
LM stream reading the same rows as the store."""
import json

import pytest
import torch

from aosae.data import store as S
from aosae.data.activations import StreamSource, collect_activations, collect_to_store
from aosae.data.text import iter_texts
from aosae.files import BadFile
from tiny_lm import corpus_text, make_tiny_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny_store")
    path = make_tiny_lm(root / "model")
    text = root / "corpus.txt"
    text.write_text(corpus_text())
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), str(text)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(S, "SHARD_BYTES", 1)  # shard_rows' floor: 1024 rows a shard


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_across_shards(tmp_path, small_shards, dtype):
    acts = torch.randn(2500, 7) * 3
    writer = S.StoreWriter(tmp_path / "s", 7, dtype, {"model": "m", "layer": 1})
    for part, n in zip(acts.split([300, 700, 1, 999, 500]), [3, 7, 1, 9, 5]):
        writer.append(part, n)
    store = writer.finish()
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["shape"] == [2500, 7] and meta["dtype"] == dtype and meta["model"] == "m" and meta["windows"] == 25
    assert len(meta["shards"]) > 1 and not (tmp_path / "s" / "progress.json").exists()
    want = acts.to(S.STORE_DTYPES[dtype])
    assert torch.equal(store.read(0, 2500), want)
    for a, b in [(0, 1), (1023, 1025), (1000, 2100), (2499, 2500), (7, 7)]:
        assert torch.equal(store.read(a, b), want[a:b])
    out = torch.empty(10, 7, dtype=store.dtype)
    assert torch.equal(store.read(1020, 1030, out=out), want[1020:1030])
    with pytest.raises(IndexError):
        store.read(2400, 2501)


def test_incomplete_store_is_resumed_and_damaged_one_refused(tmp_path, small_shards):
    acts = torch.randn(3000, 5)
    d = tmp_path / "s"
    writer = S.StoreWriter(d, 5, "float32", {"k": 1})
    writer.append(acts[:1100], 11)  # closes shard 0 (1100 rows ≥ 1024)
    writer.append(acts[1100:1500], 4)  # partial shard 1: lost in the "kill"
    with pytest.raises(S.StoreIncomplete, match="interrupted"):
        S.ActivationStore.open(d)
    again = S.StoreWriter(d, 5, "float32", {"k": 1})
    assert (again.resumed, again.rows_done, again.windows_done) == (True, 1100, 11)
    assert sorted(p.name for p in d.glob("shard_*")) == ["shard_00000.bin"]
    again.append(acts[1100:], 19)
    assert torch.equal(again.finish().read(0, 3000), acts)
    # another store's leftovers (different meta) are not resumed
    fresh = S.StoreWriter(tmp_path / "t", 5, "float32", {"k": 1})
    fresh.append(acts[:1100], 11)
    other = S.StoreWriter(tmp_path / "t", 5, "float32", {"k": 2})
    assert other.rows_done == 0 and not list((tmp_path / "t").glob("shard_*"))
    # a complete store with a truncated shard is refused, not read
    shard = d / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match="damaged.*shard_00001"):
        S.ActivationStore.open(d)


def test_open_names_a_missing_directory_or_a_file(tmp_path):
    with pytest.raises(S.StoreIncomplete, match="does not exist: no activation store there yet"):
        S.ActivationStore.open(tmp_path / "none")
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadFile, match="is a file, not an activation store directory"):
        S.ActivationStore.open(tmp_path / "f")


def test_float16_overflow_is_an_error(tmp_path):
    writer = S.StoreWriter(tmp_path / "s", 3, "float16", {})
    with pytest.raises(ValueError, match="overflow float16.*bfloat16"):
        writer.append(torch.tensor([[1.0, 7e4, 0.0]]), 1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_are_refused_when_written_opened_and_read(tmp_path, small_shards, dtype, bad):
    writer = S.StoreWriter(tmp_path / "w", 3, dtype, {"model": "m", "layer": 2})
    with pytest.raises(ValueError, match="activations hold NaN/Inf .*layer 2 of m.*--dtype float32"):
        writer.append(torch.tensor([[1.0, bad, 0.0]]), 1)
    acts = torch.randn(2500, 4)
    writer = S.StoreWriter(tmp_path / "s", 4, dtype, {})
    for part in acts.split(500):
        writer.append(part, 5)
    store = writer.finish()
    # a value damaged on disk in the second shard (rows 1500-2499): open names the shard and its row
    shard, row = tmp_path / "s" / "shard_00001.bin", 2000 - 1500
    values = torch.frombuffer(bytearray(shard.read_bytes()), dtype=S.STORE_DTYPES[dtype])
    values[row * 4 + 2] = bad
    shard.write_bytes(values.view(torch.uint8).numpy().tobytes())
    with pytest.raises(BadFile, match=f"row {row} of shard_00001.bin holds {bad} at column 2") as caught:
        S.ActivationStore.open(tmp_path / "s")
    assert caught.value.path == shard and "delete" in str(caught.value)
    with pytest.raises(BadFile, match="shard_00001.bin"):  # and a read that reaches it (a store too large to scan)
        store.read(1900, 2100)
    assert torch.equal(store.read(0, 1900), acts[:1900].to(S.STORE_DTYPES[dtype]))  # the rows before it are fine


def test_a_large_store_is_checked_at_each_shards_ends_when_opened(tmp_path, small_shards, monkeypatch):
    writer = S.StoreWriter(tmp_path / "s", 4, "float32", {})
    for part in torch.randn(2500, 4).split(500):
        writer.append(part, 5)
    store = writer.finish()
    monkeypatch.setattr(S, "FULL_CHECK_BYTES", 0)
    shard = tmp_path / "s" / "shard_00001.bin"
    values = torch.frombuffer(bytearray(shard.read_bytes()), dtype=torch.float32)
    values[2] = float("nan")  # row 0 of the shard: read at open; a row in the middle is found when read
    shard.write_bytes(values.view(torch.uint8).numpy().tobytes())
    with pytest.raises(S.BadFile, match="row 0 of shard_00001.bin"):
        S.ActivationStore.open(tmp_path / "s")
    values[2], values[2 + 4 * 500] = 0.0, float("nan")  # row 500: not read by open, refused by a read
    shard.write_bytes(values.view(torch.uint8).numpy().tobytes())
    S.ActivationStore.open(tmp_path / "s")
    with pytest.raises(S.BadFile, match="row 500 of shard_00001.bin"):
        store.read(0, 2500)


def test_killed_collection_resumes_to_the_same_store(tiny, tmp_path, small_shards):
    model, tok, text = tiny
    kw = dict(context=16, lm_batch=8)
    ref = collect_to_store(S.StoreWriter(tmp_path / "ref", 32, "float32", {}), model, tok, iter_texts(text), 1, 2600,
                           **kw).read(0, 2600)
    assert torch.equal(ref, collect_activations(model, tok, iter_texts(text), 1, 2600, **kw))

    class Killed(Exception):
        pass

    writer = S.StoreWriter(tmp_path / "k", 32, "float32", {})
    real, calls = writer.append, {"n": 0}

    def dying(acts, windows):
        calls["n"] += 1
        if calls["n"] == 12:  # after shard 0 closed, inside shard 1
            raise Killed
        real(acts, windows)

    writer.append = dying
    with pytest.raises(Killed):
        collect_to_store(writer, model, tok, iter_texts(text), 1, 2600, **kw)
    resumed = S.StoreWriter(tmp_path / "k", 32, "float32", {})
    assert resumed.resumed and 0 < resumed.rows_done < 2600
    store = collect_to_store(resumed, model, tok, iter_texts(text), 1, 2600, **kw)
    assert torch.equal(store.read(0, 2600), ref)


def test_stream_reads_the_same_rows_in_any_order(tiny):
    model, tok, text = tiny
    ref = collect_activations(model, tok, iter_texts(text), 1, 2000, context=16, lm_batch=8)
    stream = StreamSource(model, tok, lambda: iter_texts(text), 1, 1900, offset=100, context=16, lm_batch=8)
    assert torch.equal(stream.read(0, 700), ref[100:800])
    assert torch.equal(stream.read(700, 1000), ref[800:1100])  # continues without a restart
    assert torch.equal(stream.read(37, 90), ref[137:190])  # goes back: re-tokenises, LM from there
    assert torch.equal(stream.read(1500, 1900), ref[1600:2000])


def test_a_second_collector_waits_for_the_first(tmp_path):
    import threading
    import time

    order = []

    def second():
        with S.store_lock(tmp_path / "s"):
            order.append("second")

    with S.store_lock(tmp_path / "s"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]

"""2-process torchrun on CPU (gloo): ranks split --tokens into disjoint parts, each collects and reads
only its own store, weights stay identical; a NaN on one rank stops both at the same step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aosae.data.mixing import MixingBuffer, RowRange
from aosae.data.sources import ActivationSpec, held_out_count
from aosae.data.store import ActivationStore, StoreWriter
from aosae.training import distributed as ddp
from tiny_lm import corpus_text, make_tiny_lm

ROOT = Path(__file__).resolve().parents[2]


def test_detect_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = ddp.detect()
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    assert ddp.all_finite(True, info) and not ddp.all_finite(False, info)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = ddp.detect()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 4, 1, False)
    assert ddp.device_for("cuda", info) == "cuda:1" and ddp.device_for("cpu", info) == "cpu"


def torchrun(tmp_path, model, text, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "aosae", "train", "--model", str(model), "--dataset", str(text), "--layer", "1",
           "--tokens", "2000", "--context", "32", "--d-sae", "48", "--batch-size", "64", "--buffer-tokens", "256",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--backend", "reference", "--no-progress",
           *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    text = root / "corpus.txt"
    text.write_text(corpus_text() * 4)
    return make_tiny_lm(root / "model"), text


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_tokens_and_keep_identical_weights(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "run"
    proc = torchrun(tmp_path, model, text, out, "--steps", "8", "--checkpoint-every", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == summary["weights_sha256"]
    # each rank collected only its own half of --tokens, from its own windows (i ≡ rank mod 2)
    stores = {m["rank"]: (p, m) for p in (tmp_path / "cache").iterdir() if p.is_dir()
              for m in [json.loads((p / "meta.json").read_text())]}
    assert sorted(stores) == [0, 1] and all(m["world"] == 2 and m["shape"][0] == 1000 for _, m in stores.values())
    windows = {r: {r + 2 * i for i in range(m["windows"])} for r, (_, m) in stores.items()}
    assert not windows[0] & windows[1]
    rows = [ActivationStore.open(stores[r][0]).read(0, 1000).float() for r in (0, 1)]
    assert not torch.equal(rows[0], rows[1])
    # rank 0's store is exactly what a single process collects from the windows 0, 2, 4, ...
    spec = ActivationSpec(model=str(model), layer=1, dataset=str(text), tokens=2000, context=32,
                          cache_dir=str(tmp_path / "cache"), rank=0, world=2)
    assert spec.directory() == stores[0][0]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[-1])["tokens"] == 8 * 64 * 2


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    """Two ranks started by hand (not torchrun, which SIGTERMs the others when one fails): each must
    stop on its own, at the same step, with exit status 2 and a one-line message."""
    import socket

    model, text = tiny
    d, tokens = 32, 12_000
    # rank 1's part is a ready-made store (the store does not care where rows come from) with one NaN
    # row, outside the rows that set the scale and b_dec (the first 4096, the first buffer group)
    spec = ActivationSpec(model=str(model), layer=1, dataset=str(text), tokens=tokens, context=32,
                          cache_dir=str(tmp_path / "cache"), rank=1, world=2)
    n = tokens // 2
    n_train = n - held_out_count(n, 8192)
    probe = StoreWriter(tmp_path / "probe", d, "float32", {})  # row i = (i, i, ...): batches name their rows
    probe.append(torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous(), 1)
    buf = MixingBuffer(RowRange(probe.finish(), 0, n_train), 64, 256, seed=0, prefetch=False)
    group0 = {i for a, b in buf.pieces(0, 0) for i in range(a, b)}
    bad_step, bad_row = next((s, int(r)) for s in range(buf.steps_per_group, buf.steps_per_epoch)
                             for r in buf.batch(s)[:, 0].tolist() if r >= 4096 and int(r) not in group0)
    acts = torch.randn(n, d)
    acts[bad_row] = 1e30  # finite in bf16 (the store refuses NaN), the loss overflows to Inf
    writer = StoreWriter(spec.directory(), d, "bfloat16", {**spec.fields(), "n_layers": 2})
    writer.append(acts, 1)
    writer.finish()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    args = ["--model", str(model), "--dataset", str(text), "--layer", "1", "--tokens", str(tokens), "--context", "32",
            "--d-sae", "48", "--batch-size", "64", "--buffer-tokens", "256", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--backend", "reference", "--no-progress", "--steps", "200", "--checkpoint-every", "2"]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "aosae", "train", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=240) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, logs)):
        assert p.returncode == 2, err[-3000:]
        assert f"at step {bad_step}" in err and "Traceback" not in err, err[-3000:]
    assert "on another rank (rank 0 was finite)" in logs[0][1] and "on rank 1" in logs[1][1]
    last = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert last == bad_step // 2 * 2
    weights = load_file(str(out / "checkpoints" / f"step_{last}" / "train_weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "summary.json").exists()

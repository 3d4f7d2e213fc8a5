"""2-process torchrun on CPU (gloo): each rank trains on its own shard; weights must stay identical."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from aosae.training import distributed as ddp
from tiny_lm import corpus_text, make_tiny_lm

ROOT = Path(__file__).resolve().parents[2]


def test_detect_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = ddp.detect()
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = ddp.detect()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 4, 1, False)
    assert ddp.device_for("cuda", info) == "cuda:1" and ddp.device_for("cpu", info) == "cpu"


@pytest.mark.slow
def test_torchrun_two_ranks_keep_identical_weights(tmp_path):
    model = make_tiny_lm(tmp_path / "model")
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text() * 4)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "aosae", "train", "--model", str(model), "--dataset", str(text), "--layer", "1",
           "--tokens", "2000", "--context", "32", "--d-sae", "48", "--steps", "8", "--batch-size", "64",
           "--checkpoint-every", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
           "--backend", "reference", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == summary["weights_sha256"]
    # each rank read its own shard: two different activation caches were written
    caches = [json.loads((p / "meta.json").read_text()) for p in (tmp_path / "cache").iterdir()]
    assert sorted((c["rank"], c["world"]) for c in caches) == [(0, 2), (1, 2)]
    shards = [load_file(str(p / "shard_00000.safetensors"))["acts"] for p in (tmp_path / "cache").iterdir()]
    assert not (shards[0].shape == shards[1].shape and (shards[0] == shards[1]).all())
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 8 and json.loads(rows[-1])["tokens"] == 8 * 64 * 2

"""The training loop on a tiny random GPT-2: run dir contents, exact resume, bad inputs, NaN, disk full;
and one end-to-end run on the real default model (SmolLM2-135M)."""
import errno
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from aosae.training import trainer as T
from aosae.cli import main as cli_main
from aosae.training.config import TrainConfig
from aosae.cli.checks import RESUME_KEYS, read_train_config
from aosae.files import BadFile
from aosae.nn.sae import SparseAutoencoder



def tiny_cfg(tiny, tmp_path, **kw):
    base = dict(model=tiny["model"], dataset=tiny["dataset"], layer=1, tokens=3000, context=32, d_sae=64,
                steps=12, batch_size=128, checkpoint_every=4, cache_dir=tiny["cache"], backend="reference",
                lr=3e-3, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir):
    return load_file(str(run_dir / "sae_weights.safetensors"))


def test_run_dir_contents(tiny, tmp_path):
    run_dir, summary = T.train(tiny_cfg(tiny, tmp_path, steps=40, checkpoint_every=10), progress=False)
    for name in ("cfg.json", "sae_weights.safetensors", "train_config.json", "metrics.jsonl", "summary.json", "report.md", "report.png"):
        assert (run_dir / name).is_file(), name
    # the final one and the newest 3 others (--keep-checkpoints) are kept
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{i}" for i in (10, 20, 30, 40)]
    sae = SparseAutoencoder.load(run_dir)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(0.01 <= r["tau"] <= 0.2 for r in rows)
    assert len({r["tau"] for r in rows}) > 1  # adaptive: τ moves after the warm-up calibration
    assert rows[-1]["tau_target"] is not None
    for r in rows:
        assert math.isclose(r["loss"], r["recon"] + 0.04 * r["l1"] + r["tau"] * r["penalty"], rel_tol=1e-4)
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])  # it learns
    assert summary["explained_variance"] > 0 and 0 < summary["l0"] <= 64
    # metrics are consistent with the saved weights: recompute the held-out MSE from the files
    acts = T.get_activations(tiny_cfg(tiny, tmp_path), T.ddp.DistInfo(), "cpu", False)[0]
    held = acts[acts.shape[0] - summary["n_tokens"]:]
    with torch.no_grad():
        mse = (sae(held).x_hat - held).pow(2).mean().item()
    assert math.isclose(mse, summary["mse"], rel_tol=1e-4)


def test_a_finished_run_keeps_no_memory_for_a_next_step(tiny, tmp_path):
    """The gradients and the memory the sparse step keeps between steps go when the run ends."""
    from aosae.ops import kept_gradients, latent_selection

    trainer = T.Trainer(tiny_cfg(tiny, tmp_path, steps=3, activation="topk", top_k=4), progress=False)
    trainer.run()
    assert all(p.grad is None for p in trainer.sae.parameters())
    assert id(trainer.sae.W_enc) not in kept_gradients._kept and id(trainer.sae.W_dec) not in kept_gradients._kept
    assert getattr(latent_selection._kept, "buf", None) is None


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [6, 9])
def test_killed_and_resumed_run_is_bitwise_identical(tiny, tmp_path, kill_at):
    ref_dir, _ = T.train(tiny_cfg(tiny, tmp_path, out=str(tmp_path / "ref")), progress=False)

    def kill(trainer):
        if trainer.step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        T.train(tiny_cfg(tiny, tmp_path, out=str(tmp_path / "killed")), progress=False, on_step=kill)
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = T.Trainer.resume(tmp_path / "killed", progress=False)
    assert resumed.step == (kill_at // 4) * 4
    resumed.run()
    a, b = weights(ref_dir), weights(tmp_path / "killed")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ref_rows = (ref_dir / "metrics.jsonl").read_text().splitlines()
    assert ref_rows == (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()


def test_cli_train_and_resume(tiny, tmp_path, capsys):
    args = ["train", "--model", tiny["model"], "--dataset", tiny["dataset"], "--layer", "0", "--tokens", "3000",
            "--context", "32", "--d-sae", "48", "--steps", "6", "--batch-size", "128", "--cache-dir", tiny["cache"],
            "--out", str(tmp_path / "cli"), "--checkpoint-every", "3", "--backend", "reference", "--no-progress"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    for word in ("MSE", "cosine similarity", "explained variance", "L0", "dead latents", "final tau"):
        assert word in out
    assert cli_main(["train", "--resume", str(tmp_path / "cli"), "--no-progress"]) == 0  # already done: no-op
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["steps"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    real = T.MixingBuffer.batch

    def poisoned(self, step):
        x = real(self, step)
        return x * float("nan") if step == 5 else x

    monkeypatch.setattr(T.MixingBuffer, "batch", poisoned)
    with pytest.raises(T.TrainingDiverged, match="step 5.*last good checkpoint"):
        T.train(tiny_cfg(tiny, tmp_path), progress=False)
    ckpt = T.Trainer.latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_4"
    sae = SparseAutoencoder.load(ckpt)
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_nan_loss_at_the_first_step_keeps_nothing_so_the_same_out_can_be_retried(tiny, tmp_path, monkeypatch):
    real = T.MixingBuffer.batch
    monkeypatch.setattr(T.MixingBuffer, "batch", lambda self, step: real(self, step) * float("inf"))
    with pytest.raises(T.TrainingDiverged, match="step 0.*Nothing was kept.*run the same command again"):
        T.train(tiny_cfg(tiny, tmp_path), progress=False)
    assert not (tmp_path / "run").exists()  # no step_0 (only the init), no log, no train_config.json
    monkeypatch.setattr(T.MixingBuffer, "batch", real)
    assert T.train(tiny_cfg(tiny, tmp_path, steps=2), progress=False)[1]["steps"] == 2


def test_disk_full_while_checkpointing_keeps_previous(tiny, tmp_path, monkeypatch):
    real = T.ckpts.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **kw):
        if "optimizer" not in path and "train_weights" in path:
            calls["n"] += 1
            if calls["n"] == 3:  # step_0 and step_4 succeed, step_8 hits a full disk mid-write
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(T.ckpts, "save_file", flaky)
    with pytest.raises(OSError) as info:
        T.train(tiny_cfg(tiny, tmp_path), progress=False)
    assert info.value.errno == errno.ENOSPC
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0", "step_4"]  # no half-written leftovers
    monkeypatch.setattr(T.ckpts, "save_file", real)
    resumed = T.Trainer.resume(tmp_path / "run", progress=False)
    assert resumed.step == 4
    resumed.run()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="cannot load model"):
        T.Trainer(tiny_cfg(tiny, tmp_path, model="no-such-org/no-such-model-xyz", cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\]"):
        T.Trainer(tiny_cfg(tiny, tmp_path, layer=2, cache_dir=str(tmp_path / "c")))
    bad = tmp_path / "rows.jsonl"
    bad.write_text("".join(json.dumps({"id": i, "score": 0.5}) + "\n" for i in range(10)))
    with pytest.raises(ValueError, match="no 'text' column"):
        T.Trainer(tiny_cfg(tiny, tmp_path, dataset=str(bad), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="--d-sae"):
        tiny_cfg(tiny, tmp_path, d_sae=0)
    with pytest.raises(ValueError, match="larger than the activation buffer"):
        tiny_cfg(tiny, tmp_path, batch_size=4000)
    with pytest.raises(ValueError, match="larger than the activation buffer"):  # the held-out slice shrinks it
        T.Trainer(tiny_cfg(tiny, tmp_path, batch_size=2900), progress=False)
    with pytest.raises(ValueError, match="tau-min <= --tau-init"):
        tiny_cfg(tiny, tmp_path, tau_init=0.5)
    assert cli_main(["train", "--model", "no-such-org/nope-xyz", "--cache-dir", str(tmp_path / "c"),
                     "--no-progress"]) == 2


@pytest.mark.slow
def test_real_default_model_end_to_end(tmp_path):
    """SmolLM2-135M (offline GGUF) at layer 6 over the stdlib corpus, tiny budget."""
    cfg = TrainConfig(tokens=2048, steps=3, batch_size=512, d_sae=128, checkpoint_every=2,
                      cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    run_dir, summary = T.train(cfg, progress=False)
    sae = SparseAutoencoder.load(run_dir)
    assert sae.d_in == 576 and sae.cfg.hook_layer == 6
    assert summary["steps"] == 3 and math.isfinite(summary["mse"])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_bitwise(tiny, tmp_path):
    """A real kill (SIGKILL, no cleanup) of `aosae train`, then `aosae train --resume`."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ref_dir, _ = T.train(tiny_cfg(tiny, tmp_path, steps=60, checkpoint_every=3, out=str(tmp_path / "ref")),
                         progress=False)
    run = tmp_path / "killed"
    args = ["--model", tiny["model"], "--dataset", tiny["dataset"], "--layer", "1", "--tokens", "3000",
            "--context", "32", "--d-sae", "64", "--steps", "60", "--batch-size", "128", "--checkpoint-every", "3",
            "--cache-dir", tiny["cache"], "--backend", "reference", "--lr", "3e-3", "--out", str(run), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "aosae", "train", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # any checkpoint: step_3 itself may already be pruned (--keep-checkpoints) when a poll looks
    while not any((run / "checkpoints").glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "aosae", "train", "--resume", str(run), "--no-progress"], cwd=root,
                   env=env, check=True, capture_output=True, timeout=180)
    a, b = weights(ref_dir), weights(run)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_store_that_cannot_fit_on_disk_is_refused(tmp_path):
    from aosae.data.store import check_disk_space

    check_disk_space(tmp_path / "new" / "store", 1000, 64, "bfloat16")  # 128 kB: fine anywhere
    with pytest.raises(ValueError, match="lower --tokens.*--streaming"):
        check_disk_space(tmp_path, 10**13, 2304, "bfloat16")


def test_l1_defaults_to_the_papers_with_relu_and_to_zero_where_k_sets_the_sparsity(tmp_path):
    # an L1 term on TopK / BatchTopK latents pulls pre-activations below zero, and L0 falls under k
    # as the run trains (SAELens, sparsify and dictionary_learning train them without one)
    assert TrainConfig().l1 == 0.04
    assert TrainConfig(activation="topk", top_k=4).l1 == 0.0
    assert TrainConfig(activation="batchtopk", top_k=4).l1 == 0.0
    assert TrainConfig(activation="batchtopk", top_k=4, l1=0.1).l1 == 0.1  # given: kept
    assert TrainConfig(l1=0.0).l1 == 0.0
    # a run's train_config.json holds the λ it trained with: an older TopK run's 0.04 stays 0.04
    saved = {**TrainConfig(activation="topk", top_k=4).to_dict(), "l1": 0.04}
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(saved))
    assert read_train_config(path, "fix it", required=RESUME_KEYS).l1 == 0.04
    path.write_text(json.dumps({**saved, "l1": None}))  # null is no λ: refused, not read as the default
    with pytest.raises(BadFile, match="'l1' must be a number"):
        read_train_config(path, "fix it", required=RESUME_KEYS)


def test_batchtopk_trains_saves_loads_and_resumes_bitwise(tiny, tmp_path):
    # --activation batchtopk through the sparse step: the run's SAE keeps the EMA threshold
    # (folded to raw scale), saved as SAELens's JumpReLU, and a resume is exact, threshold too
    kw = dict(activation="batchtopk", top_k=4, steps=8)
    ref_dir, summary = T.train(tiny_cfg(tiny, tmp_path, out=str(tmp_path / "ref"), **kw), progress=False)
    rows = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["threshold"] > 0 for r in rows) and all(r["l0"] == 4 for r in rows)  # B·k kept: 4 per token
    assert json.loads((ref_dir / "train_config.json").read_text())["l1"] == 0.0  # the default, written as resolved
    sae = SparseAutoencoder.load(ref_dir)
    assert sae.cfg.activation == "batchtopk" and sae.cfg.top_k == 4
    scale = json.loads((ref_dir / "cfg.json").read_text())["aosae"]["activation_scale"]
    assert math.isclose(float(sae.threshold), rows[-1]["threshold"] / scale, rel_tol=1e-6)
    assert 0 < summary["l0"] < 64  # held out: the inference threshold (JumpReLU)

    def kill(trainer):
        if trainer.step == 6:
            raise Killed

    with pytest.raises(Killed):
        T.train(tiny_cfg(tiny, tmp_path, out=str(tmp_path / "killed"), **kw), progress=False, on_step=kill)
    T.Trainer.resume(tmp_path / "killed", progress=False).run()
    a, b = weights(ref_dir), weights(tmp_path / "killed")
    assert set(a) == set(b) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (ref_dir / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("penalty, pair_rule", [("coactivation", "all"), ("coact_x_decoder", "coactive")])
def test_topk_run_resumes_bitwise(tiny, tmp_path, penalty, pair_rule):
    # --activation topk through the sparse step, with the paper's penalty (TopKOrthoLoss.from_topk)
    # and a RedundancyPenalty (from_sparse on the CSR rows): a killed run resumes exactly
    kw = dict(activation="topk", top_k=4, steps=6, penalty=penalty, pair_rule=pair_rule)
    ref_dir, _ = T.train(tiny_cfg(tiny, tmp_path, out=str(tmp_path / "ref"), **kw), progress=False)
    rows = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["l0"] <= 4 for r in rows) and all(r["penalty"] > 0 for r in rows)

    def kill(trainer):
        if trainer.step == 5:
            raise Killed

    with pytest.raises(Killed):
        T.train(tiny_cfg(tiny, tmp_path, out=str(tmp_path / "killed"), **kw), progress=False, on_step=kill)
    resumed = T.Trainer.resume(tmp_path / "killed", progress=False)
    assert resumed.step == 4
    resumed.run()
    a, b = weights(ref_dir), weights(tmp_path / "killed")
    assert set(a) == set(b) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (ref_dir / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("kw, match", [
    (dict(d_sae=1), "--d-sae must be at least 2"),  # caught before collecting (the penalty needs a pair)
    (dict(activation="topk", top_k=65), "--top-k 65 exceeds --d-sae 64"),
    (dict(device="gpu"), "--device 'gpu' .*auto, cpu, cuda or cuda:N"),
    (dict(device="meta"), "--device 'meta'"),
    (dict(seed=-1), "--seed must be an int"),
    (dict(buffer_tokens=10), r"--buffer-tokens \(10\) must be at least --batch-size"),
])
def test_config_names_the_option(tiny, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(tiny, tmp_path, **kw)


def test_a_start_failing_in_its_first_step_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    """A failure before step 1 (after train_config.json, step_0 and metrics.jsonl were written) removes
    exactly what the start made, so a retry with the same --out is not refused; other files stay."""
    def broken(self):
        raise RuntimeError("boom in the first step")

    trainer = T.Trainer(tiny_cfg(tiny, tmp_path), progress=False)
    monkeypatch.setattr(T.Trainer, "_train_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    trainer = T.Trainer(tiny_cfg(tiny, tmp_path, out=str(tmp_path / "mine")), progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    run_dir, _ = T.train(tiny_cfg(tiny, tmp_path, steps=2), progress=False)  # the retry is not blocked
    assert (run_dir / "summary.json").is_file()

"""The bounded-memory pipeline inside the trainer: exact resume over a multi-group store and over the
LM stream, damaged checkpoints skipped (or a clear error), pruning, and the optional loggers."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from aosae.cli import main as cli_main
from aosae.training import checkpoints as C
from aosae.training import trainer as T
from aosae.training.config import TrainConfig



def cfg_for(tiny, out, **kw):
    base = dict(model=tiny["model"], dataset=tiny["dataset"], layer=1, tokens=1500, context=32, d_sae=64,
                steps=14, batch_size=128, buffer_tokens=512, checkpoint_every=4, cache_dir=tiny["cache"],
                backend="reference", lr=3e-3, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def same_weights(a, b):
    wa, wb = load_file(str(a / "sae_weights.safetensors")), load_file(str(b / "sae_weights.safetensors"))
    return all(torch.equal(wa[k], wb[k]) for k in wa)


class Killed(Exception):
    pass


def kill_at(n):
    def on_step(trainer):
        if trainer.step == n:
            raise Killed

    return on_step


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_is_bitwise_exact_over_buffer_groups(tiny, tmp_path, streaming):
    ref, _ = T.train(cfg_for(tiny, tmp_path / "ref", streaming=streaming), progress=False)
    trainer = T.Trainer(cfg_for(tiny, tmp_path / "ref2", streaming=streaming), progress=False)
    assert trainer.buffer.n_groups > 1 and trainer.buffer.steps_per_epoch < 14  # groups and epochs are crossed
    with pytest.raises(Killed):
        T.train(cfg_for(tiny, tmp_path / "k", streaming=streaming), progress=False, on_step=kill_at(10))
    resumed = T.Trainer.resume(tmp_path / "k", progress=False)
    assert resumed.step == 8
    resumed.run()
    assert same_weights(ref, tmp_path / "k")
    assert (ref / "metrics.jsonl").read_text() == (tmp_path / "k" / "metrics.jsonl").read_text()
    held = json.loads((ref / "summary.json").read_text())["held_out"]
    assert held["first_token"] == (0 if streaming else 1500 - held["tokens"])


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tiny, tmp_path, capsys):
    ref, _ = T.train(cfg_for(tiny, tmp_path / "ref"), progress=False)
    with pytest.raises(Killed):
        T.train(cfg_for(tiny, tmp_path / "k"), progress=False, on_step=kill_at(13))
    assert [p.name for p in C.list_checkpoints(tmp_path / "k")] == ["step_12", "step_8", "step_4"]
    weights = tmp_path / "k" / "checkpoints" / "step_12" / "train_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk outside our writer
    with pytest.warns(C.CheckpointWarning, match="step_12"):
        resumed = T.Trainer.resume(tmp_path / "k", progress=False)
    assert resumed.step == 8
    resumed.run()
    assert same_weights(ref, tmp_path / "k")
    # nothing usable: a one-line error from the CLI, no traceback
    for d in C.list_checkpoints(tmp_path / "k"):
        (d / "state.json").write_text("{not json")
    with pytest.warns(C.CheckpointWarning):
        assert cli_main(["train", "--resume", str(tmp_path / "k"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step_14" in err and "Traceback" not in err


def test_keeps_the_newest_n_plus_the_final(tiny, tmp_path):
    run, _ = T.train(cfg_for(tiny, tmp_path / "r", steps=11, checkpoint_every=2, keep_checkpoints=2), progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_10", "step_11", "step_8"]
    assert [p.name for p in C.list_checkpoints(run)] == ["step_11", "step_10", "step_8"]  # newest first
    removed = C.prune_checkpoints(run, 1, final_step=8)
    assert sorted(p.name for p in removed) == ["step_10"]


def test_given_activations_feed_the_same_buffer(tiny, tmp_path):
    acts = torch.randn(1500, 16)
    trainer = T.Trainer(cfg_for(tiny, tmp_path / "g", steps=6), progress=False, activations=acts)
    assert trainer.held_out == {"first_token": 1350, "tokens": 150, "world_size": 1}
    assert torch.equal(trainer.eval_acts, acts[1350:])
    summary = trainer.run()
    assert summary["steps"] == 6 and summary["n_tokens"] == 150


def test_log_backends(tiny, tmp_path, monkeypatch):
    from aosae.training import logging as L

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match=r"aosae\[tensorboard\]"):
        L.make_logger("tensorboard", tmp_path, {})
    with pytest.raises(ValueError, match="--log must be one of"):
        L.make_logger("mlflow", tmp_path, {})
    logged = []

    class FakeRun:
        def log(self, row, step):
            logged.append((step, row))
            if step == 2:
                raise ConnectionError("network down")

        def finish(self):
            logged.append("finished")

    class FakeWandb:
        @staticmethod
        def init(**kw):
            assert kw["mode"] == "offline" and kw["dir"] == str(tmp_path / "w")
            return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.warns(UserWarning, match="--log wandb failed.*network down"):
        T.train(cfg_for(tiny, tmp_path / "w", steps=4, log="wandb"), progress=False)
    assert [s for s, _ in logged[:-1]] == [1, 2] and logged[-1] == "finished"  # a failing logger is dropped
    assert "loss" in logged[0][1] and len((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()) == 4

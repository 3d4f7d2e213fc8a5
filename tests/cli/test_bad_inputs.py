"""Every command that reads files, against files damaged the ways disks, kills and editors damage them.

Hypothesis draws a file a command reads and a damage (cut at a random offset, a flipped bit, a
dropped key, a changed type or shape, NaN weights), applied to a copy of one tiny trained run built
once for the module. A damaged file must end the command with exit code 2 and one
`aosae <command>: error:` line that names the file, with no traceback, leaving every file the user
had byte for byte as it was. Where the documented behaviour is to recover (a damaged newest
checkpoint is skipped with a warning; a store killed mid-collection is collected again), the
recovery is asserted instead. The Python loaders get the same damages.

Bit flips in JSON files flip the top bit (the files are ASCII, so the result is never valid
UTF-8): a low-bit flip can turn one valid setting into another, which no reader can tell apart.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from aosae.cli import main
from aosae.files import BadFile, save_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_lm import corpus_text, make_tiny_lm  # noqa: E402

FAST = settings(max_examples=20, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=2)  # examples that train (a recovery) or load the LM
BAD_VALUES = ("12", None, True, 1.5, [], {})


# ------------------------------------------------------------------ one tiny run, built once
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny LM, a jsonl corpus, a trained run (checkpoints step_0/3/6), its activation store and
    an ablation record: the good files every example damages a copy of."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = make_tiny_lm(root / "model")
    corpus = root / "corpus.jsonl"
    text = corpus_text() * 2
    corpus.write_text("".join(json.dumps({"text": text[i:i + 400]}) + "\n" for i in range(0, len(text), 400)))
    train_args = ["--model", str(model), "--dataset", str(corpus), "--layer", "1", "--tokens", "2000",
                  "--context", "32", "--d-sae", "48", "--steps", "6", "--batch-size", "128", "--buffer-tokens", "512",
                  "--checkpoint-every", "3", "--backend", "reference", "--lr", "3e-3", "--no-progress"]
    code, _, err, _ = run_cli(["train", *train_args, "--cache-dir", str(root / "cache"), "--out", str(root / "run")])
    assert code == 0, err
    (store,) = [p for p in (root / "cache").iterdir() if p.is_dir()]
    return {"root": root, "model": model, "corpus": corpus, "run": root / "run", "cache": root / "cache",
            "store": store, "train_args": train_args}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """A small `aosae ablate` record, made in an install without matplotlib (its import fails):
    the missing package must be reported before the training, and every other output written."""
    out = tmp_path_factory.mktemp("ablate") / "a"
    with hidden("matplotlib"):
        result = run_cli(["ablate", "--out", str(out), "--sweeps", "synthetic", "--arms", "paper", "--seeds", "1",
                          "--lambdas", "0.3", "--steps", "8", "--samples", "1500", "--d", "16", "--features", "32",
                          "--d-sae", "32", "--batch-size", "64", "--threads", "1"])
    return out, result


def run_cli(argv: list[str]) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, warnings) of `aosae ARGV` in this process. An exception that
    escapes main() fails the test: that is the traceback a user would see."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue(), [str(w.message) for w in caught]


@contextmanager
def hidden(module: str):
    """`import module` fails inside the block, as when the package is not installed."""
    saved = sys.modules.get(module)
    sys.modules[module] = None
    try:
        yield
    finally:
        if saved is None:
            del sys.modules[module]
        else:
            sys.modules[module] = saved


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (or of the root itself when it is a file)."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_refused(code: int, err: str, named: Path, before: dict, after: dict) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("aosae "), err
    assert str(named) in errors[0], f"{named} not named in: {errors[0]}"
    assert before == after, "a failed command changed the user's files"


# ------------------------------------------------------------------ damages
def cut(path: Path, data: st.DataObject) -> None:
    raw = path.read_bytes()
    end = len(raw.rstrip()) if path.suffix in (".json", ".jsonl") else len(raw)
    path.write_bytes(raw[: data.draw(st.integers(0, end - 1), label="cut at")])


def flip(path: Path, data: st.DataObject) -> None:
    raw = bytearray(path.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1), label="flip at")
    bit = 7 if path.suffix in (".json", ".jsonl") else data.draw(st.integers(0, 7), label="bit")
    raw[at] ^= 1 << bit
    path.write_bytes(bytes(raw))


def edit_json(path: Path, keys, data: st.DataObject, *, drop: bool, values=BAD_VALUES) -> None:
    """Drop the key at a drawn key path, or give it a drawn wrong value (`keys` may map each key
    path to its own wrong values)."""
    obj = json.loads(path.read_text())
    key = data.draw(st.sampled_from(list(keys)), label="key")
    *parents, last = key
    node = obj
    for k in parents:
        node = node[k]
    if drop:
        del node[last]
    else:
        wrong = keys[key] if isinstance(keys, dict) else values
        node[last] = data.draw(st.sampled_from([v for v in wrong if v != node[last]]), label="value")
    path.write_text(json.dumps(obj))


def damage_json(path: Path, data: st.DataObject, required: list[tuple], typed: list[tuple], ints=(),
                values=BAD_VALUES) -> str:
    kinds = ["cut", "flip"] + (["drop"] if required else []) + (["retype"] if typed else []) + (["reshape"] if ints else [])
    kind = data.draw(st.sampled_from(kinds), label="damage")
    if kind == "cut":
        cut(path, data)
    elif kind == "flip":
        flip(path, data)
    elif kind == "drop":
        edit_json(path, required, data, drop=True)
    elif kind == "retype":
        edit_json(path, typed, data, drop=False, values=values)
    else:  # another size: the files that go with it no longer fit
        obj = json.loads(path.read_text())
        key = data.draw(st.sampled_from(list(ints)), label="key")
        obj[key] = obj[key] * 2 if data.draw(st.booleans()) else obj[key] + 1
        path.write_text(json.dumps(obj))
    return kind


def damage_weights(path: Path, data: st.DataObject) -> str:
    kind = data.draw(st.sampled_from(["cut", "flip", "drop", "reshape", "dtype", "nan", "extra"]), label="damage")
    if kind in ("cut", "flip"):
        (cut if kind == "cut" else flip)(path, data)
        return kind
    tensors = load_file(str(path))
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[name]
    if kind == "extra":  # a tensor of another architecture (a JumpReLU threshold, a gated SAE's r_mag)
        tensors[data.draw(st.sampled_from(["threshold", "r_mag", "W_enc_extra"]), label="extra")] = t.clone()
    elif kind == "drop":
        del tensors[name]
    elif kind == "reshape":
        tensors[name] = t.t().contiguous() if t.dim() == 2 and t.shape[0] != t.shape[1] else torch.cat([t, t[:1]])
    elif kind == "dtype":
        tensors[name] = t.to(torch.int32)
    else:
        flat = t.clone().reshape(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1))] = float("nan")
        tensors[name] = flat.reshape(t.shape)
    # a user's edit saves without aosae's checksum; NaN and extras are saved with a fresh one: only their own check
    # can catch them
    (save_tensors(path, tensors) if kind in ("nan", "extra") else save_file(tensors, str(path)))
    return kind


def copy_run(world, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(world["run"], run)
    return run


CFG_KEYS = [("d_in",), ("d_sae",)]
RESUME_KEYS = [(k,) for k in ("model", "layer", "dataset", "tokens", "context", "d_sae", "steps", "batch_size",
                              "lr", "l1", "activation", "seed")]
INT_SETTINGS = [(k,) for k in ("layer", "tokens", "context", "steps", "batch_size", "seed", "checkpoint_every",
                               "lm_batch")]
HELD_OUT = [("held_out", "first_token"), ("held_out", "tokens")]
SUMMARY_KEYS = HELD_OUT + [("weights_sha256",)]  # the checksum of sae_weights.safetensors' tensors


def damage_run_file(run: Path, name: str, data: st.DataObject, *, resume: bool = False) -> str:
    path = run / name
    if name == "sae_weights.safetensors":
        return damage_weights(path, data)
    if name == "cfg.json":
        return damage_json(path, data, CFG_KEYS, CFG_KEYS, ints=("d_in", "d_sae"))
    if name == "train_config.json":  # eval falls back to cfg.json for a missing key; a resume cannot
        return damage_json(path, data, RESUME_KEYS if resume else [], INT_SETTINGS)
    if name == "summary.json":
        return damage_json(path, data, SUMMARY_KEYS, SUMMARY_KEYS)
    raise AssertionError(name)


def spared(world, path: Path) -> bool:
    """Whether a damaged weights file still holds exactly the original tensors."""
    try:
        tensors = load_file(str(path))
    except Exception:
        return False
    good = sae_tensors(world["run"])
    return tensors.keys() == good.keys() and all(torch.equal(tensors[k], good[k]) for k in good)


def sae_tensors(run: Path) -> dict:
    return load_file(str(run / "sae_weights.safetensors"))


# ------------------------------------------------------------------ eval and export
@FAST
@given(data=st.data())
def test_eval_and_export_refuse_a_damaged_run(world, data):
    command = data.draw(st.sampled_from(["eval", "export"]), label="command")
    files = ["cfg.json", "sae_weights.safetensors"] + (["train_config.json", "summary.json"] if command == "eval" else [])
    name = data.draw(st.sampled_from(files), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        kind = damage_run_file(run, name, data)
        before = digest(run)
        argv = ["eval", str(run)] if command == "eval" else ["export", str(run), "--to", "saelens",
                                                             "--out", str(Path(tmp) / "exported")]
        code, _, err, _ = run_cli(argv)
        if code == 0:  # only a flip that spared every weight (in the checksum's key name) may pass
            assert kind == "flip" and spared(world, run / name), err
            return
        assert_refused(code, err, run / name, before, digest(run))
        assert not (Path(tmp) / "exported").exists() and not (run / "eval.json").exists()


# ------------------------------------------------------------------ train --resume
@FAST
@given(data=st.data())
def test_resume_refuses_a_damaged_train_config_or_log(world, data):
    name = data.draw(st.sampled_from(["train_config.json", "metrics.jsonl"]), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        if name == "train_config.json":
            damage_run_file(run, name, data, resume=True)
        else:  # a damaged line that is not the last (a cut last line is what a kill leaves: recovered below)
            lines = (run / name).read_bytes().split(b"\n")
            i = data.draw(st.integers(0, len(lines) - 3), label="line")
            at = data.draw(st.integers(0, len(lines[i]) - 1), label="byte")
            lines[i] = lines[i][:at] + bytes([lines[i][at] ^ 0x80]) + lines[i][at + 1:]
            (run / name).write_bytes(b"\n".join(lines))
        before = digest(run, world["cache"])
        code, _, err, _ = run_cli(["train", "--resume", str(run), "--no-progress"])
        assert_refused(code, err, run / name, before, digest(run, world["cache"]))


@SLOW
@given(data=st.data())
def test_resume_skips_a_damaged_newest_checkpoint(world, data):
    """Documented recovery: the newest checkpoint is skipped with a warning naming it, the run
    resumes from the one before, and (resume is exact) ends with the same weights."""
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        newest = run / "checkpoints" / "step_6"
        name = data.draw(st.sampled_from(sorted(p.name for p in newest.iterdir())), label="file")
        (cut if data.draw(st.booleans(), label="cut") else flip)(newest / name, data)
        with hidden("matplotlib"):  # report.png is skipped with a note, every other output written
            code, out, err, caught = run_cli(["train", "--resume", str(run), "--no-progress"])
        assert code == 0, err
        assert any("no report.png" in w for w in caught) and (run / "summary.json").is_file(), caught
        assert "no report.png" in (run / "report.md").read_text()  # the tables are written without the plot
        assert any("skipping checkpoint" in w and str(newest) in w for w in caught), caught
        for key, value in sae_tensors(world["run"]).items():
            assert torch.equal(sae_tensors(run)[key], value), key


def _garbage_with_its_checksum(step: Path, name: str) -> None:
    """Not the format, with state.json's checksum updated to match (a checkpoint of another version)."""
    from aosae.files import file_sha256

    (step / name).write_bytes(b"PK\x03\x04 not a checkpoint file")
    state = json.loads((step / "state.json").read_text())
    state["sha256"][name] = file_sha256(step / name)
    (step / "state.json").write_text(json.dumps(state))


CHECKPOINT_DAMAGES = {  # damage to checkpoints/step_6, the words its warning must use
    "state.json cut": (lambda s: (s / "state.json").write_bytes((s / "state.json").read_bytes()[:40]),
                       "its state.json is not valid JSON"),
    "state.json missing": (lambda s: (s / "state.json").unlink(), "its state.json does not exist"),
    "state.json a list": (lambda s: (s / "state.json").write_text("[]"), "its state.json holds a JSON array"),
    "optimizer.pt flipped": (lambda s: flip_byte(s / "optimizer.pt", 100),
                             "its optimizer.pt does not match the checksum recorded"),
    "weights missing": (lambda s: (s / "train_weights.safetensors").unlink(),
                        "its train_weights.safetensors does not exist"),
    "optimizer.pt garbage": (lambda s: _garbage_with_its_checksum(s, "optimizer.pt"),
                             "its optimizer.pt is not an optimizer state saved by torch"),
    "rng garbage": (lambda s: _garbage_with_its_checksum(s, "rng.safetensors"),
                    "its rng.safetensors is cut short or not a safetensors file"),
}


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_a_skipped_checkpoint_is_named_in_our_words(world, tmp_path, damage):
    """The warning says which file of which checkpoint is wrong and how, in one short line: no
    exception class names or library messages (SafetensorError, JSONDecodeError, unpickling)."""
    from aosae.training.checkpoints import CheckpointWarning
    from aosae.training.trainer import Trainer

    run = copy_run(world, tmp_path)
    newest = run / "checkpoints" / "step_6"
    how, said = CHECKPOINT_DAMAGES[damage]
    how(newest)
    with pytest.warns(CheckpointWarning) as caught:
        trainer = Trainer.resume(run, progress=False)
    trainer.buffer.close()
    assert trainer.step == 3
    (message,) = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert message.startswith(f"skipping checkpoint {newest}: {said}") and "trying the one before" in message
    assert "\n" not in message and len(message) < len(str(newest)) + 200, message
    assert not any(word in message for word in ("Error:", "Exception", "Traceback", "pickle")), message


def test_a_checkpoint_replaced_by_a_file_is_skipped_with_a_warning(world, tmp_path):
    """checkpoints/step_6 a file (a copy gone wrong): named in a warning, not passed over in silence while
    the run goes back to step 3."""
    from aosae.training.checkpoints import CheckpointWarning
    from aosae.training.trainer import Trainer

    run = copy_run(world, tmp_path)
    newest = run / "checkpoints" / "step_6"
    shutil.rmtree(newest)
    newest.write_text("not a checkpoint")
    with pytest.warns(CheckpointWarning, match=f"skipping checkpoint {newest}: it is a file, not a checkpoint directory"):
        trainer = Trainer.resume(run, progress=False)
    trainer.buffer.close()
    assert trainer.step == 3


@SLOW
@given(data=st.data())
def test_resume_with_every_checkpoint_damaged_is_refused(world, data):
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        for step in sorted((run / "checkpoints").iterdir()):
            name = data.draw(st.sampled_from(sorted(p.name for p in step.iterdir())), label=f"{step.name} file")
            (cut if data.draw(st.booleans()) else flip)(step / name, data)
        before = digest(run, world["cache"])
        code, _, err, _ = run_cli(["train", "--resume", str(run), "--no-progress"])
        assert_refused(code, err, run / "checkpoints", before, digest(run, world["cache"]))


def test_resume_drops_a_metrics_line_cut_by_a_kill(world, tmp_path):
    run = copy_run(world, tmp_path)
    (run / "checkpoints" / "step_6").rename(run / "checkpoints" / "gone")  # so that the resume trains again
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:-7])  # killed while writing the last line
    code, _, err, caught = run_cli(["train", "--resume", str(run), "--no-progress"])
    assert code == 0, err
    assert any("dropped its last line" in w for w in caught), caught
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@FAST
@given(data=st.data())
def test_train_refuses_a_damaged_budget_reference_run(world, data):
    """--tau-budget-run RUN reads RUN/metrics.jsonl: checked before any activation is collected."""
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        log = run / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        kind = data.draw(st.sampled_from(["cut", "flip", "drop", "retype"]), label="damage")
        i = data.draw(st.integers(0, len(rows) - 1), label="row")
        if kind == "drop":
            del rows[i]["recon"]
        elif kind == "retype":
            rows[i]["recon"] = data.draw(st.sampled_from(["0.1", None, True, [], float("nan"), -1.0]))
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if kind == "cut":  # inside a row
            raw = log.read_bytes()
            log.write_bytes(raw[: data.draw(st.integers(0, len(raw.rstrip()) - 2), label="cut at")])
            # inside a row: not at a row boundary, nor just after a row's '}' (both leave a shorter, whole log)
            last = log.read_bytes().rsplit(b"\n", 1)[-1]
            assume(last != b"" and not last.endswith(b"}"))
        elif kind == "flip":
            flip(log, data)
        before = digest(run, world["cache"])
        code, _, err, _ = run_cli(["train", *world["train_args"], "--cache-dir", str(Path(tmp) / "cache"),
                                   "--out", str(Path(tmp) / "new"), "--tau-rule", "budget", "--tau-budget-run", str(run)])
        assert_refused(code, err, log, before, digest(run, world["cache"]))
        assert not (Path(tmp) / "cache").exists()  # refused before collecting


# ------------------------------------------------------------------ train: the dataset and the store
@settings(FAST, max_examples=10)
@given(data=st.data())
def test_train_and_eval_refuse_a_damaged_dataset(world, data):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fmt = data.draw(st.sampled_from(["jsonl", "parquet"]), label="format")
        rows = [json.loads(line) for line in world["corpus"].read_text().splitlines()]
        if fmt == "parquet":
            import pandas as pd

            dataset = tmp / "corpus.parquet"
            pd.DataFrame(rows).to_parquet(dataset)
            cut(dataset, data)  # a parquet file ends with its footer: any cut loses it
        else:
            dataset = tmp / "corpus.jsonl"
            kind = data.draw(st.sampled_from(["cut", "flip", "drop", "retype"]), label="damage")
            if kind == "drop":  # no row has its text any more
                rows = [{"id": i} for i, _ in enumerate(rows)]
            elif kind == "retype":
                rows = [{"text": data.draw(st.sampled_from([12, 1.5, True, None, ["a"]]))} for _ in rows]
            dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
            if kind == "cut":  # inside a row, as a copy or a download cut short leaves it
                raw = dataset.read_bytes()
                starts = [i + 1 for i, b in enumerate(raw[:-1]) if b == ord("\n")]
                row = data.draw(st.sampled_from([0, *starts]), label="row")
                dataset.write_bytes(raw[: row + data.draw(st.integers(1, raw.index(b"}", row) - row), label="cut")])
            elif kind == "flip":
                flip(dataset, data)
        if data.draw(st.booleans(), label="eval"):  # `aosae eval` reads the text the run was trained on
            run = copy_run(world, tmp)
            settings = json.loads((run / "train_config.json").read_text())
            (run / "train_config.json").write_text(json.dumps({**settings, "dataset": str(dataset)}, indent=2))
            mine = [dataset, run]
            argv = ["eval", str(run)]
        else:
            mine = [dataset]
            argv = ["train", *[a if a != str(world["corpus"]) else str(dataset) for a in world["train_args"]],
                    "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "run")]
        before = digest(*mine)
        code, _, err, _ = run_cli(argv)
        assert_refused(code, err, dataset, before, digest(*mine))


def damage_shard(path: Path, data: st.DataObject) -> str:
    """A raw bf16 shard cut short, with one value made NaN/Inf anywhere (even in rows a short run
    never trains on), or holding float32 bytes of the same length (a shard of another dtype)."""
    kind = data.draw(st.sampled_from(["cut", "nonfinite", "dtype"]), label="shard damage")
    if kind == "cut":
        cut(path, data)
    elif kind == "nonfinite":
        values = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.bfloat16)
        values[data.draw(st.integers(0, values.numel() - 1), label="value")] = \
            data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="to")
        path.write_bytes(values.view(torch.uint8).numpy().tobytes())
    else:  # float32 rows in the same bytes: their low halves read as bf16 of random exponent, 1/256 NaN/Inf
        values = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.bfloat16)[: path.stat().st_size // 4].float()
        noise = torch.rand(values.shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
        path.write_bytes((values * (1 + 2**-8 * noise)).view(torch.uint8).numpy().tobytes())  # full float32 mantissas
    return kind


def empty_or_mixed_dataset(tmp: Path, kind: str) -> Path:
    import pandas as pd

    if kind == "header-only csv":
        (tmp / "d.csv").write_text("text\n")
        return tmp / "d.csv"
    if kind == "blank jsonl":
        (tmp / "d.jsonl").write_text("\n \n")
        return tmp / "d.jsonl"
    if kind == "empty parquet":
        pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(tmp / "d.parquet")
        return tmp / "d.parquet"
    directory = tmp / "many"
    directory.mkdir()
    good = [{"text": line} for line in corpus_text().splitlines() if line.strip()]
    odd = [{"body": r["text"], "id": i} for i, r in enumerate(good)]
    if kind == "mixed jsonl directory":
        for name, rows in (("a", good), ("b", odd)):
            (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(good).to_parquet(directory / "a.parquet")
        pd.DataFrame(odd).to_parquet(directory / "b.parquet")
    return directory


@pytest.mark.parametrize("kind", ["header-only csv", "blank jsonl", "empty parquet", "mixed jsonl directory",
                                  "mixed parquet directory"])
def test_train_names_a_dataset_without_rows_or_with_mixed_files_in_one_line(world, tmp_path, capfd, kind):
    """The whole of stderr, at the file-descriptor level: the `datasets` library's own log lines and
    progress bars are silenced on aosae's path."""
    dataset = empty_or_mixed_dataset(tmp_path, kind)
    before = digest(dataset)
    argv = [a if a != str(world["corpus"]) else str(dataset) for a in world["train_args"]]
    code = main(["train", *argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    err = capfd.readouterr().err
    assert code == 2 and err.startswith("aosae train: error: ") and err.count("\n") == 1, err
    said = "same columns" if "directory" in kind else "has no rows"
    assert said in err and str(dataset / "b.jsonl" if "jsonl dir" in kind else dataset) in err, err
    assert digest(dataset) == before and not (tmp_path / "run").exists()


@FAST
@given(data=st.data())
def test_train_refuses_a_damaged_activation_store(world, data):
    """`aosae train` and `aosae train --resume` (whose run reads the same store) both refuse it."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(world["cache"], tmp / "cache")
        store = tmp / "cache" / world["store"].name
        resume = data.draw(st.booleans(), label="--resume")
        if resume:  # a copy of the run whose settings point at the copied store
            run = copy_run(world, tmp)
            settings = json.loads((run / "train_config.json").read_text())
            (run / "train_config.json").write_text(json.dumps({**settings, "cache_dir": str(tmp / "cache")}, indent=2))
        if data.draw(st.booleans(), label="meta.json"):
            named = store / "meta.json"
            keys = [(k,) for k in ("format", "complete", "dtype", "d", "shape", "shards")]
            damage_json(named, data, keys, keys, ints=("d",), values=("12", None, 1.5, [], {}))
        else:
            named = store / "shard_00000.bin"
            damage_shard(named, data)
        mine = [tmp / "cache", world["corpus"]] + ([tmp / "run"] if resume else [])
        before = digest(*mine)
        argv = ["train", "--resume", str(tmp / "run"), "--no-progress"] if resume else \
            ["train", *world["train_args"], "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "run")]
        code, _, err, _ = run_cli(argv)
        assert_refused(code, err, named, before, digest(*mine))


@pytest.mark.parametrize("key, value, said", [
    ("dtype", "float16", "'dtype' is 'float16' but 'store_dtype' is 'bfloat16'"),
    ("dtype", "float32", "'dtype' is 'float32' but 'store_dtype'"),  # caught before the shard's length is
    ("layer", 0, "do not hash to the store's directory name"),
    ("model", "another/model", "do not hash to the store's directory name"),
    ("d", 16, "holds 4000 rows but the store collected 'tokens' 2000"),
])
def test_train_refuses_a_store_whose_meta_json_was_edited_to_other_valid_settings(world, tmp_path, key, value, said):
    """Settings that are each valid but not this store's: a dtype or width that would read the shards
    as other numbers, a layer or model whose activations these are not."""
    shutil.copytree(world["cache"], tmp_path / "cache")
    store = tmp_path / "cache" / world["store"].name
    meta = json.loads((store / "meta.json").read_text())
    meta[key] = value
    if key == "d":  # the same bytes as twice the rows of half the width
        meta.update(shape=[meta["shape"][0] * 2, value], shards=[meta["shards"][0] * 2])
    (store / "meta.json").write_text(json.dumps(meta))
    line = refused(["train", *world["train_args"], "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")],
                   store / "meta.json", tmp_path / "cache")
    assert said in line and f"delete {store}" in line and not (tmp_path / "run").exists()


@SLOW
@given(data=st.data())
def test_a_store_killed_mid_collection_is_collected_again(world, data):
    """Documented recovery: no meta.json (the collection never finished), a shard cut anywhere:
    `aosae train` collects the store again, bitwise the same."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(world["cache"], tmp / "cache")
        store = tmp / "cache" / world["store"].name
        (store / "meta.json").unlink()
        cut(store / "shard_00000.bin", data)
        with hidden("matplotlib"):
            code, _, err, _ = run_cli(["train", *world["train_args"], "--steps", "1", "--cache-dir",
                                       str(tmp / "cache"), "--out", str(tmp / "run")])
        assert code == 0, err
        assert sorted(digest(store).values()) == sorted(digest(world["store"]).values())


# ------------------------------------------------------------------ ablate
RECORD_KEYS = [("args",), ("arms",), ("sweeps",)] + [("sweeps", "synthetic", k) for k in
                                                       ("runs", "values", "base", "description", "swept",
                                                        "ground_truth", "slack")] \
    + [("sweeps", "synthetic", "runs", 0, k) for k in ("arm", "l0", "seed", "value")]
NOT_OBJECT, NOT_LIST = ("12", None, 1.5, True, []), ("12", None, 1.5, True, {})
RECORD_TYPES = {("args",): NOT_OBJECT, ("arms",): NOT_OBJECT, ("sweeps",): NOT_OBJECT,
                ("sweeps", "synthetic"): NOT_OBJECT, ("sweeps", "synthetic", "runs"): NOT_LIST,
                ("sweeps", "synthetic", "values"): NOT_LIST, ("sweeps", "synthetic", "base"): NOT_OBJECT,
                ("sweeps", "synthetic", "description"): NOT_OBJECT, ("sweeps", "synthetic", "swept"): (None, 1.5, [], "12"),
                ("sweeps", "synthetic", "ground_truth"): ("12", None, 1.5, []),
                ("sweeps", "synthetic", "slack"): ("12", None, [], {}),
                ("sweeps", "synthetic", "runs", 0): NOT_OBJECT, ("sweeps", "synthetic", "runs", 0, "l0"): ("12", None, [])}


@FAST
@given(data=st.data())
def test_ablate_refuses_a_damaged_record(ablation, data):
    """--render-only reads runs.json; a new call reads it to keep the sweeps it does not redo:
    both stop before any training, and runs.json stays as it was."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ablate"
        shutil.copytree(ablation[0], out)
        render = data.draw(st.booleans(), label="render-only")
        kind = data.draw(st.sampled_from(["cut", "flip", "drop", "retype"]), label="damage")
        if kind in ("cut", "flip"):
            (cut if kind == "cut" else flip)(out / "runs.json", data)
        else:
            edit_json(out / "runs.json", RECORD_KEYS if kind == "drop" else RECORD_TYPES, data, drop=kind == "drop")
        before = digest(out)
        argv = ["ablate", "--out", str(out)] + (["--render-only"] if render else
                                                ["--sweeps", "synthetic_topk", "--arms", "paper", "--seeds", "1",
                                                 "--steps", "2", "--samples", "600"])
        code, _, err, _ = run_cli(argv)
        assert_refused(code, err, out / "runs.json", before, digest(out))


# ------------------------------------------------------------------ the Python loaders
@FAST
@given(data=st.data())
def test_sparse_autoencoder_load_names_the_damaged_file(world, data):
    from aosae import SparseAutoencoder

    name = data.draw(st.sampled_from(["cfg.json", "sae_weights.safetensors"]), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        kind = damage_run_file(run, name, data)
        try:
            SparseAutoencoder.load(run)
        except BadFile as err:  # a cfg.json that no longer fits its weights names both files
            assert err.path.parent == run and str(run / name) in str(err)
        else:  # only a flip that spared every weight (in the checksum's key name) may load
            assert kind == "flip" and spared(world, run / name)


@settings(FAST, max_examples=12)
@given(data=st.data())
def test_import_from_saelens_names_the_damaged_file(world, data):
    pytest.importorskip("sae_lens", reason="sae-lens is not installed: bash .ci/install_integrations.sh saelens")
    from aosae import SparseAutoencoder
    from aosae.integrations.saelens import export_to_saelens, import_from_saelens

    with tempfile.TemporaryDirectory() as tmp:
        directory = export_to_saelens(SparseAutoencoder.load(world["run"]), Path(tmp) / "sl")
        name = data.draw(st.sampled_from(["cfg.json", "sae_weights.safetensors"]), label="file")
        if name == "cfg.json":
            damage_json(directory / name, data, [("d_in",), ("d_sae",)], [("d_in",), ("d_sae",)], ints=("d_in", "d_sae"))
        else:
            kind = damage_weights(directory / name, data)
            assume(kind != "flip")  # SAELens files carry no checksum
        with pytest.raises(ValueError) as caught:
            import_from_saelens(directory)
        assert str(directory) in str(caught.value) and "Traceback" not in str(caught.value)


def test_import_from_saelens_names_a_topk_cfg_without_k_and_integer_weights(tmp_path):
    pytest.importorskip("sae_lens", reason="sae-lens is not installed: bash .ci/install_integrations.sh saelens")
    from aosae import SparseAutoencoder
    from aosae.integrations.saelens import export_to_saelens, import_from_saelens

    directory = export_to_saelens(SparseAutoencoder.from_dims(8, 16, "topk", top_k=2), tmp_path / "sl")
    cfg = json.loads((directory / "cfg.json").read_text())
    (directory / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "k"}))
    with pytest.raises(BadFile, match="topk SAE but has no 'k'") as caught:
        import_from_saelens(directory)
    assert caught.value.path == directory / "cfg.json"
    (directory / "cfg.json").write_text(json.dumps({**cfg, "k": 40}))  # more than d_sae: SAELens loads it
    with pytest.raises(BadFile, match="top_k=40") as caught:
        import_from_saelens(directory)
    assert str(directory / "cfg.json") in str(caught.value)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    weights = directory / "sae_weights.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(BadFile, match="must be floating point") as caught:
        import_from_saelens(directory)
    assert caught.value.path == weights


def test_store_open_names_a_damaged_meta_json(world, tmp_path):
    from aosae.data.store import ActivationStore

    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "shape": "12"}))
    with pytest.raises(BadFile, match="'shape' must be list"):
        ActivationStore.open(store)


def test_store_open_of_a_directory_that_is_no_store_never_says_delete_it(world, tmp_path):
    """A run directory (or any folder of other files) passed as a store: 'not an activation store', not
    'its collection was interrupted ... delete the directory'; an empty one is a collection killed at
    its start (resumed), and a bad width names 'd'."""
    from aosae.data.store import ActivationStore, StoreIncomplete

    with pytest.raises(BadFile, match="is not an activation store: it has no meta.json and no shard_.*cfg.json") as caught:
        ActivationStore.open(world["run"])
    assert "delete" not in str(caught.value) and caught.value.path == world["run"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreIncomplete):
        ActivationStore.open(tmp_path / "empty")
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "d": 0, "shape": [meta["shape"][0], 0]}))
    with pytest.raises(BadFile, match="'d' must be a positive int"):
        ActivationStore.open(store)


# ------------------------------------------------------------------ missing optional packages
def test_export_without_sae_lens_writes_nothing(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # `import sae_lens` now fails, as when not installed
    code, _, err, _ = run_cli(["export", str(world["run"]), "--to", "saelens", "--out", str(tmp_path / "sl")])
    assert code == 2 and "sae_lens" in err and "pip install" in err and not (tmp_path / "sl").exists()


@pytest.mark.parametrize("backend,module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_train_log_backend_missing_is_found_before_collecting(world, tmp_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)
    code, _, err, _ = run_cli(["train", *world["train_args"], "--cache-dir", str(tmp_path / "cache"),
                               "--out", str(tmp_path / "run"), "--log", backend])
    assert code == 2 and f"--log {backend}" in err and "pip install" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no work started


@pytest.mark.parametrize("module", ["transformers", "datasets"])
@pytest.mark.parametrize("command", ["train", "train --resume", "eval"])
def test_the_train_extra_missing_is_found_before_anything_is_made(world, tmp_path, monkeypatch, module, command):
    """Not 'No module named ...' with no way out: the package, the extra that has it, nothing created."""
    monkeypatch.setitem(sys.modules, module, None)
    argv = {"train": ["train", *world["train_args"], "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "new")],
            "train --resume": ["train", "--resume", str(world["run"]), "--no-progress"],
            "eval": ["eval", str(world["run"])]}[command]
    line = refused(argv, f"needs the optional package {module!r}, which is not installed: pip install 'aosae[train]'",
                   world["run"], world["cache"])
    assert ("leave --dataset out" in line) == (command == "train" and module == "datasets"), line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize("option,module", [("--probing", "sklearn"), ("--scr", "scipy")])
def test_eval_probing_without_its_package_is_refused_before_the_lm_runs(world, monkeypatch, option, module):
    monkeypatch.setitem(sys.modules, module, None)
    before = digest(world["run"])
    code, _, err, _ = run_cli(["eval", str(world["run"]), option])
    assert code == 2 and repr(module) in err and "pip install" in err and digest(world["run"]) == before


def test_ablate_saelens_sweep_without_sae_lens_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    code, _, err, _ = run_cli(["ablate", "--out", str(tmp_path / "a"), "--sweeps", "synthetic,saelens"])
    assert code == 2 and "sae_lens" in err and not (tmp_path / "a").exists()


def test_ablate_without_matplotlib_warns_first_and_writes_every_other_output(ablation):
    out, (code, _, err, caught) = ablation
    assert code == 0, err
    first = next(w for w in caught if "matplotlib" in w)
    assert "will be written" in first and "--render-only" in first  # said before the training, with the way out
    assert (out / "runs.json").is_file() and (out / "ablation.json").is_file()
    assert "### Verdict" in (out / "README.md").read_text() and not list(out.glob("*.png"))


def test_the_console_command_prints_one_line_and_exits_2(world, tmp_path):
    """The same through a real process: `python -m aosae`, its exit code and its whole stderr."""
    import os
    import subprocess

    run = copy_run(world, tmp_path)
    weights = run / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("AOSAE_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "aosae", "export", str(run), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"aosae export: error: {weights}: is cut short") and done.stderr.count("\n") == 1
    debug = subprocess.run([sys.executable, "-m", "aosae", "export", str(run), "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, env={**env, "AOSAE_DEBUG": "1"}, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "BadFile" in debug.stderr


# ------------------------------------------------------------------ settings that do not fit the model or the run
def refused(argv, named, *roots):
    """Run `aosae ARGV`; assert one error line naming `named` (a path or any text) and nothing under roots changed."""
    before = digest(*roots)
    code, _, err, _ = run_cli(argv)
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("aosae "), err
    assert str(named) in errors[0], f"{named} not named in: {errors[0]}"
    assert digest(*roots) == before, "a failed command changed the user's files"
    return errors[0]


@settings(FAST, max_examples=6)
@given(context=st.integers(129, 4096))
def test_a_context_longer_than_the_model_allows_is_refused_up_front(world, context):
    """The tiny LM has 128 positions: train, eval --context and a resumed run whose train_config.json
    says more all stop before any LM forward, naming the limit."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        line = refused(["train", *world["train_args"], "--context", str(context), "--cache-dir", str(tmp / "cache"),
                        "--out", str(tmp / "new")], f"context {context}", world["run"])
        assert "128 positions" in line and "--context 128 or less" in line
        assert not (tmp / "cache").exists() and not (tmp / "new").exists()
        line = refused(["eval", str(world["run"]), "--context", str(context)], f"context {context}", world["run"])
        assert "--context 128 or less" in line
        run = copy_run(world, tmp)
        settings_ = json.loads((run / "train_config.json").read_text())
        (run / "train_config.json").write_text(json.dumps({**settings_, "context": context}))
        line = refused(["train", "--resume", str(run), "--no-progress"], run / "train_config.json", run, world["cache"])
        assert "at most 128" in line


BAD_START = {  # an option that fails only once the model, its layers or the dataset are read
    "model": ["--model", "no-such-org/no-such-model-xyz"],
    "layer": ["--layer", "7"],
    "dataset": ["--dataset", "/no/such/rows.jsonl"],
    "good settings": [],
}


@settings(FAST, max_examples=8)
@given(data=st.data())
def test_train_into_an_existing_run_is_refused_and_the_run_kept(world, data):
    bad = data.draw(st.sampled_from(list(BAD_START)), label="option")
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        line = refused(["train", *world["train_args"], *BAD_START[bad], "--cache-dir", str(world["cache"]),
                        "--out", str(run)], run, run, world["cache"])
        assert f"--resume {run}" in line


@pytest.mark.parametrize("bad", ["model", "layer", "dataset"])
def test_a_failed_start_leaves_no_train_config(world, tmp_path, bad):
    """`aosae train` (and Trainer) write train_config.json only once the run has started: a new --out
    that fails is not left behind as a half-made run; an existing one (Python API) gets its file back."""
    argv = ["train", *world["train_args"], *BAD_START[bad], "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "new")]
    code, _, err, _ = run_cli(argv)
    assert code == 2 and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()
    from aosae.training.config import TrainConfig
    from aosae.training.trainer import Trainer

    run = copy_run(world, tmp_path)
    (run / "train_config.json").write_text(json.dumps({**json.loads((run / "train_config.json").read_text()), "tau0": 0.05}))
    before = digest(run)
    options = dict(zip(BAD_START[bad][0::2], BAD_START[bad][1::2]))
    cfg = TrainConfig(model=options.get("--model", str(world["model"])), dataset=options.get("--dataset", str(world["corpus"])),
                      layer=int(options.get("--layer", 1)), tokens=2000, context=32, d_sae=48, steps=6, batch_size=128,
                      buffer_tokens=512, cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(ValueError):
        Trainer(cfg, run, progress=False)
    assert digest(run) == before


def test_a_failed_resume_does_not_rewrite_train_config(world, tmp_path):
    """A run dir of an earlier version (renamed keys, compact JSON) whose checkpoints are all damaged."""
    run = copy_run(world, tmp_path)
    settings_ = json.loads((run / "train_config.json").read_text())
    settings_["tau0"] = settings_.pop("tau_init")
    (run / "train_config.json").write_text(json.dumps(settings_))
    for step in (run / "checkpoints").iterdir():
        (step / "optimizer.pt").write_bytes(b"damaged")
    refused(["train", "--resume", str(run), "--no-progress"], run / "checkpoints", run)


@pytest.mark.parametrize("key, value, said", [("step", 7, "says step 7"), ("step", "6", "says step '6'"),
                                              ("scale", float("nan"), "scale nan"), ("scale", -2.0, "scale -2.0"),
                                              ("scale", 0, "scale 0"), ("sha256", {}, "records no checksum"),
                                              ("tau", "x", "'tau' state that cannot be restored (a value of the wrong"),
                                              ("tau", {}, "'tau' state that cannot be restored (it has no 'tau')"),
                                              ("rng", {}, "'rng' state that cannot be restored"),
                                              ("rng", {"numpy": [1], "python": []}, "'rng' state that cannot be"),
                                              ("ortho_kth", "x", "'ortho_kth' 'x': it must be a finite number"),
                                              ("tau", {"tau": 0.05, "target": "x", "init": 0.05, "min": 0.01, "max": 0.2,
                                                       "calibration_steps": 1, "calib_sum": 0.0, "calib_count": 0},
                                               "'tau' state with a value that is not a finite number")])
def test_resume_checks_each_checkpoints_state_json(world, tmp_path, key, value, said):
    """An edited state.json (a step its directory does not have, a broken activation scale, checksums
    dropped) makes its checkpoint unusable; with every checkpoint so, the resume is refused naming the
    file and the run, train_config.json included, is left exactly as it was."""
    run = copy_run(world, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        state = json.loads((checkpoint / "state.json").read_text())
        state[key] = value
        (checkpoint / "state.json").write_text(json.dumps(state))
    line = refused(["train", "--resume", str(run), "--no-progress"], run / "checkpoints" / "step_6" / "state.json",
                   run, world["cache"])
    assert said in line and "no usable checkpoint" in line, line


@pytest.mark.parametrize("lost", ["checkpoints", "checkpoints/*", "checkpoints and metrics.jsonl"])
def test_resume_refuses_a_run_whose_checkpoints_were_deleted(world, tmp_path, lost):
    """`rm -r RUN/checkpoints` (or its contents): a resume would silently train from step 0 again."""
    run = copy_run(world, tmp_path)
    shutil.rmtree(run / "checkpoints")
    if lost == "checkpoints/*":
        (run / "checkpoints").mkdir()
    elif lost != "checkpoints":
        (run / "metrics.jsonl").unlink()  # still a trained run: its summary.json and weights say so
    line = refused(["train", "--resume", str(run), "--no-progress"], run / "checkpoints", run, world["cache"])
    assert "start it again from step 0" in line and "restore the checkpoints" in line and "new --out" in line


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it(world, tmp_path):
    """Documented: only train_config.json was written (killed while collecting): the resume trains it."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(world["run"] / "train_config.json", run / "train_config.json")
    with hidden("matplotlib"):
        code, _, err, _ = run_cli(["train", "--resume", str(run), "--no-progress"])
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("log", ["empty", "missing", "short", "a step twice", "out of order"])
def test_resume_refuses_a_log_that_lost_the_steps_done(world, tmp_path, log):
    run = copy_run(world, tmp_path)
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    if log == "empty":
        path.write_bytes(b"")
    elif log == "missing":
        path.unlink()
    elif log == "short":  # rows 1-3 of the 6 the checkpoint has done
        path.write_text("".join(line + "\n" for line in lines[:3]))
    elif log == "a step twice":  # two logs joined, or a line pasted again
        path.write_text("".join(line + "\n" for line in lines[:4] + lines[3:]))
    else:
        path.write_text("".join(line + "\n" for line in lines[:2] + lines[3:4] + lines[2:3] + lines[4:]))
    line = refused(["train", "--resume", str(run), "--steps", "8", "--no-progress"], path, run, world["cache"])
    said = {"a step twice": "logs step 4 more than once", "out of order": "has its steps out of order"}.get(log, "step 6")
    assert said in line and ("restore it from a backup" in line or "one line per step" in line)


@pytest.mark.parametrize("file, key, value, said", [
    ("cfg.json", "activation_fn_str", "topk", "says activation='topk' but the run's"),
    ("cfg.json", "hook_layer", 0, "says layer=0 but the run's"),
    ("cfg.json", "context_size", 64, "says context=64"),
    ("train_config.json", "layer", 0, "says layer=1 but the run's"),
    ("train_config.json", "d_sae", 96, "says d_sae=48"),
    ("cfg.json", "context_size", -5, "'context_size' must be an int >= 2"),
    ("cfg.json", "hook_layer", -1, "'hook_layer' must be an int >= 0"),
    ("cfg.json", ("aosae", "activation_scale"), "x", "'aosae.activation_scale' must be a positive number"),
    ("cfg.json", ("aosae", "tokens"), 0, "'aosae.tokens' must be a positive int"),
])
def test_eval_refuses_a_cfg_json_that_is_valid_alone_but_not_this_runs(world, tmp_path, file, key, value, said):
    """Edits that keep cfg.json a loadable SAE config (and its weights fitting): it must still agree with
    the run's train_config.json, and aosae's own provenance fields must have their types."""
    run = copy_run(world, tmp_path)
    obj = json.loads((run / file).read_text())
    node, last = (obj[key[0]], key[1]) if isinstance(key, tuple) else (obj, key)
    node[last] = value
    if value == "topk":
        obj["activation_fn_kwargs"] = {"k": 4}
    (run / file).write_text(json.dumps(obj))
    line = refused(["eval", str(run)], run / "cfg.json", run)
    assert said in line and ("restore" in line), line


def test_a_model_directory_that_moved_is_named_not_taken_for_a_hub_id(world, tmp_path):
    """A path that cannot be a hub id and does not exist (the model was moved): 'does not exist', not
    transformers' 'Repo id must be in the form ...'; a resume names train_config.json, which it cannot
    override with --model."""
    gone = tmp_path / "moved" / "model"
    line = refused(["train", *world["train_args"], "--model", str(gone), "--cache-dir", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "new")], f"model directory {gone} does not exist")
    assert "Repo id" not in line and not (tmp_path / "new").exists() and not (tmp_path / "cache").exists()
    run = copy_run(world, tmp_path)
    for name, key in (("train_config.json", "model"), ("cfg.json", "model_name")):
        obj = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps({**obj, key: str(gone)}))
    line = refused(["eval", str(run)], f"model directory {gone} does not exist", run)
    assert "--model" in line and "Repo id" not in line
    line = refused(["train", "--resume", str(run), "--no-progress"], run / "train_config.json", run, world["cache"])
    assert f"names model directory {gone} does not exist" in line and "set its 'model'" in line


def test_eval_refuses_a_model_of_another_width_before_it_runs(world, tmp_path):
    """--model of another hidden size (or the run's model path now holding one): named with both widths
    before the LM runs, not a tensor-shape error from inside the SAE after it has."""
    wide = make_tiny_lm(tmp_path / "wide", n_embd=64)
    line = refused(["eval", str(world["run"]), "--model", str(wide)], f"--model the model {wide} gives 64-wide",
                   world["run"])
    assert "reads 32" in line and str(world["run"] / "cfg.json") in line and "leave --model out" in line
    run = copy_run(world, tmp_path)
    for name, key in (("train_config.json", "model"), ("cfg.json", "model_name")):
        obj = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps({**obj, key: str(wide)}))
    line = refused(["eval", str(run)], f"the model {wide} gives 64-wide activations", run)
    assert "not the one the run was trained on" in line and not (run / "eval.json").exists()


@pytest.mark.parametrize("first, tokens", [(10**9, 200), (1900, 200), (0, 2001)])
def test_eval_refuses_a_held_out_range_outside_the_run(world, tmp_path, first, tokens):
    """summary.json's held_out must lie in the tokens the run collected (train_config.json's tokens),
    else eval would read other text and blame the dataset."""
    run = copy_run(world, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["held_out"].update(first_token=first, tokens=tokens)
    (run / "summary.json").write_text(json.dumps(summary))
    line = refused(["eval", str(run)], run / "summary.json", run)
    assert "the run collected 2000 per rank" in line and "delete it" in line


@settings(FAST, max_examples=12)
@given(data=st.data())
def test_resume_names_an_edited_train_config_not_the_checkpoints(world, data):
    key, value = data.draw(st.sampled_from([("d_sae", 96), ("d_sae", 32), ("d_sae", None), ("activation", "topk"),
                                            ("layer", 0), ("context", 64), ("model", "another-model"), ("tokens", 4000),
                                            ("dataset", "other.jsonl")]), label="edit")
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        settings_ = json.loads((run / "train_config.json").read_text())
        settings_[key] = value
        if key == "activation":
            settings_["top_k"] = 4
        (run / "train_config.json").write_text(json.dumps(settings_, indent=2))
        line = refused(["train", "--resume", str(run), "--no-progress"], run / "train_config.json", run, world["cache"])
        assert f"'{key}'" in line and "edited" in line and "checkpoint" in line


def test_resume_steps_extends_the_run_and_refuses_fewer(world, tmp_path):
    run = copy_run(world, tmp_path)
    line = refused(["train", "--resume", str(run), "--steps", "4", "--no-progress"], "--steps 4", run)
    assert "6 steps" in line and "--steps 6 or more" in line
    line = refused(["train", "--resume", str(run), "--lr", "0.1", "--d-sae", "8", "--no-progress"], "--d-sae, --lr", run)
    assert "only --steps" in line
    with hidden("matplotlib"):
        code, out, err, _ = run_cli(["train", "--resume", str(run), "--steps", "9", "--no-progress"])
    assert code == 0, err
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 10))
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["steps"] == 9 and saved["warmup_steps"] == 1  # the 6-step run's warm-up (10% of 6, at least 1) is kept
    assert json.loads((run / "summary.json").read_text())["steps"] == 9


@pytest.mark.parametrize("option", [["--d-sae", "1"], ["--device", "gpu"], ["--device", "meta"], ["--seed", "-1"],
                                    ["--buffer-tokens", "10"], ["--warmup-steps", "100"]])
def test_train_refuses_a_bad_setting_before_collecting(world, tmp_path, option):
    """Caught before the LM runs, naming the option as typed; nothing is created (no cache, no --out)."""
    refused(["train", *world["train_args"], *option, "--cache-dir", str(tmp_path / "cache"),
             "--out", str(tmp_path / "new")], option[0])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_train_topk_without_top_k_says_to_add_it(world, tmp_path, activation):
    line = refused(["train", *world["train_args"], "--activation", activation, "--cache-dir", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "new")], f"--activation {activation} needs --top-k K")
    assert "None" not in line and not (tmp_path / "cache").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize("option, said", [
    ("--cache-dir", "--cache-dir {file} is a file; pass a directory"),
    ("--out", "--out {file}/run cannot be created: {file} is a file"),
    ("--context", "--context must be an int >= 2"),
    ("--model", "model directory {dir} has no config.json (it holds notes.txt)"),
])
def test_train_refuses_paths_that_cannot_work_before_collecting(world, tmp_path, option, said):
    (tmp_path / "notes.txt").write_text("mine")
    value = {"--cache-dir": tmp_path / "notes.txt", "--out": tmp_path / "notes.txt" / "run", "--context": "1",
             "--model": tmp_path}[option]
    argv = [*world["train_args"], "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "new")]
    given = argv.index(option) + 1
    argv[given] = str(value)
    line = refused(["train", *argv], said.format(file=tmp_path / "notes.txt", dir=tmp_path), tmp_path / "notes.txt")
    assert "pass " in line and not (tmp_path / "cache").exists() and not (tmp_path / "new").exists()


def test_resume_names_train_config_steps_not_an_option_never_given(world, tmp_path):
    run = copy_run(world, tmp_path)
    settings_ = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**settings_, "steps": 3}))
    line = refused(["train", "--resume", str(run), "--no-progress"], run / "train_config.json", run, world["cache"])
    assert "steps (3)" in line and "--steps 3" not in line and "--steps 6 or more" in line


@pytest.mark.parametrize("option", ["--probing", "--scr"])
def test_eval_probing_seeds_without_a_value_names_the_option(world, option):
    line = refused(["eval", str(world["run"]), option, "--probing-seeds"], "--probing-seeds", world["run"])
    assert "at least one seed" in line


@pytest.mark.parametrize("argv, said", [
    (["--probing-tasks", "saebench"], "--probing-tasks has no effect without --probing or --scr"),
    (["--probing-seeds", "1", "2"], "--probing-seeds has no effect without --probing or --scr"),
    (["--probing", "--probing-tasks", "ofline"], "'ofline' is not a task set or a SAEBench dataset id (did you mean 'offline'?)"),
    (["--scr", "--probing-tasks", "fancyzhx/ag_news,nope/nope"], "'nope/nope' is not a task set"),
    (["--probing", "--probing-tasks", "fancyzhx/ag_news,"], "has an empty entry"),
    (["--probing", "--probing-tasks", "fancyzhx/ag_news=/no/such/dir"], "/no/such/dir is not a directory"),
    (["--probing", "--probing-tasks", "saebench"], "needs the Hugging Face hub"),  # the tests run offline
])
def test_eval_refuses_probing_options_that_cannot_work_before_the_lm_runs(world, argv, said):
    line = refused(["eval", str(world["run"]), *argv], said, world["run"])
    assert not (world["run"] / "eval.json").exists() and ("use " in line or "add --probing" in line or "pass " in line)


def test_eval_warns_when_the_text_runs_out_before_tokens(world, tmp_path):
    run = copy_run(world, tmp_path)
    code, _, err, caught = run_cli(["eval", str(run), "--tokens", "10000000"])
    assert code == 0, err
    evaluated = json.loads((run / "eval.json").read_text())["n_tokens"]
    assert evaluated < 10_000_000
    assert any(f"evaluated {evaluated} tokens, not the 10000000 asked for" in w and "--tokens" in w for w in caught), caught


# ------------------------------------------------------------------ export --out
def test_export_refuses_an_out_that_holds_other_files(world, tmp_path):
    run = copy_run(world, tmp_path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    for out in (run, run / "checkpoints", other):
        line = refused(["export", str(run), "--out", str(out)], out, run, other)
        assert "not empty" in line and "new or empty directory" in line
    first = tmp_path / "sl"
    assert run_cli(["export", str(run), "--out", str(first)])[0] == 0
    assert run_cli(["export", str(run), "--out", str(first)])[0] == 0  # an earlier export of the same SAE: replaced
    cfg = json.loads((first / "cfg.json").read_text())
    (first / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 96}))  # now the export of another SAE
    assert "another SAE" in refused(["export", str(run), "--out", str(first)], first, first, run)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["export", str(run), "--out", str(empty)])[0] == 0 and (empty / "cfg.json").is_file()


# ------------------------------------------------------------------ safetensors files with bytes appended
@settings(FAST, max_examples=10)
@given(extra=st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_named_as_such(world, extra):
    from aosae import SparseAutoencoder

    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(world, Path(tmp))
        weights = run / "sae_weights.safetensors"
        weights.write_bytes(weights.read_bytes() + extra)
        with pytest.raises(BadFile, match=f"has {len(extra)} unexpected trailing bytes"):
            SparseAutoencoder.load(run)
        assert "trailing bytes" in refused(["eval", str(run)], weights, run)

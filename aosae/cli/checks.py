"""What a command checks before it starts working: the files it will read, the packages its outputs need.

A damaged run directory, a config with a wrong type or a missing optional package must stop a
command in its first second with one line naming the file (or package) and what to do, not after
minutes of work, and never by rewriting anything the user has. The SAE files themselves are checked
by their loader (aosae.nn.sae_files); this module checks the rest of a run directory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import types
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

from aosae.files import BadFile, MissingFile, read_bytes, read_json, require
from aosae.training.config import RENAMED, TrainConfig

# train_config.json keys that every version of aosae wrote: a resume cannot guess them
RESUME_KEYS = ("model", "layer", "dataset", "tokens", "context", "d_sae", "steps", "batch_size", "lr", "l1",
               "activation", "seed")
LOG_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


class RecoveryWarning(UserWarning):
    """A command repaired what an interrupted run left behind (the message says what)."""


def require_package(module: str, needed_for: str, install: str) -> None:
    """ImportError before any work when `module` is not importable."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{needed_for} needs the optional package {module!r}, which is not installed: {install}")


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a TrainConfig field's annotation (ints are floats, bools are not numbers)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    return "null" if hint is type(None) else {float: "a number"}.get(hint, f"{getattr(hint, '__name__', hint)}")


def read_train_config(path: str | os.PathLike, fix: str, *, required: tuple = ()) -> TrainConfig:
    """A train_config.json as a TrainConfig: every key type-checked, then validated; BadFile naming the key."""
    path = Path(path)
    raw = read_json(path, fix)
    d = {RENAMED.get(key, key): value for key, value in raw.items()}
    for key in required:
        require(d, key, object, path, fix)
    hints = get_type_hints(TrainConfig)
    names = {f.name for f in fields(TrainConfig)}
    for key, value in d.items():
        if key not in names:
            raise BadFile(path, f"has an unknown setting {key!r} (written by a newer aosae, or edited?)", fix)
        if not _fits(value, hints[key]):
            raise BadFile(path, f"{key!r} must be {_describe(hints[key])}, got {value!r}", fix)
    try:
        return TrainConfig.from_dict(d)
    except (ValueError, TypeError) as err:
        raise BadFile(path, f"holds settings that do not go together: {err}", fix) from err


def check_summary(run_dir: Path, fix: str) -> None:
    """RUN_DIR/summary.json, when present: an object whose 'held_out' (if any) says where the held-out text is."""
    path = run_dir / "summary.json"
    if not path.exists():
        return
    held = require(read_json(path, fix), "held_out", dict, path, fix, optional=True)
    if held is not None:
        for key in ("first_token", "tokens"):
            value = require(held, key, int, path, fix)
            if value < (0 if key == "first_token" else 1):
                raise BadFile(path, f"held_out.{key} must be {'>= 0' if key == 'first_token' else '>= 1'}, got {value}", fix)
        require(held, "world_size", int, path, fix, optional=True)


def check_eval_run(run_dir: str | os.PathLike) -> None:
    """What `aosae eval` reads besides the SAE files (checked by SparseAutoencoder.load)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFile(run_dir, "does not exist" if not run_dir.exists() else "is a file, not a run directory",
                          "pass a run directory written by `aosae train` (or a saved SAE directory)")
    fix = ("restore it from a backup, or delete it and pass --model, --dataset and --context "
           "(aosae eval then evaluates on text after the training tokens)")
    if (run_dir / "train_config.json").exists():
        read_train_config(run_dir / "train_config.json", fix)
    check_summary(run_dir, "restore it from a backup, or delete it (aosae eval then evaluates on text after the "
                           "training tokens)")


def check_resume_run(run_dir: str | os.PathLike) -> TrainConfig:
    """What `aosae train --resume RUN_DIR` reads before training; its TrainConfig.
    The checkpoints are checked by the trainer, which skips a damaged newest one with a warning."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFile(run_dir, "does not exist" if not run_dir.exists() else "is a file, not a run directory",
                          "pass the --out directory of an earlier `aosae train`")
    path = run_dir / "train_config.json"
    if not path.exists():
        raise MissingFile(path, "does not exist, so this is not a run directory",
                          "pass the --out directory of an earlier `aosae train`")
    cfg = read_train_config(path, "restore it from a backup (a resume needs the run's own settings), or start a new "
                                  "run with a different --out", required=RESUME_KEYS)
    if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():
        raise BadFile(run_dir / "checkpoints", "is a file, not the run's checkpoint directory",
                      "move it aside (the run then starts over from its settings)")
    return cfg


def partial_last_line(path: Path) -> int | None:
    """metrics.jsonl: one JSON object with an int 'step' per line. A last line without its newline is
    what a run killed mid-write leaves: returns the byte length without it (drop_partial_line cuts it
    once the resume is under way). Any other bad line is a BadFile; None when the log is whole."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    fix = "delete that line, or the whole file (it is only the log; training resumes without it)"
    data = read_bytes(path, fix)
    lines = data.split(b"\n")
    partial = lines[-1] != b""  # the file does not end with a newline
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
        except ValueError:
            ok = False
        if ok:
            continue
        if partial and number == len(lines):
            return len(data) - len(lines[-1])
        raise BadFile(path, f"line {number} is not a JSON object with an int 'step'", fix)
    return None


def drop_partial_line(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)
    warnings.warn(f"{path}: dropped its last line, cut short by an interrupted run", RecoveryWarning, stacklevel=2)


def check_log_backend(kind) -> None:
    """--log wandb / tensorboard: the package is there before any activation is collected."""
    if kind is not None and kind in LOG_PACKAGES:
        require_package(LOG_PACKAGES[kind], f"--log {kind}", f"pip install 'aosae[{kind}]', or drop --log "
                                                             "(metrics.jsonl is always written)")


def check_device(device: str) -> None:
    """--device: a torch device string this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {device!r} is not a device: use cpu or cuda[:i]") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} but CUDA is not available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r} but this machine has {torch.cuda.device_count()} GPU(s)")


def check_output_dir(path, option: str = "--out") -> None:
    """An output directory that is not an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; pass a directory (it is created if missing)")

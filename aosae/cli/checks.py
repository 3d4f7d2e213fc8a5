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

from aosae.files import BadFile, MissingFile, names_listed, read_bytes, read_json, require
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
    if "l1" in d and d["l1"] is None:  # a run writes the λ it trained with (--l1's default depends on the activation)
        raise BadFile(path, "'l1' must be a number (the λ the run trained with), got None", fix)
    try:
        return TrainConfig.from_dict(d)
    except (ValueError, TypeError) as err:
        raise BadFile(path, f"holds settings that do not go together: {err}", fix) from err


def check_summary(run_dir: Path, fix: str, tokens: int | None = None) -> None:
    """RUN_DIR/summary.json, when present: an object whose 'held_out' (if any) says where the held-out text is."""
    path = run_dir / "summary.json"
    if not path.exists():
        return
    summary = read_json(path, fix)
    held = require(summary, "held_out", dict, path, fix, optional=True)
    if held is not None:
        for key in ("first_token", "tokens"):
            value = require(held, key, int, path, fix)
            if value < (0 if key == "first_token" else 1):
                raise BadFile(path, f"held_out.{key} must be {'>= 0' if key == 'first_token' else '>= 1'}, got {value}", fix)
        world = require(held, "world_size", int, path, fix, optional=True) or 1
        if tokens is not None and held["first_token"] + held["tokens"] > tokens // max(world, 1):
            raise BadFile(path, f"held_out says tokens [{held['first_token']}, {held['first_token'] + held['tokens']}) "
                          f"were held out, but the run collected {tokens // max(world, 1)} per rank "
                          f"({run_dir / 'train_config.json'}: tokens {tokens}, {world} rank(s))", fix)
    check_summary_weights(run_dir, summary, path, fix)


def check_summary_weights(run_dir: Path, summary: dict, path: Path, fix: str) -> None:
    """summary.json's weights_sha256 against the checksum sae_weights.safetensors records (the same
    digest of the same tensors): like every other checksum aosae writes, a mismatch is refused: the
    weights were replaced after training, or the summary is another run's, and its numbers and
    held-out text are not this SAE's. Summaries of older versions (no 'weights_file': a digest of the
    training-scale weights) and weights files without a checksum are not compared."""
    from aosae.files import CHECKSUM_KEY

    if summary.get("weights_file") is None:
        return
    name = require(summary, "weights_file", str, path, fix)
    recorded = require(summary, "weights_sha256", str, path, fix)
    try:
        from safetensors import safe_open

        with safe_open(str(run_dir / name), framework="pt") as f:
            in_file = (f.metadata() or {}).get(CHECKSUM_KEY)
    except Exception:  # noqa: BLE001 - a missing or damaged weights file: its loader names it
        return
    if in_file is not None and in_file != recorded:
        raise BadFile(path, f"its weights_sha256 ({recorded[:12]}...) is not the checksum of {run_dir / name} "
                      f"({in_file[:12]}...): the weights were replaced after training, or the summary is another "
                      "run's", fix)


def check_eval_run(run_dir: str | os.PathLike, model=None, context=None) -> None:
    """What `aosae eval` reads besides the SAE files (checked by SparseAutoencoder.load), and the
    model, layer and context it will run (--model and --context override the run's)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFile(run_dir, "does not exist" if not run_dir.exists() else "is a file, not a run directory",
                          "pass a run directory written by `aosae train` (or a saved SAE directory)")
    fix = ("restore it from a backup, or delete it and pass --model, --dataset and --context "
           "(aosae eval then evaluates on text after the training tokens)")
    settings = None
    if (run_dir / "train_config.json").exists():
        settings = read_train_config(run_dir / "train_config.json", fix)
    check_summary(run_dir, "restore it from a backup, or delete it (aosae eval then evaluates on text after the "
                           "training tokens)", getattr(settings, "tokens", None))
    from aosae.nn.sae_files import check_sae_dir, read_sae_config

    sae_cfg = read_sae_config(check_sae_dir(run_dir))  # cheap (JSON); the weights are checked as they load
    if settings is not None:  # the run's two records of one SAE: an edit of either would evaluate something else
        from aosae.training.resume_checks import config_mismatches

        shaping = ("d_sae", "activation", "top_k", "layer", "context")  # paths (model, dataset) may have moved
        for key, want, have in (m for m in config_mismatches(settings, sae_cfg) if m[0] in shaping):
            raise BadFile(run_dir / "cfg.json", f"says {key}={have!r} but the run's {run_dir / 'train_config.json'} "
                          f"says {want!r}: one of the two was edited, or they belong to different runs",
                          "restore the edited file from a backup (a run's checkpoints/step_<N>/cfg.json holds the "
                          "SAE's own), or evaluate a directory holding only the SAE (cfg.json + weights)")
    layer = sae_cfg.hook_layer if sae_cfg.hook_layer is not None else getattr(settings, "layer", None)
    if layer is not None:  # as aosae.eval.evaluate.run_eval picks them
        check_lm_settings(model or getattr(settings, "model", None) or sae_cfg.model_name, int(layer),
                          int(context or sae_cfg.context_size or 128),
                          layer_fix=f"the SAE in {run_dir} reads layer {layer}: pass a --model that has it")
    used = model or getattr(settings, "model", None) or sae_cfg.model_name
    width = getattr(local_model_config(used), "hidden_size", None)
    if isinstance(width, int) and width > 0 and width != sae_cfg.d_in:  # else a shape error after the LM has run
        problem = (f"the model {used} gives {width}-wide activations but the SAE in {run_dir} reads {sae_cfg.d_in} "
                   f"(d_in in {run_dir / 'cfg.json'})")
        if model:
            raise ValueError(f"--model {problem}: pass the model the SAE was trained on ({sae_cfg.model_name}), or "
                             "leave --model out")
        raise ValueError(f"{problem}: the model at that path is not the one the run was trained on; pass that "
                         "one with --model")


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
    fix = "repair or delete that line, or restore the file from a backup (a resume needs the rows of every step done)"
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


def check_probing_tasks(spec: str) -> None:
    """`aosae eval --probing-tasks`: offline, saebench, or comma-separated SAEBench dataset ids, each
    optionally =DIR (an existing directory); refused before the LM runs, naming the entry."""
    import difflib

    if spec == "offline":
        return
    from aosae.eval.saebench_tasks import SAEBENCH_PROBING

    given = spec
    if spec == "saebench":
        spec = ",".join(SAEBENCH_PROBING)
    allowed = "offline, saebench, or comma-separated SAEBench dataset ids (" + ", ".join(SAEBENCH_PROBING) + ")"
    entries = [e.strip() for e in spec.split(",")]
    if not all(entries):
        raise ValueError(f"--probing-tasks {spec!r} has an empty entry: use {allowed}")
    for entry in entries:
        name, eq, local = (part.strip() for part in entry.partition("="))
        if name not in SAEBENCH_PROBING:
            close = difflib.get_close_matches(name, [*SAEBENCH_PROBING, "offline", "saebench"], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--probing-tasks: {name!r} is not a task set or a SAEBench dataset id{hint}; use {allowed}")
        if eq and not local:
            raise ValueError(f"--probing-tasks: {entry!r} needs a directory after '=' (a local copy with train.* and "
                             f"test.* files), or drop '=' to read {name} from the hub")
        if eq and not Path(local).is_dir():
            raise ValueError(f"--probing-tasks: {entry!r}: {local} is not a directory; pass a local copy of {name} "
                             "(train.* and test.* files with the hub's columns), or drop '=…' to read it from the hub")
    hub = [e.partition("=")[0].strip() for e in entries if "=" not in e]
    if hub:  # found now, not after the core metrics have run
        from aosae.machine import hub_offline, hub_reachable

        if hub_offline("DATASETS") or not hub_reachable():
            raise ValueError(f"--probing-tasks {given} needs the Hugging Face hub "
                             f"for {', '.join(hub[:3])}{' ...' if len(hub) > 3 else ''}, which is not reachable here: "
                             "pass local copies as ID=DIR, or use --probing-tasks offline")


def check_lm_packages(command: str, dataset, given: bool = True) -> None:
    """The `train` extra's packages a command running the LM needs (transformers; datasets for a
    dataset other than the built-in one), found before anything is created or loaded. `given`:
    the dataset is the --dataset option (else the run's own, which the user cannot leave out)."""
    from aosae.data.text import DEFAULT_DATASET

    require_package("transformers", f"aosae {command}", "pip install 'aosae[train]'")
    if dataset is not None and dataset != DEFAULT_DATASET:
        require_package("datasets", f"--dataset {dataset}" if given else f"the run's dataset {dataset}",
                        "pip install 'aosae[train]'" + (", or leave --dataset out (the built-in standard-library "
                                                        "corpus)" if given else ""))


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


def local_model_config(model):
    """The transformers config of `model` when it can be read without a download or a conversion
    (a local directory, the hub cache, the dequantised offline default); None otherwise, and the
    model's loader reports whatever is wrong with it."""
    from aosae.data import language_models as lm

    try:
        if model is None or model.lower() in {a.lower() for a in lm.DEFAULT_ALIASES}:
            folder = lm.cache_root() / "models" / lm._smollm2_gguf().stem  # no conversion just to check
            if not (folder / "config.json").is_file():
                return None
            model = str(folder)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here is the loader's to report, with its own message
        return None


def check_lm_settings(model, layer: int, context: int, source=None, *, layer_fix=None, context_fix=None) -> None:
    """The layer and context against the model's config, before any work: a context longer than
    the model's positions would fail deep inside its forward pass, after minutes of loading.
    `source`: the file the settings came from (a resumed run's train_config.json), named with
    the advice to set it back; else the advice is the option to pass (or layer_fix/context_fix)."""
    from aosae.data.language_models import check_model_dir

    try:
        check_model_dir(model)  # before anything is created or loaded
    except ValueError as err:
        if source is None:
            raise
        raise BadFile(source, f"names {err}".split(": pass ")[0],  # a resume cannot take --model
                      "set its 'model' to the model's new place, or restore the model there") from err
    config = local_model_config(model)
    if config is None:
        return
    what = f"the model {model}" if model else "the default model"
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > 0 and not 0 <= layer < layers:
        problem = f"layer must be an int in [0, {layers - 1}] for {what} ({layers} decoder layers), got {layer}"
        if source is not None:
            raise BadFile(source, problem, "set 'layer' back to the layer the run was started with")
        raise ValueError(f"{problem}: {layer_fix or f'pass --layer {layers - 1} or less'}")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0 and context > positions:
        problem = f"context {context} is longer than {what} allows ({positions} positions, its max_position_embeddings)"
        if source is not None:
            raise BadFile(source, problem, f"set 'context' back to the value the run was started with (at most {positions})")
        raise ValueError(f"{problem}: {context_fix or f'pass --context {positions} or less'}")


def check_writable_dir(path, option: str) -> None:
    """A directory aosae will create or write into: not a file, nor under one, nor read-only."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; pass a directory (it is created if missing)")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {probe} is a file, not a directory; pass another path")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} cannot be written: {probe} is not writable by this user; pass another path")


def check_new_run_dir(out) -> None:
    """`aosae train --out DIR`: DIR must not hold another run (training into it would rewrite its
    settings, checkpoints and weights) nor be a file."""
    if out is None:
        return
    out = Path(out)
    check_writable_dir(out, "--out")
    held = [name for name in ("train_config.json", "checkpoints", "sae_weights.safetensors") if (out / name).exists()]
    if held:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}): continue it with "
                         f"`aosae train --resume {out}`, or pass a new --out (nothing was changed)")


EXPORT_FILES = ("cfg.json", "sae_weights.safetensors")


def check_export_dir(target, sae_cfg) -> None:
    """`aosae export --out DIR`: DIR must be new, empty, or an earlier SAELens export of the same SAE
    (only cfg.json + sae_weights.safetensors, the same shapes and hook); anything else would be
    overwritten: a run directory, another SAE, the user's files."""
    target = Path(target)
    if not target.is_dir():
        return
    held = sorted(p.name for p in target.iterdir())
    if not held:
        return
    earlier = None
    if set(held) <= set(EXPORT_FILES) and (target / "cfg.json").is_file():
        try:
            earlier = json.loads((target / "cfg.json").read_text())
        except (OSError, ValueError):
            earlier = None
    if isinstance(earlier, dict) and "architecture" in earlier:  # SAELens writes it; aosae's own cfg.json does not
        meta = earlier.get("metadata") if isinstance(earlier.get("metadata"), dict) else {}
        same = (earlier.get("d_in"), earlier.get("d_sae"), meta.get("model_name"), meta.get("hook_name")) == \
            (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.model_name, sae_cfg.hook_name)
        if same:
            return
        why = (f"an export of another SAE (d_in={earlier.get('d_in')}, d_sae={earlier.get('d_sae')}, "
               f"{meta.get('model_name')} {meta.get('hook_name')})")
    else:
        why = f"not empty (it holds {names_listed(held)})"
    raise ValueError(f"--out {target} is {why}: exporting there would overwrite it; pass a new or empty "
                     "directory (an earlier export of this same SAE is replaced)")

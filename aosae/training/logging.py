"""Optional experiment logging beside metrics.jsonl: `--log wandb` or `--log tensorboard`.

Never required, never blocking: the packages are optional extras (`pip install 'aosae[wandb]'`,
`'aosae[tensorboard]'`), and a missing one is a clear ImportError naming the extra, raised before
any work starts. wandb runs offline unless WANDB_MODE says otherwise (files under
RUN/wandb, `wandb sync` uploads them later), so a machine without network never waits on it. A
logger that fails mid-run is switched off with one warning; metrics.jsonl is the record.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

LOG_BACKENDS = ("wandb", "tensorboard")


class MetricsLogger:
    """log(row) once per step (row: the metrics.jsonl dict, with "step"); close() at the end."""

    def __init__(self, name: str, write, finish):
        self.name, self._write, self._finish = name, write, finish

    def log(self, row: dict) -> None:
        if self._write is None:
            return
        try:
            self._write(row)
        except Exception as err:  # a logging backend must not stop training
            warnings.warn(f"--log {self.name} failed ({err}); logging to metrics.jsonl only from now on")
            self._write = None

    def close(self) -> None:
        if self._finish is not None:
            try:
                self._finish()
            except Exception as err:
                warnings.warn(f"--log {self.name} could not be closed cleanly ({err})")
            self._finish = None


def _missing(kind: str, package: str, err: ImportError) -> ImportError:
    return ImportError(f"--log {kind} needs the `{package}` package ({err}): pip install 'aosae[{kind}]', "
                       "or drop --log (metrics.jsonl is always written)")


def _tensorboard(run_dir: Path, config: dict) -> MetricsLogger:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise _missing("tensorboard", "tensorboard", err) from err
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in config.items()))

    def write(row):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"train/{key}", value, row["step"])

    return MetricsLogger("tensorboard", write, writer.close)


def _wandb(run_dir: Path, config: dict) -> MetricsLogger:
    try:
        import wandb
    except ImportError as err:
        raise _missing("wandb", "wandb", err) from err
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "aosae"), name=run_dir.name, dir=str(run_dir),
                     config=config, mode=os.environ.get("WANDB_MODE", "offline"), resume="allow",
                     id=os.environ.get("WANDB_RUN_ID"))

    def write(row):
        run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    return MetricsLogger("wandb", write, run.finish)


def make_logger(kind: Optional[str], run_dir: Path, config: dict) -> MetricsLogger:
    """A logger for `kind` (None: none besides metrics.jsonl)."""
    if kind is None:
        return MetricsLogger("none", None, None)
    if kind not in LOG_BACKENDS:
        raise ValueError(f"--log must be one of {LOG_BACKENDS}, got {kind!r}")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return (_wandb if kind == "wandb" else _tensorboard)(Path(run_dir), config)

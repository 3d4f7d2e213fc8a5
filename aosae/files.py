"""Crash-safe writes: a file or directory is either the old complete one or the new one.

Used for saved SAEs, checkpoints and caches, so an interrupted run loses nothing it had.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def write_dir_atomically(directory: str | os.PathLike, write) -> Path:
    """Fill a fresh temp directory beside `directory` with write(tmp), then swap it in:
    a crash or a full disk leaves the previous `directory` untouched and no leftovers."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp", dir=directory.parent))
    try:
        write(tmp)
        atomic_replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def atomic_replace_dir(tmp: Path, target: Path) -> None:
    """Move a fully-written directory `tmp` to `target`, replacing an old one.

    os.replace cannot replace a non-empty directory, so the old one is first renamed
    aside; at every instant either the old or the new complete directory exists
    under a known name (`target` or `target.old`)."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    try:  # make the renames durable
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass

"""An on-disk activation store: raw row-major shards written while the LM runs, read through memory maps.

Layout of a store directory (one per model, layer, dataset, token budget, context, LM dtype,
storage dtype and DDP part; see `store_key`):

    shard_00000.bin ...   rows [n, d] in the storage dtype, little-endian, no header
    progress.json         while collecting: the shards closed so far and the text windows they used
    meta.json             written last, only when the store is complete: shape, dtype, model, layer,
                          dataset, token range, rows per shard

A store without meta.json is incomplete (collection was killed): `StoreWriter` resumes it from
progress.json (the LM restarts at the first window of the first unfinished shard) and
`ActivationStore.open` refuses it. Nothing is ever concatenated in RAM: readers copy the rows
they ask for out of the maps and then drop those pages from the process (MADV_DONTNEED), so the
resident set stays flat however large the store is (the kernel's page cache still helps).
Every value is checked to be finite when the store is opened (all of it up to 1 GiB) and whenever
rows are read: a damaged shard is a BadFile naming it and the row, never a NaN loss later.

Storage dtype (default bfloat16): bf16 keeps float32's exponent range, so no activation can
overflow (fp16 overflows past 65504, which models with massive activations reach), at half the
size of float32; its relative rounding error (≤ 2⁻⁹) puts a floor of ~1e-6 on the fraction of
variance lost, orders of magnitude under any SAE's. float16 is more precise where it fits and
is checked for overflow; float32 is exact.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from aosae.files import BadFile, fsync_path, names_listed, read_json, require, write_json

STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FORMAT = "aosae-activation-store-v1"
_RAW = {2: np.int16, 4: np.int32}  # rows are moved as raw bits of their width
_TORCH_RAW = {2: torch.int16, 4: torch.int32}
SHARD_BYTES = 1 << 27  # 128 MiB per shard: a kill during collection loses at most one shard of LM work
FULL_CHECK_BYTES = 1 << 30  # stores up to 1 GiB have every value checked when opened (see check_values)


def store_key(**fields) -> str:
    """Directory name of a store: a hash of everything that determines its contents."""
    blob = json.dumps({"format": FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shard_rows(d: int, dtype: str) -> int:
    return max(1024, SHARD_BYTES // (d * STORE_DTYPES[dtype].itemsize))


def check_disk_space(directory: Path, n_rows: int, d: int, dtype: str) -> None:
    """Refuse up front, before hours of LM work, a store that cannot fit on the disk."""
    need = n_rows * d * STORE_DTYPES[dtype].itemsize
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ValueError(
            f"the activation store needs {need / 2**30:.1f} GiB ({n_rows:,} tokens × {d} × {dtype}) but only "
            f"{free / 2**30:.1f} GiB is free under {probe}: lower --tokens, pick --store-dtype bfloat16, "
            "point --cache-dir at a larger disk, or train with --streaming (no store)"
        )


@contextmanager
def store_lock(directory: Path):
    """Hold an exclusive lock on a store while it is collected: a second process asking for the
    same store (a parallel run, an ablation arm) waits, then finds it complete."""
    import fcntl

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_meta(directory: Path) -> dict:
    """directory/meta.json, checked: BadFile naming it (and how to rebuild the store) if anything is off."""
    path = Path(directory) / "meta.json"
    fix = f"delete {directory} and the next `aosae train` collects the store again"
    meta = read_json(path, fix)
    if require(meta, "format", str, path, fix) != FORMAT or require(meta, "complete", bool, path, fix) is not True:
        raise BadFile(path, f"is not a complete {FORMAT} store", fix)
    dtype = require(meta, "dtype", str, path, fix)
    if dtype not in STORE_DTYPES:
        raise BadFile(path, f"'dtype' must be one of {sorted(STORE_DTYPES)}, got {dtype!r}", fix)
    d = require(meta, "d", int, path, fix)
    shape, shards = require(meta, "shape", list, path, fix), require(meta, "shards", list, path, fix)
    counts = lambda xs: all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)  # noqa: E731
    if d < 1:
        raise BadFile(path, f"'d' must be a positive int (the activation width), got {d}", fix)
    if len(shape) != 2 or not counts(shape) or shape[1] != d:
        raise BadFile(path, f"'shape' must be [rows, d={d}], got {shape!r}", fix)
    if not counts(shards) or sum(shards) != shape[0]:
        raise BadFile(path, f"'shards' must be row counts adding up to shape[0]={shape[0]}, got {shards!r}", fix)
    check_meta_matches_key(Path(directory), meta, path, fix)
    return meta


KEY_FIELDS = ("model", "layer", "dataset", "tokens", "context", "rank", "world", "lm_dtype", "store_dtype")


def check_meta_matches_key(directory: Path, meta: dict, path: Path, fix: str) -> None:
    """A store collected by aosae sits in a directory named by the hash of its settings (store_key):
    meta.json's settings must hash to that name, its dtype be its store_dtype and its rows its tokens.
    Else meta.json was edited (a dtype or width that reads the shards as other numbers) or the store
    was copied under another store's name (training would read another model's or layer's activations).
    Stores written elsewhere (other names, other fields) are not checked."""
    name = directory.name
    if not all(k in meta for k in KEY_FIELDS) or len(name) != 20 or any(c not in "0123456789abcdef" for c in name):
        return
    if meta["dtype"] != meta["store_dtype"]:
        raise BadFile(path, f"'dtype' is {meta['dtype']!r} but 'store_dtype' is {meta['store_dtype']!r}: the shards "
                      "would be read as other numbers (edited?)", fix)
    if meta["tokens"] != meta["shape"][0]:
        raise BadFile(path, f"'shape' {meta['shape']} holds {meta['shape'][0]} rows but the store collected "
                      f"'tokens' {meta['tokens']} (edited?)", fix)
    if store_key(**{k: meta[k] for k in KEY_FIELDS}) != name:
        shown = ", ".join(f"{k}={meta[k]!r}" for k in ("model", "layer", "dataset", "tokens", "context"))
        raise BadFile(path, f"its settings ({shown}, ...) do not hash to the store's directory name {name}: meta.json "
                      "was edited, or the store was copied under another store's name", fix)


class StoreIncomplete(ValueError):
    """The store has no meta.json: its collection did not finish."""


class StoreWarning(UserWarning):
    """An interrupted collection cannot be resumed from its progress.json and starts over."""


def _progress_ok(state: dict) -> bool:
    shards, windows = state.get("shards"), state.get("windows")
    return (isinstance(shards, list) and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in shards)
            and isinstance(windows, int) and not isinstance(windows, bool) and windows >= 0)


class StoreWriter:
    """Append rows to a store, shard by shard, resuming an interrupted collection.

    `windows_done` / `rows_done` say where the LM must restart: the text windows (and rows)
    covered by the shards already closed. Rows are only committed when their shard closes."""

    def __init__(self, directory: Path, d: int, dtype: str, meta: dict):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        self.directory, self.d, self.dtype = Path(directory), d, dtype
        self.torch_dtype = STORE_DTYPES[dtype]
        self.meta = {**meta, "format": FORMAT, "d": d, "dtype": dtype}
        self.max_rows = shard_rows(d, dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "meta.json").unlink(missing_ok=True)  # rewriting a store: it is incomplete until finish()
        self.shards: list[int] = []
        self.windows_done = 0
        progress = self.directory / "progress.json"
        if progress.is_file():
            try:
                state = json.loads(progress.read_text())
            except (OSError, ValueError):
                state = None
            if isinstance(state, dict) and state.get("meta") == self.meta and _progress_ok(state):
                self.shards, self.windows_done = list(state["shards"]), int(state["windows"])
            elif state is not None or progress.stat().st_size:
                warnings.warn(f"{progress} is damaged or belongs to other settings: collecting {self.directory} "
                              "from the start", StoreWarning, stacklevel=2)
        # anything past the committed shards is a partial shard of a killed run (or a different store)
        for path in self.directory.glob("shard_*.bin"):
            if int(path.stem.split("_")[1]) >= len(self.shards):
                path.unlink()
        for i, rows in enumerate(self.shards):
            path = self._shard_path(i)
            if not path.is_file() or path.stat().st_size != rows * d * self.torch_dtype.itemsize:
                raise ValueError(f"{path} does not match {progress}; delete {self.directory} to rebuild the store")
        self.resumed = bool(self.shards)
        self._file = None
        self._rows, self._pending_windows = 0, 0

    @property
    def rows_done(self) -> int:
        return sum(self.shards)

    def _shard_path(self, i: int) -> Path:
        return self.directory / f"shard_{i:05d}.bin"

    def append(self, acts: torch.Tensor, windows: int) -> None:
        """Write acts [n, d] (any float dtype) produced from `windows` more text windows."""
        if acts.dim() != 2 or acts.shape[1] != self.d:
            raise ValueError(f"expected activations [n, {self.d}], got {tuple(acts.shape)}")
        out = acts.to(self.torch_dtype).contiguous()
        if not bool(torch.isfinite(out).all()):  # a store of NaN/Inf would only be refused when read
            if bool(torch.isfinite(acts).all()):
                raise ValueError("activations overflow float16 (|x| > 65504): use --store-dtype bfloat16 or float32")
            raise ValueError(f"the model's activations hold NaN/Inf (layer {self.meta.get('layer')} of "
                             f"{self.meta.get('model')}, collecting {self.directory}): use --dtype float32 "
                             "(a half-precision LM can overflow), or check the model's weights")
        if self._file is None:
            self._file = open(self._shard_path(len(self.shards)), "wb")
        self._file.write(out.view(_TORCH_RAW[out.element_size()]).numpy().data)  # the tensor's own buffer: no extra copy
        self._rows += out.shape[0]
        self._pending_windows += windows
        if self._rows >= self.max_rows:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards.append(self._rows)
        self.windows_done += self._pending_windows
        self._rows, self._pending_windows = 0, 0
        tmp = self.directory / "progress.json.tmp"
        write_json(tmp, {"meta": self.meta, "shards": self.shards, "windows": self.windows_done})
        os.replace(tmp, self.directory / "progress.json")

    def finish(self) -> "ActivationStore":
        """Close the last shard and write meta.json: from here on the store is complete and read-only."""
        self._close_shard()
        n = self.rows_done
        write_json(self.directory / "meta.json.tmp", {**self.meta, "complete": True, "shape": [n, self.d],
                                                      "shards": self.shards, "windows": self.windows_done})
        os.replace(self.directory / "meta.json.tmp", self.directory / "meta.json")
        fsync_path(self.directory)
        (self.directory / "progress.json").unlink(missing_ok=True)
        return ActivationStore.open(self.directory)

    def close(self) -> None:
        """Drop the uncommitted partial shard (on an error); committed shards stay for a resume."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._shard_path(len(self.shards)).unlink(missing_ok=True)


class ActivationStore:
    """A complete store, read through memory maps: `read(start, stop)` -> [stop − start, d] rows."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = Path(directory), meta
        self.n_tokens, self.d = meta["shape"]
        self.dtype = STORE_DTYPES[meta["dtype"]]
        self.rows = list(meta["shards"])
        self.starts = [0]
        for r in self.rows:
            self.starts.append(self.starts[-1] + r)
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ActivationStore":
        """Open a complete store; StoreIncomplete if its collection did not finish, ValueError if damaged."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if directory.exists() and not directory.is_dir():
            raise BadFile(directory, "is a file, not an activation store directory",
                          "pass the store's directory (it holds meta.json and shard_*.bin), or move the file aside")
        if not directory.exists():  # StoreIncomplete all the same: open_store collects it
            raise StoreIncomplete(f"{directory} does not exist: no activation store there yet; `aosae train` collects "
                                  "it (pass the directory of a collected store to open one)")
        found = sorted(p.name for p in directory.iterdir())
        if found and not any(name.startswith(("meta.json", "progress.json", "shard_", "texts.json")) for name in found):
            # files, none of a store's (an empty directory is a collection killed at its start): never "delete it"
            raise BadFile(directory, f"is not an activation store: it has no meta.json and no shard_*.bin (it holds "
                          f"{names_listed(found)})", "pass a store's directory (one under --cache-dir, named by a hash)")
        if not meta_path.is_file():
            raise StoreIncomplete(f"{directory} is not a complete activation store (no meta.json: its collection "
                                  "was interrupted); `aosae train` resumes it, or delete the directory")
        meta = read_meta(directory)
        itemsize = STORE_DTYPES[meta["dtype"]].itemsize
        for i, rows in enumerate(meta["shards"]):
            path = directory / f"shard_{i:05d}.bin"
            size = path.stat().st_size if path.is_file() else -1
            if size != rows * meta["d"] * itemsize:
                found = "is missing" if size < 0 else f"has {size} bytes"
                raise BadFile(path, f"the activation store is damaged: {path.name} {found}, its meta.json says "
                              f"{rows * meta['d'] * itemsize}", f"delete {directory} and the next `aosae train` collects it again")
        store = cls(directory, meta)
        store.check_values()
        return store

    def check_values(self, full_bytes: Optional[int] = None, chunk_rows: int = 1 << 14) -> None:
        """BadFile naming the shard and row if a value is NaN/Inf (flipped bytes; a shard of another
        dtype reads as garbage with NaN/Inf all over it). A store of at most `full_bytes` is read whole
        (0.8 s for the default 230 MB store on 2 shared cores); a larger one has the head and tail rows of each shard read here, and
        every row is checked again whenever it is read (`read`), so no NaN reaches training either way."""
        total = self.n_tokens * self.d * self.dtype.itemsize
        if total <= (FULL_CHECK_BYTES if full_bytes is None else full_bytes):
            spans = [(a, min(a + chunk_rows, self.n_tokens)) for a in range(0, self.n_tokens, chunk_rows)]
        else:
            spans = [span for a, b in zip(self.starts, self.starts[1:])
                     for span in ((a, min(b, a + 256)), (max(a, b - 256), b))]
        try:
            for a, b in spans:
                self.read(a, b)
        finally:
            self.close()

    def _map(self, i: int) -> tuple[mmap.mmap, np.ndarray]:
        if i not in self._maps:
            with open(self.directory / f"shard_{i:05d}.bin", "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # raw integer view of the rows: numpy copies out of a read-only map at memcpy speed
            self._maps[i] = (mm, np.frombuffer(mm, dtype=_RAW[self.dtype.itemsize]).reshape(self.rows[i], self.d))
        return self._maps[i]

    def read(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [start, stop) as a tensor in the storage dtype (a copy: into `out` when given)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) outside the store's {self.n_tokens}")
        if out is None:
            out = torch.empty(stop - start, self.d, dtype=self.dtype)
        raw = out.view(_TORCH_RAW[self.dtype.itemsize]).numpy()
        row_bytes = self.d * self.dtype.itemsize
        pos = start
        while pos < stop:
            i = bisect.bisect_right(self.starts, pos) - 1  # the shard holding row `pos`
            a, b = pos - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            mm, rows = self._map(i)
            raw[pos - start : pos - start + b - a] = rows[a:b]
            self._check_finite(out[pos - start : pos - start + b - a], i, a)
            lo = (a * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, lo, b * row_bytes - lo)  # keep RSS flat: the page cache still has them
            pos += b - a
        return out

    def _check_finite(self, rows: torch.Tensor, shard: int, first: int) -> None:
        """BadFile naming the shard when rows read from it hold NaN/Inf: flipped bytes, a shard of
        another dtype, or a store edited by hand. Checked on every read (one pass over rows already in
        memory), so a damaged store stops the run before it trains on, or scales by, a NaN."""
        if bool(torch.isfinite(torch.linalg.vector_norm(rows, float("inf")))):  # max |x|: one pass, no mask
            return
        bad = ~torch.isfinite(rows)
        r, c = (int(v) for v in bad.nonzero()[0])
        path = self.directory / f"shard_{shard:05d}.bin"
        raise BadFile(path, f"the activation store is damaged: row {first + r} of {path.name} holds "
                      f"{float(rows[r, c])} at column {c} (activations must be finite; damaged bytes, or a "
                      f"shard not written as {self.meta['dtype']})",
                      f"delete {self.directory} and the next `aosae train` collects it again")

    def close(self) -> None:
        self._maps.clear()

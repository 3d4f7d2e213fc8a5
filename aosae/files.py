"""Files, written crash-safe and read checked.

Writes: a file or directory is either the old complete one or the new one (saved SAEs,
checkpoints, caches), so an interrupted run loses nothing it had; tensor files carry a checksum.
Reads: every way a file can be wrong (missing, empty, cut short, not the format, wrong types,
a checksum that no longer matches) is one BadFile naming the file and what to do.
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


def write_json_atomically(path: Path, obj) -> None:
    """write_json through a temp file and a rename: a crash leaves the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_json(tmp, obj)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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

    os.replace cannot replace a non-empty directory, so the old one is first renamed aside
    to a fresh hidden name (never a fixed one like `target.old`: that could be the user's own
    directory, which must not be deleted); at every instant either the old or the new complete
    directory exists. Callers must only use this on a `target` that holds nothing but what
    they wrote (a checkpoint, an export): everything in the old one is deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old", dir=target.parent))
        os.rmdir(old)  # only the unique name is wanted: os.replace needs it absent
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def replace_file_atomically(path: str | os.PathLike, write) -> Path:
    """write(tmp) into a temp file beside `path`, fsync'd, then os.replace it over `path`:
    a crash leaves the old file or the new one, whole, and nothing else in the directory is touched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


# ------------------------------------------------------------------ reading files the user hands us
# Every way a file can be wrong becomes one BadFile whose message names the file, what is wrong
# and what to do: the CLI prints it as one line, the Python API raises it (a ValueError).


def names_listed(names, shown: int = 5) -> str:
    """What a directory holds, for a message: the first `shown` names, then how many more."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


class BadFile(ValueError):
    """A file cannot be used. str(err) = "<path>: <what is wrong>; <what to do>"."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path}: {problem}; {fix}")


class MissingFile(BadFile, FileNotFoundError):
    """A file that should be there is not (also a FileNotFoundError)."""


def read_bytes(path: str | os.PathLike, fix: str) -> bytes:
    """The file's bytes; MissingFile / BadFile if it is absent, a directory, unreadable or empty."""
    path = Path(path)
    if path.is_dir():
        raise BadFile(path, "is a directory, not a file", fix)
    if not path.exists():
        raise MissingFile(path, "does not exist", fix)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadFile(path, f"cannot be read ({err.strerror or err})", fix) from err
    if not data:
        raise BadFile(path, "is empty (0 bytes)", fix)
    return data


def read_json(path: str | os.PathLike, fix: str, *, kind: type = dict):
    """A JSON file holding a `kind` (an object by default), or BadFile saying what is wrong with it."""
    path = Path(path)
    data = read_bytes(path, fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadFile(path, f"is not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x}: damaged or "
                      "not a JSON file)", fix) from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        cut = " (the file ends early: cut short?)" if err.pos >= len(text.rstrip()) else ""
        raise BadFile(path, f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}{cut}", fix) from err
    if not isinstance(obj, kind):
        raise BadFile(path, f"holds a JSON {_json_type(obj)}, expected a JSON {_json_type(kind())}", fix)
    return obj


def read_jsonl(path: str | os.PathLike, fix: str) -> list[dict]:
    """A JSON-lines file of objects (blank lines skipped), or BadFile naming the first bad line."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        return []
    data = read_bytes(path, fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadFile(path, f"is not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x}: damaged?)", fix) from err
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadFile(path, f"line {number} is not valid JSON ({err.msg})", fix) from err
        if not isinstance(row, dict):
            raise BadFile(path, f"line {number} holds a JSON {_json_type(row)}, expected an object", fix)
        rows.append(row)
    return rows


def _json_type(obj) -> str:
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"),
                       ((int, float), "number")):
        if isinstance(obj, kind):
            return name
    return "null" if obj is None else type(obj).__name__


def require(obj: dict, key: str, kinds, path: str | os.PathLike, fix: str, *, optional: bool = False):
    """obj[key], checked to be one of `kinds` (a type or tuple; bool is never taken for int/float)."""
    if key not in obj:
        if optional:
            return None
        raise BadFile(path, f"has no {key!r} (keys: {', '.join(map(repr, obj)) or 'none'})", fix)
    value = obj[key]
    if value is None and optional:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("number" if k is float else k.__name__ for k in kinds)
        raise BadFile(path, f"{key!r} must be {names}, got {value!r} ({_json_type(value)})", fix)
    return value


# ------------------------------------------------------------------ checksummed tensor files
# safetensors checks its header but not its data: a flipped byte in a tensor loads silently as a
# different number. aosae records a sha256 of the tensors in the file's own metadata (SAELens and
# plain safetensors readers ignore it) and checks it on load; files without one load unchecked.
CHECKSUM_KEY = "aosae_sha256"


def tensors_sha256(tensors: dict) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + b"\0" + str(tuple(tensors[name].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict) -> None:
    """safetensors file with a checksum of its tensors, fsync'd."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={CHECKSUM_KEY: tensors_sha256(tensors)})
    fsync_path(Path(path))


def load_tensors(path: str | os.PathLike, fix: str, device: str = "cpu", *, verify: bool = True) -> dict:
    """Every tensor of a safetensors file, or BadFile: missing, empty, cut short, not safetensors,
    or (when it records one, and verify) not matching its checksum. verify=False lets a caller
    name a missing or misshapen tensor first, then call verify_tensors."""
    from safetensors import safe_open

    path = Path(path)
    data = read_bytes(path, fix)
    if len(data) < 8:
        raise BadFile(path, f"is cut short ({len(data)} bytes; a safetensors file starts with an 8-byte header size)", fix)
    header = int.from_bytes(data[:8], "little")
    if header > len(data) - 8:
        raise BadFile(path, f"is cut short or not a safetensors file (its header claims {header} bytes, the file "
                      f"has {len(data) - 8} after the size)", fix)
    check_tensor_lengths(path, data, header, fix)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error type, and torch device errors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        problem = "is cut short" if "not fully covered" in first else "is not a readable safetensors file"
        raise BadFile(path, f"{problem} ({first})", fix) from err
    if verify:
        verify_tensors(path, fix, tensors, metadata)
    return tensors


def check_tensor_lengths(path: Path, data: bytes, header: int, fix: str) -> None:
    """The file's length against what its header describes: fewer bytes is a file cut short, more
    is bytes appended after the last tensor (a copy or a download gone wrong). A header that is not
    JSON is left to safetensors' own reader."""
    try:
        entries = json.loads(data[8:8 + header].decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return
    want, have = max(ends, default=0), len(data) - 8 - header
    if have < want:
        raise BadFile(path, f"is cut short: its header describes {want} bytes of tensors, the file holds {have} "
                      f"({len(data)} bytes in all, {want - have} missing)", fix)
    if have > want:
        raise BadFile(path, f"has {have - want} unexpected trailing bytes after its last tensor (the header describes "
                      f"{8 + header + want} bytes, the file has {len(data)}): bytes were appended or two files joined",
                      fix)


def verify_tensors(path: str | os.PathLike, fix: str, tensors: dict, metadata: dict | None = None) -> None:
    """BadFile if the file records a checksum (save_tensors) that `tensors`, read from it, do not match."""
    if metadata is None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise BadFile(path, "its tensors do not match the checksum recorded when it was saved (the file was "
                      "damaged or changed afterwards)", fix)


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check_file_digests(directory: str | os.PathLike, digests: dict, fix: str) -> None:
    """BadFile for the first file in `digests` ({name: sha256}) that is missing or has changed."""
    for name, want in digests.items():
        path = Path(directory) / name
        if not path.is_file():
            raise MissingFile(path, "does not exist", fix)
        if file_sha256(path) != want:
            raise BadFile(path, "does not match the checksum recorded when it was written (damaged or changed since)", fix)

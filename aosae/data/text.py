"""Text sources and tokenisation into fixed-length context windows.

Default source ("stdlib"): every Python install's standard library sources (code) and
`pydoc_data.topics` (English prose), as documents in a fixed, seeded order. Any other
name is handed to `datasets.load_dataset`: a local .txt/.json/.jsonl/.parquet/.csv file,
a local dataset directory, or a hub name (streamed).
"""
from __future__ import annotations

import itertools
import random
import sysconfig
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from aosae.machine import hub_offline, hub_reachable

DEFAULT_DATASET = "stdlib"
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def stdlib_documents(seed: int = 0) -> list[str]:
    """Standard-library .py sources + pydoc topics, shuffled with a fixed seed so that a
    small token budget still sees a mix of code and prose (and the same mix every run)."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    topics = pydoc_data.topics.topics
    docs.extend(topics[k] for k in sorted(topics))
    random.Random(seed).shuffle(docs)
    return docs


class DatasetColumnWarning(UserWarning):
    """The dataset has no 'text' column: another column is read instead (the message names it)."""


def _column_types(columns: list, features) -> str:
    if features is None:
        return ", ".join(map(repr, columns)) or "none"
    return ", ".join(f"{c!r} ({getattr(features.get(c), 'dtype', type(features.get(c)).__name__)})" for c in columns) or "none"


def find_text_column(columns: Iterable[str], features=None, name: str = "the dataset") -> str:
    """'text' if present, else the only string column (with a DatasetColumnWarning naming it);
    a ValueError naming the columns found otherwise."""
    columns = list(columns)
    if "text" in columns:
        return "text"
    strings = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")] \
        if features is not None else []
    if len(strings) == 1:
        warnings.warn(f"{name} has no 'text' column; reading its only string column {strings[0]!r} "
                      f"(columns: {_column_types(columns, features)})", DatasetColumnWarning, stacklevel=3)
        return strings[0]
    why = "several string columns" if len(strings) > 1 else "no string column"
    raise ValueError(
        f"{name} has no 'text' column and {why} to read instead (columns: {_column_types(columns, features)}); "
        "rename the text column to 'text'"
    )


def _looks_like_data(name: str) -> bool:
    """A CSV column name that is really a first row of data: a number, a sentence, or empty."""
    name = str(name).strip()
    if not name or name.startswith("Unnamed:"):
        return True
    try:
        float(name)
        return True
    except ValueError:
        return len(name.split()) >= 3 or len(name) > 40


def _check_csv_header(dataset: str, columns: list) -> None:
    """A CSV file without a header row: its first row of text became the column names."""
    if any(_looks_like_data(c) for c in columns):
        shown = ", ".join(repr(str(c))[:50] for c in columns[:4])
        raise ValueError(f"dataset {dataset} seems to have no header row: its first line became the column names ({shown}); "
                         "add a first line naming the columns, with the text column named 'text' (for one column of "
                         "text, the line `text`), or use a .txt file with one document per line")


def _check_csv_rows(path: Path, rows: int = 100) -> None:
    """A CSV row with more fields than its header (a trailing comma, an unquoted comma in the text):
    pandas reads the extra leading fields as row labels and shifts every column, so 'text' silently
    holds another field. ValueError naming the line, before any row is read."""
    import csv

    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            for record in itertools.islice(reader, rows):
                if len(record) > len(header):
                    raise ValueError(
                        f"{path}: line {reader.line_num} has {len(record)} fields but the header line names "
                        f"{len(header)} ({', '.join(map(repr, header[:6]))}): its columns would be read shifted, with "
                        "the wrong field as 'text'; quote fields that hold commas (\"...\"), drop trailing commas, "
                        "or name every column in the header")
    except (OSError, csv.Error):  # unreadable: load_dataset reports it in its own words
        return


def _saved_to_disk(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (read with load_from_disk, not load_dataset)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _saved_without_rows(path: Path) -> bool:
    """A save_to_disk directory whose state.json lists no data files (an empty dataset: load_from_disk fails)."""
    import json

    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps pyarrow's precise message in a vague one)."""
    for _ in range(10):
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            break
        err = inner
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_utf8(path: Path, block: int = 1 << 24) -> None:
    """A text file must be UTF-8: pyarrow's JSON reader would otherwise read damaged bytes as U+FFFD."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: byte {done + max(err.start, 0)} is not UTF-8 (a damaged file, or another "
                                 "encoding); re-save the file as UTF-8") from err
            if not data:
                return
            done += len(data)


@contextmanager
def _quiet_datasets():
    """The `datasets` library's own log lines and progress bars ('Generating train split', 'Failed to
    read file ...') off while aosae reads a dataset: what goes wrong is aosae's one line."""
    try:
        from datasets import utils as ds_utils
        from datasets.utils import logging as ds_logging

        verbosity, bars_off = ds_logging.get_verbosity(), ds_utils.are_progress_bars_disabled()
    except (ImportError, AttributeError):
        yield
        return
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)  # its 'Failed to read file' lines are errors: above those
    ds_utils.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars_off:
            ds_utils.enable_progress_bars()


def _no_rows(path: Path, builder: str) -> Optional[str]:
    """What an empty data file holds instead of rows (a header line only, blank lines, an empty JSON
    array, a parquet file of 0 rows); None if it has rows or cannot be read (the loader says why)."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            return None if meta.num_rows else f"a parquet file of 0 rows (columns: {', '.join(map(repr, meta.schema.names))})"
        with open(path, encoding="utf-8") as f:
            lines = []
            for line in f:
                if line.strip():
                    lines.append(line.strip())
                    if len(lines) > 1:
                        return None
    except Exception:  # noqa: BLE001 - unreadable: load_dataset reports it in its own words
        return None
    if not lines:
        return "only blank lines"
    if builder == "json" and lines[0][:1] not in "{[":  # a bare number, string, true or null: no rows at all
        import json

        try:
            value = json.loads("\n".join(lines)) if len(lines) == 1 else None
        except ValueError:
            value = None
        if value is not None or lines[0] == "null":
            kind = {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), "null")
            return f"a single JSON {kind} ({lines[0][:40]}), not rows (one {{\"text\": ...}} object per line, or an array of them)"
    if builder == "csv":
        return f"a header line only ({lines[0][:80]!r})"
    if builder == "json" and lines[0].replace(" ", "") in ("[]", "{}"):
        return f"an empty JSON {'array' if lines[0].startswith('[') else 'object'}"
    return None


def _check_json_lines(path: Path, lines: int = 20) -> None:
    """A JSON-lines file whose first lines are not objects (bare numbers, strings, arrays of values):
    named by line, not pyarrow's 'Trailing data at position N'. A JSON array file is left to the reader."""
    import json

    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16)
    rows = [(n, line.strip()) for n, line in enumerate(head.splitlines(), 1) if line.strip()][:lines]
    if len(rows) < 2 or rows[0][1].startswith("["):
        return
    for number, line in rows[:-1]:  # the last may be cut by the 64 KiB read
        try:
            value = json.loads(line)
        except ValueError:
            continue  # an object spread over lines (pretty-printed), or a damaged line: the reader says which
        if not isinstance(value, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object ({line[:40]}); each line of a .jsonl/.json "
                             "file must be one object such as {\"text\": \"...\"}")


SPLIT_WORDS = {"test", "testing", "eval", "evaluation", "validation", "valid", "val", "dev"}


def _file_columns(path: Path, builder: str) -> Optional[dict]:
    """{column: type} of a data file, read cheaply (a parquet schema, a CSV header, the first 100 JSON
    rows); None if it cannot be read that way (the loader then says what is wrong with it)."""
    import itertools

    try:
        if builder == "text":
            return {"text": "string"}
        if builder == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            return {name: str(schema.field(name).type).replace("large_", "") for name in schema.names}
        if builder == "csv":
            import csv

            with open(path, encoding="utf-8", newline="") as f:
                return {name: "string" for name in next(csv.reader(f), [])}
        import json

        with open(path, encoding="utf-8") as f:
            head = f.read(1).strip() or f.read(64).lstrip()[:1]
            f.seek(0)
            rows = json.load(f) if head == "[" else [json.loads(line) for line in itertools.islice(
                (line for line in f if line.strip()), 100)]
        columns: dict = {}
        for row in rows[:100] if isinstance(rows, list) else []:
            for key, value in row.items() if isinstance(row, dict) else ():
                if value is not None and columns.get(key) in (None, "null"):
                    columns[key] = {str: "string", bool: "bool", int: "number", float: "number"}.get(type(value), type(value).__name__)
                columns.setdefault(key, "null")
        return columns
    except Exception:  # noqa: BLE001
        return None


def _check_directory_files(directory: Path, split: str) -> None:
    """A local dataset directory's data files (those load_dataset reads for `split`: the most common
    format) must share their columns: else `datasets` fails mid-read with 'Couldn't cast' naming no file,
    or, when few tokens are asked for, silently reads only the first file. ValueError naming each
    file's columns."""
    import re
    from collections import Counter

    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix.lower() in _BUILDERS
             and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)]
    if not files:
        found = sorted(p.name for p in directory.iterdir())[:5]
        raise ValueError(f"dataset {directory} is a directory without data files (no {'/'.join(sorted(_BUILDERS))} file; "
                         f"it holds {', '.join(map(repr, found)) or 'nothing'}): pass a data file, or a directory of them")
    builder = Counter(_BUILDERS[p.suffix.lower()] for p in files).most_common(1)[0][0]
    files = [p for p in files if _BUILDERS[p.suffix.lower()] == builder]
    words = {p: set(re.split(r"[^a-z0-9]+", str(p.relative_to(directory)).lower())) for p in files}
    if any(w & (SPLIT_WORDS | {"train", "training"}) for w in words.values()):  # named splits: only this one's files
        wanted = {"train", "training"} if split == "train" else {split}
        named = files
        files = [p for p in files if words[p] & wanted]
        if not files:
            shown = ", ".join(str(p.relative_to(directory)) for p in named[:5])
            raise ValueError(f"dataset {directory} has no file for the {split!r} split: its files are named for other "
                             f"splits ({shown}); name the file with the training text {split}{named[0].suffix}, or "
                             "pass that file itself as --dataset")
    if builder == "csv":
        for p in files:
            _check_csv_rows(p)
    groups: dict = {}
    for p in files:
        columns = _file_columns(p, builder)
        if columns is not None:
            groups.setdefault(tuple(sorted(columns.items())), []).append(p)
    if len(groups) < 2:
        return
    parts = []
    for columns, paths in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(paths) - 1} more file(s)" if len(paths) > 1 else ""
        parts.append(f"{paths[0]}{more}: {', '.join(f'{c!r} ({t})' for c, t in columns) or 'no columns'}")
    raise ValueError(f"dataset {directory}: its {builder} files do not all have the same columns ({'; '.join(parts)}); "
                     "give every file the same columns, with the text in 'text' (or pass one file as --dataset)")


class Texts:
    """Documents (str) of a dataset in a deterministic order (an iterator; see iter_texts).

    Counts what it yields, so that a dataset with too little text can say how much it had:
    `describe()` names the dataset, the column read and the documents seen so far."""

    def __init__(self, dataset: Optional[str], split: str = "train", streaming: Optional[bool] = None):
        self.dataset, self.split, self.streaming = dataset, split, streaming
        self.column: Optional[str] = None
        self.documents = 0
        self.skipped = 0  # rows whose column held something other than a string
        self.skipped_example: Optional[str] = None
        self._rows: Optional[Iterator[str]] = None

    @property
    def name(self) -> str:
        return "the standard-library corpus" if self.dataset in (None, DEFAULT_DATASET) else f"dataset {self.dataset}"

    def describe(self) -> str:
        column = f", column {self.column!r}" if self.column not in (None, "text") else ""
        skipped = "" if not self.skipped else (f", {self.skipped} rows skipped whose {self.column!r} is not a string "
                                               f"(e.g. {self.skipped_example})")
        return f"{self.name} ({self.documents} non-empty documents{column}{skipped})"

    def __iter__(self) -> "Texts":
        return self

    def __next__(self) -> str:
        with _quiet_datasets():
            if self._rows is None:
                self._rows = self._open()
            try:
                text = next(self._rows)
            except StopIteration:
                raise
            except Exception as err:  # datasets/pyarrow read errors of a damaged file, raised while iterating
                raise ValueError(f"{self.dataset}: cannot be read ({_first_line(err)}); check or replace the "
                                 "file") from err
        self.documents += 1
        return text

    def _open(self) -> Iterator[str]:
        if self.dataset is None or self.dataset == DEFAULT_DATASET:
            return iter(stdlib_documents())
        ds = self._load()
        features = getattr(ds, "features", None)
        columns = list(features) if features is not None else list(getattr(ds, "column_names", None) or [])
        if not columns:  # streaming datasets without declared features: peek at the first row
            first = next(iter(ds), None)
            if first is None:
                raise ValueError(f"{self.name} has no rows; pass a dataset with text")
            columns = list(first)
        if Path(self.dataset).suffix.lower() == ".csv" and "text" not in columns:
            _check_csv_header(self.dataset, columns)
        self.column = find_text_column(columns, features, self.name)
        dtype = getattr(features.get(self.column), "dtype", None) if features is not None else None
        if dtype is not None and dtype not in ("string", "large_string"):  # e.g. a numeric 'text' column
            raise ValueError(f"{self.name}: its {self.column!r} column holds {dtype} values, not text (columns: "
                             f"{_column_types(columns, features)}); pass a dataset whose 'text' column holds "
                             "strings (rename the column with the text to 'text')")
        return self._strings(ds)

    def _strings(self, ds) -> Iterator[str]:
        """The column's non-empty strings; other values are counted (and named by describe())."""
        for row in ds:
            value = row[self.column]
            if isinstance(value, str):
                if value:
                    yield value
            elif value is not None:
                self.skipped += 1
                if self.skipped_example is None:
                    self.skipped_example = f"{type(value).__name__} {value!r}"[:60]

    def _load(self):
        import datasets

        dataset, path = self.dataset, Path(self.dataset)
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"unsupported file type {path.suffix!r} for {dataset}; use one of {sorted(_BUILDERS)}")
            if path.stat().st_size == 0:
                raise ValueError(f"{dataset}: the file is empty; pass a file with text")
            if builder != "parquet":
                _check_utf8(path)
            empty = _no_rows(path, builder)
            if empty is not None:
                raise ValueError(f"{dataset} has no rows: it holds {empty}; pass a file with rows of text")
            if builder == "json":
                _check_json_lines(path)
            if builder == "csv":
                _check_csv_rows(path)
            try:
                return datasets.load_dataset(builder, data_files=str(path), split=self.split,
                                             streaming=bool(self.streaming))
            except Exception as err:  # pyarrow / datasets raise many types for a malformed file
                raise ValueError(f"{dataset}: cannot be read as a {path.suffix} file ({_first_line(err)}); check the "
                                 "file (a cut or damaged file?) or convert it to .jsonl rows with a 'text' field") from err
        if _saved_to_disk(path):
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as err:
                if _saved_without_rows(path):
                    raise ValueError(f"{dataset} has no rows: it is a dataset saved with save_to_disk with no data "
                                     "files; pass a dataset with rows of text") from err
                raise ValueError(f"{dataset}: cannot be read as a dataset saved with save_to_disk ({_first_line(err)}); "
                                 "save it again, or pass its data as a .jsonl/.parquet file") from err
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise ValueError(f"{dataset} has no {self.split!r} split (splits: {', '.join(ds)}); save the "
                                     f"training text as the {self.split!r} split (or save that split alone with "
                                     "save_to_disk)")
                ds = ds[self.split]
            return ds
        if path.is_dir():
            _check_directory_files(path, self.split)
        if not path.exists() and (hub_offline("DATASETS") or not hub_reachable()):
            raise ValueError(f"dataset {dataset!r} is neither a local file or directory nor reachable: the Hugging "
                             "Face hub is offline here; pass a local .txt/.json/.jsonl/.parquet/.csv file")
        try:
            return datasets.load_dataset(dataset, split=self.split, streaming=True if self.streaming is None else self.streaming)
        except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise ValueError(f"cannot load dataset {dataset!r}: {_first_line(err)}") from err


def iter_texts(dataset: Optional[str] = None, *, split: str = "train", streaming: Optional[bool] = None) -> Texts:
    """Documents (str) from `dataset` (see module docstring) in a deterministic order: an iterator
    that opens the dataset on the first next() and can describe() what it has read."""
    return Texts(dataset, split, streaming)


def describe_texts(texts) -> str:
    """What `texts` held so far, for messages ('the text' when it is a plain iterable)."""
    return texts.describe() if isinstance(texts, Texts) else "the text"


def token_windows(
    texts: Iterable[str], tokenizer, context: int = 128, *, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Pack tokenised documents into windows [context] = BOS + (context − 1) tokens.

    Documents are joined with the EOS token. Window i goes to rank i % world_size so
    that each DDP rank reads its own shard of the token stream.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 (BOS + at least one token), got {context}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start each context window")
    eos = tokenizer.eos_token_id
    body = context - 1
    pending: list[int] = []
    index = total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        total += len(ids)
        pending.extend(ids)
        if eos is not None:
            pending.append(eos)
        while len(pending) >= body:
            chunk, pending = pending[:body], pending[body:]
            if index % world_size == rank:
                yield torch.tensor([bos] + chunk, dtype=torch.long)
            index += 1
    if index == 0:  # not even one window: say how much text there was against what a window needs
        raise ValueError(f"{describe_texts(texts)} holds {total} tokens, less than one {context}-token window "
                         f"(BOS + {body} tokens, documents joined by EOS): give more text, or lower --context")


def shortfall(texts, have: int, n_tokens: int) -> str:
    """The message of a dataset that ran out before n_tokens activations (BOS positions are dropped)."""
    return (f"{describe_texts(texts)} ran out after {have:,} activation tokens but --tokens asks for {n_tokens:,}: "
            f"lower --tokens to at most {have:,}, or give more text")

"""Text sources and tokenisation into fixed-length context windows.

Default source ("stdlib"): every Python install's standard library sources (code) and
`pydoc_data.topics` (English prose), as documents in a fixed, seeded order. Any other
name is handed to `datasets.load_dataset`: a local .txt/.json/.jsonl/.parquet/.csv file,
a local dataset directory, or a hub name (streamed).
"""
from __future__ import annotations

import random
import sysconfig
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from aosae.data.data_files import (BUILDERS, check_csv_header, check_csv_rows, check_directory_files, check_json_lines,
                                   check_utf8, no_rows, saved_without_rows)
from aosae.machine import hub_offline, hub_reachable

DEFAULT_DATASET = "stdlib"


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


def _saved_to_disk(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (read with load_from_disk, not load_dataset)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps pyarrow's precise message in a vague one)."""
    for _ in range(10):
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            break
        err = inner
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
            check_csv_header(self.dataset, columns)
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
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"unsupported file type {path.suffix!r} for {dataset}; use one of {sorted(BUILDERS)}")
            if path.stat().st_size == 0:
                raise ValueError(f"{dataset}: the file is empty; pass a file with text")
            if builder != "parquet":
                check_utf8(path)
            empty = no_rows(path, builder)
            if empty is not None:
                raise ValueError(f"{dataset} has no rows: it holds {empty}; pass a file with rows of text")
            if builder == "json":
                check_json_lines(path)
            if builder == "csv":
                check_csv_rows(path)
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
                if saved_without_rows(path):
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
            check_directory_files(path, self.split)
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

"""Text sources and tokenisation into fixed-length context windows.

Default source ("stdlib"): every Python install's standard library sources (code) and
`pydoc_data.topics` (English prose), as documents in a fixed, seeded order. Any other
name is handed to `datasets.load_dataset`: a local .txt/.json/.jsonl/.parquet/.csv file,
a local dataset directory, or a hub name (streamed).
"""
from __future__ import annotations

import random
import sysconfig
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


def find_text_column(columns: Iterable[str], features=None) -> str:
    """'text' if present, else the only string column; a clear ValueError otherwise."""
    columns = list(columns)
    if "text" in columns:
        return "text"
    if features is not None:
        strings = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
        if len(strings) == 1:
            return strings[0]
    raise ValueError(
        f"the dataset has no 'text' column (columns: {columns}); rename the text column to 'text' "
        "or use a dataset with exactly one string column"
    )


def iter_texts(dataset: Optional[str] = None, *, split: str = "train", streaming: Optional[bool] = None) -> Iterator[str]:
    """Yield documents (str) from `dataset` (see module docstring) in a deterministic order."""
    if dataset is None or dataset == DEFAULT_DATASET:
        yield from stdlib_documents()
        return
    import datasets

    path = Path(dataset)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"unsupported file type {path.suffix!r} for {dataset}; use one of {sorted(_BUILDERS)}")
        ds = datasets.load_dataset(builder, data_files=str(path), split=split, streaming=bool(streaming))
    else:
        if not path.exists() and (hub_offline("DATASETS") or not hub_reachable()):
            raise ValueError(f"dataset {dataset!r} is neither a local file or directory nor reachable: the Hugging "
                             "Face hub is offline here; pass a local .txt/.json/.jsonl/.parquet/.csv file")
        try:
            ds = datasets.load_dataset(dataset, split=split, streaming=True if streaming is None else streaming)
        except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise ValueError(f"cannot load dataset {dataset!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    features = getattr(ds, "features", None)
    columns = list(features) if features is not None else list(getattr(ds, "column_names", None) or [])
    if not columns:  # streaming datasets without declared features: peek at the first row
        first = next(iter(ds))
        columns = list(first)
    column = find_text_column(columns, features)
    for row in ds:
        text = row[column]
        if isinstance(text, str) and text:
            yield text


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
    index = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pending.extend(ids)
        if eos is not None:
            pending.append(eos)
        while len(pending) >= body:
            chunk, pending = pending[:body], pending[body:]
            if index % world_size == rank:
                yield torch.tensor([bos] + chunk, dtype=torch.long)
            index += 1

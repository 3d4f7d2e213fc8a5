"""What a local data file holds, checked before `datasets` reads it: a wrong file gets one line
that names it and says what to do (a header-only CSV, rows wider than their header, JSON lines that
are not objects, non-UTF-8 bytes, a directory whose files disagree on their columns), instead of the
reader's own error from deep inside pyarrow or pandas, or a silent read of the wrong column."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_like_data(name: str) -> bool:
    """A CSV column name that is really a first row of data: a number, a sentence, or empty."""
    name = str(name).strip()
    if not name or name.startswith("Unnamed:"):
        return True
    try:
        float(name)
        return True
    except ValueError:
        return len(name.split()) >= 3 or len(name) > 40


def check_csv_header(dataset: str, columns: list) -> None:
    """A CSV file without a header row: its first row of text became the column names."""
    if any(looks_like_data(c) for c in columns):
        shown = ", ".join(repr(str(c))[:50] for c in columns[:4])
        raise ValueError(f"dataset {dataset} seems to have no header row: its first line became the column names ({shown}); "
                         "add a first line naming the columns, with the text column named 'text' (for one column of "
                         "text, the line `text`), or use a .txt file with one document per line")


def check_csv_rows(path: Path, rows: int = 100) -> None:
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


def saved_without_rows(path: Path) -> bool:
    """A save_to_disk directory whose state.json lists no data files (an empty dataset: load_from_disk fails)."""
    import json

    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def check_utf8(path: Path, block: int = 1 << 24) -> None:
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


def no_rows(path: Path, builder: str) -> Optional[str]:
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


def check_json_lines(path: Path, lines: int = 20) -> None:
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


def file_columns(path: Path, builder: str) -> Optional[dict]:
    """{column: type} of a data file, read cheaply (a parquet schema, a CSV header, the first 100 JSON
    rows); None if it cannot be read that way (the loader then says what is wrong with it)."""
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


def check_directory_files(directory: Path, split: str) -> None:
    """A local dataset directory's data files (those load_dataset reads for `split`: the most common
    format) must share their columns: else `datasets` fails mid-read with 'Couldn't cast' naming no file,
    or, when few tokens are asked for, silently reads only the first file. ValueError naming each
    file's columns."""
    import re
    from collections import Counter

    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix.lower() in BUILDERS
             and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)]
    if not files:
        found = sorted(p.name for p in directory.iterdir())[:5]
        raise ValueError(f"dataset {directory} is a directory without data files (no {'/'.join(sorted(BUILDERS))} file; "
                         f"it holds {', '.join(map(repr, found)) or 'nothing'}): pass a data file, or a directory of them")
    builder = Counter(BUILDERS[p.suffix.lower()] for p in files).most_common(1)[0][0]
    files = [p for p in files if BUILDERS[p.suffix.lower()] == builder]
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
            check_csv_rows(p)
    groups: dict = {}
    for p in files:
        columns = file_columns(p, builder)
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


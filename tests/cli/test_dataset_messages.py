"""What `--dataset` says about a local dataset: the column it reads (a warning when it is not
'text'), the columns it found when none fits, and how much text there was when it runs out.
Every local format: txt, json, jsonl, parquet, csv and a directory written by save_to_disk."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from aosae.data.text import DatasetColumnWarning, iter_texts, shortfall, token_windows

DOCS = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]


def write(tmp_path, fmt: str, columns: dict) -> str:
    """A dataset of len(DOCS) rows with the given columns, in format `fmt`; its path."""
    rows = [{name: values[i] for name, values in columns.items()} for i in range(len(DOCS))]
    if fmt == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(DOCS) + "\n")
    elif fmt in ("json", "jsonl"):
        path = tmp_path / f"d.{fmt}"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        import pandas as pd

        path = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        import pandas as pd

        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


FORMATS = ["json", "jsonl", "csv", "parquet", "saved"]


@pytest.mark.parametrize("fmt", ["txt", *FORMATS])
def test_text_column_is_read_without_a_warning(tmp_path, fmt):
    path = write(tmp_path, fmt, {"text": DOCS, "id": [1, 2, 3]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetColumnWarning)
        assert list(iter_texts(path)) == DOCS


@pytest.mark.parametrize("fmt", FORMATS)
def test_another_string_column_is_read_with_a_warning_naming_it(tmp_path, fmt):
    path = write(tmp_path, fmt, {"body": DOCS, "n": [1, 2, 3]})
    with pytest.warns(DatasetColumnWarning) as caught:
        texts = iter_texts(path)
        assert list(texts) == DOCS
    message = str(caught[0].message)
    assert path in message and "'body'" in message and "'n'" in message  # the column read, and every column found
    assert "column 'body'" in texts.describe()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("columns,why", [({"a": [1, 2, 3]}, "no string column"),
                                         ({"title": DOCS, "body": DOCS}, "several string columns")])
def test_no_usable_column_names_the_columns_found(tmp_path, fmt, columns, why):
    path = write(tmp_path, fmt, columns)
    with pytest.raises(ValueError) as caught:
        next(iter_texts(path))
    message = str(caught.value)
    assert path in message and why in message and "rename the text column to 'text'" in message
    assert all(f"'{c}'" in message for c in columns)


class WordTokenizer:
    """One token per word: enough to count windows."""

    bos_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + len(w) for w in text.split()]}


@pytest.mark.parametrize("fmt", ["txt", *FORMATS])
def test_too_little_text_for_one_window_says_how_much_there_was(tmp_path, fmt):
    path = write(tmp_path, fmt, {"text": DOCS})
    with pytest.raises(ValueError) as caught:
        next(token_windows(iter_texts(path), WordTokenizer(), context=128))
    message = str(caught.value)
    # 9 words in 3 documents, against a window of BOS + 127 tokens
    assert path in message and "3 non-empty documents" in message and "holds 9 tokens" in message
    assert "128-token window" in message and "--context" in message


def test_running_out_before_tokens_says_how_far_it_got(tmp_path):
    texts = iter_texts(write(tmp_path, "jsonl", {"text": DOCS}))
    windows = list(token_windows(texts, WordTokenizer(), context=4))
    assert len(windows) == 4  # 9 words + 3 EOS = 12 tokens: 4 windows of BOS + 3
    message = shortfall(texts, have=len(windows) * 3, n_tokens=100)  # BOS positions are not kept
    assert "3 non-empty documents" in message and "ran out after 12 activation tokens" in message
    assert "--tokens asks for 100" in message and "at most 12" in message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("values,dtype", [([1, 2, 3], "int64"), ([0.5, 1.5, 2.5], "float64")])
def test_a_numeric_text_column_names_its_type_and_the_columns(tmp_path, fmt, values, dtype):
    path = write(tmp_path, fmt, {"text": values, "body": DOCS})
    with pytest.raises(ValueError) as caught:
        next(iter_texts(path))
    message = str(caught.value)
    assert path in message and f"'text' column holds {dtype} values" in message
    assert f"'text' ({dtype})" in message and "'body'" in message and "rename the column with the text to 'text'" in message


@pytest.mark.parametrize("first_line", ["The quick brown fox jumps", "12.5", "a long first document, with a comma"])
def test_a_csv_without_a_header_row_says_so(tmp_path, first_line):
    path = tmp_path / "rows.csv"
    path.write_text(first_line + "\nover the lazy dog again\nmore text here and here\n")
    with pytest.raises(ValueError) as caught:
        next(iter_texts(str(path)))
    message = str(caught.value)
    assert str(path) in message and "no header row" in message and "the line `text`" in message


def test_rows_whose_text_is_not_a_string_are_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": DOCS[i] if i < 3 else [i]}) + "\n" for i in range(5)))
    texts = iter_texts(str(path))
    try:
        docs = list(texts)
    except ValueError as err:  # the reader refuses the mixed column: it must name it
        assert str(path) in str(err)
        return
    assert docs == DOCS and "2 rows skipped whose 'text' is not a string" in texts.describe()


EMPTY = {  # a file with no rows, as each format writes it
    "csv": (lambda p: p.write_text("text\n"), "a header line only ('text')"),
    "jsonl": (lambda p: p.write_text("\n  \n\n"), "only blank lines"),
    "json": (lambda p: p.write_text("[]\n"), "an empty JSON array"),
    "parquet": (lambda p: __import__("pandas").DataFrame({"text": []}).astype(str).to_parquet(p),
                "a parquet file of 0 rows (columns: 'text')"),
}


@pytest.mark.parametrize("fmt", [*EMPTY, "saved"])
def test_a_dataset_without_rows_says_no_rows(tmp_path, fmt):
    if fmt == "saved":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": []}).save_to_disk(str(path))
        said = "no data files"
    else:
        path = tmp_path / f"d.{fmt}"
        EMPTY[fmt][0](path)
        said = EMPTY[fmt][1]
    with pytest.raises(ValueError) as caught:
        next(iter_texts(str(path)))
    message = str(caught.value)
    assert f"{path} has no rows" in message and said in message and "cannot be read" not in message


ODD_COLUMNS = [{"body": DOCS, "id": [1, 2, 3]}, {"text": DOCS, "id": [1, 2, 3]}, {"text": [1, 2, 3]}]


# an int 'text' column is a type difference, which a CSV header cannot carry: not a CSV case
@pytest.mark.parametrize("fmt,odd", [(fmt, odd) for fmt in ("jsonl", "csv", "parquet") for odd in ODD_COLUMNS
                                     if not (fmt == "csv" and odd == {"text": [1, 2, 3]})])
def test_a_directory_whose_files_have_other_columns_names_them(tmp_path, fmt, odd):
    """Each file's columns, not 'Couldn't cast' naming none (nor, with few tokens, only the first file read)."""
    directory = tmp_path / "many"
    directory.mkdir()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        first = write(tmp_path / name, fmt, {"text": DOCS} if name == "a" else odd)
        Path(first).rename(directory / f"{name}{Path(first).suffix}")
    with pytest.raises(ValueError) as caught:
        next(iter_texts(str(directory)))
    message = str(caught.value)
    assert str(directory / f"a.{fmt}") in message and str(directory / f"b.{fmt}") in message
    assert all(f"'{column}'" in message for column in odd) and "same columns" in message


def test_a_directory_without_data_files_says_so(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match="directory without data files.*'notes.md'.*pass a data file"):
        next(iter_texts(str(tmp_path)))


def test_a_directory_of_matching_files_reads_them_all(tmp_path):
    for name, docs in (("a", DOCS[:2]), ("b", DOCS[2:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d, "id": 1}) + "\n" for d in docs))
    assert sorted(iter_texts(str(tmp_path))) == sorted(DOCS)


@pytest.mark.parametrize("content, said", [
    ("42\n", "a single JSON number (42), not rows"),
    ('"some text"\n', "a single JSON string"),
    ("null\n", "a single JSON null"),
    ('42\n43\n', "line 1 is not a JSON object (42)"),
    ('{"text": "a b"}\n"c d"\n{"text": "e"}\n', "line 2 is not a JSON object (\"c d\")"),
    ('{"text": "a b"}\n[1, 2]\n{"text": "e"}\n', "line 2 is not a JSON object ([1, 2])"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_that_is_not_rows_of_objects_is_named_by_line(tmp_path, content, said, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        next(iter_texts(str(path)))
    message = str(caught.value)
    assert str(path) in message and said in message and "cannot be read" not in message


def test_pretty_printed_json_objects_still_read(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{\n  "text": "alpha beta",\n  "id": 1\n}\n')
    assert list(iter_texts(str(path))) == ["alpha beta"]


def test_a_dataset_without_a_train_split_says_how_to_give_one(tmp_path):
    import datasets

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "test.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    with pytest.raises(ValueError, match="has no file for the 'train' split.*test.jsonl.*train.jsonl"):
        next(iter_texts(str(tmp_path / "dir")))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"has no 'train' split \(splits: test\); save the training text"):
        next(iter_texts(str(tmp_path / "saved")))


@pytest.mark.parametrize("body", ["alpha beta,1,\ndelta epsilon,2,\n",  # a trailing comma on every row
                                  "alpha beta,1,extra\ndelta epsilon,2,extra\n",  # more fields than the header names
                                  "alpha, beta,1\ndelta, epsilon,2\n"])  # an unquoted comma inside the text
@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_csv_row_wider_than_its_header_is_refused_not_read_shifted(tmp_path, body, where):
    """pandas reads the extra leading fields as row labels and shifts the columns: 'text' would hold
    '1' or 'extra' for every row, trained on without a word."""
    path = tmp_path / "d.csv"
    path.write_text("text,id\n" + body)
    with pytest.raises(ValueError, match=r"d\.csv: line 2 has 3 fields but the header line names 2 \('text', 'id'\)"
                                         r".*quote fields that hold commas"):
        list(iter_texts(str(path if where == "file" else tmp_path)))


def test_a_quoted_comma_in_a_csv_still_reads(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,id\n"alpha, beta",1\n"delta\nepsilon",2\n')
    assert list(iter_texts(str(path))) == ["alpha, beta", "delta\nepsilon"]

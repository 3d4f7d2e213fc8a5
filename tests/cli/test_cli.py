"""The command line as a newcomer meets it: generated options, one-line errors, fast failures."""
from __future__ import annotations

import dataclasses
import time

import pytest

from aosae.cli import main
from aosae.data.text import iter_texts
from aosae.training.config import TrainConfig


def test_train_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name
    assert "Sequences per LM forward" in text  # help comes from the field docstrings


def test_top_level_help_lists_the_shipped_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("info", "train", "eval", "export", "ablate"):
        assert command in text


@pytest.mark.parametrize("argv", [["eval", "/no/such/run"], ["export", "/no/such/run", "--to", "saelens"]])
def test_bad_run_dir_is_one_line_not_a_traceback(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "/no/such/run" in err


def test_bad_config_value_is_one_line(capsys):
    assert main(["train", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "steps must be a positive int" in err and "Traceback" not in err


def test_unknown_hub_dataset_fails_fast_offline():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="neither a local file"):
        next(iter_texts("no-such-org/no-such-dataset"))
    assert time.perf_counter() - start < 5


def test_dataset_without_text_column_says_so(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "a", "title": "b"}\n{"body": "c", "title": "d"}\n')
    with pytest.raises(ValueError, match="no 'text' column"):
        next(iter_texts(str(path)))


def test_run_dirs_of_earlier_versions_still_load():
    cfg = TrainConfig.from_dict({"tau0": 0.1, "activation": "topk", "k": 8})
    assert cfg.tau_init == 0.1 and cfg.top_k == 8


# what the user typed -> what the one line must name (the option, what was given, what is allowed)
BAD_COMMAND_LINES = {
    "int option given a word": (["train", "--d-sae", "abc"], ["--d-sae", "'abc'", "an int"]),
    "float option given a word": (["train", "--lr", "fast"], ["--lr", "'fast'", "a number"]),
    "repeated option, the last refused": (["train", "--tokens", "2000", "--tokens", "1e3"], ["--tokens", "'1e3'", "an int"]),
    "choice not allowed": (["export", "RUN", "--to", "foo"], ["--to", "'foo'", "saelens"]),
    "literal option": (["train", "--similarity", "cos"], ["--similarity", "'cos'", "dot", "cosine"]),
    "unknown option": (["train", "--stepz", "3"], ["--stepz", "did you mean --steps"]),
    "unknown option, nothing close": (["eval", "RUN", "--frobnicate"], ["--frobnicate", "aosae eval --help"]),
    "option without its value": (["train", "--steps"], ["--steps", "needs a value"]),
    "missing positional": (["eval"], ["RUN_DIR", "aosae eval --help"]),
    "unknown command": (["trian"], ["'trian'", "train"]),
    "no command": ([], ["one of info, train"]),
    "tuple option given a word": (["eval", "RUN", "--probing-seeds", "a"], ["--probing-seeds", "'a'", "int"]),
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_a_bad_command_line_is_one_error_line(case, capsys):
    argv, named = BAD_COMMAND_LINES[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    command = argv[0] if argv and argv[0] in ("info", "train", "eval", "export", "ablate") else None
    prefix = f"aosae {command}: error: " if command else "aosae: error: "
    assert captured.err.startswith(prefix) and captured.err.count("\n") == 1, captured.err
    assert "╭" not in captured.err and "Traceback" not in captured.err and captured.out == ""
    for text in named:
        assert text in captured.err, (text, captured.err)

"""The `aosae` command line: `aosae info | train | eval | export | ablate`.

Each subcommand is a function in aosae/cli/<name>.py; tyro builds its parser from the
signature and the dataclasses it takes, and `--help` from their docstrings.
"""
from __future__ import annotations

import os
import sys
import warnings

import tyro

from aosae.cli.ablate import ablate
from aosae.cli.eval import eval as eval_command
from aosae.cli.export import export
from aosae.cli.info import info
from aosae.cli.train import train

COMMANDS = {"info": info, "train": train, "eval": eval_command, "export": export, "ablate": ablate}
# What a user can cause (a bad path, option, dataset or model, a damaged file, a missing extra, a
# diverged run, a full disk): one line on stderr, exit 2. AOSAE_DEBUG=1 shows the traceback instead.
# Damaged files raise aosae.files.BadFile (a ValueError) naming the file and what to do.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, RuntimeError)


def exit_process(code: int) -> None:
    """Ends the process with `code`. A data-parallel rank ends with os._exit once its output is
    flushed: the process group is already shut down, and the interpreter's own teardown can still
    hit a gloo/c10d thread left joinable and abort (SIGABRT) after a run that ended cleanly or with
    its error message. Single-process runs exit normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def script() -> None:
    """The `aosae` console script."""
    exit_process(main())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in args if a in COMMANDS), "aosae")
    debug = os.environ.get("AOSAE_DEBUG") == "1"
    format_before = warnings.formatwarning
    if not debug:  # a warning is one line too: what happened and what was done about it
        warnings.formatwarning = lambda message, *_args, **_kw: f"aosae {command}: warning: {message}\n"
    try:
        return int(tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="aosae", args=args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"aosae {command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = format_before

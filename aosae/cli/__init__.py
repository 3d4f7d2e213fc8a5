"""The `aosae` command line: `aosae info | train | eval | export | ablate`.

Each subcommand is a function in aosae/cli/<name>.py; tyro builds its parser from the
signature and the dataclasses it takes, and `--help` from their docstrings.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
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
# The arguments of the command being run: `aosae train --resume` tells the options it was given
# from the defaults tyro fills in (see given_options).
ARGV: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("aosae_argv", default=())


class UsageError(ValueError):
    """The command line itself is wrong (an unknown option, a value of the wrong type, a bad choice)."""


def given_options(names) -> list[str]:
    """Which of the option `names` (field names: steps, d_sae, ortho ...) the command line set."""
    given = set()
    for token in ARGV.get():
        if token.startswith("--"):
            flag = token[2:].split("=", 1)[0].replace("-", "_")
            given.add(flag)
            if flag.startswith("no_"):
                given.add(flag[3:])
    return [n for n in names if n in given]


def _values_after(flag: str, args: list[str]) -> str:
    """What the command line gave an option (for a message): `--flag v` or `--flag=v`; the last one
    when it is repeated (the parser keeps the last, so that is the value it refused)."""
    given = ""
    for i, token in enumerate(args):
        if token == flag:
            values = []
            for value in args[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
            given = " ".join(values)
        elif token.startswith(flag + "="):
            given = token[len(flag) + 1:]
    return given


def _expected(metavar: str) -> str:
    """tyro's metavar ({None}|INT, FLOAT, {a,b}, [INT [INT ...]]) in words."""
    words = {"INT": "an int", "FLOAT": "a number", "STR": "a string", "{None}": "None", "{True,False}": "True or False"}
    metavar = str(metavar)
    if metavar.startswith("[") or metavar.endswith("...]"):
        return "one or more values, each " + _expected(metavar.strip("[]").split()[0])
    return " or ".join(words.get(part, "one of " + part.strip("{}").replace(",", ", ") if part.startswith("{") else part)
                       for part in metavar.split("|"))


def _known_flags(command: str) -> list[str]:
    """Every --option of a command (for 'did you mean'): its parameters, and the fields of a
    dataclass parameter (`aosae train`'s TrainConfig)."""
    import dataclasses
    import typing

    try:
        hints = typing.get_type_hints(COMMANDS[command])
    except Exception:  # noqa: BLE001 - a hint that does not resolve: no suggestions, the message stands
        return []
    names = []
    for name, hint in hints.items():
        names += [f.name for f in dataclasses.fields(hint)] if dataclasses.is_dataclass(hint) else [name]
    return [flag for n in names for flag in ("--" + n.replace("_", "-"), "--no-" + n.replace("_", "-"))]


def _usage_message(event, command: str, args: list[str]) -> str:
    """One line for a tyro parse error: which option, what was given, what is allowed."""
    from tyro import _errors as E

    where = "aosae --help" if command == "aosae" else f"aosae {command} --help"
    arg = getattr(event, "argument", None)
    name = None if arg is None else ("/".join(arg.lowered.name_or_flags) or arg.display_name())
    if isinstance(event, E.InvalidChoice):
        return (f"{name} {event.value!r} is not a valid choice: use one of "
                f"{', '.join(c for c in event.choices)} (see {where})")
    if isinstance(event, E.InstantiationFailure) and arg is not None:
        given = _values_after(arg.lowered.name_or_flags[0], args) if arg.lowered.name_or_flags else ""
        what = f" {given!r}" if given else ""
        return f"{name}{what} is not valid: it must be {_expected(arg.lowered.metavar)} (see {where})"
    if isinstance(event, E.InstantiationFailure):
        return f"{event.message.splitlines()[0]} (see {where})"
    if isinstance(event, E.BadValue):
        return f"{name} needs a value ({_expected(arg.lowered.metavar)}) (see {where})"
    if isinstance(event, E.UnrecognizedArgs):
        if command == "aosae":
            return (f"unknown command {' '.join(event.tokens)!r}: use one of {', '.join(COMMANDS)} "
                    "(see aosae --help)")
        options = [t for t in event.tokens if t.startswith("-")]
        hints = []
        for token in options:
            close = difflib.get_close_matches(token.split("=", 1)[0], _known_flags(command), n=1, cutoff=0.75)
            if close:
                hints.append(f"{token}: did you mean {close[0]}?")
        what = "unknown option(s)" if options else "unexpected argument(s)"
        return (f"{what} {' '.join(event.tokens)}" + (f" ({'; '.join(hints)})" if hints else "")
                + f"; see {where} for the options")
    if isinstance(event, E.MissingArgs):
        missing = [m.arg.display_name() for m in event.missing_arguments]
        return f"missing {', '.join(m.upper().replace('-', '_') for m in missing)} (see {where})"
    if isinstance(event, E.MissingSubcommand):
        return f"give a command: one of {', '.join(COMMANDS)} (see aosae --help)"
    title = E._render(event)[0] if hasattr(E, "_render") else type(event).__name__
    return f"{title} (see {where})"


@contextlib.contextmanager
def _one_line_parse_errors(command: str, args: list[str]):
    """tyro draws a box for a bad command line; aosae's errors are one line. tyro's parse-error
    hook (tyro >= 1.0) turns each into a UsageError; older tyro versions keep their box."""
    try:
        from tyro import _errors as E

        hook = E.on_parse_error
    except (ImportError, AttributeError):
        yield
        return

    def raise_usage(event) -> None:
        raise UsageError(_usage_message(event, command, args))

    with hook(raise_usage):
        yield


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
    prog = "aosae" if command == "aosae" else f"aosae {command}"
    format_before = warnings.formatwarning
    if not debug:  # a warning is one line too: what happened and what was done about it
        warnings.formatwarning = lambda message, *_args, **_kw: f"{prog}: warning: {message}\n"
    token = ARGV.set(tuple(args))
    try:
        with contextlib.nullcontext() if debug else _one_line_parse_errors(command, args):
            return int(tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="aosae", args=args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    finally:
        ARGV.reset(token)
        warnings.formatwarning = format_before

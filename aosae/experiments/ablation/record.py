"""DIR/runs.json, the record `aosae ablate` writes after every sweep: read and checked before any work.

A damaged record must stop the command before it trains anything or overwrites the file: the
check reads every key the merge and the report use, then renders the report in memory."""
from __future__ import annotations

import tempfile
from pathlib import Path

from aosae.experiments.ablation.arms import ARMS
from aosae.files import BadFile, read_json, require


def read_record(path: Path, *, render_only: bool) -> dict:
    """The record in `path`, every part the merge and the report read checked (BadFile if not)."""
    path = Path(path)
    fix = (f"restore it from a backup, or move it aside and rerun the sweeps (`aosae ablate --out {path.parent}` "
           "without --render-only)") if render_only else \
        f"move it aside (a new record is written from scratch) or pass another --out; nothing was changed"
    record = read_json(path, fix)
    require(record, "args", dict, path, fix)
    require(record, "arms", dict, path, fix)
    for name, sweep in require(record, "sweeps", dict, path, fix).items():
        where = f"sweep {name!r}"
        if not isinstance(sweep, dict):
            raise BadFile(path, f"{where} is not an object", fix)
        for key, kind in (("runs", list), ("values", list), ("base", dict), ("description", dict), ("swept", str),
                          ("ground_truth", bool), ("slack", (int, float))):
            try:
                require(sweep, key, kind, path, fix)
            except BadFile as err:
                raise BadFile(path, f"{where}: {err.problem}", fix) from err
        for i, run in enumerate(sweep["runs"]):
            if not isinstance(run, dict) or not isinstance(run.get("arm"), str):
                raise BadFile(path, f"{where}: run {i} is not an object with an 'arm'", fix)
            if run["arm"] not in ARMS:  # the plots look its kind up; caught here, before a PNG is rewritten
                raise BadFile(path, f"{where}: run {i} has arm {run['arm']!r}, which is not one of "
                                    f"{', '.join(ARMS)}", fix)
    try:  # everything the report reads, rendered where nothing of the user's is touched
        from aosae.experiments.ablation.report import write_report

        with tempfile.TemporaryDirectory() as tmp:
            write_report(dict(record), Path(tmp), plots=False)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise BadFile(path, f"cannot be turned into tables ({detail})", fix) from err
    return record


# per kind of sweep, the options that may differ between a recorded sweep and a call that extends it:
# its value list (the point of extending) and the torch thread count (shapes speed, not results)
_FREE = {"l1": ("lambdas", "threads"), "top_k": ("ks", "threads"), "model": ("model_lambdas", "threads")}


def settings_differ(old: dict, new: dict) -> list[str]:
    """What keeps a recorded sweep `old` from being extended by a call's sweep `new` (both shaped like
    a record's sweep): the names of the settings that differ, besides the value list. Compared: the
    trainer settings every run shares (base), the budget slack, the swept field, the data (description
    'data') and every option that shapes the sweep (report.SWEEP_OPTIONS, seeds and probing set-up among them)."""
    from aosae.experiments.ablation.report import SWEEP_OPTIONS

    kind = "model" if new["name"] == "model" else new["swept"]
    differ = [key for key in ("base", "slack", "swept") if old.get(key) != new[key]]
    if old.get("description", {}).get("data") != new["description"].get("data"):
        differ.append("data")
    old_args = old.get("args", {})
    differ += [f"--{key.replace('_', '-')}" for key in SWEEP_OPTIONS[kind]
               if key not in _FREE[kind] and (key not in old_args or old_args[key] != new["args"][key])]
    return differ


def complete_groups(old: dict, arms: tuple) -> dict:
    """{(value, seed): [its recorded runs]} for every group of `old` whose runs cover each of `arms`:
    groups are reused whole, since a group's 'none' run set the budget of its budgeted arms."""
    groups: dict = {}
    for run in old["runs"]:
        groups.setdefault((run.get("value"), run.get("seed")), []).append(run)
    return {key: runs for key, runs in groups.items() if set(arms) <= {r["arm"] for r in runs}}

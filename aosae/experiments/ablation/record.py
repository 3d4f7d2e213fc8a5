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

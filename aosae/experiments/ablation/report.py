"""DIR/README.md, DIR/ablation.json and the PNGs from the runs that `aosae ablate` recorded."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import warnings
from pathlib import Path

import torch

from aosae.experiments.ablation import compare as C
from aosae.experiments.ablation import plots as P
from aosae.nn.penalties import selection_at_width

TABLE = (("l0", "L0", "{:.1f}"), ("fvu", "FVU", "{:.3f}"), ("mmcs", "MMCS", "{:.3f}"), ("mcc", "MCC", "{:.3f}"),
         ("frac_recovered", "recovered", "{:.2f}"), ("absorption_rate", "absorption", "{:.3f}"),
         ("duplicate_pairs", "dup pairs", "{:.1f}"), ("dead_fraction", "dead", "{:.2f}"),
         ("kl_div_score", "KL score", "{:.3f}"), ("ce_loss_score", "CE score", "{:.3f}"),
         ("sae_test_accuracy", "probe acc", "{:.3f}"), ("sae_top_1_test_accuracy", "top-1 acc", "{:.3f}"),
         ("sae_top_5_test_accuracy", "top-5 acc", "{:.3f}"), ("scr_metric_threshold_2", "SCR@2", "{:.3f}"),
         ("scr_metric_threshold_20", "SCR@20", "{:.3f}"), ("tpp_threshold_20_total_metric", "TPP@20", "{:.3f}"),
         ("final_tau", "final τ", "{:.3g}"), ("nonzero_share", "non-zero share", "{:.2f}"))
WIDTHS = (16384, 65536, 262144)
# the options that shape each kind of sweep (the rest belong to the other kinds)
_COMMON = ("steps", "batch_size", "lr", "slack", "threads")
SWEEP_OPTIONS = {"l1": _COMMON + ("seeds", "lambdas", "d_sae", "d", "features", "samples"),
                 "top_k": _COMMON + ("seeds", "ks", "d_sae", "d", "features", "samples"),
                 "model": ("batch_size", "lr", "slack", "threads", "model_steps", "model_seeds", "model_lambdas",
                           "model_tokens", "lm_tokens", "model_d_sae", "model_probing", "probing_tasks", "probing_seeds")}
DELTAS = (("fvu", "ΔFVU", "{:+.4f}"), ("mmcs", "ΔMMCS", "{:+.3f}"), ("mcc", "ΔMCC", "{:+.3f}"),
          ("frac_recovered", "Δrecovered", "{:+.3f}"), ("absorption_rate", "Δabsorption", "{:+.3f}"),
          ("duplicate_pairs", "Δdup pairs", "{:+.1f}"), ("ce_loss_score", "ΔCE score", "{:+.4f}"),
          ("sae_top_1_test_accuracy", "Δtop-1 acc", "{:+.3f}"), ("sae_top_5_test_accuracy", "Δtop-5 acc", "{:+.3f}"),
          ("scr_metric_threshold_2", "ΔSCR@2", "{:+.3f}"), ("scr_metric_threshold_20", "ΔSCR@20", "{:+.3f}"),
          ("tpp_threshold_20_total_metric", "ΔTPP@20", "{:+.3f}"))


def regenerate_command(name: str, sweep: dict, out: str) -> str:
    """`aosae ablate ...` that reruns one recorded sweep into `out`: every option that shapes it
    (SWEEP_OPTIONS) as the call that ran it had it, and every arm the record holds for it."""
    args = sweep.get("args", {})
    options = SWEEP_OPTIONS["model" if name == "model" else sweep["swept"]]
    arms = ",".join(a for a in sweep.get("arms", []) if a != "none") or "none"
    # --no-reuse: into a folder that holds this record (the committed one) the call retrains instead of reusing it
    parts = ["aosae ablate", f"--out {out}", f"--sweeps {name}", f"--{'model-arms' if name == 'model' else 'arms'} {arms}",
             "--no-reuse"]
    for key in options:
        if key not in args or args[key] is None:
            continue
        flag = "--" + key.replace("_", "-")
        value = args[key]
        parts.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join(parts)


def machine() -> dict:
    from aosae.machine import cpu_name

    import aosae

    return {"machine": f"{cpu_name()} ({os.cpu_count()} cores)", "torch": torch.__version__,
            "python": platform.python_version(), "aosae": aosae.__version__,
            "date": datetime.date.today().isoformat()}


def _cell(pair, fmt: str) -> str:
    if pair is None or pair[0] is None or not math.isfinite(pair[0]):
        return "–"
    text = fmt.format(pair[0])
    spread = 0.0 if abs(pair[1]) <= 1e-12 * max(1.0, abs(pair[0])) else pair[1]  # float noise of equal seeds
    return text + (f" ± {fmt.format(spread).lstrip('+')}" if math.isfinite(spread) else "")


def value_table(stats: dict, swept: str) -> list[str]:
    present = {k for by_value in stats.values() for v in by_value.values() for k in v}
    cols = [c for c in TABLE if c[0] in present]
    lines = [f"| arm | {swept} | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, by_value in stats.items():
        for value, s in sorted(by_value.items(), key=lambda kv: float(kv[0])):
            # the penalty-free arm has no τ and no selection
            cells = [_cell(None if arm == "none" and k in ("final_tau", "nonzero_share") else s.get(k), f)
                     for k, _, f in cols]
            lines.append(f"| {arm} | {value:g} | " + " | ".join(cells) + " |")
    return lines


def delta_table(match: dict) -> list[str]:
    cols = [c for c in DELTAS if any(c[0] in res for arm, res in match.items() if arm != "targets")]
    lines = ["| arm | matched L0 | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, res in match.items():
        if arm in ("targets", "none"):
            continue
        for i, t in enumerate(match["targets"]):
            lines.append(f"| {arm} | {t:.1f} | " + " | ".join(_cell(res[k][i], f) for k, _, f in cols) + " |")
    return lines


def verdict_lines(verdicts: dict, ground_truth: bool, slack: float) -> list[str]:
    lines = []
    for arm, v in verdicts.items():
        n = v["targets"]
        if ground_truth:
            lines.append(f"- **{arm}**: MMCS better at {v['mmcs_better']}/{n} matched L0s (worse at {v['mmcs_worse']}), "
                         f"absorption lower at {v['absorption_better']}/{n} (higher at {v['absorption_worse']}), "
                         f"FVU worse by more than {slack:.0%} at {v['fvu_worse']}/{n}, fewer duplicate pairs at "
                         f"{v['duplicates_fewer']}/{n}; beats no penalty on both without losing reconstruction at "
                         f"**{v['wins']}/{n}**")
        else:
            n = v.get("matched", n)
            lines.append(f"- **{arm}**: FVU worse by more than {slack:.0%} at {v['fvu_worse']}/{n} matched L0s"
                         + (f" (its curve reaches {n} of the {v['targets']} target L0s)" if n < v["targets"] else "") + ", "
                         f"fewer duplicate pairs at {v['duplicates_fewer']}/{n}"
                         + "".join(f"; {label} better at {v[m + '_better']}/{n} (worse at {v[m + '_worse']})"
                                   for m, label in C.CLAIMS if m + "_better" in v))
    return lines


def write_report(record: dict, out: Path, *, plots: bool = True) -> dict:
    """Analyse every sweep of `record` (as written to runs.json), write README.md, ablation.json and PNGs.

    Without matplotlib (or with plots=False) the PNGs are skipped, with a warning in the first case;
    the tables and ablation.json are written all the same."""
    out = Path(out)
    why_not = P.missing() if plots else None
    if why_not is not None:
        warnings.warn(f"no plots in {out}: {why_not}; then `aosae ablate --out {out} --render-only` draws them",
                      stacklevel=2)
    plots = plots and why_not is None
    out.mkdir(parents=True, exist_ok=True)
    record.setdefault("machine", machine())
    args = record["args"]
    analysis = {"machine": record["machine"], "sweeps": {}}
    md = ["# Penalty ablation (`aosae ablate`)", "",
          "Every run is `aosae.training.trainer.Trainer` on the given activations (the recipe of `aosae train`); "
          "arms differ only in the penalty and the τ rule. Budgeted arms keep the training FVU at every step "
          f"within {args['slack']:.0%} of the penalty-free run with the same λ (or k) and seed (`--tau-rule budget "
          "--tau-budget-run`). Means over seeds ± the 95% Student-t half-width.", "",
          "Regenerate: each sweep's section below gives the command that runs it (its options that differ from "
          "the defaults).", "",
          f"Machine: {record['machine']['machine']}, torch {record['machine']['torch']}, {record['machine']['date']}.", "",
          "## Arms", "", *(f"- `{a}`: {d['description']}" + (" (budgeted)" if d["budgeted"] else "")
                           for a, d in record["arms"].items()), ""]
    for name, sweep in record["sweeps"].items():
        runs, gt, topk = sweep["runs"], sweep["ground_truth"], sweep["swept"] == "top_k"
        stats = C.per_value(runs)
        match = C.matched(runs, topk)
        verdicts = C.verdict(match, sweep["slack"], gt)
        analysis["sweeps"][name] = {"description": sweep["description"], "per_value": stats, "matched": match,
                                    "verdict": verdicts}
        middle = sweep["values"][len(sweep["values"]) // 2]
        figures = []
        if plots:
            figures = [P.pareto(stats, out / f"pareto_{name}.png", f"{name}: arms against L0"),
                       P.tau_trajectories(runs, out / f"tau_{name}.png",
                                          f"{name}: τ, {sweep['swept']}={middle:g}, seed 0", middle)]
        secs = sum(r["seconds"] for r in runs)
        opts = sweep.get("args", args)
        md += [f"## {name}", "", *(f"- {k}: {v}" for k, v in sweep["description"].items()),
               "- arms: " + ", ".join(a for a in record["arms"] if any(r["arm"] == a for r in runs)),
               f"- regenerate: `{regenerate_command(name, sweep, args.get('out', str(out)))}`",
               "- options: " + ", ".join(f"{k}={v}" for k, v in opts.items() if k in SWEEP_OPTIONS[sweep["swept"] if name != "model" else "model"]),
               f"- swept {sweep['swept']} ∈ {sweep['values']}, {len({r['seed'] for r in runs})} seeds, "
               f"{len(runs)} runs, {secs / 60:.1f} min of training",
               *(["- **incomplete**: the call stopped before every (arm, value, seed) ran; the tables read what "
                  "did (rerun the same command to complete it)"] if sweep.get("complete") is False else []), "",
               "### Verdict (paired by seed, 95% intervals, at the penalty-free arm's L0s)", "",
               *verdict_lines(verdicts, gt, sweep["slack"]), "",
               "### At matched L0: difference to no penalty", "", *delta_table(match), "",
               f"### Per {sweep['swept']}", "", *value_table(stats, sweep["swept"]), "",
               *(line for fig in figures for line in (f"![{fig.stem.split('_')[0]}]({fig.name})", ""))]
    widths = [selection_at_width(n, 4096, 64) for n in WIDTHS]
    analysis["selection_at_width"] = widths
    md += ["## What the paper's selection holds at each width", "",
           "B = 4096 tokens, L0 = 64 active latents per token drawn uniformly (real latents cluster: fewer "
           "distinct co-active pairs, a smaller share), k = 0.5% of all n(n−1)/2 pairs. Slots beyond the "
           "co-active pairs are empty (zero score), so the penalty then covers *every* co-active pair; "
           "`--pair-rule coactive` takes `--fraction` of the co-active pairs instead, non-zero by construction. "
           "The trained runs above report their measured non-zero share (`non-zero share` in the tables).", "",
           "| n | k (0.5% of pairs) | co-active pairs | bound B·L0(L0−1)/2 | non-zero share of the k |",
           "|---|---|---|---|---|",
           *(f"| {w['n']} | {w['k']:,} | {w['coactive_pairs']:,} | {w['bound']:,} | {w['nonzero_share']:.2f} |"
             for w in widths), ""]
    (out / "ablation.json").write_text(json.dumps(analysis, indent=1))
    (out / "README.md").write_text("\n".join(md) + "\n")
    return analysis

"""The L0-matched comparison: seeds → means with confidence intervals, arms matched at equal L0.

For a ReLU sweep each (arm, seed) gives one point (L0, metric) per λ. The points are
interpolated linearly in log L0 (extended by at most 15% in L0 past the ends) at target L0s
taken from the penalty-free arm's mean curve (its inner λ values and the geometric midpoints
between neighbours), so every arm is read at the same sparsity; for a
TopK sweep L0 = k already. Differences to the penalty-free arm are paired by seed (same
data order and initialisation) and reported with a 95% Student-t interval over seeds.
"""
from __future__ import annotations

import math
from typing import Optional

# two-sided 95% Student-t quantiles by degrees of freedom (n − 1 seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
METRICS = ("fvu", "mmcs", "mcc", "frac_recovered", "absorption_rate", "duplicate_pairs", "dead_fraction",
           "explained_variance", "cossim", "final_tau", "nonzero_share", "selected_abs_c_mean", "kl_div_score",
           "ce_loss_score", "sae_test_accuracy", "sae_llm_accuracy_ratio", "sae_top_1_test_accuracy",
           "sae_top_2_test_accuracy", "sae_top_5_test_accuracy", "sae_top_10_test_accuracy",
           "sae_top_20_test_accuracy", "sae_top_50_test_accuracy", "scr_metric_threshold_2",
           "scr_metric_threshold_5", "scr_metric_threshold_10", "scr_metric_threshold_20",
           "scr_metric_threshold_50", "tpp_threshold_2_total_metric", "tpp_threshold_20_total_metric")
# the paper's two central claims, read at matched L0 when the runs measured them (higher is better)
CLAIMS = (("sae_top_1_test_accuracy", "sparse probing top-1"), ("sae_top_5_test_accuracy", "sparse probing top-5"),
          ("scr_metric_threshold_2", "SCR@2"), ("scr_metric_threshold_20", "SCR@20"))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval); the half-width is nan for a single value."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return m, T95.get(len(vals) - 1, 1.96) * sd / math.sqrt(len(vals))


def interpolate(points: list[tuple[float, float]], x: float, reach: float = 1.15) -> Optional[float]:
    """Linear interpolation in log x through points [(x, y)] (any order). Up to a factor `reach`
    beyond the end points the end segment is extended; further out, None."""
    pts = sorted((math.log(px), py) for px, py in points if px > 0 and py is not None and math.isfinite(py))
    if not pts:
        return None
    lx, margin = math.log(x), math.log(reach)
    if lx < pts[0][0] - margin or lx > pts[-1][0] + margin:
        return None
    if len(pts) == 1:
        return pts[0][1]
    segment = next(((a, b) for a, b in zip(pts, pts[1:]) if lx <= b[0]), (pts[-2], pts[-1]))
    (x0, y0), (x1, y1) = segment
    return y0 if x1 == x0 else y0 + (y1 - y0) * (lx - x0) / (x1 - x0)


def l0_targets(none_l0s: list[float]) -> list[float]:
    """Where the arms are compared: the penalty-free arm's L0s at the inner swept values and the
    geometric midpoints between neighbours (the end values are where other arms' curves may stop)."""
    xs = sorted(none_l0s)
    if len(xs) <= 2:
        return [math.sqrt(xs[0] * xs[-1])]
    mids = [math.sqrt(a * b) for a, b in zip(xs, xs[1:])]
    return sorted(xs[1:-1] + mids)


def per_value(runs: list[dict], metrics=METRICS) -> dict:
    """{arm: {value: {metric: [mean, ci], "l0": [mean, ci], "n": seeds}}}."""
    out: dict = {}
    for r in runs:
        out.setdefault(r["arm"], {}).setdefault(r["value"], []).append(r)
    return {arm: {value: {"n": len(rs), "l0": mean_ci([r["l0"] for r in rs]),
                          **{m: mean_ci([r.get(m) for r in rs]) for m in metrics if m in rs[0]}}
                  for value, rs in by_value.items()}
            for arm, by_value in out.items()}


def matched(runs: list[dict], topk: bool, metrics=METRICS) -> dict:
    """{"targets": [L0], arm: {metric: [[mean Δ, ci] or None per target], "<metric>_abs": [[mean, ci] ...]}}:
    each arm read at the penalty-free arm's L0s, and its paired difference to it (arm − none)."""
    seeds = sorted({r["seed"] for r in runs})
    values = sorted({r["value"] for r in runs})
    by = {(r["arm"], r["seed"], r["value"]): r for r in runs}
    if topk:
        targets = [float(v) for v in values]
    else:
        targets = l0_targets([mean_ci([by[("none", s, v)]["l0"] for s in seeds if ("none", s, v) in by])[0]
                              for v in values])

    def read(arm, seed, target, metric):
        if topk:
            r = by.get((arm, seed, int(target)))
            return None if r is None else r.get(metric)
        pts = [(by[(arm, seed, v)]["l0"], by[(arm, seed, v)].get(metric)) for v in values if (arm, seed, v) in by]
        return interpolate(pts, target)

    out = {"targets": targets}
    for arm in sorted({r["arm"] for r in runs}):
        res = {}
        for m in metrics:
            if m not in runs[0]:
                continue
            absolute, delta = [], []
            for t in targets:
                mine = [read(arm, s, t, m) for s in seeds]
                base = [read("none", s, t, m) for s in seeds]
                pairs = [(a, b) for a, b in zip(mine, base) if a is not None and b is not None]
                absolute.append(list(mean_ci([a for a in mine if a is not None])) if any(a is not None for a in mine) else None)
                delta.append(list(mean_ci([a - b for a, b in pairs])) if len(pairs) >= 2 else None)
            res[m], res[m + "_abs"] = delta, absolute
        out[arm] = res
    return out


def verdict(match: dict, slack: float, ground_truth: bool) -> dict:
    """Per arm: at how many matched L0s it beats the penalty-free arm (95% intervals of the paired
    differences excluding 0) on recovery (MMCS) and on absorption, how often its FVU is worse by
    more than `slack` × the penalty-free FVU, and whether it wins on both without losing reconstruction;
    where the runs measured them, at how many it is better / worse on sparse probing and SCR (CLAIMS)."""
    out = {}
    targets = match["targets"]
    for arm, res in match.items():
        if arm in ("targets", "none"):
            continue
        row = {"targets": len(targets), "mmcs_better": 0, "mmcs_worse": 0, "absorption_better": 0,
               "absorption_worse": 0, "fvu_worse": 0, "duplicates_fewer": 0, "wins": 0}
        row["matched"] = sum(d is not None for d in res["fvu"])  # the targets its curve reaches
        for i in range(len(targets)):
            d_fvu, base_fvu = res["fvu"][i], match["none"]["fvu_abs"][i]
            fvu_bad = d_fvu is not None and base_fvu is not None and d_fvu[0] - d_fvu[1] > slack * base_fvu[0]
            row["fvu_worse"] += fvu_bad
            dup = res.get("duplicate_pairs", [None] * len(targets))[i]
            row["duplicates_fewer"] += dup is not None and dup[0] + dup[1] < 0
            for metric, _ in CLAIMS:
                if metric in res:
                    d = res[metric][i]
                    row[f"{metric}_better"] = row.get(f"{metric}_better", 0) + (d is not None and d[0] - d[1] > 0)
                    row[f"{metric}_worse"] = row.get(f"{metric}_worse", 0) + (d is not None and d[0] + d[1] < 0)
            if not ground_truth:
                continue
            mm, ab = res["mmcs"][i], res["absorption_rate"][i]
            better_mm = mm is not None and mm[0] - mm[1] > 0
            better_ab = ab is not None and ab[0] + ab[1] < 0
            row["mmcs_better"] += better_mm
            row["mmcs_worse"] += mm is not None and mm[0] + mm[1] < 0
            row["absorption_better"] += better_ab
            row["absorption_worse"] += ab is not None and ab[0] - ab[1] > 0
            row["wins"] += better_mm and better_ab and not fvu_bad
        out[arm] = row
    return out

"""The ablation's figures: Pareto curves against L0 and τ trajectories (matplotlib, Agg)."""
from __future__ import annotations

import math
from pathlib import Path

from aosae.experiments.ablation.arms import ARMS

PANELS = (("fvu", "FVU (1 − explained variance)"), ("mmcs", "MMCS"), ("mcc", "MCC"),
          ("frac_recovered", "recovered (cos > 0.9)"), ("absorption_rate", "absorption rate"),
          ("duplicate_pairs", "duplicate pairs (|cos| > 0.9)"), ("ce_loss_score", "CE-loss score"),
          ("kl_div_score", "KL-div score"), ("sae_top_1_test_accuracy", "sparse probing top-1 accuracy"),
          ("sae_top_5_test_accuracy", "sparse probing top-5 accuracy"), ("scr_metric_threshold_2", "SCR (2 latents)"),
          ("scr_metric_threshold_20", "SCR (20 latents)"))


def missing() -> str | None:
    """None when matplotlib imports, else why not (the report then skips its PNGs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        return f"matplotlib is not installed ({err}): pip install matplotlib"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(stats: dict, path: Path, title: str) -> Path:
    """One panel per metric against L0 (log): each arm's mean over seeds at each swept value,
    with 95% intervals on both axes."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    present = {k for by_value in stats.values() for v in by_value.values() for k in v}
    panels = [p for p in PANELS if p[0] in present]
    cols = 3 if len(panels) > 2 else len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (metric, label) in zip(axes.flat, panels):
        for arm, by_value in stats.items():
            pts = sorted((v["l0"][0], v["l0"][1], *v[metric]) for v in by_value.values() if metric in v)
            if not pts:
                continue
            x, xe, y, ye = (list(c) for c in zip(*pts))
            xe = [0 if not math.isfinite(e) else e for e in xe]
            ye = [0 if not math.isfinite(e) else e for e in ye]
            style = dict(lw=2.2, color="black") if arm == "none" else dict(lw=1.2)
            if arm == "paper":
                style["ls"] = "--"
            ax.errorbar(x, y, xerr=xe, yerr=ye, marker="o", ms=3, capsize=2, label=arm, **style)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("L0 (held-out)")
        ax.set_title(label, fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def tau_trajectories(runs: list[dict], path: Path, title: str, value, seed: int = 0) -> Path:
    """τ over the steps of the paper's rule and of the budget rule (every penalised arm), at one
    swept value and seed; the paper's bounds [0.01, 0.2] dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        if r["value"] != value or r["seed"] != seed or r["arm"] == "none" or not r.get("tau_trajectory"):
            continue
        steps, taus = zip(*r["tau_trajectory"])
        budgeted = ARMS[r["arm"]].budgeted
        style = dict(lw=1.2) if budgeted else dict(lw=2, ls="--", color="black" if r["arm"] == "paper" else None)
        ax.plot(steps, taus, label=f"{r['arm']} ({'budget' if budgeted else 'paper rule'})", **style)
    for bound in (0.01, 0.2):
        ax.axhline(bound, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("τ")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # a sweep of the penalty-free arm alone has no τ to label
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

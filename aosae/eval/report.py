"""End-of-run report: RUN_DIR/report.md + RUN_DIR/report.png.

The figure has three panels: the loss terms over steps, L0 and τ over steps, and the
latent density histogram (log10 of the fraction of tokens each latent fires on; dead
latents counted apart). It reads RUN_DIR/metrics.jsonl (one JSON object per step with
step, recon, l1, penalty, tau, l0, lr, loss; missing keys are skipped) and, when present,
RUN_DIR/summary.json and RUN_DIR/eval.json.

    write_report(run_dir, sae=None, density=None) -> Path of report.md
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from aosae.eval.metrics import DENSE_THRESHOLD, decoder_cosine_stats

LOSS_KEYS = ("loss", "recon", "l1", "penalty")


def read_metrics(run_dir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl (a truncated last line, e.g. from a killed run, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `aosae train`?")
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if "step" in r and isinstance(r.get(key), (int, float))]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_report(rows: list[dict], density: Optional[torch.Tensor], path: Path) -> None:
    """Writes the three-panel PNG to `path` (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key in LOSS_KEYS:
        x, y = _series(rows, key)
        if x and any(v > 0 for v in y):
            ax.plot(x, y, label=key, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss terms")
    ax.legend(fontsize=8)

    ax = axes[1]
    x, y = _series(rows, "l0")
    ax.plot(x, y, color="C0", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("L0", color="C0")
    ax.set_title("L0 and τ")
    x, y = _series(rows, "tau")
    if x:
        ax2 = ax.twinx()
        ax2.plot(x, y, color="C3", lw=1)
        ax2.set_ylabel("τ", color="C3")

    ax = axes[2]
    if density is not None:
        d = density.detach().double().flatten()
        alive = d[d > 0]
        if alive.numel():
            ax.hist(torch.log10(alive).numpy(), bins=50, color="C2")
        ax.axvline(math.log10(DENSE_THRESHOLD), color="k", ls="--", lw=0.8)
        ax.set_title(f"latent density ({int((d == 0).sum())} dead of {d.numel()})")
        ax.set_xlabel("log10(fraction of tokens firing)")
    else:
        ax.set_title("latent density (not given)")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(run_dir, sae=None, density: Optional[torch.Tensor] = None) -> Path:
    """Writes RUN_DIR/report.md and RUN_DIR/report.png; returns the markdown path.

    Args:
        run_dir: the run directory (must contain metrics.jsonl).
        sae: optional SparseAutoencoder (anything with W_dec [d_sae, d_in]) for decoder stats.
        density: optional [d_sae] fraction of tokens each latent fired on (e.g. from
            aosae.metrics.latent_density over a held-out batch).
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    png = run_dir / "report.png"
    try:
        plot_report(rows, density, png)
        missing_plot = None
    except ImportError as err:  # matplotlib is optional: the tables are written all the same
        missing_plot = err
    lines = [f"# Training report: {run_dir.name}", ""]
    if rows:
        last = rows[-1]
        lines += ["## Last step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in last.items() if isinstance(v, (int, float))]
        lines.append("")
    else:
        lines += ["metrics.jsonl has no rows yet.", ""]
    for name in ("summary.json", "eval.json"):
        path = run_dir / name
        if path.exists():
            data = json.loads(path.read_text())
            flat = {k: v for k, v in data.items() if isinstance(v, (int, float))}
            if flat:
                lines += [f"## {name}", "", "| metric | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
                lines.append("")
    if density is not None:
        d = density.detach().double().flatten()
        lines += [
            "## Latents",
            "",
            f"- dead (never fired): {int((d == 0).sum())} of {d.numel()} ({float((d == 0).double().mean()):.2%})",
            f"- dense (> {DENSE_THRESHOLD:.0%} of tokens): {int((d > DENSE_THRESHOLD).sum())}",
        ]
    if sae is not None:
        stats = decoder_cosine_stats(sae.W_dec)
        lines += [f"- decoder |cos| max {stats['decoder_cos_max']:.3f}, mean {stats['decoder_cos_mean']:.4f}, "
                  f"mean of per-latent max {stats['decoder_cos_max_mean']:.3f}"]
    lines += ["", f"![report]({png.name})" if missing_plot is None else
              f"(no report.png: {missing_plot}; pip install matplotlib and rerun `aosae eval` or write_report)", ""]
    md = run_dir / "report.md"
    md.write_text("\n".join(lines))
    if missing_plot is not None:
        raise missing_plot  # the caller says so (the trainer as a warning); report.md is written
    return md

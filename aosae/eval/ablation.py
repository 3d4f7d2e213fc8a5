"""The ablation: does the adaptive, selective orthogonality penalty help, at equal steps?

Arms (same data, same batches, same initialisation, same optimiser and step count):

    none          recon + λ·L1                                   (no penalty)
    fixed_0.05    + 0.05 · Σ_top-k |C_ij|, C = fᵀf / B             (paper's τ₀, held fixed)
    fixed_0.2     + 0.2  · Σ_top-k |C_ij|                          (paper's τ_max, held fixed)
    adaptive      + τ_t  · Σ_top-k |C_ij|, τ by AdaptiveTau          (the paper's method)
    decoder       + τ_t  · Σ_top-k |cos(W_dec,i, W_dec,j)|          (same op on decoder directions)

C is the batch-mean co-activation fᵀf / B (coactivation="mean", what `aosae train` uses, so
that τ means the same at any batch size), or the paper's literal fᵀf summed over the batch
(coactivation="sum", B times larger). Data: synthetic activations with known
features (then ground-truth metrics are reported), or cached activations of a language
model. Writes DIR/ablation.md, DIR/ablation.json and PNG plots.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from aosae.eval import metrics as M
from aosae.nn.loss import TopKOrthoLoss
from aosae.nn.tau import AdaptiveTau

ARMS = ("none", "fixed_0.05", "fixed_0.2", "adaptive", "decoder")


@dataclass
class AblationConfig:
    """Matched settings shared by every arm.

    steps: optimiser steps per arm. batch_size: tokens per step. d_sae: latents.
    lr, warmup_steps: AdamW learning rate with a linear warm-up (default steps // 20).
    l1_coeff: λ of the L1 term (on latents; decoder rows are unit norm).
    fraction: share of latent pairs penalised (paper: 0.005).
    similarity: "dot" (the paper) or "cosine" for the co-activation arms.
    coactivation: "mean" (fᵀf / B, as `aosae train`) or "sum" (the paper's literal fᵀf).
    calibration_steps: AdaptiveTau's L_target warm-up (default steps // 10).
    log_every: steps between logged rows. seed: initialisation and batch order.
    """

    steps: int = 2000
    batch_size: int = 512
    d_sae: int = 256
    lr: float = 1e-3
    warmup_steps: Optional[int] = None
    l1_coeff: float = 0.04
    fraction: float = 0.005
    similarity: str = "dot"
    coactivation: str = "mean"
    calibration_steps: Optional[int] = None
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2 or self.d_sae < 2:
            raise ValueError("need steps >= 1, batch_size >= 2 and d_sae >= 2")
        if self.lr <= 0 or self.l1_coeff < 0:
            raise ValueError("need lr > 0 and l1_coeff >= 0")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 20)
        if self.calibration_steps is None:
            self.calibration_steps = max(1, min(100, self.steps // 10))
        if self.coactivation not in ("sum", "mean"):
            raise ValueError(f"coactivation must be 'sum' or 'mean', got {self.coactivation!r}")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")


def _batches(x: torch.Tensor, batch_size: int, steps: int, seed: int):
    """Deterministic shuffled batches (reshuffled each epoch), identical for every arm."""
    gen = torch.Generator().manual_seed(seed + 1)
    perm, pos = torch.randperm(x.shape[0], generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > x.shape[0]:
            perm, pos = torch.randperm(x.shape[0], generator=gen), 0
        yield x[perm[pos : pos + batch_size]]
        pos += batch_size


def train_arm(
    arm: str,
    x_train: torch.Tensor,
    cfg: AblationConfig,
    probe: Optional[Callable] = None,
) -> tuple[object, list[dict]]:
    """Trains one arm on x_train [N, d_in] float32; returns (sae, log rows).

    The loop is the paper's: loss = ‖x − x̂‖² (sum over d, mean over tokens) + λ·Σ|f|
    (mean over tokens) + τ·penalty; AdamW with linear warm-up; the decoder gradient's
    component parallel to each row is removed before the step and rows renormalised
    after it. `probe(sae) -> dict` adds extra numbers (e.g. ground-truth recovery) to
    each logged row.
    """
    from aosae.nn.sae import SparseAutoencoder

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}: choose from {ARMS}")
    torch.manual_seed(cfg.seed)
    sae = SparseAutoencoder.from_dims(x_train.shape[1], cfg.d_sae)
    with torch.no_grad():  # start b_dec at the data mean: the usual, arm-independent init
        sae.b_dec.copy_(x_train[: min(len(x_train), 8192)].mean(0))
    opt = torch.optim.AdamW(sae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    on_decoder = arm == "decoder"
    penalty_fn = None
    if arm != "none":
        penalty_fn = TopKOrthoLoss(cfg.fraction, similarity="cosine" if on_decoder else cfg.similarity)
    tau_ctl = AdaptiveTau(calibration_steps=cfg.calibration_steps) if arm in ("adaptive", "decoder") else None
    tau = {"none": 0.0, "fixed_0.05": 0.05, "fixed_0.2": 0.2}.get(arm, 0.05)
    rows = []
    for step, xb in enumerate(_batches(x_train, cfg.batch_size, cfg.steps, cfg.seed)):
        out = sae(xb)
        f = out.latents
        recon = (xb - out.x_hat).pow(2).sum(-1).mean()
        l1 = f.abs().sum(-1).mean()
        if penalty_fn is None:
            pen = torch.zeros((), dtype=recon.dtype)
        elif on_decoder:
            pen = penalty_fn(sae.W_dec.t())
        else:
            pen = penalty_fn(f if cfg.coactivation == "sum" else f / math.sqrt(f.shape[0]))
        loss = recon + cfg.l1_coeff * l1 + tau * pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        sched.step()
        sae.normalize_decoder_()
        if tau_ctl is not None:
            tau = tau_ctl.update(float(recon.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {
                "step": step,
                "loss": float(loss.detach()),
                "recon": float(recon.detach()),
                "l1": float(l1.detach()),
                "penalty": float(pen.detach()),
                "tau": float(tau),
                "l0": float((f != 0).sum(-1).float().mean()),
            }
            if not all(math.isfinite(v) for v in row.values()):
                raise FloatingPointError(f"arm {arm!r} diverged at step {step}: {row}; lower --lr")
            if probe is not None:
                row.update(probe(sae))
            rows.append(row)
    return sae, rows


@torch.no_grad()
def final_metrics(sae, x_eval: torch.Tensor, cfg: AblationConfig, batch: int = 4096) -> dict:
    """Held-out metrics of a trained SAE on x_eval [N, d_in]: reconstruction, sparsity,
    dead/dense latents, decoder cosines and the co-activation |C_ij| (as in training: summed
    over a batch of cfg.batch_size tokens, or its mean)."""
    stats = M.ReconstructionStats()
    for s in range(0, x_eval.shape[0], batch):
        out = sae(x_eval[s : s + batch])
        stats.update(x_eval[s : s + batch], out.x_hat, out.latents)
    res = stats.result()
    res.update(M.decoder_cosine_stats(sae.W_dec))
    f = sae.encode(x_eval[: min(x_eval.shape[0], cfg.batch_size)])
    co = M.coactivation_stats(f if cfg.coactivation == "sum" else f / math.sqrt(f.shape[0]), cfg.fraction, cfg.similarity)
    res["topk_abs_c_mean"], res["all_abs_c_mean"] = co["topk_abs_c_mean"], co["all_abs_c_mean"]
    return res


def run_ablation(
    x_train: torch.Tensor,
    x_eval: torch.Tensor,
    cfg: AblationConfig,
    truth=None,
    arms=ARMS,
    seeds=(0,),
    log: Callable[[str], None] = print,
) -> dict:
    """Trains every arm on the same data for each seed; returns
    {arm: {"final": mean metrics, "final_std": std over seeds, "runs": [per-seed finals],
    "log": rows of the first seed, "seconds": mean seconds per run}}.

    truth: optional aosae.synthetic.SyntheticData of the *eval* set (x_eval = truth.x):
    adds ground-truth metrics (mmcs, mcc, frac_recovered, absorption_rate) to the results.
    """
    from aosae.data import synthetic as S

    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}: choose from {ARMS}")
    probe = None
    if truth is not None:
        probe = lambda sae: S.dictionary_metrics(sae.W_dec, truth.directions)  # noqa: E731
    results = {}
    for arm in arms:
        runs, logs, secs = [], [], []
        for seed in seeds:
            t0 = time.perf_counter()
            sae, rows = train_arm(arm, x_train, replace(cfg, seed=seed), probe)
            final = final_metrics(sae, x_eval, cfg)
            if truth is not None:
                final.update(S.evaluate_against_truth(sae, truth))
            secs.append(time.perf_counter() - t0)
            runs.append(final)
            logs.append(rows)
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
        std = {k: (sum((r[k] - mean[k]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for k in keys}
        results[arm] = {"final": mean, "final_std": std, "runs": runs, "log": logs[0],
                        "seconds": sum(secs) / len(secs)}
        log(f"  {arm:<11} {sum(secs):6.1f}s  cossim {mean['cossim']:.3f}  EV {mean['explained_variance']:.3f}  "
            f"L0 {mean['l0']:.1f}" + (f"  recovered {mean['frac_recovered']:.2f}" if truth is not None else ""))
    return results


TABLE_COLUMNS = (
    ("cossim", "cossim", "{:.3f}"),
    ("explained_variance", "EV", "{:.3f}"),
    ("mse", "MSE", "{:.4g}"),
    ("l0", "L0", "{:.1f}"),
    ("dead_fraction", "dead", "{:.2f}"),
    ("dense_fraction", "dense", "{:.2f}"),
    ("decoder_cos_max", "dec cos max", "{:.3f}"),
    ("decoder_cos_mean", "dec cos mean", "{:.3f}"),
    ("topk_abs_c_mean", "top-k abs C", "{:.4g}"),
    ("all_abs_c_mean", "all abs C", "{:.4g}"),
    ("mmcs", "MMCS", "{:.3f}"),
    ("mcc", "MCC", "{:.3f}"),
    ("frac_recovered", "recovered", "{:.2f}"),
    ("absorption_rate", "absorption", "{:.3f}"),
)


def markdown_table(results: dict) -> str:
    """One row per arm, the columns of TABLE_COLUMNS that every arm has (mean ± std over
    seeds when there are several; final τ is the first seed's)."""
    finals = [r["final"] for r in results.values()]
    cols = [c for c in TABLE_COLUMNS if all(c[0] in f for f in finals)]
    head = "| arm | final τ | " + " | ".join(c[1] for c in cols) + " |"
    sep = "|---|---|" + "---|" * len(cols)
    lines = [head, sep]
    for arm, r in results.items():
        tau = r["log"][-1]["tau"] if r["log"] else float("nan")
        multi = len(r.get("runs", ())) > 1
        cells = [fmt.format(r["final"][key]) + (" ± " + fmt.format(r["final_std"][key]) if multi else "")
                 for key, _, fmt in cols]
        lines.append(f"| {arm} | {tau:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: dict, out_dir: Path, title: str) -> list[str]:
    """metrics_vs_step.png (recon, L0, penalty), tau.png, and recovered.png when ground truth exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, r in results.items():
        steps = [row["step"] for row in r["log"]]
        for ax, key in zip(axes, ("recon", "l0", "penalty")):
            ax.plot(steps, [row[key] for row in r["log"]], label=arm, lw=1)
    for ax, key in zip(axes, ("reconstruction loss", "L0", "penalty Σ top-k |C| (unweighted)")):
        ax.set_xlabel("step")
        ax.set_title(key)
    axes[0].set_yscale("log")
    axes[2].set_yscale("symlog", linthresh=1e-4)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / "metrics_vs_step.png", dpi=90)
    plt.close(fig)
    written.append("metrics_vs_step.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in results.items():
        ax.plot([row["step"] for row in r["log"]], [row["tau"] for row in r["log"]], label=arm, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("τ")
    ax.set_title(f"τ trajectory ({title})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "tau.png", dpi=90)
    plt.close(fig)
    written.append("tau.png")

    if all("frac_recovered" in r["log"][0] for r in results.values() if r["log"]):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for arm, r in results.items():
            steps = [row["step"] for row in r["log"]]
            axes[0].plot(steps, [row["frac_recovered"] for row in r["log"]], label=arm, lw=1)
            axes[1].plot(steps, [row["mmcs"] for row in r["log"]], label=arm, lw=1)
        axes[0].set_title("true features recovered (cos > 0.9)")
        axes[1].set_title("MMCS")
        for ax in axes:
            ax.set_xlabel("step")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "recovered.png", dpi=90)
        plt.close(fig)
        written.append("recovered.png")
    return written


def write_outputs(results: dict, out_dir, name: str, cfg: AblationConfig, meta: dict) -> Path:
    """Writes {name}.md (table + settings + plots), {name}.json and the PNGs with a name prefix."""
    out_dir = Path(out_dir)
    sub = out_dir / name
    sub.mkdir(parents=True, exist_ok=True)
    pngs = plot_results(results, sub, name)
    (sub / "results.json").write_text(json.dumps({"config": asdict(cfg), "meta": meta, "results": results}, indent=1))
    lines = [
        f"## Ablation on {name} data",
        "",
        "Settings (identical for every arm): " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()),
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        markdown_table(results),
        "",
        *(f"![{p}]({name}/{p})" for p in pngs),
        "",
    ]
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines))
    return md


def model_activations(model: Optional[str], layer: Optional[int], n_tokens: int, dataset: Optional[str] = None,
                      log: Callable[[str], None] = print) -> tuple[torch.Tensor, dict]:
    """n_tokens residual activations [n_tokens, d_model] of `model` (default: the embedded
    SmolLM2-135M) at block `layer` (default: the trainer's), through the trainer's collector
    and on-disk cache, so `aosae train` runs, reruns and every arm share one LM pass."""
    from aosae.training.config import TrainConfig
    from aosae.training.distributed import DistInfo
    from aosae.training.trainer import get_activations

    tcfg = TrainConfig(model=model, dataset=dataset, tokens=n_tokens, batch_size=min(2048, n_tokens),
                       **({} if layer is None else {"layer": int(layer)}))
    t0 = time.perf_counter()
    log(f"model: activations of {tcfg.model or 'smollm2-135m'} layer {tcfg.layer}, {n_tokens} tokens "
        f"(from the activation cache, or by running the LM once)")
    acts, meta = get_activations(tcfg, DistInfo(), "cpu", progress=False)
    log(f"model: {acts.shape[0]} activations ready in {time.perf_counter() - t0:.0f} s")
    info = {"data": f"{tcfg.model or 'smollm2-135m'} layer {tcfg.layer} residual output, "
                    f"{tcfg.dataset or 'stdlib'} text, context {tcfg.context}, {acts.shape[0]} tokens (BOS excluded)",
            "activation rms norm": f"{float(acts.pow(2).sum(-1).mean().sqrt()):.2f}"}
    return acts, info

"""Train the arms through the trainer's own loop and measure them on held-out ground truth.

One run = one Trainer(TrainConfig, activations=...) whose config differs from its
neighbours only in the arm's fields and the swept λ (ReLU) or k (TopK). Per run this
records the held-out reconstruction (SAEBench names), ground-truth recovery and absorption
when the data has a known dictionary, duplicate latents, and from the training loop the τ
trajectory, the FVU the budget refers to, and the share of the selection that is non-zero.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from aosae.data import synthetic as S
from aosae.data.sources import held_out_count
from aosae.eval import metrics as M
from aosae.experiments.ablation.arms import ARMS, arm_overrides
from aosae.nn.penalties import nonzero_share
from aosae.training.config import TrainConfig
from aosae.training.trainer import EVAL_TOKENS, Trainer, folded_sae

TAU_POINTS = 100  # τ trajectory kept per run (subsampled)


@dataclass
class Sweep:
    """One sweep: the trainer settings shared by all arms, and the swept values.

    base: TrainConfig fields every run shares (steps, batch_size, lr, d_sae, activation, ...).
    values: λ for ReLU sweeps (written into `l1`), k for TopK sweeps (written into `top_k`).
    seeds: seeds of every (arm, value). slack: the budget is (1 + slack) × FVU_none.
    """

    name: str
    base: dict
    values: tuple
    seeds: tuple = (0, 1, 2)
    slack: float = 0.05

    @property
    def swept(self) -> str:
        return "top_k" if self.base.get("activation") == "topk" else "l1"


def training_variance(acts: torch.Tensor, scale: float) -> float:
    """E‖x − E x‖² of the scaled training sample, computed as the Trainer computes BudgetTau's."""
    n_eval = held_out_count(acts.shape[0], EVAL_TOKENS)
    sample = acts[: min(4096, acts.shape[0] - n_eval)] * scale
    return float((sample - sample.mean(0)).pow(2).sum(-1).mean())


@torch.no_grad()
def measure(sae, held: torch.Tensor, truth: Optional[S.SyntheticData], fraction: float) -> dict:
    """Held-out metrics of a (folded, raw-scale) SAE on held [N, d_in]."""
    stats = M.ReconstructionStats()
    latents = []
    for x in held.split(4096):
        out = sae(x)
        stats.update(x, out.x_hat, out.latents)
        latents.append(out.latents)
    f = torch.cat(latents)
    res = stats.result()
    res["fvu"] = 1.0 - res["explained_variance"]
    res.update(M.duplicate_pairs(sae.W_dec, live=(f != 0).any(0)))
    res["decoder_cos_max"] = M.decoder_cosine_stats(sae.W_dec)["decoder_cos_max"]
    co = M.coactivation_stats(f[:2048] / math.sqrt(min(2048, f.shape[0])), fraction)  # per token, as trained
    res["selected_abs_c_mean"] = co["topk_abs_c_mean"]
    if truth is not None:
        res.update(S.evaluate_against_truth(sae, truth))
    return res


def train_run(acts: torch.Tensor, cfg: TrainConfig, held: torch.Tensor, truth, run_dir: Path,
              scorer: Optional[Callable] = None) -> dict:
    """One Trainer run on acts; returns its metrics plus the training-side records."""
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, progress=False, activations=acts)
    trainer.write_report = lambda: None  # its per-run report.png costs seconds of plotting; the sweep plots its own
    shares = []

    def on_step(tr):
        pairs = getattr(tr.ortho, "last_pairs", None)
        if pairs is not None:
            shares.append(nonzero_share(pairs, getattr(tr.ortho, "last_k", None)))  # non-zero pairs ÷ k

    trainer.run(on_step)
    log = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recons, taus = [row["recon"] for row in log], [row["next_tau"] for row in log]
    sae = folded_sae(trainer.sae, trainer.scale)
    res = measure(sae, held, truth, cfg.fraction)
    if scorer is not None:
        res.update(scorer(sae))
    variance = training_variance(acts, trainer.scale)
    tail = recons[-max(1, len(recons) // 10):]
    res["train_fvu_end"] = sum(tail) / len(tail) / variance
    if cfg.tau_rule == "budget" and abs(trainer.tau.variance - variance) > 1e-6 * variance:
        raise RuntimeError(f"the budget's variance {trainer.tau.variance} differs from the ablation's {variance}")
    if trainer.ortho is None:  # no penalty: its τ multiplies nothing
        taus = []
    every = max(1, len(taus) // TAU_POINTS)
    res["tau_trajectory"] = [[i + 1, t] for i, t in enumerate(taus)][::every]
    res["final_tau"] = taus[-1] if taus else float("nan")
    res["nonzero_share"] = sum(shares) / len(shares) if shares else float("nan")
    res["seconds"] = time.perf_counter() - t0
    return res


def run_sweep(sweep: Sweep, acts: torch.Tensor, held: torch.Tensor, truth, arms: tuple, workdir: Optional[Path] = None,
              log: Callable[[str], None] = print, scorer: Optional[Callable] = None,
              on_run: Optional[Callable[[list], None]] = None, reuse: Optional[dict] = None) -> list[dict]:
    """Every (value, seed, arm); the 'none' arm of each (value, seed) runs first and sets the budget.
    Returns one row per run: {"arm", "value", "seed", "budget_fvu", **metrics}; on_run(rows so far)
    after each run (the CLI saves them, so that a long sweep stopped early keeps what ran).
    reuse: {(value, seed): recorded rows} of groups taken over as they are instead of trained."""
    rows, reuse = [], reuse or {}
    with tempfile.TemporaryDirectory(prefix="aosae-ablate-") as tmp:
        root = Path(workdir or tmp)
        for value in sweep.values:
            for seed in sweep.seeds:
                if (value, seed) in reuse:
                    rows += reuse[value, seed]
                    log(f"  {sweep.name} {sweep.swept}={value} seed={seed}: reused the recorded runs of "
                        + ", ".join(r["arm"] for r in reuse[value, seed]))
                    continue
                reference = reference_fvu = None
                for name in arms:
                    over = arm_overrides(ARMS[name], reference, sweep.slack)
                    cfg = TrainConfig(**{**sweep.base, sweep.swept: value, "seed": seed, **over})
                    run_dir = root / f"{sweep.name}-{name}-{value}-{seed}"
                    res = train_run(acts, cfg, held, truth, run_dir, scorer)
                    if name == "none":
                        reference, reference_fvu = run_dir, res["train_fvu_end"]
                    rows.append({"arm": name, "value": value, "seed": seed, **res, "budget_fvu_end":
                                 None if reference_fvu is None or not ARMS[name].budgeted
                                 else reference_fvu * (1 + sweep.slack)})
                    if on_run is not None:
                        on_run(rows)
                    log(f"  {sweep.name} {name:<20} {sweep.swept}={value} seed={seed}: L0 {res['l0']:.1f} "
                        f"FVU {res['fvu']:.3f} " + (f"MMCS {res['mmcs']:.3f} absorption {res['absorption_rate']:.3f} "
                                                    if truth is not None else "")
                        + (f"CE score {res['ce_loss_score']:.3f} " if scorer is not None else "")
                        + f"dup {res['duplicate_pairs']} τ {res['final_tau']:.3g} ({res['seconds']:.1f}s)")
    return rows

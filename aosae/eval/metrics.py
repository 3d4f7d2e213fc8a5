"""SAE evaluation metrics as pure functions on tensors, with SAEBench's names and formulas.

Shapes: x, x_hat [tokens, d_in]; latents [tokens, d_sae]; W_dec [d_sae, d_in]; logits
[..., vocab]. Everything returns Python floats (or float tensors where noted) so the
results go straight into JSON.

Reconstruction metrics follow SAEBench's core eval (sae_bench/evals/core/main.py):
  cossim              mean over tokens of cos(x_t, x̂_t)
  explained_variance  1 − Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − μ‖²,  μ = mean over all tokens
                      (the corrected formula of SAEBench PR #61 / SAELens PR #443:
                      numerator and denominator are summed separately)
  explained_variance_legacy  mean over tokens of 1 − ‖x_t − x̂_t‖² / ‖x_t − μ‖² (what the
                      SAEBench paper reported; kept for comparison with published numbers)
  mse                 mean over tokens and dimensions of (x − x̂)²
Model-preservation scores (SAEBench names):
  kl_div_score  = (KL_zero_ablation − KL_SAE) / KL_zero_ablation
  ce_loss_score = (CE_zero_ablation − CE_SAE) / (CE_zero_ablation − CE_clean)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from aosae.ops.gram_topk import gram_topk, k_for_fraction, num_pairs
from aosae.ops.sparse_coding import SparseLatents

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens is "dense" (SAEBench convention)


def _check_pair(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor [..., d_in], got shape {tuple(x.shape)}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).double()


def l0(latents: torch.Tensor) -> float:
    """Mean number of non-zero latents per token. latents: [..., d_sae]."""
    if latents.dim() < 1 or latents.numel() == 0:
        raise ValueError(f"latents must be a non-empty tensor [..., d_sae], got shape {tuple(latents.shape)}")
    return float((latents != 0).reshape(-1, latents.shape[-1]).sum(-1).double().mean())


def l1(latents: torch.Tensor) -> float:
    """Mean over tokens of Σ_i |f_i|. latents: [..., d_sae]."""
    return float(_flat(latents).abs().sum(-1).mean())


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over tokens and dimensions of (x − x̂)². x, x_hat: [..., d_in]."""
    _check_pair(x, x_hat)
    return float((_flat(x) - _flat(x_hat)).pow(2).mean())


def cossim(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over tokens of the cosine between x_t and x̂_t (a zero vector has cosine 0)."""
    _check_pair(x, x_hat)
    a, b = _flat(x), _flat(x_hat)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)).mean())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """SAEBench's corrected explained variance 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over all tokens."""
    _check_pair(x, x_hat)
    a, b = _flat(x), _flat(x_hat)
    total = (a - a.mean(0)).pow(2).sum()
    if total <= 0:
        raise ValueError("explained_variance is undefined when x has zero variance (all tokens identical)")
    return float(1.0 - (a - b).pow(2).sum() / total)


def explained_variance_legacy(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> float:
    """SAEBench's legacy (paper) formula: mean over tokens of 1 − ‖x_t − x̂_t‖² / ‖x_t − μ‖²."""
    _check_pair(x, x_hat)
    a, b = _flat(x), _flat(x_hat)
    per_token = 1.0 - (a - b).pow(2).sum(-1) / (a - a.mean(0)).pow(2).sum(-1).clamp_min(eps)
    return float(per_token.mean())


@dataclass
class ReconstructionStats:
    """Streaming accumulator for the reconstruction metrics over many batches.

    The corrected explained variance needs the mean over *all* tokens; this keeps Σx,
    Σ‖x‖², Σ‖x − x̂‖² (float64) so the result equals explained_variance() on the
    concatenation of the batches. cossim and l0 are averaged over tokens.
    """

    n_tokens: int = 0
    sum_x: Optional[torch.Tensor] = None
    sum_x_sq: float = 0.0
    sum_resid_sq: float = 0.0
    sum_cos: float = 0.0
    sum_l0: float = 0.0
    sum_l1: float = 0.0
    fire_counts: Optional[torch.Tensor] = None
    sum_legacy_ev: float = 0.0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor | SparseLatents) -> None:
        """x, x_hat: [..., d_in]; latents: [..., d_sae] (same leading shape), or the SparseLatents
        of the flattened tokens (what the SAE's forward keeps; nothing dense is built then)."""
        _check_pair(x, x_hat)
        a, b = _flat(x), _flat(x_hat)
        tokens = latents.batch if isinstance(latents, SparseLatents) else latents.reshape(-1, latents.shape[-1]).shape[0]
        if tokens != a.shape[0]:
            raise ValueError(f"latents have {tokens} tokens but x has {a.shape[0]}")
        self.n_tokens += a.shape[0]
        self.sum_x = a.sum(0) if self.sum_x is None else self.sum_x + a.sum(0)
        self.sum_x_sq += float(a.pow(2).sum())
        self.sum_resid_sq += float((a - b).pow(2).sum())
        self.sum_cos += cossim(a, b) * a.shape[0]
        if isinstance(latents, SparseLatents):
            values = latents.values.detach()
            fired = values != 0
            self.sum_l0 += float(fired.sum())
            self.sum_l1 += float(values.double().abs().sum())
            counts = torch.bincount(latents.indices[fired], minlength=latents.n_latents).double()
        else:
            f = latents.reshape(-1, latents.shape[-1])
            fired = f != 0
            self.sum_l0 += float(fired.sum())
            self.sum_l1 += float(f.double().abs().sum())
            counts = fired.sum(0).double()
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        self.sum_legacy_ev += explained_variance_legacy(a, b) * a.shape[0]

    def result(self) -> dict:
        if self.n_tokens == 0:
            raise ValueError("ReconstructionStats.result() called before any update()")
        n, d = self.n_tokens, self.sum_x.numel()
        mean = self.sum_x / n
        total = self.sum_x_sq - n * float(mean.pow(2).sum())
        density = self.fire_counts / n
        return {
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "mse": self.sum_resid_sq / (n * d),
            "cossim": self.sum_cos / n,
            "explained_variance": 1.0 - self.sum_resid_sq / total if total > 0 else float("nan"),
            # per-batch means, as SAEBench's legacy number was also computed batch by batch
            "explained_variance_legacy": self.sum_legacy_ev / n,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).double().mean()),
            "n_tokens": n,
        }


def latent_density(latents: torch.Tensor | SparseLatents) -> torch.Tensor:
    """Fraction of tokens on which each latent is non-zero. latents [..., d_sae] (or SparseLatents)
    -> [d_sae] float64."""
    if isinstance(latents, SparseLatents):
        if latents.batch == 0:
            raise ValueError("latent_density needs at least one token")
        fired = latents.indices[latents.values.detach() != 0]
        return torch.bincount(fired, minlength=latents.n_latents).double() / latents.batch
    f = latents.reshape(-1, latents.shape[-1])
    if f.shape[0] == 0:
        raise ValueError("latent_density needs at least one token")
    return (f != 0).double().mean(0)


def dead_fraction(density: torch.Tensor) -> float:
    """Fraction of latents that never fired. density: [d_sae] from latent_density()."""
    return float((density == 0).double().mean())


def dense_fraction(density: torch.Tensor, threshold: float = DENSE_THRESHOLD) -> float:
    """Fraction of latents firing on more than `threshold` (default 10%) of tokens."""
    return float((density > threshold).double().mean())


def kl_div_per_token(clean_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ p_new) per position. logits [..., vocab] -> [...] float32."""
    if clean_logits.shape != new_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(clean_logits.shape)} vs {tuple(new_logits.shape)}")
    lp = torch.log_softmax(clean_logits.float(), dim=-1)
    lq = torch.log_softmax(new_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def kl_score(kl_zero_ablation: float, kl_sae: float) -> float:
    """SAEBench kl_div_score = (KL_zero_ablation − KL_SAE) / KL_zero_ablation (1 = perfect)."""
    if not kl_zero_ablation > 0:
        raise ValueError(f"KL with zero ablation must be > 0 to normalise the score, got {kl_zero_ablation}")
    return (kl_zero_ablation - kl_sae) / kl_zero_ablation


def ce_loss_score(ce_zero_ablation: float, ce_sae: float, ce_clean: float) -> float:
    """SAEBench ce_loss_score = (CE_zero_ablation − CE_SAE) / (CE_zero_ablation − CE_clean)."""
    gap = ce_zero_ablation - ce_clean
    if gap == 0:
        raise ValueError("CE with zero ablation equals the clean CE: the CE-loss score is undefined")
    return (ce_zero_ablation - ce_sae) / gap


def _unit_columns(a: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return a / a.norm(dim=0, keepdim=True).clamp_min(eps)


def decoder_cosine_stats(W_dec: torch.Tensor, chunk: int = 1024) -> dict:
    """Off-diagonal |cos| between decoder rows, without an n × n matrix for large n.

    Args:
        W_dec: [d_sae, d_in], one row per latent (any float dtype).
        chunk: rows per block of the chunked pass.

    Returns dict:
        decoder_cos_max: the largest |cos| over all pairs (from gram_topk, k = 1, cosine).
        decoder_cos_mean: mean |cos| over all n(n−1)/2 pairs.
        decoder_cos_max_mean: mean over latents of each latent's max |cos| with another one
            (the average of SAEBench's per-feature max_decoder_cosine_sim).
    """
    if W_dec.dim() != 2 or W_dec.shape[0] < 2:
        raise ValueError(f"W_dec must be [d_sae >= 2, d_in], got shape {tuple(W_dec.shape)}")
    a = W_dec.detach().float().t().contiguous()  # [d_in, d_sae]: columns are the latents' directions
    top = gram_topk(a, 1, similarity="cosine")
    u = _unit_columns(a)
    n = u.shape[1]
    total, row_max = 0.0, torch.empty(n, dtype=torch.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = (u[:, s:e].t() @ u).abs()  # [e-s, n]
        idx = torch.arange(s, e)
        block[idx - s, idx] = 0.0  # drop the diagonal
        row_max[s:e] = block.max(1).values
        # the upper triangle of this block: column j > row i
        upper = torch.arange(n).unsqueeze(0) > idx.unsqueeze(1)
        total += float(block.double()[upper].sum())
    return {
        "decoder_cos_max": float(top.values[0].abs()),
        "decoder_cos_mean": total / num_pairs(n),
        "decoder_cos_max_mean": float(row_max.double().mean()),
    }


def coactivation_stats(
    latents: torch.Tensor, fraction: float = 0.005, similarity: str = "dot", chunk: int = 1024
) -> dict:
    """The penalty's own quantity |C_ij|, C = fᵀf over a batch of latents.

    Args:
        latents: [tokens, d_sae] float.
        fraction: share of pairs selected, as in TopKOrthoLoss (k = ceil(fraction · n(n−1)/2)).
        similarity: "dot" (|f_i·f_j|, the paper) or "cosine".

    Returns dict: topk_abs_c_mean (mean |C_ij| over the k selected pairs, empty slots
    excluded), all_abs_c_mean (mean |C_ij| over all n(n−1)/2 pairs, chunked), k.
    """
    if latents.dim() != 2 or latents.shape[1] < 2:
        raise ValueError(f"latents must be [tokens, d_sae >= 2], got shape {tuple(latents.shape)}")
    f = latents.detach().float()
    n = f.shape[1]
    k = k_for_fraction(n, fraction)
    pairs = gram_topk(f, k, similarity=similarity)
    valid = pairs.rows >= 0
    topk_mean = float(pairs.values[valid].abs().double().mean()) if bool(valid.any()) else 0.0
    g = _unit_columns(f) if similarity == "cosine" else f
    total = 0.0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = (g[:, s:e].t() @ g).abs()
        upper = torch.arange(n).unsqueeze(0) > torch.arange(s, e).unsqueeze(1)
        total += float(block.double()[upper].sum())
    return {"topk_abs_c_mean": topk_mean, "all_abs_c_mean": total / num_pairs(n), "k": k}



DUPLICATE_COS = 0.9


def duplicate_pairs(W_dec: torch.Tensor, live: Optional[torch.Tensor] = None, threshold: float = DUPLICATE_COS) -> dict:
    """Near-duplicate latents: pairs of live latents whose decoder rows have |cos| > threshold.

    Args:
        W_dec: [d_sae, d_in] decoder rows.
        live: [d_sae] bool, latents that fired on the evaluation tokens (None: all).
        threshold: |cos| above which two latents count as duplicates (0.9).

    Returns {"duplicate_pairs": count, "duplicate_latents": latents in at least one such pair,
    "live_latents": count}.
    """
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [d_sae, d_in], got shape {tuple(W_dec.shape)}")
    if live is not None and (live.shape != (W_dec.shape[0],) or live.dtype != torch.bool):
        raise ValueError(f"live must be a bool tensor [d_sae={W_dec.shape[0]}], got {live.dtype} {tuple(live.shape)}")
    rows = W_dec.detach().double()
    if live is not None:
        rows = rows[live]
    n = rows.shape[0]
    if n < 2:
        return {"duplicate_pairs": 0, "duplicate_latents": 0, "live_latents": n}
    u = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    close = (u @ u.t()).abs() > threshold
    close.fill_diagonal_(False)
    return {"duplicate_pairs": int(close.triu(1).sum()), "duplicate_latents": int(close.any(1).sum()), "live_latents": n}

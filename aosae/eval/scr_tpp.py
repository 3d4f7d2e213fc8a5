"""SCR (spurious correlation removal) and TPP (targeted probe perturbation) with SAEBench's
definitions (sae_bench/evals/scr_and_tpp, v0.6.0).

Both start from linear probes on the LM's mean-pooled activations (BOS/PAD/EOS dropped), trained
as SAEBench trains them: nn.Linear → BCE-with-logits + 1e-3·Σ|w|, AdamW lr 1e-3, batch 16 (small on
purpose: it sets how much of the spurious signal the biased probe learns), 20 epochs, keeping the
epoch with the best test accuracy. Then, per SAE:

1. Latents are ranked by their effect on a probe: (mean latent activation over the probe's
   positives − over its negatives, on the training texts) × (probe direction · decoder row).
   SCR ranks by the absolute effect; TPP keeps only latents more active on the positives
   (negative differences clipped to 0).
2. The top N latents (N in THRESHOLDS, only latents with a non-zero effect) are zero-ablated with
   the SAE error kept: x' = SAE.decode(f with those latents zeroed) + (x − SAE.decode(f)) =
   x − Σ_{i ∈ ablated} f_i·W_dec[i]; the probes are re-tested on the pooled x'.
   (Pooling is linear, so this is computed from the pooled latents; it assumes an affine
   decoder, as SAELens' and aosae's SAEs have. SAEBench pads every text to the context length
   with zero activations, and the error term it adds back at those positions does not vanish:
   −f(0)_i·W_dec[i] per padded position, summed into the pool. `pad_to` reproduces it.)
3. SCR (per pair of column-1 values, e.g. professor/nurse, with column 2, e.g. gender, as the
   spurious attribute): the `biased` probe was trained where the two agree. Ablating the latents
   of the spurious probe should raise its accuracy on the target task:
     scr_dir1_threshold_N = (A_abl − A_biased) / (A_target − A_biased)   (0 when the gap < 0.001)
   with A_biased, A_abl the biased probe's accuracy on target data before and after, A_target the
   target probe's own accuracy. dir2 swaps the roles (ablate the target's latents, measure on the
   spurious attribute). scr_metric_threshold_N is dir1 when the biased probe is worse on the target
   than on the spurious attribute, dir2 when better; on a tie SAEBench records neither, and the
   mean runs over the pairs that have one.
   TPP (per class of a multi-class dataset): ablate the class's latents; intended = the drop of its
   own probe's accuracy, unintended = the mean drop of the other classes' probes;
     tpp_threshold_N_total_metric = intended − unintended
   (and _intended_diff_only, _unintended_diff_only), averaged over classes and datasets.

Random draws (balanced negatives, probe initialisation and batch order) follow SAEBench's order
(sparse_probing.one_vs_rest), so one seed reproduces SAEBench's numbers on the same activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from aosae.eval.sparse_probing import (one_vs_rest, probe_accuracy, rng_state, seed_everything, set_rng_state,
                                       single_threaded, train_linear_probe)
from aosae.eval.tasks import SCR_KEYS, SCR_PAIRS

THRESHOLDS = (2, 5, 10, 20, 50, 100, 500)
SCR_CLASSES = tuple(SCR_PAIRS)  # spurious, target, biased
PROBE = dict(batch_size=16, epochs=20, lr=1e-3, l1=1e-3, patience=20)  # SAEBench's ScrAndTppEvalConfig
_PARTNER = {**SCR_PAIRS, **{v: k for k, v in SCR_PAIRS.items()}}


def _prepare(acts: dict[str, torch.Tensor], cls: str, scr: bool):
    return one_vs_rest(acts, cls, paired=_PARTNER[cls] if scr else None)


@dataclass
class LMProbes:
    """The SAE-independent half of SCR/TPP for one seed: probes, their clean test accuracies and
    the RNG state after them (every SAE starts from it, so each gets the numbers of a fresh run)."""
    probes: dict[str, nn.Linear]
    clean: dict[str, float]
    classes: tuple[str, ...]
    scr: bool
    state: tuple


def test_accuracies(probes: dict[str, nn.Linear], classes: Sequence[str], acts: dict[str, torch.Tensor],
                    scr: bool) -> dict[str, float]:
    """Each class's probe on its own test data; for SCR also every other probe on each class's
    data ("biased probe on target data", ...). SAEBench's get_probe_test_accuracy."""
    out = {c: probe_accuracy(probes[c], *_prepare(acts, c, scr)) for c in classes}
    if scr:
        for c in classes:
            if c not in SCR_PAIRS:
                continue
            x, y = _prepare(acts, c, True)
            for other in SCR_PAIRS:
                if other != c:
                    out[f"{other} probe on {c} data"] = probe_accuracy(probes[other], x, y)
    return out


@single_threaded
def train_lm_probes(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], scr: bool,
                    seed: Optional[int] = 42, classes: Optional[Sequence[str]] = None) -> LMProbes:
    """Probes on pooled LM activations, one per key of `train` in order (for SCR: the six groups in
    SCR_KEYS order, each against its partner, as SAEBench trains them), then their clean accuracies.

    train/test: key -> [n_texts, d_model] float32."""
    if scr and tuple(train) != SCR_KEYS:
        raise ValueError(f"SCR activations need the keys {SCR_KEYS} in that order, got {tuple(train)}")
    if set(train) != set(test):
        raise ValueError(f"train and test must have the same keys, got {sorted(train)} and {sorted(test)}")
    if seed is not None:
        seed_everything(seed)
    probes = {}
    for cls in train:
        x_tr, y_tr = _prepare(train, cls, scr)
        x_te, y_te = _prepare(test, cls, scr)
        probes[cls], _ = train_linear_probe(x_tr, y_tr, x_te, y_te, **PROBE)
    classes = tuple(classes) if classes is not None else (SCR_CLASSES if scr else tuple(train))
    with torch.no_grad():
        clean = test_accuracies(probes, classes, test, scr)
    return LMProbes(probes, clean, classes, scr, rng_state())


@torch.no_grad()
def node_effects(sae_train: dict[str, torch.Tensor], probe: nn.Linear, W_dec: torch.Tensor, cls: str, scr: bool) -> torch.Tensor:
    """[d_sae] effect of each latent on `probe` (module docstring, step 1). sae_train: pooled latents."""
    x, y = _prepare(sae_train, cls, scr)
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    if not scr:
        diff = diff.clamp(min=0.0)
    effects = diff * (W_dec.float() @ probe.weight[0].float())
    return effects.abs() if scr else effects


def top_latents(effects: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest effects, among the non-zero ones (fewer when fewer are non-zero)."""
    if n > effects.numel():
        raise ValueError(f"cannot ablate {n} latents: the SAE has {effects.numel()}; use thresholds <= d_sae")
    k = min(n, int((effects != 0).sum()))
    return torch.topk(effects, k).indices if k > 0 else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def ablate_pooled(lm_pooled: torch.Tensor, sae_pooled: torch.Tensor, W_dec: torch.Tensor, latents: torch.Tensor,
                  padded: Optional[torch.Tensor] = None, f_zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pooled x − Σ_{i ∈ latents} f_i·W_dec[i] per text (module docstring, step 2).

    padded [n_texts]: zero-activation positions per kept token that SAEBench's padding adds
    (see `pad_to` in SaeSide), with f_zero [d_sae] = SAE.encode(0)."""
    f = sae_pooled[:, latents]
    if padded is not None:
        f = f + padded.unsqueeze(1).to(f.dtype) * f_zero[latents].to(f.dtype).unsqueeze(0)
    return lm_pooled - f @ W_dec[latents].to(f.dtype)


@dataclass
class SaeSide:
    """What an SAE contributes: pooled latents of the training and test texts per key, the
    decoder, and (for SAEBench's padding term) padded positions per kept token and f(0)."""
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    W_dec: torch.Tensor
    padded: Optional[dict[str, torch.Tensor]] = None
    f_zero: Optional[torch.Tensor] = None


@single_threaded
def ablation_accuracies(lm: LMProbes, lm_test: dict[str, torch.Tensor], sae: SaeSide, ablated: Sequence[str],
                        thresholds: Sequence[int] = THRESHOLDS) -> dict[str, dict[int, dict[str, float]]]:
    """[ablated class][N][measured accuracy name] after zero-ablating the top-N latents of each
    class in `ablated`; starts from lm.state (SAEBench's perform_feature_ablations)."""
    set_rng_state(lm.state)
    effects = {c: node_effects(sae.train, lm.probes[c], sae.W_dec, c, lm.scr) for c in lm.classes}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for c in ablated:
        out[c] = {}
        for n in thresholds:
            latents = top_latents(effects[c], n)
            acts = {k: ablate_pooled(lm_test[k], sae.test[k], sae.W_dec, latents,
                                     None if sae.padded is None else sae.padded[k], sae.f_zero) for k in lm_test}
            with torch.no_grad():
                out[c][n] = test_accuracies(lm.probes, lm.classes, acts, lm.scr)
    return out


def scr_scores(ablated: dict[str, dict[int, dict[str, float]]], clean: dict[str, float]) -> dict[str, float]:
    """scr_dir1/dir2/metric_threshold_N for one SCR pair (SAEBench's get_scr_plotting_dict)."""
    res = {}
    measured = "biased probe on {} data"
    dir1_acc, dir2_acc = clean[measured.format("target")], clean[measured.format("spurious")]
    for d, (ablated_cls, data_cls) in ((1, ("spurious", "target")), (2, ("target", "spurious"))):
        for n, accs in ablated[ablated_cls].items():
            original = clean[measured.format(data_cls)]
            gap = clean[data_cls] - original
            score = 0.0 if gap < 0.001 else (accs[measured.format(data_cls)] - original) / gap
            res[f"scr_dir{d}_threshold_{n}"] = score
            if (d == 1 and dir1_acc < dir2_acc) or (d == 2 and dir1_acc > dir2_acc):
                res[f"scr_metric_threshold_{n}"] = score
    return res


def tpp_scores(ablated: dict[str, dict[int, dict[str, float]]], clean: dict[str, float]) -> tuple[dict, dict]:
    """(means over classes, per class) of tpp_threshold_N_{total_metric, intended_diff_only,
    unintended_diff_only} (SAEBench's create_tpp_plotting_dict)."""
    per_class = {}
    for c in clean:
        m = {}
        for n, accs in ablated[c].items():
            intended = clean[c] - accs[c]
            others = [clean[o] - accs[o] for o in clean if o != c]
            unintended = sum(others) / len(others)
            m[f"tpp_threshold_{n}_total_metric"] = intended - unintended
            m[f"tpp_threshold_{n}_intended_diff_only"] = intended
            m[f"tpp_threshold_{n}_unintended_diff_only"] = unintended
        per_class[c] = m
    keys = next(iter(per_class.values())).keys()
    return {k: sum(m[k] for m in per_class.values()) / len(per_class) for k in keys}, per_class


def average(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per metric, the mean over the result dicts that have it (SAEBench's average_results_dictionaries)."""
    sums: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.items():
            sums.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def scr_for_pair(lm: LMProbes, lm_test: dict[str, torch.Tensor], sae: SaeSide,
                 thresholds: Sequence[int] = THRESHOLDS) -> dict[str, float]:
    """SCR of one SAE on one pair (the biased probe's latents are not needed by the metric)."""
    return scr_scores(ablation_accuracies(lm, lm_test, sae, ("spurious", "target"), thresholds), lm.clean)


def tpp_for_dataset(lm: LMProbes, lm_test: dict[str, torch.Tensor], sae: SaeSide,
                    thresholds: Sequence[int] = THRESHOLDS) -> tuple[dict, dict]:
    return tpp_scores(ablation_accuracies(lm, lm_test, sae, lm.classes, thresholds), lm.clean)

"""SAEBench's first-letter feature absorption metric, simplified but with its definitions.

Pipeline (after SAEBench evals/absorption, Chanin et al. "A is for Absorption"):
1. Vocabulary: the model's own tokens that are one alphabetic word with a leading space
   (" cat"); a deterministic sample of `max_words`.
2. Prompts: a fixed in-context prefix of `n_icl` examples "{w} has the first letter: {L}"
   then "{word} has the first letter:"; the residual activation of the hooked block is read
   at the word's token. (SAEBench shuffles its ≤10 examples per prompt; the fixed prefix
   keeps every prompt the same length and halves the cost on CPU.)
3. A 26-way logistic-regression probe (torch) on those activations predicts the first
   letter; train/test split 80/20.
4. Main latents per letter: candidates are the latents whose decoder rows have the highest
   cosine with the letter's probe direction; k grows from 1 while adding the next latent
   raises the F1 of "any main latent fires ⇒ letter" on the training words by more than
   `f1_jump_threshold` (SAEBench's feature-split rule, with cosine ranking in place of its
   k-sparse probe ranking).
5. On held-out words where the probe is right (probe true positives), SAEBench's two scores:
   absorption fraction: the share of the probe projection carried by other probe-aligned
     latents (cos ≥ 0.1, up to 3 of them, contributing ≥ 40% of the projection) instead of
     the main latents;
   full absorption: the main latents are all silent, the top probe-projecting latent has
     cos ≥ 0.025 with the probe and carries ≥ 40% of the projection.
   Each is averaged per letter over its true positives, then over letters.

CAVEAT (SAEBench's own): the metric is meaningful only for wide SAEs (≥ 16k latents) on
models with ≥ 1B parameters; on small models/SAEs the probe and the main latents are noisy.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from aosae.data.language_models import decoder_layers

CAVEAT = ("absorption caveat: SAEBench's first-letter absorption is meaningful only for SAEs with "
          ">= 16k latents on models with >= 1B parameters; smaller settings give noisy numbers")
LETTERS = string.ascii_lowercase
WORD = re.compile(r"^ [A-Za-z]+$")


@dataclass
class AbsorptionConfig:
    max_words: int = 1000
    n_icl: int = 4
    template: str = " has the first letter:"
    probe_steps: int = 300
    probe_lr: float = 0.05
    probe_weight_decay: float = 1e-3
    max_k: int = 10
    f1_jump_threshold: float = 0.03
    full_cos_threshold: float = 0.025
    fraction_cos_threshold: float = 0.1
    proportion_threshold: float = 0.4
    max_absorbing: int = 3
    batch_size: int = 64
    seed: int = 0


def alpha_tokens(tokenizer) -> list[tuple[int, str]]:
    """(token id, word) for every vocabulary token that decodes to ' <letters>'."""
    out = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if WORD.match(text) and len(text) > 2:
            out.append((tid, text[1:]))
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Stop(Exception):
    pass


@torch.no_grad()
def word_activations(model, tokenizer, words: list[tuple[int, str]], icl: list[tuple[int, str]],
                     layer: int, cfg: AbsorptionConfig) -> torch.Tensor:
    """[len(words), d] residual activations at the word token of each prompt (the forward
    stops after block `layer`)."""
    suffix = _ids(tokenizer, cfg.template)
    newline = _ids(tokenizer, "\n")
    prefix = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        prefix.append(bos)
    for tid, w in icl:
        prefix += [tid] + suffix + _ids(tokenizer, " " + w[0].upper()) + newline
    pos = len(prefix)
    rows = [prefix + [tid] + suffix for tid, _ in words]
    device = next(model.parameters()).device
    out: list = []
    layer_module = decoder_layers(model)[layer]

    def grab(_module, _inputs, output):  # keep block `layer`'s output and skip the rest of the model
        h = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
        out.append(h[:, pos].detach().float().cpu())
        raise _Stop

    handle = layer_module.register_forward_hook(grab)
    try:
        for s in range(0, len(rows), cfg.batch_size):
            try:
                model(input_ids=torch.tensor(rows[s : s + cfg.batch_size], device=device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)


def train_probe(x: torch.Tensor, y: torch.Tensor, cfg: AbsorptionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """26-way logistic regression; returns (weights [26, d], bias [26]). Inputs are
    standardised for the optimiser and the weights mapped back to raw-activation space."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    W = torch.zeros(len(LETTERS), x.shape[1], requires_grad=True)
    b = torch.zeros(len(LETTERS), requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=cfg.probe_lr)
    for _ in range(cfg.probe_steps):
        loss = torch.nn.functional.cross_entropy(z @ W.t() + b, y) + cfg.probe_weight_decay * W.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    W_raw = (W / sd).detach()
    return W_raw, (b - (W / sd) @ mu).detach()


def _f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    tp = float((pred & true).sum())
    fp, fn = float((pred & ~true).sum()), float((~pred & true).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def main_latents(cos: torch.Tensor, fires: torch.Tensor, is_letter: torch.Tensor, cfg: AbsorptionConfig) -> list[int]:
    """cos [d_sae] with the probe; fires [n, d_sae] bool on training words; is_letter [n] bool."""
    cand = cos.topk(min(cfg.max_k, cos.numel())).indices.tolist()
    chosen = [cand[0]]
    best = _f1(fires[:, chosen].any(1), is_letter)
    for c in cand[1:]:
        f1 = _f1(fires[:, chosen + [c]].any(1), is_letter)
        if f1 - best <= cfg.f1_jump_threshold:
            break
        chosen.append(c)
        best = f1
    return chosen


def word_scores(acts: torch.Tensor, x: torch.Tensor, probe_dir: torch.Tensor, cos: torch.Tensor,
                main: list[int], cfg: AbsorptionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's absorption fraction and full-absorption flag per word.

    acts [n, d_sae] SAE latents; x [n, d] activations; probe_dir [d] unit; cos [d_sae].
    Returns (fraction [n] float64, full [n] bool).
    """
    proj = x.double() @ probe_dir.double()  # probe projection of the activation
    lat_proj = acts.double() * cos.double()  # each latent's projection (unit decoder rows)
    main_proj = lat_proj[:, main].sum(1)
    mask = torch.ones_like(cos, dtype=torch.bool)
    mask[main] = False
    mask &= cos >= cfg.fraction_cos_threshold
    absorbers = torch.where(mask & (lat_proj > 0), lat_proj, torch.zeros_like(lat_proj))
    top_abs = absorbers.topk(min(cfg.max_absorbing, absorbers.shape[1]), dim=1).values.sum(1)
    frac = torch.zeros_like(proj)
    share = top_abs / proj
    active = (main_proj < proj) & (share >= cfg.proportion_threshold)
    full_abs = active & (main_proj <= 0)
    partial = active & (main_proj > 0)
    frac[full_abs] = 1.0
    absorbed = torch.minimum(top_abs, proj - main_proj)
    frac[partial] = (absorbed / (absorbed + main_proj))[partial].clamp(0, 1)
    top_val, top_idx = lat_proj.topk(1, dim=1)
    main_silent = (acts[:, main].abs() < 1e-8).all(1)
    full = main_silent & (cos[top_idx[:, 0]] >= cfg.full_cos_threshold) & (proj >= 0) & \
        (top_val[:, 0] / proj >= cfg.proportion_threshold)
    return frac, full


def absorption_eval(sae, model, tokenizer, layer: int, cfg: Optional[AbsorptionConfig] = None,
                    log: Callable[[str], None] = print) -> dict:
    """First-letter absorption of `sae` at decoder block `layer` of `model`. Returns
    mean_absorption_fraction_score, mean_full_absorption_score, mean_num_split_features
    (SAEBench names) plus probe_test_accuracy, n_words, n_letters and the caveat."""
    cfg = cfg or AbsorptionConfig()
    log(CAVEAT)
    vocab = alpha_tokens(tokenizer)
    if len(vocab) < 60:
        raise ValueError(f"the tokenizer has only {len(vocab)} single-word alphabetic tokens; absorption needs more")
    rng = random.Random(cfg.seed)
    rng.shuffle(vocab)
    icl, vocab = vocab[: cfg.n_icl], vocab[cfg.n_icl : cfg.n_icl + cfg.max_words]
    x = word_activations(model, tokenizer, vocab, icl, layer, cfg)
    y = torch.tensor([LETTERS.index(w[0].lower()) for _, w in vocab])
    n_train = int(0.8 * len(vocab))
    W, b = train_probe(x[:n_train], y[:n_train], cfg)
    pred = (x @ W.t() + b).argmax(1)
    test_acc = float((pred[n_train:] == y[n_train:]).double().mean())
    device = next(sae.parameters()).device
    with torch.no_grad():
        acts = sae.encode(x.to(device)).float().cpu()
        W_dec = sae.W_dec.detach().float().cpu()
    dec_unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    fires = acts != 0
    fractions, fulls, splits, per_letter = [], [], [], {}
    for li, letter in enumerate(LETTERS):
        probe_dir = W[li] / W[li].norm().clamp_min(1e-12)
        cos = dec_unit @ probe_dir
        main = main_latents(cos, fires[:n_train], y[:n_train] == li, cfg)
        test = torch.arange(n_train, len(vocab))
        tp = test[(y[test] == li) & (pred[test] == li)]
        if tp.numel() == 0:
            continue
        frac, full = word_scores(acts[tp], x[tp], probe_dir, cos, main, cfg)
        fractions.append(float(frac.mean()))
        fulls.append(float(full.double().mean()))
        splits.append(len(main))
        per_letter[letter] = {"absorption_fraction": fractions[-1], "full_absorption_rate": fulls[-1],
                              "num_probe_true_positives": int(tp.numel()), "main_latents": main}
    if not fractions:
        raise ValueError("the probe got no held-out word right: raise max_words or check the hooked layer")
    return {
        "mean_absorption_fraction_score": sum(fractions) / len(fractions),
        "mean_full_absorption_score": sum(fulls) / len(fulls),
        "mean_num_split_features": sum(splits) / len(splits),
        "absorption_probe_test_accuracy": test_acc,
        "absorption_n_words": len(vocab),
        "absorption_n_letters": len(fractions),
        "absorption_caveat": CAVEAT,
        "absorption_per_letter": per_letter,
    }

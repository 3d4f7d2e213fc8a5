"""TrainConfig: one training run's settings, the paper's defaults, validated on construction.

Paper defaults: λ = 0.04 (ReLU; 0 with TopK and BatchTopK, whose k sets the sparsity), AdamW
lr 9e-4 with a 1000-step linear warm-up, batch 2048 tokens, context 128, fraction 0.005,
τ₀ = 0.05 in [0.01, 0.2], adaptive τ, d_sae = d_in unless set. Short runs: warm-up =
min(1000, 10% of the steps) when `warmup_steps` is None, because the paper's warm-up is longer
than a whole offline run.
AdaptiveTau calibrates L_target as the mean recon loss over the warm-up steps.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Literal, Optional

from aosae.data.store import STORE_DTYPES as STORE_TORCH_DTYPES
from aosae.nn.loss import SCALES
from aosae.nn.penalties import PAIR_RULES, PENALTIES
from aosae.nn.sae import ACTIVATIONS, K_ACTIVATIONS
from aosae.nn.tau import TAU_RULES
from aosae.ops.gram_topk import SIMILARITIES
from aosae.training.logging import LOG_BACKENDS

DTYPES = ("float32", "bfloat16", "float16")
STORE_DTYPES = tuple(STORE_TORCH_DTYPES)  # defined with the store
# Field names of earlier versions, so that their run directories still resume.
RENAMED = {"tau0": "tau_init", "k": "top_k"}


def default_l1(activation: str) -> float:
    """--l1's default: 0 where k sets the sparsity (topk, batchtopk); the paper's λ otherwise (relu)."""
    return 0.0 if activation in K_ACTIVATIONS else 0.04


def option(name: str) -> str:
    """The command-line option of a TrainConfig field (the name a user typed, or sees in --help)."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """One training run. Every field is a command-line option of `aosae train`."""

    model: Optional[str] = None
    """Hugging Face causal LM id or local directory; None: the offline SmolLM2-135M."""
    layer: int = 6
    """Decoder block whose output (residual stream) is hooked."""
    dataset: Optional[str] = None
    """`datasets` hub name or local text/json/parquet file with a `text` column; None: the standard-library corpus."""
    tokens: int = 200_000
    """Activations collected (and cached) once, then reused over epochs."""
    context: int = 128
    """Tokens per sequence, BOS included."""
    d_sae: Optional[int] = None
    """Number of latents; None: d_in."""
    steps: int = 400
    """Optimiser steps (with --resume: the total to train the run on to, at least the steps it has done)."""
    batch_size: int = 2048
    """Tokens per optimiser step."""
    lr: float = 9e-4
    """AdamW learning rate."""
    l1: Optional[float] = None
    """L1 coefficient; None: the paper's 0.04 with activation relu, and 0 with topk and batchtopk, whose k sets
    the sparsity (as in SAELens, sparsify and dictionary_learning: an L1 term drives their L0 below k)."""
    warmup_steps: Optional[int] = None
    """Linear learning-rate warm-up; None: min(1000, 10% of steps)."""
    fraction: float = 0.005
    """Share of latent pairs penalised (the paper's 0.5%)."""
    similarity: Literal[SIMILARITIES] = "dot"
    """Score of a latent pair: |f_i·f_j| (dot) or its cosine."""
    backend: str = "auto"
    """gram_topk backend for the penalty: auto, reference, cpu, sparse or triton."""
    ortho: bool = True
    """Apply the orthogonality penalty (--no-ortho: a plain L1 SAE)."""
    tau_init: float = 0.05
    """Initial penalty weight τ."""
    tau_min: float = 0.01
    """Lower bound of τ."""
    tau_max: float = 0.2
    """Upper bound of τ."""
    tau_target: Optional[float] = None
    """L_target of the τ rule; None: the mean reconstruction loss over the warm-up."""
    fixed_tau: bool = False
    """Keep τ = tau_init (no adaptation)."""
    penalty: Literal[PENALTIES] = "coactivation"
    """What the penalty sums over its selected pairs: coactivation (the paper: |C_ij|), coact_x_decoder
    (|C_ij|·|cos(d_i, d_j)|), decoder_on_coactive (|cos(d_i, d_j)| of the most co-active pairs) or decoder
    (top pairs of the decoder cosine, OrtSAE-style); see aosae.nn.penalties."""
    ortho_scale: Literal[SCALES] = "per_token"
    """Penalty scale of --penalty coactivation: per_token (C = fᵀf / B, like the other loss terms) or batch_sum
    (the paper's literal C = fᵀf, B× larger; collapses training at the paper's τ range)."""
    pair_rule: Literal[PAIR_RULES] = "all"
    """k = fraction × all n(n−1)/2 pairs (all, the paper) or × the pairs co-active in the batch (coactive)."""
    tau_rule: Literal[TAU_RULES] = "paper"
    """paper: τ ← clip(τ·L_target/L_recon); budget: τ steered so that the training FVU meets --tau-budget (BudgetTau)."""
    tau_budget: Optional[float] = None
    """FVU (1 − explained variance on the training batches) that --tau-rule budget holds reconstruction to,
    e.g. 1.05 × the FVU of a --no-ortho run with the same λ."""
    tau_budget_run: Optional[str] = None
    """Budget rule: a finished penalty-free run on the same data; the budget at step t is (1 + --tau-slack) × its
    smoothed FVU at step t (instead of a constant --tau-budget)."""
    tau_slack: float = 0.05
    """Budget rule with --tau-budget-run: allowed relative FVU excess over the reference run."""
    tau_gain: float = 0.5
    """Budget rule: step of log τ per unit of log(budget / FVU) (each step clipped to ±0.05)."""
    activation: Literal[ACTIVATIONS] = "relu"
    """Latent activation: relu, topk (keep the top_k largest pre-activations of each token) or batchtopk (keep the
    top_k·B largest of each batch of B tokens; at inference a threshold learnt in training, saved as SAELens's JumpReLU)."""
    top_k: Optional[int] = None
    """Latents kept per token with activation topk (on average over the batch with batchtopk)."""
    seed: int = 0
    """Seed of the SAE's initialisation and the batch order."""
    device: str = "auto"
    """auto, cpu or cuda[:i]."""
    dtype: Literal[DTYPES] = "float32"
    """LM weights dtype; on GPU the SAE step runs under bf16 autocast."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    cache_dir: Optional[str] = None
    """Activation cache; None: $AOSAE_CACHE/activations."""
    out: Optional[str] = None
    """Run directory; None: runs/<model>-L<layer>-<time>."""
    lm_batch: int = 16
    """Sequences per LM forward while collecting activations."""
    normalize_activations: bool = True
    """Train on x/E‖x‖ (λ = 0.04 then gives L0 ≈ 10-100 on any model); folded back into the weights at save."""
    # --- activation pipeline, checkpoints and logging (bounded memory: see aosae/data/store.py, mixing.py)
    store_dtype: Literal[STORE_DTYPES] = "bfloat16"
    """Dtype of the on-disk activation store: bfloat16 (default: float32's range, half its size, rounding far
    below any SAE's error), float16 (more precise, checked for overflow) or float32 (exact, 2x the disk)."""
    streaming: bool = False
    """Train while the LM runs, with no store on disk. Each epoch re-runs the LM; a resume re-runs it over the
    first buffer group (the activation scale) and the checkpoint's group (re-tokenising the text before it)."""
    buffer_tokens: int = 131_072
    """Rows in the shuffling buffer: each batch mixes rows from 32 places across the store; RAM holds two
    float32 buffers (in use + prefetched) of buffer_tokens × d_in (2 × 302 MB at d_in 576)."""
    keep_checkpoints: int = 3
    """Checkpoints kept: the newest N plus the final one (older ones are deleted as training goes)."""
    log: Optional[Literal[LOG_BACKENDS]] = None
    """Also log metrics to wandb (offline unless WANDB_MODE is set) or tensorboard (optional extras)."""

    def __post_init__(self):
        def positive_int(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{option(name)} must be a positive int, got {v!r}")

        for name in ("tokens", "context", "steps", "batch_size", "checkpoint_every", "lm_batch", "buffer_tokens",
                     "keep_checkpoints"):
            positive_int(name)
        positive_int("d_sae", allow_none=True)
        if self.d_sae is not None and self.d_sae < 2:  # the penalty needs a pair of latents; caught before collecting
            raise ValueError(f"--d-sae must be at least 2 (an SAE needs at least two latents), got {self.d_sae}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be an int in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device!r} is not a device aosae trains on: use auto, cpu, cuda or cuda:N")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"--layer must be a non-negative int, got {self.layer!r}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 2:
            raise ValueError(f"--context must be an int >= 2 (BOS + at least one token), got {self.context!r}; pass --context 2 or more")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"--warmup-steps must be a non-negative int or None, got {self.warmup_steps!r}")
        for name in ("lr", "tau_init", "tau_min", "tau_max"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{option(name)} must be a positive finite number, got {v!r}")
        if self.l1 is None:
            self.l1 = default_l1(self.activation)
        if not (isinstance(self.l1, (int, float)) and math.isfinite(self.l1) and self.l1 >= 0):
            raise ValueError(f"--l1 must be a non-negative finite number, got {self.l1!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not self.tau_min <= self.tau_init <= self.tau_max:
            raise ValueError(f"need --tau-min <= --tau-init <= --tau-max, got {self.tau_min} <= {self.tau_init} <= {self.tau_max}")
        if self.tau_target is not None and not (math.isfinite(self.tau_target) and self.tau_target > 0):
            raise ValueError(f"--tau-target must be a positive finite loss or None, got {self.tau_target}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.ortho_scale not in SCALES:
            raise ValueError(f"ortho_scale must be one of {SCALES}, got {self.ortho_scale!r}")
        if self.ortho_scale != "per_token" and (self.penalty != "coactivation" or self.pair_rule != "all"):
            raise ValueError("--ortho-scale batch_sum is the paper's literal penalty: use it with --penalty coactivation "
                             "--pair-rule all")
        if self.pair_rule not in PAIR_RULES:
            raise ValueError(f"pair_rule must be one of {PAIR_RULES}, got {self.pair_rule!r}")
        if self.penalty == "decoder" and self.pair_rule != "all":
            raise ValueError("--penalty decoder selects pairs on the decoder: use it with --pair-rule all")
        if self.tau_rule not in TAU_RULES:
            raise ValueError(f"tau_rule must be one of {TAU_RULES}, got {self.tau_rule!r}")
        if self.tau_rule == "budget" and (self.tau_budget is None) == (self.tau_budget_run is None):
            raise ValueError("--tau-rule budget needs exactly one of --tau-budget (an FVU, e.g. 1.05 × a --no-ortho "
                             "run's 1 − explained variance) and --tau-budget-run (that run's directory)")
        if self.tau_budget is not None and not (isinstance(self.tau_budget, (int, float)) and 0 < self.tau_budget < 1):
            raise ValueError(f"--tau-budget must be an FVU in (0, 1), got {self.tau_budget!r}")
        if not (isinstance(self.tau_slack, (int, float)) and math.isfinite(self.tau_slack) and self.tau_slack >= 0):
            raise ValueError(f"--tau-slack must be a non-negative number, got {self.tau_slack!r}")
        if not (isinstance(self.tau_gain, (int, float)) and math.isfinite(self.tau_gain) and self.tau_gain > 0):
            raise ValueError(f"--tau-gain must be a positive finite number, got {self.tau_gain!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation in ("topk", "batchtopk"):
            if self.top_k is None:
                raise ValueError(f"--activation {self.activation} needs --top-k K, the latents kept per token (e.g. "
                                 "--top-k 32)")
            positive_int("top_k")
            if self.d_sae is not None and self.top_k > self.d_sae:
                raise ValueError(f"--top-k {self.top_k} exceeds --d-sae {self.d_sae}: keep at most d_sae latents per token")
        elif self.top_k is not None:
            raise ValueError("top_k is only used with --activation topk or batchtopk")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        if self.log is not None and self.log not in LOG_BACKENDS:
            raise ValueError(f"log must be one of {LOG_BACKENDS} or None, got {self.log!r}")
        if self.buffer_tokens < self.batch_size:
            raise ValueError(f"--buffer-tokens ({self.buffer_tokens}) must be at least --batch-size ({self.batch_size}): "
                             "the shuffling buffer holds whole batches")
        if self.batch_size > self.tokens:
            raise ValueError(
                f"--batch-size ({self.batch_size}) is larger than the activation buffer (--tokens {self.tokens}); "
                "lower --batch-size or raise --tokens"
            )

    @property
    def warmup(self) -> int:
        """Linear warm-up length: warmup_steps, or min(1000, 10% of steps) (at least 1)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, min(1000, self.steps // 10))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = {RENAMED.get(key, key): value for key, value in d.items()}
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)

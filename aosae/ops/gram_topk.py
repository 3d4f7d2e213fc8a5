"""The core op: the k most correlated column pairs of a matrix, as a torch.library op.

`gram_topk` validates its input (shapes, dtypes, k, backend) and calls the custom op
`aosae::gram_topk`, which picks a backend and returns TopKPairs. The op has a fake
(meta) kernel and an autograd formula, so `torch.compile` and `torch.library.opcheck`
work, and its backward is itself the op `aosae::gram_topk_backward`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from aosae.ops import backends
from aosae.ops.backward import gram_topk_backward
from aosae.ops.conventions import empty_pairs

SIMILARITIES = ("dot", "cosine")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)  # latent ids and row pointers of sparse inputs


class TopKPairs(NamedTuple):
    """The k selected pairs, best first.

    values: [k] float32 (float64 for float64 input): the signed score C_ij (dot) or
        cosine of columns i and j; 0 in empty slots.
    rows: [k] int64, the smaller index i of each pair; -1 in empty slots.
    cols: [k] int64, the larger index j > i; -1 in empty slots.
    """

    values: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def num_pairs(n: int) -> int:
    """Number of unordered pairs i < j among n columns."""
    return n * (n - 1) // 2


def k_for_fraction(n: int, fraction: float) -> int:
    """k = ceil(fraction · n(n−1)/2), at least 1: the paper's 0.5% is fraction=0.005."""
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # round first so that e.g. 0.005 * 499500 = 2497.5000000000005 does not become 2498
    return max(1, math.ceil(round(fraction * num_pairs(n), 9)))


def gram_topk(
    a: torch.Tensor,
    k: int,
    *,
    similarity: str = "dot",
    backend: str = "auto",
    threshold: Optional[torch.Tensor] = None,
) -> TopKPairs:
    """The k column pairs (i < j) of `a` with the largest |C_ij|, C = aᵀa, without
    materialising C (except in the reference backend).

    Args:
        a: [m, n] float16/bfloat16/float32/float64, on CPU or CUDA. Columns are the
            vectors compared (latent activations over a batch: a = f [batch, n_latents];
            decoder directions: a = W_decᵀ [d_in, n_latents]). Scores are accumulated in
            float32 (float64 for float64 input).
        k: number of pairs, 1 <= k <= n(n-1)/2.
        similarity: "dot" scores |a_i · a_j|; "cosine" scores |a_i · a_j| / (‖a_i‖‖a_j‖)
            (a zero column has cosine 0 with everything).
        backend: "auto" | "reference" | "cpu" | "sparse" | "triton". "auto" (or the
            AOSAE_BACKEND environment variable) picks the fastest usable one.
        threshold: optional 0-d tensor, a hint that the k-th best score is at least about
            this (e.g. the previous step's k-th score). Only speed depends on it.

    Returns:
        TopKPairs(values [k], rows [k] int64, cols [k] int64), sorted by |value|
        descending, ties by (row, col) ascending. When fewer than k pairs have a non-zero
        score the remaining slots hold value 0 and index -1. Deterministic for a given
        input and device. Differentiable with respect to `a` through `values`.

    The padded output costs k·20 bytes: at the paper's fraction 0.005 of n(n−1)/2 pairs,
    3.4 GB at n = 2¹⁸ and 55 GB at n = 2²⁰, so past n ≈ 2¹⁹ it stops fitting in memory. The
    training path (TopKOrthoLoss, RedundancyPenalty) selects through
    aosae.ops.coactive_topk, which returns only the min(k, P) co-active pairs.
    """
    validate(a, k, similarity, backend)
    if threshold is not None:
        threshold = check_threshold(threshold, a)
    values, rows, cols = torch.ops.aosae.gram_topk(a, k, similarity, backend, threshold)
    return TopKPairs(values, rows, cols)


def validate(a: torch.Tensor, k: int, similarity: str, backend: str) -> None:
    """Raises TypeError/ValueError naming what is wrong with the arguments and how to fix it."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"gram_topk expects a torch.Tensor, got {type(a).__name__}")
    if a.dim() != 2:
        raise ValueError(
            f"gram_topk expects a 2-D tensor [m, n] (columns are the vectors compared), "
            f"got shape {tuple(a.shape)}; reshape activations to [tokens, n_latents]"
        )
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"gram_topk expects a floating tensor (float16, bfloat16, float32, float64), "
            f"got {a.dtype}; convert with a.float()"
        )
    if a.is_sparse or a.layout != torch.strided:
        raise TypeError(f"gram_topk expects a dense (strided) tensor, got layout {a.layout}; use a.to_dense()")
    m, n = a.shape
    if m < 1:
        raise ValueError(f"gram_topk needs at least one row (m >= 1), got shape {tuple(a.shape)}")
    if n < 2:
        raise ValueError(f"gram_topk needs at least 2 columns to form a pair, got n = {n}")
    validate_k_and_similarity(k, n, similarity)
    if backend != "auto":
        backends.resolve(backend, a)  # raises if unknown, or if it cannot run on `a`


def check_threshold(threshold, a: torch.Tensor) -> torch.Tensor:
    """The warm-start hint as a one-element tensor on a's device or the CPU, or TypeError/ValueError."""
    if not isinstance(threshold, torch.Tensor):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number or a 0-d tensor (e.g. the previous step's k-th score), "
                            f"got {type(threshold).__name__}")
        return torch.tensor(float(threshold))
    if threshold.numel() != 1:
        raise ValueError(f"threshold must be one score (a 0-d tensor, e.g. the previous step's k-th |C_ij|), "
                         f"got shape {tuple(threshold.shape)}")
    if threshold.device != a.device and threshold.device.type != "cpu":
        raise ValueError(f"threshold is on {threshold.device} but a is on {a.device}; use threshold.to(a.device)")
    return threshold


MAX_LATENTS = 2**31


def validate_k_and_similarity(k: int, n: int, similarity: str) -> None:
    """k must be an int in [1, n(n-1)/2]; similarity one of SIMILARITIES."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if n >= MAX_LATENTS:  # the kernels index latents with 32-bit ints (and pair ids i·n + j must fit int64)
        raise ValueError(f"n = {n} latents is too many: n must be below 2**31 (the kernels index latents with 32-bit ints)")
    if not 1 <= k <= num_pairs(n):
        raise ValueError(f"k must be in [1, n(n-1)/2] = [1, {num_pairs(n)}] for n = {n}, got k = {k}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def check_finite(a: torch.Tensor) -> None:
    # max |a| is NaN/Inf exactly when some element is: one pass, no n-sized temporary
    if not bool(torch.isfinite(torch.linalg.vector_norm(a, float("inf")))):
        bad = int((~torch.isfinite(a)).sum())
        raise ValueError(
            f"gram_topk input contains {bad} NaN/Inf value(s); check the activations "
            f"(e.g. torch.nan_to_num) or the training run that produced them"
        )


def kth_score(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th score of a top-k selection (0-d): the smallest |value| of its first k, in any order
    (the unordered selection's set has the same k-th); 0 when it holds fewer than k pairs (the
    empty slots' score)."""
    return values[:k].abs().min() if values.numel() >= k else values.new_zeros(())


@torch.library.custom_op("aosae::gram_topk", mutates_args=())
def _gram_topk_op(
    a: torch.Tensor, k: int, similarity: str, backend: str, threshold: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_finite(a)
    name = backends.resolve(backend, a)
    hint = None if threshold is None else float(threshold)
    values, rows, cols = backends.get(name).forward(a, k, similarity == "cosine", hint)
    return values, rows, cols


@_gram_topk_op.register_fake
def _(a, k, similarity, backend, threshold):
    return empty_pairs(a, k)


@torch.library.custom_op("aosae::gram_topk_backward", mutates_args=())
def _gram_topk_backward_op(
    grad_values: torch.Tensor,
    a: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    similarity: str,
) -> torch.Tensor:
    return gram_topk_backward(grad_values, a, values, rows, cols, similarity == "cosine")


@_gram_topk_backward_op.register_fake
def _(grad_values, a, values, rows, cols, similarity):
    return torch.empty_like(a)


def _setup_context(ctx, inputs, output):
    a, _, similarity, _, _ = inputs
    values, rows, cols = output
    ctx.save_for_backward(a, values, rows, cols)
    ctx.similarity = similarity


def _backward(ctx, grad_values, grad_rows, grad_cols):
    a, values, rows, cols = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None, None
    grad_a = torch.ops.aosae.gram_topk_backward(grad_values, a, values, rows, cols, ctx.similarity)
    return grad_a, None, None, None, None


_gram_topk_op.register_autograd(_backward, setup_context=_setup_context)

"""Orthogonality penalties aimed at redundancy, all through the gram_topk op.

The paper penalises the co-activation C = fᵀf / B of the k most co-active latent pairs.
A parent latent that fires with its child is such a pair, so the paper's penalty pushes
towards absorption; what an orthogonality penalty should remove are latents that fire
together *and* point the same way. The kinds (per token, like the trainer's losses):

    coactivation         Σ_S |C_ij|                      S = top-k of |C| (the paper; with
                                                         similarity="cosine": top-k of cos(f_i, f_j))
    coact_x_decoder      Σ_S |C_ij| · |cos(d_i, d_j)|    S as above; co-activation weighted by
                                                         the pair's decoder similarity (C²R-like)
    decoder_on_coactive  Σ_S |cos(d_i, d_j)|             S chosen by co-activation (no gradient to f),
                                                         penalised on the decoder cosine
    decoder              Σ_S' |cos(d_i, d_j)|            S' = top-k of the decoder Gram's cosine
                                                         (OrtSAE-style: gram_topk on W_decᵀ)

d_i is latent i's decoder row. The pair rule fixes k: "all" takes `fraction` of all
n(n−1)/2 pairs (the paper); "coactive" takes `fraction` of the pairs that fire together at
least once in the batch. With B tokens and L0 active latents there are at most B·L0²/2
co-active pairs, which at large widths is below the paper's 0.5% of all pairs: the rule
"all" then selects every co-active pair. Where `backend` resolves to the sparse path (the
training path at real widths) the co-activation kinds select through coactive_topk, which
never pads: min(k, P) pairs, nothing sized by k. `RedundancyPenalty.from_sparse` takes the
latents as CSR rows (the sparse SAE step's form) and selects on them directly: no [B, n]
tensor at all, and the rule "coactive" counts its pairs from the rows. `last_nonzero_share`
reports non-zero pairs ÷ k, for either rule and either path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from aosae.ops import backends
from aosae.ops.coactive_topk import coactive_topk, coactive_topk_dense
from aosae.ops.gram_topk import SIMILARITIES, gram_topk, k_for_fraction, kth_score, num_pairs
from aosae.ops.sparse_coding import gathered_dot, group_by, segment_gather_sum, token_of_entry

PENALTIES = ("coactivation", "coact_x_decoder", "decoder_on_coactive", "decoder")
PAIR_RULES = ("all", "coactive")
# pair codes held at once by count_coactive_pairs before it switches to the chunked Gram
MAX_PAIR_CODES = 1 << 24


def count_coactive_pairs(latents: torch.Tensor, chunk: int = 1024) -> int:
    """Number of latent pairs i < j that are both non-zero on at least one token.

    latents: [B, n]. From the non-zeros of each token (O(B·L²) for L active latents per
    token, no n × n matrix) when they fit, else from the binary Gram in column chunks."""
    if latents.dim() != 2:
        raise ValueError(f"latents must be [tokens, n_latents], got shape {tuple(latents.shape)}")
    on = latents.detach() != 0
    b, n = on.shape
    per_row = on.sum(1)
    width = int(per_row.max()) if b else 0
    if width < 2:
        return 0
    if b * width * width <= MAX_PAIR_CODES:
        # each token's active ids, padded with n (sorts last)
        return count_pairs_of_ids(torch.where(on, torch.arange(n, device=on.device), n).sort(1).values[:, :width], n)
    a = on.float()
    total = 0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = a[:, s:e].t() @ a  # [e-s, n] co-firing counts (exact in float32 below 2^24 tokens)
        upper = torch.arange(n, device=a.device).unsqueeze(0) > torch.arange(s, e, device=a.device).unsqueeze(1)
        total += int(((block > 0) & upper).sum())
    return total


def count_coactive_pairs_csr(offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n: int,
                             max_codes: int = MAX_PAIR_CODES) -> int:
    """count_coactive_pairs of latents given as CSR rows (offsets [B+1], indices [nnz] distinct
    within a row, values [nnz]; entries holding 0 do not count): the codes i·n + j of each row's
    pairs, Σ_t L_t² of them built for at most max_codes at a time (a longer row alone), then
    deduplicated. Memory O(B·L²), no [B, n] tensor."""
    keep = values.detach() != 0
    counts = torch.zeros(offsets.numel() - 1, dtype=torch.long, device=indices.device)
    if counts.numel():
        counts.index_add_(0, token_of_entry(offsets, indices.numel())[keep], torch.ones_like(indices[keep]))
    ids, starts = indices[keep].long(), torch.cumsum(counts, 0) - counts
    ends = torch.cumsum(counts * counts, 0)  # the pair codes up to each row's end
    codes, row, b = [], 0, counts.numel()
    while row < b:
        done = int(ends[row - 1]) if row else 0
        last = max(row + 1, int(torch.searchsorted(ends, done + max_codes, right=True)))
        codes.append(_row_pair_codes(counts[row:last], starts[row:last], ids, n).unique())
        row = last
    if len(codes) < 2:  # one chunk: its codes are already distinct
        return int(codes[0].numel()) if codes else 0
    return int(torch.cat(codes).unique().numel())


def _row_pair_codes(counts: torch.Tensor, starts: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """i·n + j of every pair i < j of latents sharing a row; row r holds ids[starts[r]:starts[r]+counts[r]]."""
    arange = lambda m: torch.arange(m, device=ids.device)  # noqa: E731
    def spans(lengths, begins):  # begins[r] + 0, 1, ..., lengths[r] − 1 for every r, concatenated
        first = torch.cumsum(lengths, 0) - lengths
        owner = torch.repeat_interleave(arange(lengths.numel()), lengths)
        return begins[owner] + arange(owner.numel()) - first[owner], owner
    entry, row = spans(counts, starts)  # every entry of these rows
    partner, of = spans(counts[row], starts[row])  # every entry of the same row, once per entry
    i, j = ids[entry[of]], ids[partner]
    return (i * n + j)[i < j]


def count_pairs_of_ids(ids: torch.Tensor, n: int) -> int:
    """Distinct pairs i < j that share a row of ids [B, L] (entries >= n are padding): the
    codes i·n + j of every row's pairs, deduplicated."""
    i, j = ids.unsqueeze(2), ids.unsqueeze(1)
    keep = (i < j) & (j < n)
    return int(torch.unique((i * n + j)[keep]).numel())


def _pair_cosines(W_dec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """|cos(d_i, d_j)| of the given pairs (0 for empty slots, row −1), differentiable in W_dec.
    The dots go through _PairDot: no [pairs, d] gathers (u[i] * u[j] wrote three of them and its
    backward two more, 0.1 GB each at d_sae 4608, d_in 576, k 53 k)."""
    w = _acc(W_dec)
    u = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    valid = rows >= 0
    if bool(valid.all()):  # the unpadded selections of the training path
        return _PairDot.apply(u, rows, cols).abs()
    keep = valid.nonzero().squeeze(1)
    dots = _PairDot.apply(u, rows.index_select(0, keep), cols.index_select(0, keep)).abs()
    return dots.new_zeros(rows.numel()).index_copy(0, keep, dots)


class _PairDot(torch.autograd.Function):
    """out[p] = <u[i_p], u[j_p]> for distinct pairs (i_p, j_p), without [pairs, d] temporaries:
    an SDDMM forward (gathered_dot); backward grad_u[a] = Σ_{p: i_p = a} g_p u[j_p] + Σ_{p: j_p = a}
    g_p u[i_p], the pairs grouped by latent (counting sort) and summed by segment_gather_sum."""

    @staticmethod
    def forward(ctx, u, i, j):
        ctx.save_for_backward(u, i, j)
        return gathered_dot(i, j, u, u)

    @staticmethod
    def backward(ctx, g):
        u, i, j = ctx.saved_tensors
        n = u.shape[0]
        g = g.to(u.dtype)
        grad = None
        for a, b in ((i, j), (j, i)):  # the pairs as seen from either of their latents
            order, offsets = group_by(a, n)
            part = segment_gather_sum(offsets, b.index_select(0, order), g.index_select(0, order), u)
            grad = part if grad is None else grad.add_(part)
        return grad, None, None


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The penalty is computed in fp32, or in fp64 for fp64 input (the float64 oracle tests)."""
    return t if t.dtype == torch.float64 else t.float()


class RedundancyPenalty(nn.Module):
    """One of PENALTIES as a module: forward(latents [B, n], W_dec [n, d_in]) -> 0-d penalty,
    per token (C = fᵀf / B), summed over the selected pairs; from_sparse(CSR rows, W_dec) is the
    same penalty of latents given sparsely (the sparse SAE step).

    Args:
        kind: one of PENALTIES (see the module docstring).
        fraction: share of pairs selected, over all pairs or over the co-active ones (pair_rule).
        similarity: "dot" or "cosine", the co-activation score used to select (and, for
            coactivation and coact_x_decoder, to penalise) pairs.
        pair_rule: "all" (the paper) or "coactive".
        backend: gram_topk backend.
    """

    def __init__(self, kind: str = "coactivation", fraction: float = 0.005, *, similarity: str = "dot",
                 pair_rule: str = "all", backend: str = "auto"):
        super().__init__()
        if kind not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {kind!r}")
        if pair_rule not in PAIR_RULES:
            raise ValueError(f"pair_rule must be one of {PAIR_RULES}, got {pair_rule!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if kind == "decoder" and pair_rule == "coactive":
            raise ValueError("penalty 'decoder' selects pairs on the decoder, not by co-activation: "
                             "use pair_rule 'all' with it")
        k_for_fraction(2, fraction)  # validates fraction now
        backends.check_name(backend)
        self.kind, self.fraction, self.similarity = kind, fraction, similarity
        self.pair_rule, self.backend = pair_rule, backend
        self._kth_value: Optional[torch.Tensor] = None  # set by a checkpoint, else read off last_pairs
        self.last_pairs = None
        self.last_k = 0

    @property
    def _kth(self) -> Optional[torch.Tensor]:
        """The last selection's k-th score (0 when fewer than k pairs were selected): the warm-start
        hint, saved in checkpoints by the trainer. Computed when asked for: the co-activation
        selection is unordered on the sparse path, its k-th score the smallest |value| of the k."""
        if self._kth_value is None and self.last_pairs is not None:
            self._kth_value = kth_score(self.last_pairs.values, self.last_k)
        return self._kth_value

    @_kth.setter
    def _kth(self, value: Optional[torch.Tensor]) -> None:
        self._kth_value = value

    @property
    def last_nonzero_share(self) -> float:
        """Non-zero pairs ÷ k of the last selection (NaN before any)."""
        return float("nan") if self.last_pairs is None else nonzero_share(self.last_pairs, self.last_k)

    def pairs_k(self, latents: torch.Tensor) -> int:
        return self._pairs_k(latents.shape[1], lambda: count_coactive_pairs(latents))

    def _pairs_k(self, n: int, coactive) -> int:
        """k of the pair rule at width n; coactive() counts the co-active pairs (rule "coactive")."""
        if self.pair_rule == "all":
            return k_for_fraction(n, self.fraction)
        return max(1, min(num_pairs(n), math.ceil(round(self.fraction * coactive(), 9))))

    def forward(self, latents: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 2 or latents.shape[1] < 2:
            raise ValueError(f"latents must be [tokens, n_latents >= 2], got shape {tuple(latents.shape)}")
        if W_dec.dim() != 2 or W_dec.shape[0] != latents.shape[1]:
            raise ValueError(f"W_dec must be [n_latents={latents.shape[1]}, d_in], got shape {tuple(W_dec.shape)}")
        if self.kind == "decoder":
            return self._decoder_penalty(W_dec)
        k = self.pairs_k(latents)
        f = _acc(latents) / math.sqrt(latents.shape[0])  # C = fᵀf / B: per token
        if self.kind == "decoder_on_coactive":
            f = f.detach()  # the selection only; the gradient goes to the decoder
        backend = backends.resolve(self.backend, f)  # once: gram_topk below need not decide again
        if backend == "sparse":  # never padded, unordered (a sum needs the set); the gradient is gram_topk's
            pairs = coactive_topk_dense(f, k, similarity=self.similarity, ordered=False)
        else:
            hint = self._kth if self.pair_rule == "all" else None  # k moves under "coactive"
            pairs = gram_topk(f, k, similarity=self.similarity, backend=backend, threshold=hint)
        return self._pairs_penalty(pairs, k, W_dec)

    def from_sparse(self, latents, W_dec: torch.Tensor) -> torch.Tensor:
        """forward(f, W_dec) of latents given as CSR rows, e.g. aosae.ops.sparse_coding.SparseLatents:
        (offsets [B+1] int64, indices [nnz] distinct within a row, values [nnz] differentiable[,
        n_latents]); rows may differ in length or be empty. The same value and gradients (w.r.t.
        the values and W_dec) as forward on the densified f, selected through coactive_topk on
        the rows: no [B, n] tensor, nothing sized by k, and the rule "coactive" counts its pairs
        from the rows."""
        try:
            if isinstance(latents, torch.Tensor):
                raise TypeError
            offsets, indices, values = tuple(latents)[:3]
        except (TypeError, ValueError):
            raise TypeError("from_sparse expects (offsets, indices, values), e.g. a SparseLatents, got "
                            f"{type(latents).__name__}; dense latents [B, n] go to forward") from None
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError("from_sparse: offsets must be a 1-D tensor [B+1] of CSR row pointers")
        n = getattr(latents, "n_latents", None)
        if W_dec.dim() != 2 or W_dec.shape[0] < 2 or (n is not None and W_dec.shape[0] != n):
            raise ValueError(f"W_dec must be [n_latents{'' if n is None else f'={n}'} >= 2, d_in], "
                             f"got shape {tuple(W_dec.shape)}")
        n = W_dec.shape[0]
        if self.kind == "decoder":
            return self._decoder_penalty(W_dec)
        k = self._pairs_k(n, lambda: count_coactive_pairs_csr(offsets, indices, values, n))
        f = _acc(values) / math.sqrt(offsets.numel() - 1)  # C = fᵀf / B: per token
        if self.kind == "decoder_on_coactive":
            f = f.detach()  # the selection only; the gradient goes to the decoder
        pairs = coactive_topk(offsets, indices, f, n, k, similarity=self.similarity, ordered=False)
        return self._pairs_penalty(pairs, k, W_dec)

    def _decoder_penalty(self, W_dec: torch.Tensor) -> torch.Tensor:
        k = k_for_fraction(W_dec.shape[0], self.fraction)
        pairs = gram_topk(_acc(W_dec).t(), k, similarity="cosine", backend=self.backend)
        return self._record(pairs, k, pairs.values.abs().sum())

    def _pairs_penalty(self, pairs, k: int, W_dec: torch.Tensor) -> torch.Tensor:
        """The kind's penalty of a co-activation selection (scores per token)."""
        if self.kind == "coactivation":
            penalty = pairs.values.abs().sum()
        elif self.kind == "coact_x_decoder":
            penalty = (pairs.values.abs() * _pair_cosines(W_dec, pairs.rows, pairs.cols)).sum()
        else:
            penalty = _pair_cosines(W_dec, pairs.rows, pairs.cols).sum()
        return self._record(pairs, k, penalty)

    def _record(self, pairs, k: int, penalty: torch.Tensor) -> torch.Tensor:
        """Keeps the selection for logging; its k-th score (the next call's hint) and non-zero
        share are read off it when asked for."""
        self.last_pairs = type(pairs)(*(t.detach() for t in pairs))
        self._kth_value = None
        self.last_k = k
        return penalty

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, fraction={self.fraction}, similarity={self.similarity!r}, "
                f"pair_rule={self.pair_rule!r}, backend={self.backend!r}")


def nonzero_share(pairs, k: Optional[int] = None) -> float:
    """Non-zero pairs ÷ k of a TopKPairs selection: padded (k slots, empty ones −1) or not
    (coactive_topk's min(k, P) pairs, where k must be given). k defaults to the slots held."""
    k = pairs.rows.numel() if k is None else k
    return int((pairs.rows >= 0).sum()) / max(1, k)


def selection_at_width(n: int, batch: int, l0: int, fraction: float = 0.005, seed: int = 0) -> dict:
    """What the paper's rule selects at width n: B tokens with l0 active latents each, drawn
    uniformly (with replacement; real latents cluster, so they have fewer distinct co-active
    pairs and an even smaller non-zero share). Returns k (fraction of all pairs), the distinct
    co-active pairs, the bound B·l0(l0−1)/2, and the share of the k slots that can be non-zero."""
    if not (2 <= l0 <= n and batch >= 1):
        raise ValueError(f"need 2 <= l0 <= n and batch >= 1, got n={n}, batch={batch}, l0={l0}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (batch, l0), generator=gen)
    k = k_for_fraction(n, fraction)
    coactive = count_pairs_of_ids(ids, n)
    return {"n": n, "batch": batch, "l0": l0, "k": k, "coactive_pairs": coactive,
            "bound": batch * l0 * (l0 - 1) // 2, "nonzero_share": min(1.0, coactive / k)}

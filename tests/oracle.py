"""An independent float64 oracle for gram_topk and the comparison every backend test uses."""
from __future__ import annotations

import torch


def oracle_scores(a: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Exact (float64) C = aᵀa or the cosine matrix, [n, n]; an exactly zero dot stays 0."""
    x = a.detach().double().cpu()
    c = x.t() @ x
    if cosine:
        norms = x.norm(dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        c = c / norms[:, None] / norms[None, :]
    return c


def oracle_topk(a: torch.Tensor, k: int, cosine: bool = False):
    """Pairs i<j sorted by |C| desc then (i, j) asc, with zero scores dropped: list of (|v|, i, j, v)."""
    c = oracle_scores(a, cosine)
    n = c.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    v = c[i, j]
    keep = v != 0
    entries = sorted(zip((-v[keep].abs()).tolist(), i[keep].tolist(), j[keep].tolist(), v[keep].tolist()))
    return [(-neg, r, col, val) for neg, r, col, val in entries[:k]], c


def assert_matches_oracle(pairs, a: torch.Tensor, k: int, cosine: bool = False, rtol: float | None = None):
    """Checks a TopKPairs result against the float64 oracle.

    - shapes, dtypes, empty slots (value 0, index -1) exactly;
    - each returned (i, j) has i < j, is unique, and its value equals the exact C_ij;
    - the sorted |values| equal the oracle's top-k |values|;
    - a pair of the oracle's top-k may only be missing if its score is within tolerance of
      the k-th score (rounding near ties), and the order is by |value| desc, (i, j) asc
      up to the same tolerance.
    """
    values, rows, cols = (t.cpu() for t in pairs)
    assert values.shape == rows.shape == cols.shape == (k,)
    assert rows.dtype == cols.dtype == torch.int64
    expected_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    assert values.dtype == expected_dtype, values.dtype
    top, c = oracle_topk(a, k, cosine)
    scale = float(c.abs().max()) if c.numel() else 1.0
    if rtol is None:
        rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[a.dtype]
    # fp16/bf16 inputs are exact in fp32 after the cast, but the oracle sees the same
    # rounded inputs, so the only error is fp32 accumulation; tolerance is relative to |C|max.
    tol = rtol * max(scale, 1e-30) + 1e-30
    filled = rows >= 0
    n_filled = int(filled.sum())
    assert n_filled == len(top), f"{n_filled} filled slots, oracle has {len(top)} non-zero pairs in its top-{k}"
    assert bool((rows[~filled] == -1).all() and (cols[~filled] == -1).all() and (values[~filled] == 0).all())
    assert bool(filled[:n_filled].all()), "empty slots must come after all filled ones"
    r, cc, v = rows[:n_filled], cols[:n_filled], values[:n_filled].double()
    assert bool((r < cc).all()), "pairs must have row < col"
    assert len(set(zip(r.tolist(), cc.tolist()))) == n_filled, "duplicate pairs"
    exact = c[r, cc]
    torch.testing.assert_close(v, exact, atol=tol, rtol=0)
    want_abs = torch.tensor([t[0] for t in top], dtype=torch.float64)
    torch.testing.assert_close(v.abs(), want_abs, atol=tol, rtol=0)
    if n_filled:
        kth = want_abs[-1].item()
        got = set(zip(r.tolist(), cc.tolist()))
        for score, i, j, _ in top:
            if score > kth + 2 * tol:
                assert (i, j) in got, f"pair ({i}, {j}) with |C| = {score} is missing"
        # order: |v| non-increasing (within tol); exact ties ordered by (i, j)
        absv = v.abs()
        assert bool((absv[:-1] >= absv[1:] - tol).all()), "values not sorted by |value| descending"
        for p in range(n_filled - 1):
            if absv[p] == absv[p + 1]:
                assert (r[p], cc[p]) < (r[p + 1], cc[p + 1]), "ties must be ordered by (row, col)"


def assert_identical(p, q):
    """Bitwise equality of two TopKPairs (determinism, exact-arithmetic inputs)."""
    for x, y in zip(p, q):
        assert torch.equal(x.cpu(), y.cpu())


def separated(a: torch.Tensor, k: int, cosine: bool = False, gap: float = 1e-4) -> bool:
    """True when the k + 1 largest non-zero |scores| of dense latents `a` differ pairwise by more
    than `gap`: a finite difference (eps 1e-6) then cannot reorder the top-k or swap its boundary,
    which a gradcheck through the selection needs (its rows would swap)."""
    top = [entry[0] for entry in oracle_topk(a.double(), k + 1, cosine)[0]]
    return all(x - y > gap for x, y in zip(top, top[1:]))

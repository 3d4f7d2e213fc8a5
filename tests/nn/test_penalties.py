"""RedundancyPenalty, count_coactive_pairs and selection_at_width against float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from aosae.nn.loss import TopKOrthoLoss
from aosae.nn.penalties import PENALTIES, RedundancyPenalty, count_coactive_pairs, nonzero_share, selection_at_width
from aosae.ops.sparse_coding import SparseLatents
from oracle import oracle_scores, oracle_topk


def _cos(W, i, j):
    w = W.double()
    return abs(float(w[i] @ w[j] / (w[i].norm() * w[j].norm())))


def _latents(b=48, n=40):
    return torch.relu(torch.randn(b, n) - 1.0)


@pytest.mark.parametrize("kind", PENALTIES)
def test_each_kind_equals_its_formula_on_oracle_pairs(seed, kind):
    f, W = _latents(), torch.randn(40, 12)
    pen = RedundancyPenalty(kind, fraction=0.02)
    got = float(pen(f, W))
    k = pen.last_k
    if kind == "decoder":
        top, _ = oracle_topk(W.t(), k, cosine=True)
        want = sum(score for score, *_ in top)
    else:
        top, _ = oracle_topk(f / math.sqrt(f.shape[0]), k)  # per token: C = fᵀf / B
        if kind == "coactivation":
            want = sum(score for score, *_ in top)
        elif kind == "coact_x_decoder":
            want = sum(score * _cos(W, i, j) for score, i, j, _ in top)
        else:
            want = sum(_cos(W, i, j) for _, i, j, _ in top)
    assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7)


def test_paper_kind_matches_topk_ortho_loss_per_token(seed):
    f, W = _latents(), torch.randn(40, 12)
    mine = RedundancyPenalty("coactivation", fraction=0.01)(f, W)
    theirs = TopKOrthoLoss(fraction=0.01)(f)
    assert math.isclose(float(mine), float(theirs), rel_tol=1e-5)


def test_gradients_go_where_each_kind_says(seed):
    for kind, to_f, to_w in (("coactivation", True, False), ("coact_x_decoder", True, True),
                             ("decoder_on_coactive", False, True), ("decoder", False, True)):
        f = _latents().requires_grad_()
        W = torch.randn(40, 12, requires_grad=True)
        RedundancyPenalty(kind, fraction=0.02)(f, W).backward()
        assert (f.grad is not None and bool(f.grad.abs().sum() > 0)) == to_f, kind
        assert (W.grad is not None and bool(W.grad.abs().sum() > 0)) == to_w, kind


def test_count_coactive_pairs_against_dense_gram(seed, monkeypatch):
    f = torch.relu(torch.randn(64, 30) - 1.2)
    on = (f != 0).double()
    want = int(((on.t() @ on).triu(1) > 0).sum())
    assert count_coactive_pairs(f) == want
    import aosae.nn.penalties as P

    monkeypatch.setattr(P, "MAX_PAIR_CODES", 0)  # the chunked-Gram path
    assert count_coactive_pairs(f, chunk=7) == want
    assert count_coactive_pairs(torch.zeros(5, 9)) == 0


def test_coactive_rule_takes_a_fraction_of_the_coactive_pairs(seed):
    f, W = torch.relu(torch.randn(32, 60) - 1.5), torch.randn(60, 8)
    pen = RedundancyPenalty("coactivation", fraction=0.25, pair_rule="coactive")
    pen(f, W)
    assert pen.last_k == max(1, math.ceil(0.25 * count_coactive_pairs(f)))
    assert pen.last_nonzero_share == 1.0
    # the paper's rule at a fraction larger than the co-active share pads with empty slots
    sparse = torch.zeros(16, 60)
    sparse[:, :3] = 1.0
    paper = RedundancyPenalty("coactivation", fraction=0.5)
    paper(sparse, W)
    assert paper.last_nonzero_share == pytest.approx(3 / paper.last_k)


def test_selection_at_width_share():
    small = selection_at_width(128, 64, 8)
    assert small["nonzero_share"] == 1.0 and small["coactive_pairs"] <= small["bound"]
    wide = selection_at_width(1 << 16, 64, 8, fraction=0.005)
    assert wide["coactive_pairs"] <= 64 * 28 and wide["nonzero_share"] == pytest.approx(wide["coactive_pairs"] / wide["k"])
    assert wide["nonzero_share"] < 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="penalty must be one of"):
        RedundancyPenalty("nope")
    with pytest.raises(ValueError, match="pair_rule"):
        RedundancyPenalty("decoder", pair_rule="coactive")
    with pytest.raises(ValueError, match="backend 'gpu' is not a gram_topk backend"):
        RedundancyPenalty(backend="gpu")  # when built, not at the first call
    with pytest.raises(ValueError, match="W_dec must be"):
        RedundancyPenalty()(torch.rand(4, 6), torch.rand(5, 3))
    assert oracle_scores(torch.eye(2), False).shape == (2, 2)


@pytest.mark.parametrize("kind", ["coactivation", "coact_x_decoder", "decoder_on_coactive"])
@pytest.mark.parametrize("pair_rule", ["all", "coactive"])
def test_sparse_route_never_pads_and_matches_the_reference(seed, kind, pair_rule):
    """backend="sparse" selects through coactive_topk (min(k, P) pairs): the same penalty, the same
    gradients (latents and decoder) and the same non-zero share (pairs ÷ k) as the padded reference."""
    latents = torch.relu(torch.randn(40, 60) - 1.5)
    W = torch.randn(60, 8)
    out = {}
    for backend in ("sparse", "reference"):
        pen = RedundancyPenalty(kind, fraction=0.3 if pair_rule == "all" else 0.5, pair_rule=pair_rule,
                                backend=backend)
        f, w = latents.clone().requires_grad_(), W.clone().requires_grad_()
        value = pen(f, w)
        value.backward()
        out[backend] = (value, f.grad, w.grad, pen)
    (v, gf, gw, pen), (rv, rgf, rgw, ref) = out["sparse"], out["reference"]
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-7)
    for got, want in ((gf, rgf), (gw, rgw)):
        if want is None:
            assert got is None or not bool(got.any())
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    p = int((ref.last_pairs.rows >= 0).sum())
    assert pen.last_pairs.values.numel() == min(pen.last_k, p) and pen.last_k == ref.last_k
    assert pen.last_nonzero_share == pytest.approx(ref.last_nonzero_share)
    assert nonzero_share(pen.last_pairs, pen.last_k) == pytest.approx(p / pen.last_k)


def _csr_latents(b=36, n=50, dtype=torch.float64):
    """Ragged CSR rows (some empty, one kept entry holding 0 as TopK keeps) and their dense form."""
    counts = torch.randint(0, 9, (b,))
    counts[:2] = 0
    offsets = torch.zeros(b + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    indices = torch.cat([torch.randperm(n)[: int(c)] for c in counts])
    values = torch.rand(indices.numel(), dtype=dtype) + 0.1
    values[0] = 0.0
    rows = torch.repeat_interleave(torch.arange(b), counts)
    return offsets, indices, values, rows


@pytest.mark.parametrize("kind, pair_rule", [(kind, rule) for kind in PENALTIES for rule in ("all", "coactive")
                                             if not (kind == "decoder" and rule == "coactive")])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_from_sparse_equals_the_dense_route(seed, kind, pair_rule, similarity):
    """float64: from_sparse on CSR rows against forward on the densified latents: the same penalty,
    the same gradients (values; decoder), the same k and non-zero share."""
    n = 50
    offsets, indices, values, rows = _csr_latents(n=n)
    W = torch.randn(n, 7, dtype=torch.float64)
    fraction = 0.02 if pair_rule == "all" else 0.4
    sparse_pen = RedundancyPenalty(kind, fraction, similarity=similarity, pair_rule=pair_rule)
    dense_pen = RedundancyPenalty(kind, fraction, similarity=similarity, pair_rule=pair_rule, backend="reference")
    v, w = values.clone().requires_grad_(), W.clone().requires_grad_()
    got = sparse_pen.from_sparse(SparseLatents(offsets, indices, v, n), w)
    vd, wd = values.clone().requires_grad_(), W.clone().requires_grad_()
    dense = torch.zeros(offsets.numel() - 1, n, dtype=torch.float64).index_put((rows, indices), vd)
    want = dense_pen(dense, wd)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(got, [v, w], allow_unused=True)
    want_grads = torch.autograd.grad(want, [vd, wd], allow_unused=True)
    for name, g, gw in zip(["values", "W_dec"], grads, want_grads):
        if gw is None or not bool(gw.any()):
            assert g is None or not bool(g.any()), name
        else:
            torch.testing.assert_close(g, gw, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
    assert sparse_pen.last_k == dense_pen.last_k
    assert sparse_pen.last_nonzero_share == pytest.approx(dense_pen.last_nonzero_share)
    if kind != "decoder":  # never padded: min(k, P) pairs
        assert sparse_pen.last_pairs.values.numel() == int((dense_pen.last_pairs.rows >= 0).sum())


@pytest.mark.parametrize("max_codes", [1, 13, 1 << 24])
def test_count_coactive_pairs_csr_equals_the_dense_count(seed, max_codes):
    # a small max_codes cuts the rows into many chunks (a row longer than it goes alone)
    from aosae.nn.penalties import count_coactive_pairs_csr

    offsets, indices, values, rows = _csr_latents(n=30)
    dense = torch.zeros(offsets.numel() - 1, 30, dtype=torch.float64).index_put((rows, indices), values)
    assert count_coactive_pairs_csr(offsets, indices, values, 30, max_codes=max_codes) == count_coactive_pairs(dense)
    assert count_coactive_pairs_csr(torch.zeros(1, dtype=torch.long), indices[:0], values[:0], 30) == 0


def test_from_sparse_rejects_bad_input():
    from error_checks import check

    offsets, indices, values, _ = _csr_latents(n=20)
    pen, W = RedundancyPenalty(), torch.randn(20, 4)
    check(TypeError, "offsets, indices, values", lambda: pen.from_sparse(torch.rand(4, 20), W))
    check(ValueError, "offsets", lambda: pen.from_sparse((offsets[None], indices, values), W))
    check(ValueError, r"W_dec must be \[n_latents=20", lambda: pen.from_sparse(
        SparseLatents(offsets, indices, values, 20), torch.randn(21, 4)))


@pytest.mark.parametrize("padded", [False, True])
def test_pair_cosines_value_and_gradient_equal_the_gathered_formula(seed, padded):
    """float64: _pair_cosines (SDDMM forward, grouped segment-sum backward) against the direct
    |<d_i, d_j>| / (‖d_i‖‖d_j‖) on gathered rows, value and W_dec gradient, with empty slots (−1)."""
    from aosae.nn.penalties import _pair_cosines

    n, d, pairs = 30, 7, 120
    codes = torch.randperm(n * (n - 1) // 2)[:pairs]  # distinct pairs i < j
    iu = torch.triu_indices(n, n, 1)
    rows, cols = iu[0][codes], iu[1][codes]
    if padded:
        rows = torch.cat([rows, torch.full((9,), -1)])
        cols = torch.cat([cols, torch.full((9,), -1)])
    W = torch.randn(n, d, dtype=torch.float64)
    W[3] = 0.0  # a zero row: cosine 0 (the clamp), gradient as the formula's
    weights = torch.randn(rows.numel(), dtype=torch.float64)
    w1, w2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    got = _pair_cosines(w1, rows, cols)
    u = w2 / w2.norm(dim=1, keepdim=True).clamp_min(1e-12)
    valid = rows >= 0
    want = (u[rows.clamp_min(0)] * u[cols.clamp_min(0)]).sum(-1).abs() * valid
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)

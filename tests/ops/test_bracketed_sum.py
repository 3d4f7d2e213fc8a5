"""The bracketed sum of the k best co-active pairs (csrc/bracketed_sum.h): sparse_csr_topk_sum's
path for float32 rows with no negative value and no GEMM block, which brackets the k-th score from
a sample of latents and writes a kept bit per row pair instead of every row pair's score. Against
the full path (bracketed=False) and the selection itself: the same k-th score, tie cut and kept
count, the total to float64 rounding, the gradient bit for bit (both backwards); ties at the cut
settled by their keys; products that underflow to 0; int32 latent ids; a sample that misleads
falls back to the full path."""
from __future__ import annotations

import pytest
import torch

from aosae.ops import coactive_topk as co
from test_coactive_topk import cpp_module
from test_coactive_topk_sum import BIG_K, assert_is_the_selections


def topk_rows(batch: int, n: int, lo: int = 12, hi: int = 40, values=None):
    """Rows of lo..hi distinct latents of n, positive float32 values (default: |N(0, 1)| + 0.01)."""
    lengths = torch.randint(lo, hi + 1, (batch,))
    # (L distinct of 2L draws: a randperm of n per row took a minute at n = 2^20)
    def distinct(L):
        u = torch.randint(n, (2 * L,)).unique()
        return u[torch.randperm(u.numel())[:L]]
    indices = torch.cat([distinct(L) if 4 * L <= n else torch.randperm(n)[:L] for L in lengths.tolist()])
    vals = values(indices.numel()) if values is not None else torch.randn(indices.numel()).abs() + 0.01
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return offsets, indices, vals.float()


def row_pairs(c) -> int:
    """The row pairs of canonical rows c (each pair of entries of a row)."""
    lengths = c.row_ptr[1:] - c.row_ptr[:-1]
    return int((lengths * (lengths - 1) // 2).sum())


def misleading_sample(c):
    """c with the sampled latents (every 16th canonical id, from the 8th) at 100 times the others'
    values: the sample brackets far above the k-th score."""
    return c._replace(vals=(torch.where(c.cols % 16 == 8, 100.0, 1.0) * (torch.rand(c.cols.numel()) + 0.5)).float())


def run(module, c, k, bracketed: bool, slack: float = 0.5):
    """The op's answer, its plan and both backwards' gradients. slack: the bracketed sum's (wide
    by default: on rows this small its sample is coarse, and a miss would leave the path untested)."""
    u = c.uniq.numel()
    total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
        c.row_ptr, c.cols, c.vals, u, k, keep_plan=True, bracketed=bracketed, bracketed_slack=slack)
    grads = [module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                 live_end=live_end, plan=plan, vectorised=v) for v in (True, False)]
    return float(total), float(kth), int(tie_cut), int(kept), int(width), plan, grads


def assert_same_as_full_path(module, c, k, expect_bits: bool = True, slack: float = 0.5):
    """The bracketed path's answer is the full path's; returns whether the bracketed path ran."""
    full = run(module, c, k, bracketed=False)
    got = run(module, c, k, bracketed=True, slack=slack)
    assert full[5].kept_bits is None
    assert got[1:5] == full[1:5]  # kth, tie cut, kept, width
    assert got[0] == pytest.approx(full[0], rel=1e-12)
    for g, want in zip(got[6], full[6]):
        assert torch.equal(g, want)
    assert torch.equal(got[6][0], got[6][1])  # the AVX-512 backward and the portable one
    ran = got[5].kept_bits is not None
    if expect_bits and module.cpu_has_avx512_bw_vl():
        assert ran and got[5].pair_scores is None
    return ran


@pytest.mark.parametrize("share", [0.05, 0.3, 0.6])
def test_the_bracketed_sum_keeps_the_full_paths_pairs(share, seed):
    module = cpp_module()
    offsets, indices, values = topk_rows(600, 4000)
    c = co.canonical(offsets, indices, values)
    k = max(1, int(share * row_pairs(c) * 0.9))
    assert_same_as_full_path(module, c, k)
    total, kth, tie_cut, kept, width, plan, grads = run(module, c, k, bracketed=True)
    assert_is_the_selections(c, k, torch.float32, torch.tensor(total, dtype=torch.float64), kth, grads[0])


def test_ties_at_the_cut_are_settled_by_their_keys(seed):
    """Values from {1, 2, 3}: thousands of pairs share each score, so the cut falls inside a tie
    and the row pairs inside the bracket at it take their pairs' keys (read back through their
    partners)."""
    module = cpp_module()
    offsets, indices, values = topk_rows(500, 1500, values=lambda nnz: torch.randint(1, 4, (nnz,)).float())
    c = co.canonical(offsets, indices, values)
    pairs = co.coactive_topk(offsets, indices, values, 1500, BIG_K).values.abs()
    for k in (pairs.numel() // 4, pairs.numel() // 2):
        kth = torch.topk(pairs, k).values.min()
        assert int((pairs == kth).sum()) > 1 and int((pairs > kth).sum()) < k  # a cut inside a tie
        assert_same_as_full_path(module, c, k)


def test_wide_latent_ids_take_int32(seed):
    module = cpp_module()
    offsets, indices, values = topk_rows(2300, 1 << 20, lo=28, hi=36)
    c = co.canonical(offsets, indices, values)
    assert c.uniq.numel() > 65536
    assert_same_as_full_path(module, c, row_pairs(c) // 3)


def test_products_that_underflow_to_zero_are_no_pairs(seed):
    """Values near float32's smallest normal: many products round to 0, so a partner's sum can sit
    at 0 when it is touched again (listed twice); those are no pairs, on both paths."""
    module = cpp_module()
    tiny = lambda nnz: torch.where(torch.rand(nnz) < 0.5, torch.full((nnz,), 1e-30), torch.rand(nnz) + 0.5)
    offsets, indices, values = topk_rows(400, 800, values=tiny)
    c = co.canonical(offsets, indices, values)
    pairs = co.coactive_topk(offsets, indices, values, 800, BIG_K).values.numel()
    assert_same_as_full_path(module, c, pairs // 3)


def test_a_misleading_sample_falls_back_to_the_full_path(seed):
    """The sampled latents (every 16th canonical id, from the 8th) carry values 100 times the
    others': the sample brackets far above the k-th score, the pass finds fewer than k pairs above
    its low end, and the full path answers."""
    module = cpp_module()
    offsets, indices, values = topk_rows(400, 1600)
    c = misleading_sample(co.canonical(offsets, indices, values))
    assert not assert_same_as_full_path(module, c, row_pairs(c) // 2, expect_bits=False, slack=0.1)


def test_zero_values_take_the_path_and_make_no_pairs(seed):
    """TopK rows with fewer than k positive pre-activations hold zeros: they take the bracketed sum
    (no value is negative), and a pair whose every product is 0 is no pair on either path."""
    module = cpp_module()
    zeros = lambda nnz: torch.where(torch.rand(nnz) < 0.3, 0.0, torch.rand(nnz) + 0.1)
    offsets, indices, values = topk_rows(600, 3000, values=zeros)
    c = co.canonical(offsets, indices, values)
    pairs = co.coactive_topk(offsets, indices, values, 3000, BIG_K).values.numel()
    assert_same_as_full_path(module, c, pairs // 3)


def test_every_pair_within_k_is_left_to_the_full_path(seed):
    """k equal to the number of pairs: the full path keeps them all and states its own cut (the
    smallest score, every tie kept); the bracketed sum declines rather than state another."""
    module = cpp_module()
    offsets, indices, values = topk_rows(300, 2000)
    c = co.canonical(offsets, indices, values)
    pairs = co.coactive_topk(offsets, indices, values, 2000, BIG_K).values.numel()
    assert not assert_same_as_full_path(module, c, pairs, expect_bits=False, slack=0.9)


def test_the_same_bits_whatever_the_thread_count(seed):
    module = cpp_module()
    offsets, indices, values = topk_rows(800, 3000)
    c = co.canonical(offsets, indices, values)
    pairs = co.coactive_topk(offsets, indices, values, 3000, BIG_K).values.numel()
    before = torch.get_num_threads()
    try:
        answers = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            answers.append(run(module, c, pairs // 4, bracketed=True))
    finally:
        torch.set_num_threads(before)
    if module.cpu_has_avx512_bw_vl():
        assert all(got[5].kept_bits is not None for got in answers)  # (the bracketed path, not the full one)
    for got in answers[1:]:
        assert got[:5] == answers[0][:5]  # the total's bits too
        assert all(torch.equal(g, want) for g, want in zip(got[6], answers[0][6]))


def test_a_hit_after_a_miss_is_the_full_paths(seed):
    """A miss leaves the threads' accumulators and lists as a hit needs them."""
    module = cpp_module()
    offsets, indices, values = topk_rows(400, 1600)
    c = co.canonical(offsets, indices, values)
    assert not assert_same_as_full_path(module, misleading_sample(c), row_pairs(c) // 2, expect_bits=False, slack=0.1)
    assert_same_as_full_path(module, c, row_pairs(c) // 3)

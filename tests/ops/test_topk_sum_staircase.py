"""coactive_topk_sum's staircase (csrc/block_staircase.h): with positive values and outlier rows
only the part of the GEMM block that can reach the k-th score is summed, cut at a floor sampled
from the seed's rows and checked against the k-th score found (the whole block when it misled).
Value, k-th score and gradient are still the selection's, with and without the forward's plan;
a second look whose floor misled sums the seed's staircase again; signed values keep the whole
block, and a foreign staircase is refused."""
from __future__ import annotations

import pytest
import torch

from aosae.ops import coactive_topk as co
from aosae.ops.coactive_topk import coactive_topk
from test_coactive_topk import cpp_module, outlier_rows
from test_coactive_topk_sum import BIG_K, assert_is_the_selections, backward_from_plan


@pytest.fixture(autouse=True)
def _fresh_inputs(seed):
    """Every test draws fresh random inputs (conftest's `seed` reseeds torch and prints it)."""
    cpp_module()  # skips without the extension


def staircase_pairs(live_end: torch.Tensor) -> int:
    """Pairs (p, q) with p < q < live_end[p]: what the block sums."""
    return int((live_end - torch.arange(live_end.numel()) - 1).clamp_min(0).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("product", ["sparse", "dense"])
def test_positive_values_sum_only_the_blocks_staircase_and_still_equal_the_selection(dtype, product):
    """Positive values (ReLU, TopK, BatchTopK) with outlier rows: the block's latents in norm order,
    and only the pairs whose bound ‖a_i‖‖a_j‖ reaches the k-th score summed (live_end). The value,
    the k-th score and the gradient are still the selection's, for both products of the backward,
    and a second backward gives the first's gradient bit for bit."""
    module = cpp_module()
    offsets, indices, values, _, n = outlier_rows(dtype, signed=False)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    pairs = coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    pruned = fell_back = 0
    for k in (1, 2, pairs // 50, pairs // 10, pairs // 3, pairs - 1):
        total, kth, tie_cut, kept, in_block, width, live_end, *_ = module.sparse_csr_topk_sum(c.row_ptr, c.cols,
                                                                                             c.vals, u, k)
        assert live_end.numel() == width >= 2 and kept == k
        assert bool((live_end > torch.arange(width)).all() and (live_end <= width).all())
        pruned += staircase_pairs(live_end) < width * (width - 1) // 2
        grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                   product=product, live_end=live_end)
        again = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                    product=product, live_end=live_end)
        eps = assert_is_the_selections(c, k, dtype, total, kth, grad)
        assert torch.equal(grad, again)
        assert torch.equal(backward_from_plan(module, c, k, product=product), grad)
        # a floor set far too high (a sample that misled): the k-th score found is below it, and the
        # whole block is summed instead, with the same result
        whole = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, staircase_reach=1e-9)
        assert torch.equal(whole[1], kth) and whole[2:5] == (tie_cut, kept, in_block)
        fell_back += staircase_pairs(live_end) < staircase_pairs(whole[6]) == width * (width - 1) // 2
        torch.testing.assert_close(whole[0], total, rtol=1e-12, atol=0)
        whole_grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                         product=product, live_end=whole[6])
        torch.testing.assert_close(whole_grad, grad, rtol=eps, atol=eps * max(1.0, float(grad.abs().max())))
        # and a plan made after that fallback gives the backward's own gradient, bit for bit
        planned = backward_from_plan(module, c, k, forward={"staircase_reach": 1e-9}, product=product)
        assert torch.equal(planned, whole_grad)
    assert pruned >= 3  # the small k's staircases leave most of the block out
    assert fell_back >= 2  # (k = 1 or 2 may still reach a floor at the best pair's bin)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_wide_block_samples_its_staircase_and_still_equals_the_selection(dtype):
    """A block of 256 latents or more: the staircase's floor comes from every step-th row of the
    seed (step > 1), and value, k-th score, count and gradient are still the selection's, with
    and without the forward's plan."""
    module = cpp_module()
    offsets, indices, values, _, n = outlier_rows(dtype, signed=False, long_rows=4, long_l0=330, pool=400)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    pairs = coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    pruned = 0
    for k in (pairs // 100, pairs // 20, pairs // 6):
        total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
            c.row_ptr, c.cols, c.vals, u, k, keep_plan=True)
        assert width >= 256 and kept == k  # (step = width // 128 >= 2)
        pruned += staircase_pairs(live_end) < width * (width - 1) // 2
        grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                   live_end=live_end)
        assert_is_the_selections(c, k, dtype, total, kth, grad)
        # each product the same with and without the plan (left to choose, the two may pick
        # different products: the plan's kept bits make the tiles cheaper)
        for product in ("sparse", "dense"):
            without_plan, with_plan = (
                module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                    product=product, live_end=live_end, **extra)
                for extra in ({}, {"plan": plan}))
            assert torch.equal(with_plan, without_plan)
    assert pruned >= 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_block_under_two_and_a_half_k_pairs_is_cut_by_the_second_look(dtype):
    """A block of 1.5·k to 2.5·k pairs has no seed under half of it (the seed holds 1.25·k): the
    second look samples the whole block for its floor, and the staircase leaves part of it out.
    Value, k-th score and gradient are still the selection's, with and without the plan, and a
    second look's floor set too high falls back to the whole block (there is no seed staircase)
    with the same result."""
    module = cpp_module()
    offsets, indices, values, _, n = outlier_rows(dtype, signed=False, long_rows=4, long_l0=330, pool=400)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    width = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, 10)[5]
    block = width * (width - 1) // 2
    cut = 0
    for k in (int(block / 1.8), int(block / 2.2)):
        total, kth, tie_cut, kept, in_block, width, live_end, _, plan = module.sparse_csr_topk_sum(
            c.row_ptr, c.cols, c.vals, u, k, keep_plan=True)
        assert kept == k and k <= staircase_pairs(live_end) <= block
        cut += staircase_pairs(live_end) < block
        grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                   live_end=live_end)
        eps = assert_is_the_selections(c, k, dtype, total, kth, grad)
        with_plan = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                        live_end=live_end, plan=plan)
        torch.testing.assert_close(with_plan, grad, rtol=eps, atol=eps * max(1.0, float(grad.abs().max())))
        whole = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, refine_reach=1e-9)
        assert staircase_pairs(whole[6]) == block and whole[7] >= 3  # (no seed staircase to fall back to)
        assert torch.equal(whole[1], kth) and whole[2:5] == (tie_cut, kept, in_block)
        torch.testing.assert_close(whole[0], total, rtol=1e-12, atol=0)
    assert cut >= 1  # (a sample that misled both times would fall back twice: not seen in 400 draws)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_second_look_that_misled_sums_the_seeds_staircase_again(dtype):
    """A second look whose floor proves above the k-th score (refine_reach made tiny: the floor is
    near the best pairs' bins) sums the seed's staircase again, not the whole block: no fewer pairs
    than the second look's staircase, fewer than the block, a pass more (one run here takes two:
    the row histogram and the pass), and value, k-th score, count and gradient still the
    selection's, with and without the plan."""
    module = cpp_module()
    offsets, indices, values, _, n = outlier_rows(dtype, signed=False, long_rows=4, long_l0=330, pool=400)
    c = co.canonical(offsets, indices, values)
    u = c.uniq.numel()
    pairs = coactive_topk(offsets, indices, values, n, BIG_K).values.numel()
    k = pairs // 20
    total, kth, tie_cut, kept, in_block, width, live_end, *_ = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals,
                                                                                           u, k)
    again = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, refine_reach=1e-9, keep_plan=True)
    block = width * (width - 1) // 2
    # (the default's may be the seed's own, where its second look found no higher floor)
    assert staircase_pairs(live_end) <= staircase_pairs(again[6]) < block and again[7] >= 3
    assert torch.equal(again[1], kth) and again[2:6] == (tie_cut, kept, in_block, width)
    torch.testing.assert_close(again[0], total, rtol=1e-12, atol=0)
    grad = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                               live_end=again[6])
    eps = assert_is_the_selections(c, k, dtype, again[0], again[1], grad)
    with_plan = module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, u, float(kth), tie_cut, width,
                                                    live_end=again[6], plan=again[8])
    torch.testing.assert_close(with_plan, grad, rtol=eps, atol=eps * max(1.0, float(grad.abs().max())))
    with pytest.raises(RuntimeError, match="refine_reach must be > 0"):
        module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, u, k, refine_reach=0.0)


def test_signed_values_keep_the_whole_block_and_a_foreign_staircase_is_refused():
    """The bound needs positive values: signed ones keep the latents' order and the whole block
    (no live_end); a live_end that is not these rows' is named."""
    module = cpp_module()
    offsets, indices, values, _, n = outlier_rows(torch.float64, signed=True)
    c = co.canonical(offsets, indices, values)
    out = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, c.uniq.numel(), 10)
    assert out[5] >= 2 and out[6].numel() == 0
    offsets, indices, values, _, n = outlier_rows(torch.float64, signed=False)
    c = co.canonical(offsets, indices, values)
    out = module.sparse_csr_topk_sum(c.row_ptr, c.cols, c.vals, c.uniq.numel(), 10)
    with pytest.raises(RuntimeError, match="pass the live_end that sparse_csr_topk_sum returned"):
        module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, c.uniq.numel(), float(out[1]), out[2],
                                            out[5], live_end=out[6][:-1])
    rising = torch.arange(out[6].numel()) + 1  # an end below its row's diagonal is not a staircase
    rising[-1] = 0
    with pytest.raises(RuntimeError, match="is not a staircase"):
        module.sparse_csr_topk_sum_backward(1.0, c.row_ptr, c.cols, c.vals, c.uniq.numel(), float(out[1]), out[2],
                                            out[5], live_end=rising)

// The backward of sparse_csr_topk_sum (csrc/gram_topk_sparse.cpp) on CPU: the gradient of
// Σ |C_ij| over the min(k, P) best co-active pairs at every entry of canonical CSR rows, from
// the forward's cut (kth, tie_cut) instead of a list of the pairs: a pair is kept when
// |C_ij| > kth, or |C_ij| = kth and i·n + j <= tie_cut (kth 0 and tie_cut -1: every non-zero
// pair). The scores are the forward's, read from its plan (csrc/topk_sum_plan.h) or, without
// one, derived again by the forward's own pass (csrc/coactive_pairs.h), with the same bits:
//   - the rows outside the GEMM block (csrc/dense_rows.h, the same plan as the forward's): every
//     row pair's score; a row-by-row pass turns each run of scores into g·sign(C_ij) where
//     (i, j) is kept, else 0, and adds their products (each entry summed in a fixed order, no
//     atomics);
//   - the pairs inside U × U: their scores recomputed as the forward recomputed them
//     (csrc/recomputed_block.h, the plan's or built again), and the moved rows' gradient is
//     A_H · G_U, per kept pair (few kept inside U × U) or from L1 tiles of G_U (most of it kept;
//     csrc/block_gradient.h), read from the plan's kept bits where the forward kept them (float32
//     rows with no negative value, csrc/block_bits.h) instead of from recomputed scores.
// Nothing is sized by k, and the block is never stored: work O(Σ_t L_t² + h·u²), memory
// O(Σ_{other rows} L_t² + nnz + threads·(n + h·u)). A plan from the bracketed sum holds a kept bit
// per row pair instead of the scores: its backward is csrc/kept_bits_backward.h.
//
// No PYBIND11_MODULE here: csrc/gram_topk_cpu.cpp calls register_topk_sum_backward(m).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block_gradient.h"
#include "buffer_pool.h"
#include "csr_checks.h"
#include "dense_rows.h"
#include "kept_bits_backward.h"
#include "norm_order.h"
#include "pair_select.h"
#include "recomputed_block.h"
#include "coactive_pairs.h"
#include "row_slots.h"
#include "topk_sum_plan.h"

namespace {

using torch::Tensor;

#if defined(__x86_64__) || defined(__i386__)
// aosae::run_product on a run of scores w[0 .. len), turned into the gradients G_c on the way, a
// register at a time (the tails masked): G_c = ±g (|w[c]| above bar, C's sign) or 0, and a score
// tied at bar takes tied(c, w[c]) (ties: the kept test needs the pair's key). The same rounding
// and order as the portable path (csrc/row_slots.h), so the same bits. Its separate select pass
// and scalar tails made TopK d_sae 16384's backward 3.4 ms, 2.5 ms with this (benchmarks/NOTES.md,
// thirteenth pass).
template <typename acc_t, typename Tied>
__attribute__((target("avx512f"))) acc_t kept_run_product(const acc_t* w, int64_t len, acc_t xe, const acc_t* xq,
                                                          acc_t* oq, acc_t bar, acc_t g, bool ties, Tied&& tied) {
  using S = aosae::Simd512<acc_t>;
  constexpr int64_t L = S::kLanes;
  const auto vbar = S::set1(bar), up = S::set1(g), down = S::set1(-g), zero = S::zero(), vxe = S::set1(xe);
  auto own = S::zero();
  for (int64_t c = 0; c < len; c += L) {
    const auto valid = S::first(len - c);
    const auto a = S::load(valid, w + c);
    const auto mag = S::abs(a);
    const auto keep = S::template compare<_CMP_GT_OQ>(valid, mag, vbar);
    const auto negative = S::template compare<_CMP_LT_OQ>(valid, a, zero);
    auto grad = S::blend(keep, zero, S::blend(negative, up, down));
    if (ties) {
      auto tie = S::template compare<_CMP_EQ_OQ>(valid, mag, vbar);
      if (tie) {  // (rare: the pairs at the k-th score)
        alignas(64) acc_t lanes[L];
        S::store(lanes, grad);
        for (; tie; tie = decltype(tie)(tie & (tie - 1))) {
          const int l = __builtin_ctz(tie);
          lanes[l] = tied(c + l, w[c + l]);
        }
        grad = S::load(lanes);
      }
    }
    aosae::run_step<acc_t>(own, grad, valid, xq + c, oq + c, vxe);
  }
  return S::halving_sum(own);
}

// kept_run_product over the entries of rows [t0, t1) without moved[t], in the order and with the
// prefetch of for_each_run<acc_t, true>: one call for the rows (called per entry from code built
// without AVX-512, it could not be inlined). Entry e's scores from scores + runs[e]; a tie at the
// k-th score takes tied(score, i, j).
template <typename acc_t, typename Tied>
__attribute__((target("avx512f"))) void kept_run_rows(const acc_t* scores, const int64_t* runs, const int64_t* rp,
                                                      const int64_t* ca, const uint8_t* moved, int64_t t0, int64_t t1,
                                                      const acc_t* x, acc_t* o, acc_t bar, acc_t g, bool ties,
                                                      Tied&& tied) {
  for (int64_t t = t0; t < t1; ++t) {
    if (moved[t]) continue;
    const int64_t e_end = rp[t + 1];
    for (int64_t e = rp[t]; e + 1 < e_end; ++e) {
      const int64_t len = e_end - e - 1;
      if (e + aosae::kPrefetchAhead + 1 < e_end)
        aosae::prefetch_run(scores + runs[e + aosae::kPrefetchAhead],
                            (len - aosae::kPrefetchAhead) * static_cast<int64_t>(sizeof(acc_t)));
      const int64_t* js = ca + e + 1;
      o[e] += kept_run_product(scores + runs[e], len, x[e], x + e + 1, o + e + 1, bar, g, ties,
                               [&](int64_t c, acc_t v) { return tied(v, ca[e], js[c]); });
    }
  }
}

#endif

// How the moved rows' product A_H · G_U is taken: by the cost model, or forced (tests cover both).
enum class Product { kAuto, kSparse, kDense };

template <typename acc_t>
Tensor topk_sum_backward_impl(double grad, const Tensor& row_ptr, const Tensor& cols, const Tensor& vals, int64_t n,
                              double kth_d, int64_t tie_cut, int64_t forward_width, int64_t inside, Product product,
                              const Tensor& live_end_t, const aosae::TopKSumPlan* given, bool vectorised) {
  const int64_t m = row_ptr.size(0) - 1, nnz = cols.size(0);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* ca = cols.data_ptr<int64_t>();
  const acc_t* x = vals.data_ptr<acc_t>();
  TORCH_CHECK(rp[0] == 0 && rp[m] == nnz, "sparse_csr_topk_sum_backward: row_ptr must run from 0 to nnz");
  for (int64_t t = 0; t < m; ++t)
    TORCH_CHECK(rp[t] <= rp[t + 1], "sparse_csr_topk_sum_backward: row_ptr must not decrease");
  at::parallel_for(0, m, 256, [&](int64_t t0, int64_t t1) {  // (a failing row's error is rethrown)
    for (int64_t t = t0; t < t1; ++t) {
      bool ok = true;
      for (int64_t e = rp[t]; e < rp[t + 1]; ++e) ok &= ca[e] >= 0 && ca[e] < n && (e == rp[t] || ca[e] > ca[e - 1]);
      TORCH_CHECK(ok, "sparse_csr_topk_sum_backward: row ", t, "'s cols must lie in [0, n) and ascend strictly");
    }
  });
  // The forward's plan (csrc/topk_sum_plan.h), or what it held derived again from the rows.
  const auto* plan = dynamic_cast<const aosae::TopKSumPlanOf<acc_t>*>(given);
  // (the forward orders by norm exactly when it has a block, and then returns its live_end; an
  // empty block with an order is only guarded against)
  TORCH_CHECK(given == nullptr || (plan != nullptr && plan->m == m && plan->nnz == nnz && plan->n == n &&
                                   (plan->order.has_value() == (live_end_t.numel() > 0) || plan->dense.size() == 0)),
              "sparse_csr_topk_sum_backward: the plan was made for other rows (or another dtype): pass the plan that "
              "sparse_csr_topk_sum returned for these rows");
  if (plan && plan->kept_bits.defined())
    return aosae::kept_bits_backward<acc_t>(*plan, rp, x, m, nnz, static_cast<acc_t>(grad), forward_width,
                                     live_end_t.numel() == 0, vals, vectorised);
  // The forward's labels: with a staircase (live_end), latents in norm order (csrc/norm_order.h);
  // the gradient is mapped back to the caller's entries at the end. Ties keep the original order.
  std::optional<aosae::NormOrder<acc_t>> own_order;
  if (!plan && live_end_t.numel() > 0) own_order = aosae::order_by_norm<acc_t>(rp, ca, x, m, n);
  const aosae::NormOrder<acc_t>* order = plan ? (plan->order ? &*plan->order : nullptr) : (own_order ? &*own_order : nullptr);
  if (order) {
    ca = order->cols.data();
    x = order->vals.data();
  }
  const acc_t kth = static_cast<acc_t>(kth_d);
  const acc_t g = static_cast<acc_t>(grad);
  // branch-free: about two thirds of the block's pairs are kept at BatchTopK 262144, in no order
  auto kept = [&](acc_t v, int64_t i, int64_t j) {
    const acc_t a = std::abs(v);
    return (a > kth) | ((a == kth) & ((order ? order->key(i, j, n) : i * n + j) <= tie_cut));
  };
  auto slot_grad = [&](acc_t v, int64_t i, int64_t j) {
    const acc_t signed_g = v < 0 ? -g : g;
    return kept(v, i, j) ? signed_g : acc_t(0);
  };
  // out[x] = the slot_grad of score in[x] = (i, js[x]), x < len (in == out: in place): without a tie
  // at kth (almost every run) one vectorised select, no key formed
  auto to_gradients = [&](const acc_t* in, acc_t* out, int64_t len, int64_t i, const int64_t* js) {
    const acc_t bar = kth, up = g, down = -g;  // locals: out's stores cannot alias them, so the loops vectorise
    auto pick = [=](acc_t v) { return std::abs(v) > bar ? (v < acc_t(0) ? down : up) : acc_t(0); };
    int tie = 0;
    if (in != out) {  // the select and the tie test in one pass (the run is read once), redone on a tie
      const acc_t* __restrict__ a = in;
      acc_t* __restrict__ b = out;
      for (int64_t x = 0; x < len; ++x) {
        tie |= std::abs(a[x]) == bar;
        b[x] = pick(a[x]);
      }
    } else {  // in place: the test first, the scores are overwritten
      for (int64_t x = 0; x < len; ++x) tie |= std::abs(in[x]) == bar;
      if (!tie || tie_cut < 0)
        for (int64_t x = 0; x < len; ++x) out[x] = pick(in[x]);
    }
    if (tie && tie_cut >= 0)
      for (int64_t x = 0; x < len; ++x) out[x] = slot_grad(in[x], i, js[x]);
  };

  // The forward's plan: the same rows go to the block, over the same latents, and every row
  // pair's score outside it. Without one, the forward's own pass derives them again (the whole
  // block live: a score past the forward's staircase is below the k-th, kept or not alike).
  aosae::CoactivePairs<acc_t> own;
  if (!plan) {
    own = aosae::coactive_pairs<acc_t>(rp, ca, x, m, n, nnz, false, std::max(1, at::get_num_threads()), true,
                                       nullptr, 0, true);
    aosae::Scratch<int32_t, 0>::trim(size_t(64) << 20);  // (its bucket lists: only the scores are read here)
    aosae::Scratch<acc_t, 1>::trim(size_t(64) << 20);
  }
  const aosae::DenseRows<acc_t>& dense = plan ? plan->dense : own.dense;
  const aosae::RecomputedBlock<acc_t>& scores = plan ? plan->scores : own.rows;
  const Tensor& pair_scores = plan ? plan->pair_scores : own.pair_scores;
  const Tensor& pair_runs = plan ? plan->pair_runs : own.pair_runs;
  const uint8_t* moved = dense.moved.data();
  const int32_t* position = dense.position.data();
  const int64_t width = dense.size();
  TORCH_CHECK(forward_width == width, "sparse_csr_topk_sum_backward: width is ", forward_width,
              " but these rows' plan has ", width, " latents: pass the width that sparse_csr_topk_sum returned for these rows");
  TORCH_CHECK(live_end_t.numel() == 0 || (live_end_t.numel() == width && live_end_t.scalar_type() == at::kLong),
              "sparse_csr_topk_sum_backward: live_end has ", live_end_t.numel(), " entries for a block of ", width,
              " latents: pass the live_end that sparse_csr_topk_sum returned for these rows");
  const Tensor live_end_c = live_end_t.contiguous();
  const int64_t* live_end = live_end_t.numel() > 0 ? live_end_c.data_ptr<int64_t>() : nullptr;
  for (int64_t p = 0; live_end && p < width; ++p)  // a staircase: row p's end in (p, width], not past the row above's
    TORCH_CHECK(live_end[p] > p && live_end[p] <= width && (p == 0 || live_end[p] == p + 1 || live_end[p] <= live_end[p - 1]),
                "sparse_csr_topk_sum_backward: live_end[", p, "] = ", live_end[p], " is not a staircase over ", width,
                " latents: pass the live_end that sparse_csr_topk_sum returned for these rows");
  // block row p holds the pairs (p, q < row_end(p)); past it nothing was summed (below the k-th score)
  auto row_end = [&](int64_t p) { return live_end ? live_end[p] : width; };
  // the latents with a pair in the staircase: [0, extent) (ends do not grow)
  const int64_t extent = width > 0 ? row_end(0) : 0;

  Tensor out = at::zeros({nnz}, vals.options());
  acc_t* o = out.data_ptr<acc_t>();
  // each run of scores becomes its gradients on the way into the product (the moved rows: below)
  auto run_gradients = [&](const acc_t* w, acc_t* v, int64_t len, int64_t e) { to_gradients(w, v, len, ca[e], ca + e + 1); };
  const int64_t* runs = pair_runs.template data_ptr<int64_t>();
  const int64_t count = pair_scores.numel();
  TORCH_CHECK(pair_runs.numel() == nnz, "sparse_csr_topk_sum_backward: the plan's pair_runs has ", pair_runs.numel(),
              " entries for ", nnz, ": pass the plan that sparse_csr_topk_sum returned for these rows");
  at::parallel_for(0, m, 256, [&](int64_t t0, int64_t t1) {  // (cheap: a bound on every read)
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e = rp[t]; e + 1 < rp[t + 1] && !moved[t]; ++e)
        TORCH_CHECK(runs[e] >= 0 && runs[e] + (rp[t + 1] - e - 1) <= count, "sparse_csr_topk_sum_backward: the "
                    "plan's pair_runs[", e, "] = ", runs[e], " is outside its ", count, " pair scores: pass the plan "
                    "that sparse_csr_topk_sum returned for these rows");
  });
  const acc_t* scores_in = pair_scores.template data_ptr<acc_t>();
  auto run_of = [&](int64_t e, int64_t) { return scores_in + runs[e]; };
  const bool use_avx512 = vectorised && aosae::has_avx512();
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx512)
    at::parallel_for(0, m, 64, [&](int64_t t0, int64_t t1) {
      kept_run_rows<acc_t>(scores_in, runs, rp, ca, moved, t0, t1, x, o, kth, g, tie_cut >= 0, slot_grad);
    });
#endif
  if (!use_avx512) aosae::add_pair_products(run_of, rp, x, moved, m, o, run_gradients, vectorised);
  auto in_callers_order = [&](Tensor& grad_out) {  // new entry e is the caller's order->entry[e]
    if (!order) return grad_out;
    Tensor back = at::empty({nnz}, vals.options());
    acc_t* b = back.data_ptr<acc_t>();
    for (int64_t e = 0; e < nnz; ++e) b[order->entry[e]] = o[e];
    return back;
  };
  if (width == 0) return in_callers_order(out);

  // The moved rows: A_H · G_U, G_U the kept pairs' gradients inside U × U (symmetric).
  const int64_t* latent = dense.latents.data();
  const int64_t h = static_cast<int64_t>(dense.taken.size());
  const int threads = std::max(1, at::get_num_threads());
  // Every co-active pair kept (fewer than k of them) on positive values, the whole block live:
  // G_U[p, q] = g for every pair that co-fires. Moved row r's gradient at latent p, Σ_q G[p, q]·
  // a[r, q], reads only q in row r, and those co-fire with p: so it is g·(A_H's row sum − a[r, p])
  // whatever G holds for the pairs that never co-fire (up to a product of positive values that
  // underflows to 0, below ≈ 1e-19 each, whose pair the forward left out: its term is as small).
  // BatchTopK's early steps at d_sae 262144 keep every pair of blocks of 0.8–1.4·10⁸ pairs.
  if (product == Product::kAuto && order && kth_d == 0 && tie_cut < 0 && extent == width && row_end(width - 1) == width) {
    const Tensor& a_h = scores.moved_rows_matrix();
    const acc_t* a = a_h.data_ptr<acc_t>();
    Tensor prod = at::empty({h, width}, vals.options());
    acc_t* pr = prod.data_ptr<acc_t>();
    for (int64_t r = 0; r < h; ++r) {
      double total = 0;
      for (int64_t q = 0; q < width; ++q) total += static_cast<double>(a[r * width + q]);
      for (int64_t q = 0; q < width; ++q)
        pr[r * width + q] = g * static_cast<acc_t>(total - static_cast<double>(a[r * width + q]));
    }
    aosae::add_moved_rows_product(prod, dense, rp, ca, o);
    return in_callers_order(out);
  }
  // the forward's kept pairs inside U × U as bits (float32 rows with no negative value)
  const aosae::BlockBits* bits = plan && plan->block_bits.defined() ? &plan->block_bits : nullptr;
  TORCH_CHECK(!bits || bits->covers(extent, row_end), "sparse_csr_topk_sum_backward: the plan's kept bits are for ",
              "another staircase than live_end's: pass the live_end and plan that sparse_csr_topk_sum returned for ",
              "these rows");
  if (inside < 0 && product == Product::kAuto) {  // not passed: count the kept pairs inside U × U
    int64_t count = 0;
#pragma omp parallel num_threads(threads) reduction(+ : count)
    {
      std::vector<acc_t> row(width);
#pragma omp for schedule(dynamic, 16)
      for (int64_t p = 0; p < extent; ++p) {
        scores.row(p, p + 1, row_end(p), row.data());
        for (int64_t q = p + 1; q < row_end(p); ++q) count += kept(row[q - p - 1], latent[p], latent[q]);
      }
    }
    inside = count;
  }
  // ns per scattered multiply-add (the kept pairs, per pair) against ns per multiply-add of a tile
  // (2-core AMD EPYC, benchmarks/NOTES.md): both recompute the staircase (h per entry), the tiles
  // add two products of h per entry on top (and read the kept bits instead, where there are some).
  // The tiles' rows kept whole cost O(h) since (csrc/block_gradient.h), so this overprices them
  // where most of the staircase is kept; the sparse way wins only where few pairs are (≤ 1/35).
  double area = 0;  // the tiles: each panel of rows up to its widest row
  const int64_t panel_rows = aosae::block_gradient_detail::kTileRows;
  for (int64_t r0 = 0; r0 < extent; r0 += panel_rows)
    area += static_cast<double>(std::min(extent, r0 + panel_rows) - r0) *
            (std::max(row_end(r0), std::min(extent, r0 + panel_rows)) - r0);
  constexpr double kTileMac = 0.02;
  const double sparse_cost = kTileMac * h * area + 0.35 * 2.0 * h * inside;
  const double dense_cost = (bits ? 2 : 3) * kTileMac * h * area;
  if (product == Product::kAuto ? sparse_cost <= dense_cost : product == Product::kSparse) {
    // latent-major [u, h] A_H; each thread adds its block rows' kept pairs into its own copy
    const Tensor a_t_t = scores.moved_rows_matrix().t().contiguous();
    const acc_t* a_t = a_t_t.data_ptr<acc_t>();
    std::vector<std::vector<acc_t>> out_t(threads, std::vector<acc_t>(width * h, acc_t(0)));
#pragma omp parallel num_threads(threads)
    {
      std::vector<acc_t>& mine = out_t[omp_get_thread_num()];
      std::vector<acc_t> row(width);
#pragma omp for schedule(static, 16)  // a fixed split, rows dealt round-robin: deterministic and balanced
      for (int64_t p = 0; p < extent; ++p) {
        scores.row(p, p + 1, row_end(p), row.data());
        for (int64_t q = p + 1; q < row_end(p); ++q) {
          const acc_t gp = slot_grad(row[q - p - 1], latent[p], latent[q]);
          if (gp == acc_t(0)) continue;
          acc_t* op = mine.data() + p * h;
          acc_t* oq = mine.data() + q * h;
          const acc_t* ap = a_t + p * h;
          const acc_t* aq = a_t + q * h;
#pragma GCC ivdep
          for (int64_t r = 0; r < h; ++r) {
            op[r] += gp * aq[r];
            oq[r] += gp * ap[r];
          }
        }
      }
    }
    aosae::add_moved_rows_gradient(out_t, dense.taken, rp, ca, position, o);
    return in_callers_order(out);
  }
  // most of the staircase kept: A_H · G_U from tiles of G_U (csrc/block_gradient.h), read from the
  // forward's kept bits where it kept them, else from recomputed scores
  auto to_block_gradients = [&](acc_t* v, int64_t len, int64_t p, int64_t q_first) {
    to_gradients(v, v, len, latent[p], latent + q_first);
  };
  const Tensor prod =
      bits ? aosae::block_gradient(scores, extent, row_end, aosae::kept_bit_gradients<acc_t>(*bits, row_end, g), g,
                                   threads)
           : aosae::block_gradient(scores, extent, row_end,
                                   aosae::recomputed_gradients(scores, row_end, to_block_gradients, g), g, threads);
  aosae::add_moved_rows_product(prod, dense, rp, ca, o);
  return in_callers_order(out);
}

}  // namespace

// sparse_csr_topk_sum's backward: grad (the upstream gradient of the sum), the same canonical CSR
// rows (row_ptr [m+1] int64, cols [nnz] int64 ascending within each row, in [0, n), vals [nnz]
// float32/float64), n, and the forward's kth, tie_cut, width and kept_in_block (inside; -1: counted
// here) -> the gradient at every entry, [nnz] in vals' dtype.
Tensor sparse_csr_topk_sum_backward(double grad, const Tensor& row_ptr, const Tensor& cols, const Tensor& vals,
                                    int64_t n, double kth, int64_t tie_cut, int64_t width, int64_t inside,
                                    const std::string& product, const std::optional<Tensor>& live_end,
                                    const std::shared_ptr<aosae::TopKSumPlan>& plan, bool vectorised) {
  TORCH_CHECK(product == "auto" || product == "sparse" || product == "dense",
              "sparse_csr_topk_sum_backward: product must be 'auto', 'sparse' or 'dense', got '", product, "'");
  const Product how = product == "auto" ? Product::kAuto : product == "sparse" ? Product::kSparse : Product::kDense;
  aosae::check_csr_rows("sparse_csr_topk_sum_backward", row_ptr, cols, vals, n, 2);
  TORCH_CHECK(row_ptr.device().is_cpu() && cols.device().is_cpu() && vals.device().is_cpu() &&
                  (!live_end.has_value() || live_end->device().is_cpu()),
              "sparse_csr_topk_sum_backward: CPU tensors only");
  at::NoGradGuard no_grad;
  const Tensor rp = row_ptr.contiguous(), ca = cols.contiguous(), va = vals.contiguous();
  const Tensor le = live_end.has_value() ? *live_end : torch::empty({0}, torch::kInt64);
  if (va.scalar_type() == at::kDouble)
    return topk_sum_backward_impl<double>(grad, rp, ca, va, n, kth, tie_cut, width, inside, how, le, plan.get(),
                                          vectorised);
  return topk_sum_backward_impl<float>(grad, rp, ca, va, n, kth, tie_cut, width, inside, how, le, plan.get(),
                                       vectorised);
}

void register_topk_sum_backward(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cpu_has_avx512", &aosae::has_avx512,
        "Whether this CPU runs the kernels' AVX-512 paths (else: their portable ones)");
  m.def("sparse_csr_topk_sum_backward", &sparse_csr_topk_sum_backward, py::arg("grad"), py::arg("row_ptr"),
        py::arg("cols"), py::arg("vals"), py::arg("n"), py::arg("kth"), py::arg("tie_cut"), py::arg("width"),
        py::arg("inside") = -1, py::arg("product") = "auto", py::arg("live_end") = py::none(),
        py::arg("plan") = py::none(), py::arg("vectorised") = true, py::call_guard<py::gil_scoped_release>(),
        "sparse_csr_topk_sum's backward: the gradient of the kept pairs' Σ|C_ij| at every entry, [nnz]; product: how "
        "the outlier rows' product is taken ('auto': cost model, 'sparse': per kept pair, 'dense': tiles of G_U); "
        "plan: the forward's (sparse_csr_topk_sum(keep_plan=True)), read instead of derived again; vectorised=False: "
        "the rows' products by the portable path, as on a machine without AVX-512 (tests)");
}

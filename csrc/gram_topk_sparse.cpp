// Sparse co-activation backend for gram_topk (CPU, OpenMP).
//
// After ReLU/TopK most activations are zero, so C = aᵀa has at most Σ_t L0_t(L0_t−1)/2
// off-diagonal non-zeros. Instead of B·n²/2 multiply-adds we:
//   1. gather each row's non-zeros (CSR: row_ptr, cols ascending per row, vals; csrc/sparse_input.cpp),
//   2. sum the densest rows (outlier tokens) with one block over the latents they touch
//      (csrc/dense_rows.h; the sum of the k best recomputes its rows where it reads them instead
//      of storing it, csrc/recomputed_block.h, and on positive values reads only its staircase
//      that can reach the k-th score, csrc/norm_order.h and block_staircase.h),
//   3. view the other rows latent by latent (CSC) and sum each latent i's row of C
//      (Gustavson): its entries' later row partners j > i add a_ti·a_tj into a thread-local
//      dense accumulator and list j in bucket i; the bucket is then compacted in place to the
//      distinct non-zero (j, C_ij), each counted in a |C| histogram,
//   (steps 2–3: csrc/coactive_pairs.h)
//   4. find the k-th best |C| from the histogram (csrc/pair_select.h), keep the pairs at least
//      that good: as a set grouped by i (unordered, or k covering every pair; or only their sum:
//      csrc/unordered_selection.h; only their sum: csrc/topk_sum.h), or ordered by (|C| desc,
//      (i, j) asc) (radix sort of 64-bit keys; csrc/sorted_selection.h).
// Memory O(pairs + nnz + threads·n); accumulation in float32 (float64 for float64 input), each
// C_ij summed in row order whatever the thread count, so results are deterministic.
//
// No PYBIND11_MODULE here: the extension's single module (csrc/gram_topk_cpu.cpp) calls
// register_sparse(m).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "bracketed_sum.h"
#include "chunked_list.h"
#include "csr_checks.h"
#include "dense_rows.h"
#include "norm_order.h"
#include "coactive_pairs.h"
#include "pair_select.h"
#include "sorted_selection.h"
#include "topk_sum.h"
#include "unordered_selection.h"

namespace {

using torch::Tensor;

// Pair lists up to this size stay allocated between calls (see aosae::Scratch).
constexpr size_t kKeepScratchBytes = size_t(64) << 20;

int num_threads() {
  return std::max(1, at::get_num_threads());
}

// Indices in range and strictly increasing inside each row (a duplicate latent in one row would
// double count its pairs).
void check_rows(const int64_t* rp, const int64_t* cp, int64_t m, int64_t n, int64_t nnz) {
  TORCH_CHECK(rp[0] == 0 && rp[m] == nnz, "sparse gram_topk: row_ptr must start at 0 and end at nnz = ", nnz);
  int64_t bad_row = -1;
  for (int64_t t = 0; t < m && bad_row < 0; ++t) {
    TORCH_CHECK(rp[t] <= rp[t + 1], "sparse gram_topk: row_ptr must be non-decreasing");
    for (int64_t e = rp[t]; e < rp[t + 1]; ++e) {
      if (cp[e] < 0 || cp[e] >= n || (e > rp[t] && cp[e] <= cp[e - 1])) {
        bad_row = t;
        break;
      }
    }
  }
  TORCH_CHECK(bad_row < 0, "sparse gram_topk: row ", bad_row,
              " has a latent index out of [0, n) or its indices are not strictly increasing "
              "(duplicates are not allowed)");
}

// CSR rows' pointers, checked.
template <typename acc_t>
struct Rows {
  int64_t m, nnz;
  const int64_t* rp;
  const int64_t* cp;
  const acc_t* vp;
  Rows(const Tensor& row_ptr, const Tensor& cols, const Tensor& vals, int64_t n)
      : m(row_ptr.size(0) - 1), nnz(cols.size(0)), rp(row_ptr.data_ptr<int64_t>()), cp(cols.data_ptr<int64_t>()),
        vp(vals.data_ptr<acc_t>()) {
    check_rows(rp, cp, m, n, nnz);
  }
};

void trim_scratch() {
  aosae::Scratch<int32_t, 0>::trim(kKeepScratchBytes);
  aosae::Scratch<float, 1>::trim(kKeepScratchBytes);
  aosae::Scratch<double, 1>::trim(kKeepScratchBytes);
}

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> csr_topk_impl(
    const Tensor& row_ptr_t, const Tensor& cols_t, const Tensor& vals_t, int64_t n, int64_t k, bool cosine, bool pad,
    bool ordered = true, const int64_t* ids = nullptr, Tensor* id_rows = nullptr, Tensor* id_cols = nullptr) {
  const Rows<acc_t> x(row_ptr_t, cols_t, vals_t, n);
  const int threads = num_threads();
  const aosae::CoactivePairs<acc_t> summed =
      aosae::coactive_pairs<acc_t>(x.rp, x.cp, x.vp, x.m, n, x.nnz, cosine, threads);
  const std::vector<int64_t>& hist_total = summed.hist_total;
  const int64_t nonzero_pairs = summed.nonzero_pairs;
  // Select: the histogram names the bin of the k-th best |C|; pairs above it are kept, and
  // one nth_element inside that bin finds the exact k-th score.
  const bool keep_all = nonzero_pairs <= k;
  const aosae::KthBin kth_bin = keep_all ? aosae::KthBin{-1, nonzero_pairs} : aosae::find_kth_bin(hist_total, k);
  if (!pad && (keep_all || !ordered)) {
    const auto out = aosae::unordered_selection<acc_t>(summed, n, k, kth_bin, threads, vals_t.scalar_type(), ids,
                                                       id_rows, id_cols);
    trim_scratch();
    return out;
  }
  return aosae::sorted_selection<acc_t>(
      [&](int64_t i, auto&& offer) { summed.pairs_of(i, offer); }, trim_scratch, n, k, pad, kth_bin, hist_total,
      threads, vals_t);
}

// Whether the bracketed sum (csrc/bracketed_sum.h) can take these rows if they have no block:
// float32, no value negative (positive: already known), AVX-512 BW/VL, 32-bit latent ids.
template <typename acc_t>
bool can_bracket(const acc_t* vp, int64_t nnz, int64_t n, bool positive) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (std::is_same<acc_t, float>::value)
    return aosae::has_avx512_bw_vl() && n <= INT32_MAX && (positive || aosae::none_negative(vp, nnz));
#endif
  return false;
}

// The bracketed sum of rows that can_bracket and have no block; nullopt where its sample's bracket
// missed.
template <typename acc_t>
std::optional<aosae::SumResult> try_bracketed(const int64_t* rp, const int64_t* cp, const acc_t* vp, int64_t m,
                                              int64_t n, int64_t nnz, int64_t k, int threads, bool keep_plan,
                                              double slack) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (std::is_same<acc_t, float>::value) {
    aosae::KeptBits bits;
    auto run = [&](const auto& cols) {
      return aosae::bracketed_sum(rp, cp, cols.data(), vp, m, n, nnz, k, threads, keep_plan ? &bits : nullptr, slack);
    };
    std::optional<aosae::SumResult> r = n <= 65536 ? run(aosae::narrowed_latents<uint16_t>(cp, nnz))
                                                   : run(aosae::narrowed_latents<int32_t>(cp, nnz));
    aosae::Scratch<uint64_t, 0>::trim(kKeepScratchBytes);  // (its inside bits)
    if (r && keep_plan) {
      auto plan = aosae::plan_for_rows<acc_t>(m, nnz, n);
      plan->kept_bits = bits.bits;
      plan->pair_runs = bits.pair_runs;
      r->plan = std::move(plan);
    }
    return r;
  }
#endif
  return std::nullopt;
}

// The sum of the k best (csrc/topk_sum.h): the block's rows recomputed where they are read, and
// on positive values, where the block pays (csrc/dense_rows.h's block_cost(true)), only its
// staircase that can reach the k-th score, the latents relabelled by norm (the tie order stays
// the original latents' i·n + j).
template <typename acc_t>
aosae::SumResult csr_topk_sum_impl(const Tensor& row_ptr_t, const Tensor& cols_t, const Tensor& vals_t, int64_t n,
                                   int64_t k, double bracket, int64_t sample_step, bool keep_plan,
                                   aosae::StaircaseReach reach, bool bracketed, double bracketed_slack) {
  const Rows<acc_t> x(row_ptr_t, cols_t, vals_t, n);
  const int64_t m = x.m, nnz = x.nnz;
  const int64_t* rp = x.rp;
  const int64_t* cp = x.cp;
  const acc_t* vp = x.vp;
  const int threads = num_threads();
  std::optional<aosae::NormOrder<acc_t>> order;
  // (the plan's rows and U do not depend on the labels: the block relabelled is the same block)
  const bool positive = aosae::all_positive(vp, nnz);
  const bool bracketable = bracketed && can_bracket(vp, nnz, n, positive);
  const bool blocked = (positive || bracketable) &&
                       aosae::plan_dense_rows<acc_t>(rp, cp, vp, m, n, aosae::block_cost(true), false).size() > 0;
  if (blocked) {
    if (positive) {
      order = aosae::order_by_norm<acc_t>(rp, cp, vp, m, n);
      cp = order->cols.data();
      vp = order->vals.data();
    }
  } else if (bracketable) {
    if (auto r = try_bracketed(rp, cp, vp, m, n, nnz, k, threads, keep_plan, bracketed_slack)) return std::move(*r);
  }
  aosae::CoactivePairs<acc_t> summed = aosae::coactive_pairs<acc_t>(
      rp, cp, vp, m, n, nnz, false, threads, true, order ? &order->norm : nullptr, k, keep_plan, reach);
  // the block's kept pairs as bits for the backward: float32 (TopKSum's test), no value negative
  // (a block is only made for positive or bracketable rows, csrc/block_bits.h)
  const bool block_bits = keep_plan && (positive || bracketable);
  aosae::SumResult r =
      aosae::TopKSum<acc_t>(summed, order ? &*order : nullptr, n, threads, block_bits).run(k, bracket, sample_step);
  while (summed.staircase_floor > 0 && !(r.kth >= summed.staircase_floor)) {
    // the staircase's sampled floor was above the k-th score: pairs past it may be among the k
    // best, so they are summed again: the seed's staircase where the second look's floor misled,
    // else the whole block (the same labels; live_end: the seed's staircase, or the full width)
    const bool seed_staircase = summed.staircase_second_look;
    const int64_t passes = r.block_passes;
    summed = aosae::CoactivePairs<acc_t>();  // (its buffers go before the next pass takes its own)
    r.block_bits = aosae::BlockBits();
    summed = aosae::coactive_pairs<acc_t>(rp, cp, vp, m, n, nnz, false, threads, true,
                                          seed_staircase ? &order->norm : nullptr, k, keep_plan, {reach.seed, 0.0});
    r = aosae::TopKSum<acc_t>(summed, order ? &*order : nullptr, n, threads, block_bits).run(k, bracket, sample_step);
    r.block_passes += passes;
  }
  if (order) {
    const int64_t width = summed.dense.size();
    r.live_end = torch::tensor(summed.live_end.empty() ? std::vector<int64_t>(width, width) : summed.live_end,
                               torch::kInt64);
  }
  if (keep_plan) {
    auto plan = aosae::plan_for_rows<acc_t>(m, nnz, n);
    plan->pair_scores = summed.pair_scores;
    plan->pair_runs = summed.pair_runs;
    plan->order = std::move(order);
    plan->dense = std::move(summed.dense);
    plan->scores = std::move(summed.rows);
    plan->block_bits = std::move(r.block_bits);
    r.plan = std::move(plan);
  }
  trim_scratch();
  return r;
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_k(int64_t n, int64_t k) {
  TORCH_CHECK(n >= 2, "sparse gram_topk: needs n >= 2 latents, got ", n);
  TORCH_CHECK(n < (int64_t(1) << 31), "sparse gram_topk: n must be < 2^31, got ", n);
  TORCH_CHECK(k >= 1 && k <= n * (n - 1) / 2, "sparse gram_topk: k must be in [1, n(n-1)/2], got ", k);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> sparse_dense_to_csr(const Tensor& a);  // csrc/sparse_input.cpp

// CSR (row_ptr [m+1] int64, cols [nnz] int64 strictly increasing per row, vals [nnz]
// float32/float64) of a [m, n] -> (values [k] in vals' dtype, rows [k] int64, cols [k]
// int64): the k pairs i<j with the largest |C_ij| (cosine: |C_ij|/(‖a_i‖‖a_j‖)), sorted by
// |value| desc then (i, j) asc, padded with (0, -1, -1).
std::tuple<Tensor, Tensor, Tensor> sparse_csr_topk(
    const Tensor& row_ptr, const Tensor& cols, const Tensor& vals, int64_t n, int64_t k, bool cosine) {
  check_k(n, k);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kLong,
              "sparse_csr_topk: row_ptr must be a 1-D int64 tensor of length m + 1");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong, "sparse_csr_topk: cols must be 1-D int64");
  TORCH_CHECK(vals.dim() == 1 && vals.size(0) == cols.size(0), "sparse_csr_topk: vals must be 1-D, same length as cols");
  TORCH_CHECK(row_ptr.device().is_cpu() && cols.device().is_cpu() && vals.device().is_cpu(),
              "sparse_csr_topk: CPU tensors only");
  const Tensor rp = row_ptr.contiguous(), cp = cols.contiguous();
  const Tensor vp = vals.to(acc_type(vals.scalar_type())).contiguous();
  if (vp.scalar_type() == at::kDouble) return csr_topk_impl<double>(rp, cp, vp, n, k, cosine, true);
  return csr_topk_impl<float>(rp, cp, vp, n, k, cosine, true);
}

// sparse_csr_topk without the padding: the min(k, P) best of the P pairs with a non-zero
// score, P ≤ Σ_t L0_t(L0_t−1)/2, so nothing is sized by k (k may exceed n(n−1)/2). k < P:
// contract order (|value| desc, (i, j) asc); with ordered = false the same k pairs (ties at the
// k-th |value| kept by (i, j) asc) unsorted, laid out as for k >= P. k >= P: every pair, grouped
// by i ascending and within i in order of first co-activation (row order), unsorted by score. Memory
// O(pairs + threads·n): callers with n ≫ nnz compact the latent ids first (coactive_topk) and
// pass the compact ids' originals as ids [n]. Returns (values, ids[rows], ids[cols], rows,
// cols); without ids the second pair is the first.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sparse_csr_coactive(
    const Tensor& row_ptr, const Tensor& cols, const Tensor& vals, int64_t n, int64_t k, bool cosine,
    bool ordered, const std::optional<Tensor>& ids) {
  TORCH_CHECK(n >= 2 && n < (int64_t(1) << 31), "sparse_csr_coactive: n must be in [2, 2^31), got ", n);
  TORCH_CHECK(k >= 1, "sparse_csr_coactive: k must be >= 1, got ", k);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kLong,
              "sparse_csr_coactive: row_ptr must be a 1-D int64 tensor of length m + 1");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong, "sparse_csr_coactive: cols must be 1-D int64");
  TORCH_CHECK(vals.dim() == 1 && vals.size(0) == cols.size(0), "sparse_csr_coactive: vals must be 1-D, same length as cols");
  TORCH_CHECK(row_ptr.device().is_cpu() && cols.device().is_cpu() && vals.device().is_cpu(),
              "sparse_csr_coactive: CPU tensors only");
  Tensor id_table;
  if (ids.has_value()) {
    id_table = ids->contiguous();
    TORCH_CHECK(id_table.dim() == 1 && id_table.size(0) >= n && id_table.scalar_type() == at::kLong &&
                    id_table.device().is_cpu(),
                "sparse_csr_coactive: ids must be a 1-D int64 CPU tensor of at least n = ", n, " entries");
  }
  const int64_t* id_data = id_table.defined() ? id_table.data_ptr<int64_t>() : nullptr;
  const Tensor rp = row_ptr.contiguous(), cp = cols.contiguous();
  const Tensor vp = vals.to(acc_type(vals.scalar_type())).contiguous();
  Tensor id_rows, id_cols;
  auto out = vp.scalar_type() == at::kDouble
                 ? csr_topk_impl<double>(rp, cp, vp, n, k, cosine, false, ordered, id_data, &id_rows, &id_cols)
                 : csr_topk_impl<float>(rp, cp, vp, n, k, cosine, false, ordered, id_data, &id_rows, &id_cols);
  const Tensor& rows = std::get<1>(out);
  const Tensor& cols_out = std::get<2>(out);
  if (!id_data) return {std::get<0>(out), rows, cols_out, rows, cols_out};
  if (!id_rows.defined()) {  // the sorted paths: map the ids after the fact
    id_rows = id_table.index_select(0, rows);
    id_cols = id_table.index_select(0, cols_out);
  }
  return {std::get<0>(out), id_rows, id_cols, rows, cols_out};
}

// Σ |C_ij| over sparse_csr_coactive(row_ptr, cols, vals, n, k, cosine=false)'s pairs, without
// writing them (a loss that sums its selection needs nothing else; at BatchTopK d_sae 262144
// mid-training that selection is 1.7·10⁸ pairs, 6 GB) and without storing the GEMM block (csrc/
// topk_sum.h). Returns (total: float64 0-d, kth: the k-th best |C| as float64 0-d (0 when P < k),
// tie_cut: int64 (of the pairs tied at kth, those with i·n + j <= tie_cut are kept; the largest
// int64 when all of them are; -1 when P < k; when P = k every pair is kept, kth the smallest
// score), kept: min(k, P), kept_in_block, width: the block's latents (0: none),
// live_end: [width] int64 (positive values with a block: the block's latents are the columns in
// norm order, largest first, and row p holds only the pairs (p, q < live_end[p]) that can reach
// the k-th score; empty otherwise), block_passes: passes over the block's rows (1 when the
// sampled bracket held the k-th score, 2 when the rescaled second one did, 3 or 4 through the
// exact histogram; a staircase whose floor proved too high adds its own), plan (with keep_plan=True: what the backward takes
// instead of deriving it again, csrc/topk_sum_plan.h; else None)). sparse_csr_topk_sum_backward
// takes them back. bracket, sample_step: csrc/topk_sum.h's estimate (bracket 0: the exact
// histogram; step 0: chosen). staircase_reach, refine_reach: csrc/block_staircase.h's margins,
// the seed's and the second look's (tests make them small to see the whole block, or the seed's
// staircase, summed again when a floor proves too high). bracketed:
// float32 rows with no negative value and no block take the bracketed sum (csrc/bracketed_sum.h)
// where its sample's bracket holds the k-th score, and their plan holds a kept bit per row pair
// instead of the scores (plan.kept_bits); bracketed_slack: its bracket's least slack (tests widen
// it to see the path taken on small rows; False: always the full path).
std::tuple<Tensor, Tensor, int64_t, int64_t, int64_t, int64_t, Tensor, int64_t, std::shared_ptr<aosae::TopKSumPlan>>
sparse_csr_topk_sum(
    const Tensor& row_ptr, const Tensor& cols, const Tensor& vals, int64_t n, int64_t k, double bracket,
    int64_t sample_step, bool keep_plan, double staircase_reach, double refine_reach, bool bracketed,
    double bracketed_slack) {
  aosae::check_csr_rows("sparse_csr_topk_sum", row_ptr, cols, vals, n, 2);
  TORCH_CHECK(k >= 1, "sparse_csr_topk_sum: k must be >= 1, got ", k);
  TORCH_CHECK(bracket >= 0 && bracket < 1, "sparse_csr_topk_sum: bracket must be in [0, 1), got ", bracket);
  TORCH_CHECK(sample_step >= 0, "sparse_csr_topk_sum: sample_step must be >= 0 (0: chosen), got ", sample_step);
  TORCH_CHECK(staircase_reach > 0, "sparse_csr_topk_sum: staircase_reach must be > 0, got ", staircase_reach);
  TORCH_CHECK(refine_reach > 0, "sparse_csr_topk_sum: refine_reach must be > 0, got ", refine_reach);
  TORCH_CHECK(bracketed_slack >= 0 && bracketed_slack < 1, "sparse_csr_topk_sum: bracketed_slack must be in [0, 1), got ",
              bracketed_slack);
  TORCH_CHECK(row_ptr.device().is_cpu() && cols.device().is_cpu() && vals.device().is_cpu(),
              "sparse_csr_topk_sum: CPU tensors only");
  const Tensor rp = row_ptr.contiguous(), cp = cols.contiguous(), vp = vals.contiguous();
  const aosae::StaircaseReach reach{staircase_reach, refine_reach};
  const aosae::SumResult r = vp.scalar_type() == at::kDouble
                                 ? csr_topk_sum_impl<double>(rp, cp, vp, n, k, bracket, sample_step, keep_plan, reach,
                                                             bracketed, bracketed_slack)
                                 : csr_topk_sum_impl<float>(rp, cp, vp, n, k, bracket, sample_step, keep_plan, reach,
                                                            bracketed, bracketed_slack);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor live_end = r.live_end.defined() ? r.live_end : torch::empty({0}, torch::kInt64);
  return {torch::full({}, r.total, f64), torch::full({}, r.kth, f64), r.tie_cut, r.kept, r.kept_in_block, r.width,
          live_end, r.block_passes, r.plan};
}

// The whole sparse backend on a dense CPU tensor a [m, n].
std::tuple<Tensor, Tensor, Tensor> gram_topk_sparse_cpu(const Tensor& a, int64_t k, bool cosine) {
  TORCH_CHECK(a.dim() == 2, "gram_topk_sparse_cpu: expects a 2-D tensor [m, n]");
  check_k(a.size(1), k);
  auto csr = sparse_dense_to_csr(a);
  return sparse_csr_topk(std::get<0>(csr), std::get<1>(csr), std::get<2>(csr), a.size(1), k, cosine);
}

// The rows of a CSR matrix that the sparse backend would sum with one GEMM block (tests,
// benchmarks): int64 row ids, ascending; empty when every row goes through the pair path.
// recomputed: the sum of the k best's cost model (its block recomputed where read).
Tensor sparse_dense_rows(const Tensor& row_ptr, const Tensor& cols, const Tensor& vals, int64_t n, bool recomputed) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && cols.scalar_type() == at::kLong && vals.scalar_type() == at::kFloat,
              "sparse_dense_rows: int64 row_ptr and cols, float32 vals");
  const Tensor rp = row_ptr.contiguous(), cp = cols.contiguous(), vp = vals.contiguous();
  const auto plan = aosae::plan_dense_rows<float>(rp.data_ptr<int64_t>(), cp.data_ptr<int64_t>(), vp.data_ptr<float>(),
                                                  rp.size(0) - 1, n, aosae::block_cost(recomputed), false);
  std::vector<int64_t> rows;
  for (size_t t = 0; t < plan.moved.size(); ++t)
    if (plan.moved[t]) rows.push_back(static_cast<int64_t>(t));
  return torch::tensor(rows, torch::kInt64);
}

void register_sparse(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<aosae::TopKSumPlan, std::shared_ptr<aosae::TopKSumPlan>>(
      m, "TopKSumPlan",
      "What sparse_csr_topk_sum(keep_plan=True) hands its backward: the latents' order, the GEMM block's plan and "
      "scores, every row pair's score (csrc/topk_sum_plan.h)")
      .def_property_readonly("pair_scores", [](const aosae::TopKSumPlan& p) { return p.pair_scores; })
      .def_property_readonly("pair_runs", [](const aosae::TopKSumPlan& p) { return p.pair_runs; })
      .def_property_readonly("kept_bits", [](const aosae::TopKSumPlan& p) { return p.kept_bits; })
      .def_property_readonly("block_bits", [](const aosae::TopKSumPlan& p) {
        const auto* f = dynamic_cast<const aosae::TopKSumPlanOf<float>*>(&p);
        return f && f->block_bits.defined() ? f->block_bits.words() : torch::Tensor();
      });
  m.def("gram_topk_sparse_cpu", &gram_topk_sparse_cpu, py::arg("a"), py::arg("k"), py::arg("cosine"),
        py::call_guard<py::gil_scoped_release>(),
        "Sparse co-activation gram_topk on a dense CPU tensor: (values[k], rows[k], cols[k])");
  m.def("sparse_csr_topk", &sparse_csr_topk, py::arg("row_ptr"), py::arg("cols"), py::arg("vals"),
        py::arg("n"), py::arg("k"), py::arg("cosine"), py::call_guard<py::gil_scoped_release>(),
        "Top-k co-activation pairs of a CSR matrix: (values[k], rows[k], cols[k])");
  m.def("sparse_csr_coactive", &sparse_csr_coactive, py::arg("row_ptr"), py::arg("cols"), py::arg("vals"),
        py::arg("n"), py::arg("k"), py::arg("cosine"), py::arg("ordered") = true, py::arg("ids") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "The min(k, P) best co-active pairs of a CSR matrix, never padded: (values, ids[rows], ids[cols], rows, "
        "cols), the ids pair equal to (rows, cols) without ids; ordered=False: the same set, not sorted by score");
  m.def("sparse_csr_topk_sum", &sparse_csr_topk_sum, py::arg("row_ptr"), py::arg("cols"), py::arg("vals"),
        py::arg("n"), py::arg("k"), py::arg("bracket") = aosae::kSumBracket, py::arg("sample_step") = 0,
        py::arg("keep_plan") = false, py::arg("staircase_reach") = aosae::kSeedReach,
        py::arg("refine_reach") = aosae::kSeedReach, py::arg("bracketed") = true,
        py::arg("bracketed_slack") = aosae::kBracketSlack, py::call_guard<py::gil_scoped_release>(),
        "Σ |C_ij| (dot) over sparse_csr_coactive's min(k, P) pairs without writing them: (total, kth, tie_cut, kept, "
        "kept_in_block, width, live_end, block_passes, plan), what sparse_csr_topk_sum_backward takes back");
  m.def("cpu_has_avx512_bw_vl", &aosae::has_avx512_bw_vl,
        "Whether this CPU runs the sixteen-lane summing passes and the bracketed sum (AVX-512 F, BW and VL)");
  m.def("sparse_block_costs", [] {
    const aosae::DenseRowCost c;
    return std::make_tuple(c.pair, c.mac, c.entry, aosae::kMinDenseRowL0, aosae::kMaxDenseLatents,
                           aosae::kMaxDenseLatentsHard, aosae::pair_path_bytes<float>());
  }, "The GEMM block's cost model (ns per pair, per multiply-add, per block entry; min row L0; max width; hard "
     "max width and the pair path's bytes per row pair (float32), which allow a wider block)");
  m.def("sparse_block_cost_model", [](bool recomputed) {
    const aosae::DenseRowCost c = aosae::block_cost(recomputed);
    return std::map<std::string, double>{{"pair", c.pair}, {"mac", c.mac}, {"entry", c.entry}, {"fixed", c.fixed},
                                         {"correction", c.correction}, {"stored", c.stored ? 1.0 : 0.0}};
  }, py::arg("recomputed"), "The block's cost model that sparse_dense_rows(recomputed=...) plans by (ns: per row "
     "pair, per multiply-add, per block entry, per entry of the rows once there is a block, per correction; "
     "stored: 1 where the block is stored, which bounds its width by memory)");
  m.def("sparse_dense_rows", &sparse_dense_rows, py::arg("row_ptr"), py::arg("cols"), py::arg("vals"), py::arg("n"),
        py::arg("recomputed") = false,
        "Rows the sparse kernel would sum with one GEMM block (its outlier rows); recomputed=True: those the sum "
        "of the k best (sparse_csr_topk_sum) would");
  m.def("buffer_pool_free_bytes", [] { return aosae::BufferPool::instance().free_bytes(); },
        "Bytes of freed large buffers the CPU kernels keep for their next calls (csrc/buffer_pool.h)");
  m.def("buffer_pool_counts", [] {
          const auto c = aosae::BufferPool::instance().counts();
          return std::make_tuple(c.reused, c.grown, c.mapped);
        }, "How the pool met its requests so far: (from a free buffer, by growing an outgrown one, newly mapped)");
  m.def("release_buffer_pool",
        [] { return aosae::BufferPool::instance().release() + aosae::ChunkStore::instance().release(); },
        "Gives the kept buffers and list chunks back to the system; returns their bytes");
}

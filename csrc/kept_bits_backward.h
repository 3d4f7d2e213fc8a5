// The backward of the bracketed sum (csrc/bracketed_sum.h) from its plan's kept bits, one per row
// pair (csrc/topk_sum_plan.h): each row's runs of bits turned into the gradients G = g where
// kept, then the same products, in the same order, as csrc/topk_sum_backward.cpp's pass over
// every row pair's score, so the same bits. It reads a bit per row pair where that pass reads a
// 4-byte score: the op's backward at TopK d_sae 16384 took 1.3 ms instead of 4.3 on saved
// batches (benchmarks/NOTES.md, seventeenth pass).

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "block_bits.h"  // bits_at, expand_bits_plain
#include "row_slots.h"  // run_product, run_step
#include "simd512.h"
#include "topk_sum_plan.h"

namespace aosae {

#if defined(__x86_64__) || defined(__i386__)
// csrc/topk_sum_backward.cpp's kept_run_product on a run of kept bits (csrc/bracketed_sum.h) from bit `at` of `bits`: G_c = g
// where the bit is set (no negative value: a kept C > 0), else 0. The same G, rounding and order, so the
// same bits as from the scores.
template <typename acc_t>
__attribute__((target("avx512f"))) acc_t kept_bits_product(const uint8_t* bits, int64_t at, int64_t len, acc_t xe,
                                                           const acc_t* xq, acc_t* oq, acc_t g) {
  using S = Simd512<acc_t>;
  constexpr int64_t L = S::kLanes;
  const auto up = S::set1(g), vxe = S::set1(xe);
  auto own = S::zero();
  for (int64_t c = 0; c < len; c += L) {
    const auto valid = S::first(len - c);
    const auto grad = S::blend(static_cast<typename S::M>(bits_at(bits, at + c) & valid), S::zero(), up);
    run_step<acc_t>(own, grad, valid, xq + c, oq + c, vxe);
  }
  return S::halving_sum(own);
}

// kept_bits_product over every entry of rows [t0, t1), in the order of the portable loop below: one
// call for the rows (a call per entry, from code built without AVX-512, could not be inlined)
template <typename acc_t>
__attribute__((target("avx512f"))) void kept_bits_rows(const uint8_t* bits, const int64_t* runs, const int64_t* rp,
                                                       int64_t t0, int64_t t1, const acc_t* x, acc_t* o, acc_t g) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t e = rp[t]; e + 1 < rp[t + 1]; ++e)
      o[e] += kept_bits_product<acc_t>(bits, runs[e], rp[t + 1] - e - 1, x[e], x + e + 1, o + e + 1, g);
}
#endif

// The gradient from the bracketed sum's kept bits (csrc/bracketed_sum.h; no block, no negative
// value): each row's runs turned into G = g where kept, in the order of the loop below.
// The bits already hold the forward's cut: kth, tie_cut and the block's arguments are not read.
template <typename acc_t>
torch::Tensor kept_bits_backward(const aosae::TopKSumPlan& plan, const int64_t* rp, const acc_t* x, int64_t m, int64_t nnz,
                          acc_t g, int64_t width, bool live_end_empty, const torch::Tensor& vals, bool vectorised) {
  TORCH_CHECK(width == 0 && live_end_empty, "sparse_csr_topk_sum_backward: width is ", width, " (and live_end given: ",
              !live_end_empty, ") but these rows' plan has no block: pass the width and live_end that sparse_csr_topk_sum "
              "returned for these rows");
  const int64_t* runs = plan.pair_runs.template data_ptr<int64_t>();
  const int64_t count = (plan.kept_bits.numel() - 1) * 64;  // (the last word is spare)
  TORCH_CHECK(plan.pair_runs.numel() == nnz, "sparse_csr_topk_sum_backward: the plan's pair_runs has ",
              plan.pair_runs.numel(), " entries for ", nnz, ": pass the plan that sparse_csr_topk_sum returned for these rows");
  at::parallel_for(0, m, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e = rp[t]; e + 1 < rp[t + 1]; ++e)
        TORCH_CHECK(runs[e] >= 0 && runs[e] + (rp[t + 1] - e - 1) <= count, "sparse_csr_topk_sum_backward: the "
                    "plan's pair_runs[", e, "] = ", runs[e], " is outside its ", count, " kept bits: pass the plan "
                    "that sparse_csr_topk_sum returned for these rows");
  });
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(plan.kept_bits.template data_ptr<int64_t>());
  torch::Tensor out = at::zeros({nnz}, vals.options());
  acc_t* o = out.data_ptr<acc_t>();
  const bool use_avx512 = vectorised && has_avx512();
  at::parallel_for(0, m, 64, [&](int64_t t0, int64_t t1) {
#if defined(__x86_64__) || defined(__i386__)
    if (use_avx512) return kept_bits_rows<acc_t>(bits, runs, rp, t0, t1, x, o, g);
#endif
    std::vector<acc_t> run;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e = rp[t]; e + 1 < rp[t + 1]; ++e) {
        const int64_t len = rp[t + 1] - e - 1, at = runs[e];
        run.resize(len);
        expand_bits_plain(bits, at, len, g, run.data());
        o[e] += run_product(run.data(), len, x[e], x + e + 1, o + e + 1);
      }
  });
  return out;
}

}  // namespace aosae

// What the sum of the k best pairs' forward (sparse_csr_topk_sum, csrc/gram_topk_sparse.cpp)
// hands its backward (csrc/topk_sum_backward.cpp), so that the backward does not derive it again:
// the latents' norm order, the GEMM block's plan and its recomputed scores (the moved rows and the
// corrections) with, on float32 rows with no negative value, its kept pairs as bits, and every row
// pair's score outside the block. Without it the backward rebuilt
// all of them: 16 ms at BatchTopK d_sae 16384's initialisation and 13.6 ms at TopK 16384, against
// 4–5 ms from the plan (which costs the forward 1.5–3.5 ms).
//
// Python holds it as an opaque object (aosae._C.TopKSumPlan) in the autograd context; its
// buffers are freed with it.

#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <memory>
#include <optional>

#include "block_bits.h"
#include "dense_rows.h"
#include "norm_order.h"
#include "recomputed_block.h"

namespace aosae {

struct TopKSumPlan {
  virtual ~TopKSumPlan() = default;
  int64_t m = 0, nnz = 0, n = 0;  // the rows it was made for
  // every pair (s, q), s < q, of a row outside the block: its score; entry e's pairs with its
  // row's later entries from pair_scores[pair_runs[e]] on (csrc/coactive_pairs.h). From the
  // bracketed sum (csrc/bracketed_sum.h) instead: kept_bits, one bit per row pair (kept or not),
  // entry e's from bit pair_runs[e] on, and no scores.
  torch::Tensor pair_scores, pair_runs, kept_bits;
};

template <typename acc_t>
struct TopKSumPlanOf : TopKSumPlan {
  std::optional<NormOrder<acc_t>> order;  // the latents relabelled by norm (with a staircase)
  DenseRows<acc_t> dense;                 // the rows moved to the block, and its latents
  RecomputedBlock<acc_t> scores;          // the block's scores, recomputed where read
  BlockBits block_bits;                   // float32 rows with no negative value: its kept pairs (csrc/block_bits.h)
};

// an empty plan for rows [m] of nnz entries over n latents
template <typename acc_t>
std::shared_ptr<TopKSumPlanOf<acc_t>> plan_for_rows(int64_t m, int64_t nnz, int64_t n) {
  auto plan = std::make_shared<TopKSumPlanOf<acc_t>>();
  plan->m = m;
  plan->nnz = nnz;
  plan->n = n;
  return plan;
}

}  // namespace aosae

// The k best co-active pairs as a set, in no order (csrc/gram_topk_sparse.cpp's selection after
// its first stage, csrc/coactive_pairs.h): a loss sums over the set, or k covers every pair.
// Every pair in a bin above the k-th's, and inside that bin the pairs above the k-th |C| plus, of
// those tied at it, the ones with the smallest (i, j): the set the ordered path
// (csrc/sorted_selection.h) keeps, without building or sorting 64-bit keys (10.7 M of them at
// BatchTopK d_sae 65536: 0.4 s). With every pair kept nothing is compared. Parts are contiguous
// ranges of i balanced by their pair counts: a first pass counts each part's sure pairs and
// collects its boundary bin's, a second writes each part's kept pairs at its offset. Output
// grouped by i ascending. (The sum of the k best without their list: csrc/topk_sum.h.)

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "buffer_pool.h"
#include "coactive_pairs.h"
#include "pair_select.h"

namespace aosae {

// ids: the caller's ids of the latents, written beside the pairs, or null.
template <typename acc_t>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> unordered_selection(
    const CoactivePairs<acc_t>& summed, int64_t n, int64_t k, const KthBin& kth_bin, int threads,
    at::ScalarType dtype, const int64_t* ids, torch::Tensor* id_rows, torch::Tensor* id_cols) {
  using torch::Tensor;
  const std::vector<int64_t>& kept = summed.kept;
  const bool keep_all = summed.nonzero_pairs <= k;
  const int64_t bar = kth_bin.bin;  // -1: at most k pairs, keep them all
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) start[i + 1] = start[i] + kept[i];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n, 8 * threads));
  std::vector<int64_t> part_begin(parts + 1, n);
  part_begin[0] = 0;
  for (int64_t p = 1; p < parts; ++p)
    part_begin[p] = std::lower_bound(start.begin(), start.end(), start[n] * p / parts) - start.begin();
  std::vector<int64_t> out_begin(parts + 1, 0);
  acc_t kth = acc_t(0);
  int64_t tie_cut = -1;
  auto in_edge = [&](acc_t v, int64_t key) {
    const acc_t a = std::abs(v);
    return a > kth || (a == kth && key <= tie_cut);
  };
  if (keep_all) {
    for (int64_t p = 0; p <= parts; ++p) out_begin[p] = start[part_begin[p]];
  } else {
    std::vector<int64_t> sure_count(parts, 0);
    std::vector<std::vector<Candidate<acc_t>>> edge(parts);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t count = 0;
        auto& mine = edge[p];
        auto offer = [&](acc_t v, int64_t i, int64_t j) {
          const int64_t bin = magnitude_bin(v);
          count += bin > bar;
          if (bin == bar) mine.push_back({v, i * n + j});
        };
        for (int64_t i = part_begin[p]; i < part_begin[p + 1]; ++i) summed.pairs_of(i, offer);
        sure_count[p] = count;
      }
    });
    // the k-th |C| inside the boundary bin, then the cut among the pairs tied at it
    const KthCut<acc_t> cut = kth_cut<acc_t>(
        [&](auto&& take) {
          for (const auto& part : edge)
            for (const auto& c : part) take(c);
        },
        k - kth_bin.above);
    kth = cut.kth;
    tie_cut = cut.tie_cut;
    for (int64_t p = 0; p < parts; ++p) {
      int64_t c = sure_count[p];
      for (const auto& e : edge[p]) c += in_edge(e.value, e.key);
      out_begin[p + 1] = out_begin[p] + c;
    }
    TORCH_CHECK(out_begin[parts] == k, "sparse_csr_coactive: kept ", out_begin[parts], " pairs, expected k = ", k);
  }
  const int64_t count = out_begin[parts];
  auto values = empty_pooled(count, dtype);
  auto rows = empty_pooled(count, torch::kInt64);
  auto cols = empty_pooled(count, torch::kInt64);
  acc_t* ov = values.data_ptr<acc_t>();
  int64_t* orow = rows.data_ptr<int64_t>();
  int64_t* ocol = cols.data_ptr<int64_t>();
  // the caller's ids of the pairs too, written here: mapping them afterwards re-read 16 B per pair
  int64_t *irow = nullptr, *icol = nullptr;
  if (ids) {
    *id_rows = empty_pooled(count, torch::kInt64);
    *id_cols = empty_pooled(count, torch::kInt64);
    irow = id_rows->data_ptr<int64_t>();
    icol = id_cols->data_ptr<int64_t>();
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t o = out_begin[p];
      auto offer = [&](acc_t v, int64_t i, int64_t j) {
        const int64_t bin = magnitude_bin(v);
        if (bin > bar || (bin == bar && in_edge(v, i * n + j))) {
          ov[o] = v;
          orow[o] = i;
          ocol[o] = j;
          if (irow) {
            irow[o] = ids[i];
            icol[o] = ids[j];
          }
          ++o;
        }
      };
      for (int64_t i = part_begin[p]; i < part_begin[p + 1]; ++i) summed.pairs_of(i, offer);
    }
  });
  return {values, rows, cols};
}

}  // namespace aosae

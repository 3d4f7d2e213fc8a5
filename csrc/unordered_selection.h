// The k best co-active pairs as a set, in no order (csrc/gram_topk_sparse.cpp's selection after
// its first stage, csrc/coactive_pairs.h): a loss sums over the set, or k covers every pair.
// Every pair in a bin above the k-th's, and inside that bin the pairs above the k-th |C| plus, of
// those tied at it, the ones with the smallest (i, j): the set the ordered path
// (csrc/sorted_selection.h) keeps, without building or sorting 64-bit keys (10.7 M of them at
// BatchTopK d_sae 65536: 0.4 s). With every pair kept nothing is compared. Parts are contiguous
// ranges of i balanced by their pair counts: a first pass counts each part's sure pairs and
// collects its boundary bin's, a second writes each part's kept pairs at its offset. Output
// grouped by i ascending. The summing entry (sum_out) writes no pair: the sum of the kept ones
// and the cut that tells them (SumResult).

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
#include "norm_order.h"
#include "pair_select.h"

namespace aosae {

// What sparse_csr_topk_sum returns instead of the pairs: their sum, and what tells a pair in
// from a pair out (the backward recomputes the scores and applies the same test).
struct SumResult {
  double total = 0;         // Σ |C_ij| over the kept pairs, summed in float64
  double kth = 0;           // the k-th best |C| (0 and tie_cut -1: every non-zero pair is kept)
  int64_t tie_cut = -1;     // of the pairs tied at kth, those with i·n + j <= tie_cut are kept
  int64_t kept = 0;         // min(k, P)
  int64_t kept_in_block = 0;  // of them, inside U × U (the GEMM block)
  torch::Tensor block;      // [u, u]: the scores over U × U (upper triangle), or undefined
  torch::Tensor live_end;   // [u] int64: block row p holds (p, q < live_end[p]); empty: latents not relabelled
};

// order: the latents' relabelling (norm order) or null; ids: the caller's ids of the latents,
// written beside the pairs, or null.
template <typename acc_t>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> unordered_selection(
    const CoactivePairs<acc_t>& summed, const NormOrder<acc_t>* order, int64_t n, int64_t k,
    const KthBin& kth_bin, int threads, at::ScalarType dtype, const int64_t* ids, torch::Tensor* id_rows,
    torch::Tensor* id_cols, SumResult* sum_out) {
  using torch::Tensor;
  const DenseRows<acc_t>& dense = summed.dense;
  const int32_t* position = dense.position.data();
  const int64_t* block_latent = dense.latents.data();
  const int64_t width = dense.size();
  const acc_t* block = width > 0 ? dense.block.template data_ptr<acc_t>() : nullptr;
  const std::vector<int64_t>& bucket_start = summed.bucket_start;
  const std::vector<int64_t>& distinct = summed.distinct;
  const std::vector<int64_t>& kept = summed.kept;
  const int32_t* pj = summed.pj;
  const acc_t* pv = summed.pv;
  const bool keep_all = summed.nonzero_pairs <= k;
  const int64_t bar = kth_bin.bin;  // -1: at most k pairs, keep them all
  // the tie order's key of a pair: i·n + j of the original latents
  auto key_of = [&](int64_t i, int64_t j) { return order ? order->key(i, j, n) : i * n + j; };
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
  // the summing entry: per part, Σ|C| and the count inside the block of the pairs kept so far
  std::vector<double> part_sum(parts, 0.0);
  std::vector<int64_t> part_in_block(parts, 0);
  std::vector<acc_t> part_min(parts, std::numeric_limits<acc_t>::infinity());
  auto in_block = [&](int64_t key) {  // of a pair's key (original latents)
    int64_t i = key / n, j = key % n;
    if (order) i = order->label[i], j = order->label[j];
    return position[i] >= 0 && position[j] >= 0;
  };
  // The summing entry's pass over part p's rows: the sum, count and minimum of the pairs above
  // the k-th's bin (every non-zero pair when bar = -1), those in that bin collected into edge.
  // Branch-free over the block's rows, which hold most of BatchTopK's pairs, kept or not in no
  // order (a branch there cost as much as the block's GEMM); the buckets' pairs are never in it.
  auto sum_part = [&](int64_t p, std::vector<Candidate<acc_t>>* edge) {
    double total = 0;
    int64_t count = 0, count_block = 0;
    acc_t lowest = std::numeric_limits<acc_t>::infinity();
    for (int64_t i = part_begin[p]; i < part_begin[p + 1]; ++i) {
      auto visit = [&](acc_t v, int64_t j, int64_t& counter) {
        const int64_t bin = magnitude_bin(v);
        const bool above = (bin > bar) & (v != acc_t(0));
        const acc_t a = std::abs(v);
        total += above ? static_cast<double>(a) : 0.0;
        counter += above;
        lowest = above ? std::min(lowest, a) : lowest;
        if (bin == bar && edge != nullptr) edge->push_back({v, key_of(i, j)});  // (bar >= 0: v != 0)
      };
      const int64_t b = bucket_start[i];
      for (int64_t u = 0; u < distinct[i]; ++u) visit(pv[b + u], static_cast<int64_t>(pj[b + u]), count);
      const int64_t pi = position[i];
      const int64_t row_end = pi >= 0 ? summed.row_end(pi) : 0;
      for (int64_t q = pi + 1; q < row_end; ++q) visit(block[pi * width + q], block_latent[q], count_block);
    }
    part_sum[p] = total;
    part_in_block[p] = count_block;
    part_min[p] = lowest;
    return count + count_block;
  };
  if (keep_all) {
    for (int64_t p = 0; p <= parts; ++p) out_begin[p] = start[part_begin[p]];
    if (sum_out) {
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) sum_part(p, nullptr);
      });
    }
  } else {
    std::vector<int64_t> sure_count(parts, 0);
    std::vector<std::vector<Candidate<acc_t>>> edge(parts);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (sum_out) {
          sure_count[p] = sum_part(p, &edge[p]);
          continue;
        }
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
    std::vector<acc_t> edge_mag;
    for (const auto& part : edge)
      for (const auto& c : part) edge_mag.push_back(std::abs(c.value));
    const int64_t need = k - kth_bin.above;  // 1 <= need <= edge_mag.size()
    std::nth_element(edge_mag.begin(), edge_mag.begin() + (need - 1), edge_mag.end(), std::greater<acc_t>());
    kth = edge_mag[need - 1];
    int64_t greater = 0;
    std::vector<int64_t> tie_keys;
    for (const auto& part : edge)
      for (const auto& c : part) {
        const acc_t a = std::abs(c.value);
        greater += a > kth;
        if (a == kth) tie_keys.push_back(c.key);
      }
    const int64_t ties_kept = need - greater;  // 1 <= ties_kept <= tie_keys.size()
    std::nth_element(tie_keys.begin(), tie_keys.begin() + (ties_kept - 1), tie_keys.end());
    tie_cut = tie_keys[ties_kept - 1];
    for (int64_t p = 0; p < parts; ++p) {
      int64_t c = sure_count[p];
      for (const auto& e : edge[p]) {
        const bool in = in_edge(e.value, e.key);
        c += in;
        if (sum_out && in) {
          part_sum[p] += std::abs(static_cast<double>(e.value));
          part_in_block[p] += in_block(e.key);
        }
      }
      out_begin[p + 1] = out_begin[p] + c;
    }
    TORCH_CHECK(out_begin[parts] == k, "sparse_csr_coactive: kept ", out_begin[parts], " pairs, expected k = ", k);
  }
  const int64_t count = out_begin[parts];
  if (sum_out) {  // no pair written: the sum, and the test that tells the kept pairs
    for (int64_t p = 0; p < parts; ++p) {
      sum_out->total += part_sum[p];
      sum_out->kept_in_block += part_in_block[p];
    }
    sum_out->kth = static_cast<double>(kth);
    sum_out->tie_cut = tie_cut;
    if (keep_all && count == k) {  // exactly k pairs: the k-th score is the smallest, and every pair at it is kept
      sum_out->kth = static_cast<double>(*std::min_element(part_min.begin(), part_min.end()));
      sum_out->tie_cut = std::numeric_limits<int64_t>::max();
    }
    sum_out->kept = count;
    if (width > 0) sum_out->block = dense.block;
    if (order) sum_out->live_end = torch::tensor(summed.live_end.empty() ? std::vector<int64_t>(width, width)
                                                                         : summed.live_end, torch::kInt64);
    return {};
  }
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

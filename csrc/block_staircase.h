// Only the part of the GEMM block that can hold one of the k best pairs (the sum of the k best
// pairs, csrc/gram_topk_sparse.cpp, with positive values and latents in norm order, csrc/
// norm_order.h).
//
// With positive values every C_ij is at least its moved rows' part A_Hᵀ A_H and at most
// s_i·s_j, s the column norms (Cauchy–Schwarz). The block's latents in norm order, largest first,
// make {s_p·s_q ≥ x} a staircase at the block's top-left corner: row p's columns (p, end_p), end
// non-increasing. A seed staircase with about 1.25·k pairs is multiplied first; the k-th best of
// its moved-row parts (as the lower edge of its histogram bin) is a score that at least k pairs
// reach, so at most the k-th best score: LB. Any pair with s_p·s_q·(1 + slack) < LB is then below
// the k-th score and outside the selection; only the staircase {s_p·s_q·(1 + slack) ≥ LB} is
// multiplied and scanned. At BatchTopK initialisation that is 4 % of the block at d_sae 16384 and
// 36 % at 65536 (benchmarks/NOTES.md); where the seed alone would be half the block or more, the
// whole block is computed. The block is never stored on this path (csrc/recomputed_block.h).

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pair_select.h"
#include "recomputed_block.h"

namespace aosae {

// Rounding: a score sums at most m products (one per row), each rounded, so it is within about
// m·ε of exact: 1 % covers m up to 10⁵ rows in float32; larger batches widen it with them.
constexpr double kStaircaseSlack = 0.01;

template <typename acc_t>
double staircase_slack(int64_t m) {
  return std::max(kStaircaseSlack, 4.0 * static_cast<double>(m) * std::numeric_limits<acc_t>::epsilon());
}
// The seed holds this many times k pairs; pruning is tried only when that is under half the block.
constexpr double kSeedPairs = 1.25;

// Row p's end: the first q whose bound falls below x (at least p + 1: no column), s non-increasing.
inline std::vector<int64_t> staircase_ends(const std::vector<double>& s, double x) {
  const int64_t u = static_cast<int64_t>(s.size());
  std::vector<int64_t> end(u);
  int64_t q = u;
  for (int64_t p = 0; p < u; ++p) {  // q(p) = #{q: s_p·s_q >= x} does not grow with p
    while (q > 0 && s[p] * s[q - 1] < x) --q;
    end[p] = std::max(q, p + 1);
  }
  return end;
}

inline double staircase_pairs(const std::vector<int64_t>& end) {
  double pairs = 0;
  for (size_t p = 0; p < end.size(); ++p) pairs += static_cast<double>(end[p] - static_cast<int64_t>(p) - 1);
  return pairs;
}

// The lower edge of a magnitude bin (csrc/pair_select.h): every |v| in the bin is at least this.
template <typename acc_t>
double bin_floor(int64_t bin) {
  if constexpr (std::is_same<acc_t, float>::value) {
    const uint32_t bits = static_cast<uint32_t>(bin) << 15;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    const uint64_t bits = static_cast<uint64_t>(bin) << 47;
    double v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
}

// Each row's end over the block's latents (s: their norms, non-increasing): the staircase of pairs
// that can be among the k best; every end is the block's width when no pruning pays. Only the
// seed's moved-row parts are computed here (recomputed again where the staircase is read).
template <typename acc_t>
std::vector<int64_t> block_staircase(const RecomputedBlock<acc_t>& rows, int64_t m, const std::vector<double>& s,
                                     int64_t k) {
  const int64_t width = rows.width();
  std::vector<int64_t> full(width, width);
  const double block_pairs = 0.5 * static_cast<double>(width) * static_cast<double>(width - 1);
  if (kSeedPairs * static_cast<double>(k) >= 0.5 * block_pairs || s.empty() || !(s.back() > 0)) return full;
  // the seed: the smallest bound x (by bisection, on a log scale) whose staircase holds >= 1.25·k pairs
  double lo = s[width - 1] * s[width - 1], hi = s[0] * s[1];
  for (int it = 0; it < 60 && hi > lo * (1 + 1e-6); ++it) {
    const double mid = std::sqrt(lo * hi);
    (staircase_pairs(staircase_ends(s, mid)) >= kSeedPairs * static_cast<double>(k) ? lo : hi) = mid;
  }
  const std::vector<int64_t> seed = staircase_ends(s, lo);
  // the k-th best moved-row part in the seed, as its bin's lower edge
  const int threads = std::max(1, at::get_num_threads());
  std::vector<std::vector<uint32_t>> hists(threads, std::vector<uint32_t>(kMagnitudeBins, 0));
  at::parallel_for(0, width, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t>& hist = hists[at::get_thread_num()];
    std::vector<acc_t> row(width);
    for (int64_t p = begin; p < end; ++p) {
      rows.product_row(p, p + 1, seed[p], row.data());
      for (int64_t q = 0; q < seed[p] - p - 1; ++q) hist[magnitude_bin(row[q])] += row[q] != acc_t(0);
    }
  });
  std::vector<int64_t> hist_total(kMagnitudeBins, 0);
  for (const auto& h : hists)
    for (int64_t b = 0; b < kMagnitudeBins; ++b) hist_total[b] += h[b];
  const KthBin kth_bin = find_kth_bin(hist_total, k);
  const double bound = kth_bin.bin > 0 ? bin_floor<acc_t>(kth_bin.bin) : 0.0;
  if (!(bound > 0)) return full;  // fewer than k non-zero parts in the seed: the whole block
  return staircase_ends(s, bound / (1 + staircase_slack<acc_t>(m)));
}

}  // namespace aosae

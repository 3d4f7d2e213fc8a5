// Only the part of the GEMM block that can hold one of the k best pairs (the sum of the k best
// pairs, csrc/gram_topk_sparse.cpp, with positive values and latents in norm order, csrc/
// norm_order.h).
//
// With positive values every C_ij is at least its moved rows' part A_Hᵀ A_H and at most
// s_i·s_j, s the column norms (Cauchy–Schwarz). The block's latents in norm order, largest first,
// make {s_p·s_q ≥ x} a staircase at the block's top-left corner: row p's columns (p, end_p), end
// non-increasing. A seed staircase with about 1.25·k pairs is sampled first; the score that
// about 1.1·k of its moved-row parts reach (as the lower edge of its histogram bin) is then a
// floor that at least k pairs reach, so at most the k-th best score: any pair with
// s_p·s_q·(1 + slack) below it is below the k-th score and outside the selection; only the
// staircase {s_p·s_q·(1 + slack) ≥ floor} is multiplied and scanned, and the k-th score found
// there is checked against the floor (a sample that misled: the whole block). At BatchTopK
// initialisation that is 4 % of the block at d_sae 16384 and 36 % at 65536 (benchmarks/
// NOTES.md); where the seed alone would be half the block or more (it is doubled while too few of
// its pairs have a moved-row part), the staircase is the whole block. A staircase (or whole
// block) still over 1.5·k pairs is then sampled once more for a second floor nearer the k-th
// score (kRefineOver); where that floor proves too high the caller sums the seed's staircase
// again before the whole block. The block is never stored on this path (csrc/recomputed_block.h).

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
#include "sorted_selection.h"  // selection_thread

namespace aosae {

// Rounding: a score sums at most m products (one per row), each rounded, so it is within about
// m·ε of exact: 1 % covers m up to 10⁵ rows in float32; larger batches widen it with them.
constexpr double kStaircaseSlack = 0.01;

template <typename acc_t>
double staircase_slack(int64_t m) {
  return std::max(kStaircaseSlack, 4.0 * static_cast<double>(m) * std::numeric_limits<acc_t>::epsilon());
}
// The seed region holds this many times k pairs at first (doubled while too few of its pairs have a
// moved-row part); pruning is tried only while that is under half the block.
constexpr double kSeedPairs = 1.25;
// The floor: where the seed's sampled moved-row parts reach this many times k (the margin: the
// sample's error).
constexpr double kSeedReach = 1.1;
// Every this-many-th row of the seed is sampled (fewer for a narrow block: every row below 256 latents).
constexpr int64_t kSeedRowStep = 16;
// A staircase (or a whole block) of more than this many times k pairs is sampled again (every
// width/128-th row, at most every kRefineRowStep-th) for a floor closer to the k-th score: the
// seed's floor is where 1.1·k of its 1.25·k pairs lie, far below the k-th of all pairs where the
// norms order the scores loosely (BatchTopK d_sae 262144: staircases of 3.2·k cut to 2.0·k;
// benchmarks/NOTES.md, twenty-fifth pass)
constexpr double kRefineOver = 1.5;
constexpr int64_t kRefineRowStep = 64;
// The second look's sample is read this many Poisson deviations low: with its 10 % margin alone
// the floor proved above the k-th score in 110 of 1 200 calls on the tests' 400-latent blocks (71
// of the 400 with k ≈ 790, whose sample holds ≈ 290 pairs: ±6 %), with it in 18; at BatchTopK
// d_sae 65536 the sample holds millions of pairs and the margin is nil.
constexpr double kRefineNoiseSd = 3.0;

// The samples' margins: the seed's floor is where seed·k of its pairs lie, the second look's where
// second·k of the staircase's do (0: no second look; the retry after it misled). Tests make them
// small to see a floor that proves too high.
struct StaircaseReach {
  double seed = kSeedReach;
  double second = kSeedReach;
};

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

// The staircase: each row's end over the block's latents, and the floor it was cut at: every
// pair outside it scores below the floor (0: nothing was cut, every end is the block's width).
struct Staircase {
  std::vector<int64_t> end;
  double floor = 0;
  bool second_look = false;  // the floor is the second look's (above the seed's)
};

// The floor that about reach·k of the region's moved-row parts reach (0: fewer of them
// non-zero), row p's part of the region being its columns (p, end[p]); every step-th row sampled
// (at most max_step). With noise_sd > 0 and step > 1, c sampled pairs at or above a bin count as
// step·(c − noise_sd·√c): the floor then holds where the sample is noise_sd Poisson deviations
// low.
template <typename acc_t>
double region_floor(const RecomputedBlock<acc_t>& rows, const std::vector<int64_t>& end, int64_t k, double reach,
                    int64_t max_step, double noise_sd = 0) {
  const int64_t width = rows.width();
  const int64_t step = std::clamp<int64_t>(width / 128, 1, max_step);
  const int threads = std::max(1, at::get_num_threads());
  std::vector<std::vector<uint32_t>>& hists = ZeroedCounts<uint32_t, 1>::lend(threads, kMagnitudeBins);
  const int64_t sampled = (width - step / 2 + step - 1) / step;
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint32_t>& hist = hists[selection_thread()];
    std::vector<acc_t> row(width);
#pragma omp for schedule(dynamic, 4)  // the region's rows shorten down the staircase
    for (int64_t x = 0; x < sampled; ++x) {
      const int64_t p = step / 2 + x * step;
      if (end[p] <= p + 1) continue;
      rows.product_row(p, p + 1, end[p], row.data());
      for (int64_t q = 0; q < end[p] - p - 1; ++q) hist[magnitude_bin(row[q])] += row[q] != acc_t(0);
    }
  }
  std::vector<int64_t> counted(kMagnitudeBins, 0);  // the sampled rows' pairs per bin
  ZeroedCounts<uint32_t, 1>::drain(hists, 0, kMagnitudeBins, [&](int64_t b, uint32_t c) { counted[b] += c; });
  ZeroedCounts<uint32_t, 1>::give_back();
  const double need = std::ceil(reach * static_cast<double>(k)), sd = step > 1 ? noise_sd : 0.0;
  int64_t at_or_above = 0;
  for (int64_t b = kMagnitudeBins - 1; b > 0; --b) {  // (bin 0: zeros, no floor)
    if (counted[b] == 0) continue;
    at_or_above += counted[b];
    const double c = static_cast<double>(at_or_above);
    if (static_cast<double>(step) * (c - sd * std::sqrt(c)) >= need) return bin_floor<acc_t>(b);
  }
  return 0.0;
}

// The floor of the seed: the staircase of about seed_pairs pairs at the block's top-left corner
template <typename acc_t>
double seed_floor(const RecomputedBlock<acc_t>& rows, const std::vector<double>& s, double seed_pairs, int64_t k,
                  double reach) {
  const int64_t width = rows.width();
  // the seed: the smallest bound x (by bisection, on a log scale) whose staircase holds >= seed_pairs pairs
  double lo = s[width - 1] * s[width - 1], hi = s[0] * s[1];
  for (int it = 0; it < 60 && hi > lo * (1 + 1e-6); ++it) {
    const double mid = std::sqrt(lo * hi);
    (staircase_pairs(staircase_ends(s, mid)) >= seed_pairs ? lo : hi) = mid;
  }
  return region_floor(rows, staircase_ends(s, lo), k, reach, kSeedRowStep);
}

// The staircase of pairs that can be among the k best (s: the block latents' norms,
// non-increasing), from a sample of the seed region: every step-th row's moved-row parts
// (recomputed again where the staircase is read), histogrammed ×step, give the floor where about
// reach·k of the seed's pairs lie above. The seed's pairs are some of all pairs and their
// moved-row parts at most their scores, so at least reach·k pairs score above the floor when the
// sample is right (exactly so with step 1); the caller checks that the k-th best score it finds
// is at least the floor and otherwise sums the whole block. Sampling the seed instead of
// multiplying it whole took the forward at BatchTopK d_sae 65536's initialisation from 51 to
// 24–26 ms (the whole seed was 20 ms). The second look samples the staircase so found (or the
// whole block, where no seed gave a floor) the same way, over more rows than the seed holds: its
// floor is where reach.second·k of them lie, at most the k-th score by the same argument. Its
// region is the whole staircase, where the seed's is 1.25·k pairs for 1.1·k: a 10 % margin in the
// count, which a sample of a few hundred pairs misses often (kRefineNoiseSd).
template <typename acc_t>
Staircase block_staircase(const RecomputedBlock<acc_t>& rows, int64_t m, const std::vector<double>& s, int64_t k,
                          StaircaseReach reach = {}) {
  const int64_t width = rows.width();
  Staircase full{std::vector<int64_t>(width, width), 0.0};
  const double block_pairs = 0.5 * static_cast<double>(width) * static_cast<double>(width - 1);
  if (s.empty() || !(s.back() > 0)) return full;
  // a seed where fewer than reach·k pairs have a non-zero moved-row part (the others' scores come
  // from the other rows alone) is doubled while under half the block: BatchTopK d_sae 65536's step
  // 34 with three more rows moved had such a seed, and the whole block took 87 ms against 59
  double floor = 0;  // (0: the block is small next to k, or no seed under half of it has reach·k such pairs)
  for (double seed_pairs = kSeedPairs * static_cast<double>(k); seed_pairs < 0.5 * block_pairs && !(floor > 0);
       seed_pairs *= 2)
    floor = seed_floor(rows, s, seed_pairs, k, reach.seed);
  const double slack = 1 + staircase_slack<acc_t>(m);
  std::vector<int64_t> end = floor > 0 ? staircase_ends(s, floor / slack) : std::move(full.end);
  bool second_look = false;
  if (reach.second > 0 && staircase_pairs(end) > kRefineOver * static_cast<double>(k)) {  // the second look
    const double second = region_floor(rows, end, k, reach.second, kRefineRowStep, kRefineNoiseSd);
    if (second > floor) {
      floor = second;
      end = staircase_ends(s, floor / slack);
      second_look = true;
    }
  }
  return {std::move(end), floor, second_look};
}

}  // namespace aosae

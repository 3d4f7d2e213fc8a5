// Σ |C_ij| over the k best co-active pairs, without their list and without storing the GEMM block
// (sparse_csr_topk_sum, csrc/gram_topk_sparse.cpp; its backward: csrc/topk_sum_backward.cpp).
//
// The pairs come from csrc/coactive_pairs.h: the buckets (the rows outside the block, summed and
// histogrammed there) and the block's rows, recomputed where they are read
// (csrc/recomputed_block.h; only the staircase that can reach the k-th score with positive
// values, csrc/block_staircase.h). The kept set is the selection's: |C| above the k-th best, and
// of the pairs tied at it those with the smallest original (i, j).
//
// One pass over the block finds it when the k-th best's neighbourhood is known beforehand: every
// step-th row of the block, recomputed and histogrammed (×step) together with the buckets'
// exact histogram, estimates the bins where k·(1 ∓ bracket) pairs are reached. The pass then
// sums and counts the pairs above that bracket (AVX-512 masks, no branch) and collects the few
// inside it; when the count above is below k and the count with the bracket reaches it, the k-th
// score lies inside and kth_cut_between over the collected pairs gives it exactly. Where the
// sample misled, the estimate rescaled to the pass's exact count brackets it once more; where that
// misses too (or bracket = 0) the block is histogrammed whole (step 1) and the pass repeated on
// the exact bin. On the sweep's BatchTopK batches every 32nd row put the k-th score within 0.6 %
// of k pairs (benchmarks/NOTES.md). The block's histogram pass, which the exact method needs,
// cost as much as the sum pass and the product together. Asked for (float32 rows with no negative
// value), the pass also writes the block's pairs above the bracket as bits, and the kept ones
// inside it are set once the cut is known: the backward reads them (csrc/block_bits.h).

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "block_bits.h"
#include "block_staircase.h"
#include "chunked_list.h"
#include "coactive_pairs.h"
#include "norm_order.h"
#include "pair_select.h"
#include "simd512.h"
#include "topk_sum_plan.h"

namespace aosae {

// The estimate's slack: the bracket reaches from k·(1 − 1 %) to k·(1 + 1 %) pairs by the sample,
// or wider where the sample is coarse: about k pairs counted on every step-th row vary by
// ≈ √(step·k), and several times that over a staircase's rows, whose lengths and scores fall
// from its top-left corner (kSampleSpread, fitted there; at most kWidestBracket). At BatchTopK
// d_sae 16384's steps 14 and 40 (k 6.7·10⁵, steps 13 and 9) ±1 % and ±1.8 % missed, and a
// miss's histogram and second pass cost 5–7 ms; ±2.6 % and ±2.2 % hold. At 65536 (k 1.1·10⁷,
// step 32) the bracket stays ±1 % (benchmarks/NOTES.md, fourteenth pass).
constexpr double kSumBracket = 0.01;
constexpr double kSampleSpread = 6.0;
constexpr double kWidestBracket = 0.05;

// What sparse_csr_topk_sum returns instead of the pairs: their sum, and what tells a pair in
// from a pair out (the backward reads or recomputes the scores and applies the same test, or
// reads the kept bits).
struct SumResult {
  double total = 0;           // Σ |C_ij| over the kept pairs, summed in float64
  double kth = 0;             // the k-th best |C| (0 and tie_cut -1: every non-zero pair is kept)
  int64_t tie_cut = -1;       // of the pairs tied at kth, those with i·n + j <= tie_cut are kept
  int64_t kept = 0;           // min(k, P)
  int64_t kept_in_block = 0;  // of them, inside U × U (the GEMM block)
  int64_t width = 0;          // the block's latents (0: no block)
  int64_t block_passes = 0;   // passes over the block's rows (a sample of every step-th row and the seed not counted)
  torch::Tensor live_end;     // [u] int64: block row p holds (p, q < live_end[p]); empty: latents not relabelled
  std::shared_ptr<TopKSumPlan> plan;  // asked for: what the backward takes instead of deriving it (csrc/topk_sum_plan.h)
  BlockBits block_bits;               // asked for: the block's kept pairs (csrc/block_bits.h)
};

// Where a pass draws the line: |C| >= hi is kept for sure; lo <= |C| < hi is collected (the k-th
// score's neighbourhood); zeros are never pairs.
template <typename acc_t>
struct Bracket {
  acc_t lo, hi;
};

// The smallest magnitude of a bin (csrc/pair_select.h's bins); +inf from the bin of +inf on (the
// bins above it hold NaNs, which every tally counts above any bracket, as the histograms do).
template <typename acc_t>
acc_t bin_start(int64_t bin) {
  if (bin >= kMagnitudeBins) return std::numeric_limits<acc_t>::infinity();
  const acc_t v = static_cast<acc_t>(bin_floor<acc_t>(std::max<int64_t>(bin, 0)));
  return std::isfinite(v) ? v : std::numeric_limits<acc_t>::infinity();
}

// Bins (lo, hi] of a histogram where the pairs counted from the top first exceed k·(1 − slack)
// and first reach k·(1 + slack): the bracket [bin_start(lo), bin_start(hi + 1)).
template <typename acc_t>
Bracket<acc_t> bracket_of(const std::vector<double>& hist, int64_t k, double slack) {
  const double want_hi = static_cast<double>(k) * (1 - slack), want_lo = static_cast<double>(k) * (1 + slack);
  int64_t hi_bin = -1, lo_bin = 0;
  double above = 0;
  for (int64_t b = kMagnitudeBins - 1; b >= 0; --b) {
    above += hist[b];
    if (hi_bin < 0 && above > want_hi) hi_bin = b;
    if (above >= want_lo) {
      lo_bin = b;
      break;
    }
  }
  if (hi_bin < 0) hi_bin = lo_bin;  // (slack 0: both lines reached in the same bin)
  return {bin_start<acc_t>(std::min(lo_bin, hi_bin)), bin_start<acc_t>(hi_bin + 1)};
}

// A pass's tally of one part of the pairs.
template <typename acc_t>
struct Tally {
  double total = 0;       // Σ |C| of the pairs above the bracket
  int64_t count = 0;      // how many
  int64_t in_block = 0;   // of them, inside the block
  acc_t lowest = std::numeric_limits<acc_t>::infinity();  // the smallest of them (every_pair's; kept by passes with lo = 0 only)
  ChunkedList<Candidate<acc_t>> edge;  // the pairs inside the bracket (csrc/chunked_list.h)
  size_t bucket_edges = 0;  // edge's first entries: bucket pairs, never in the block (the block's rows follow)
  ChunkedList<int64_t> edge_bits;  // with block bits: each later entry's bit (BlockBits::bit_of)
};

namespace tally_detail {

// A row's pairs above the bracket: their Σ|C| (float64), count and smallest |C|; the offsets of
// those inside it appended to `inside`.
template <typename acc_t>
struct RowTally {
  double total = 0;
  int64_t count = 0;
  acc_t lowest = std::numeric_limits<acc_t>::infinity();
};

// masks (float32 rows only, else null): bit q of the words set where v[q] is above the bracket
template <typename acc_t>
RowTally<acc_t> tally_plain(const acc_t* v, int64_t len, acc_t lo, acc_t hi, std::vector<int64_t>& inside,
                            uint16_t* masks) {
  RowTally<acc_t> t;
  uint16_t word = 0;
  for (int64_t q = 0; q < len; ++q) {
    const acc_t a = std::abs(v[q]);
    const bool above = !(a < hi) & (a != acc_t(0));  // (a NaN counts above, as it bins above)
    t.total += above ? static_cast<double>(a) : 0.0;
    t.count += above;
    t.lowest = above ? std::min(t.lowest, a) : t.lowest;
    if ((a >= lo) & (a < hi) & (a != acc_t(0))) inside.push_back(q);
    word |= static_cast<uint16_t>(above) << (q & 15);
    if (masks && ((q & 15) == 15 || q + 1 == len)) masks[q >> 4] = word, word = 0;
  }
  return t;
}

#if defined(__x86_64__) || defined(__i386__)
// A register of scores per step, masks instead of branches; the sum in float64 registers (float:
// the low and high halves apart), lane order fixed. kLoPositive (lo > 0): a score at or above lo
// is not 0, so the zero test goes, and the smallest above is never read (every_pair, its only
// reader, follows passes with lo = 0): three of the fifteen instructions per register.
template <typename acc_t, bool kLoPositive>
__attribute__((target("avx512f"))) RowTally<acc_t> tally_avx512(const acc_t* v, int64_t len, acc_t lo, acc_t hi,
                                                                std::vector<int64_t>& inside, uint16_t* masks) {
  using S = Simd512<acc_t>;
  constexpr int64_t L = S::kLanes;
  const auto vlo = S::set1(lo), vhi = S::set1(hi), zero = S::zero();
  __m512d sum0 = _mm512_setzero_pd(), sum1 = _mm512_setzero_pd();
  auto lowest = S::set1(std::numeric_limits<acc_t>::infinity());
  int64_t count = 0;
  for (int64_t q = 0; q < len; q += L) {
    const auto valid = S::first(len - q);
    const auto a = S::abs(S::load(valid, v + q));
    typename S::M above, in;
    if constexpr (kLoPositive) {  // (hi > lo > 0: 0 is neither above nor inside; NaN is above)
      above = S::template compare<_CMP_NLT_UQ>(valid, a, vhi);
      in = S::template compare<_CMP_LT_OQ>(S::template compare<_CMP_GE_OQ>(valid, a, vlo), a, vhi);
    } else {
      const auto nonzero = S::template compare<_CMP_NEQ_UQ>(valid, a, zero);  // (NaN: above)
      above = S::template compare<_CMP_NLT_UQ>(nonzero, a, vhi);
      in = S::template compare<_CMP_GE_OQ>(nonzero, a, vlo) & S::template compare<_CMP_LT_OQ>(nonzero, a, vhi);
      lowest = S::min(lowest, above, lowest, a);
    }
    if constexpr (std::is_same<acc_t, float>::value) {
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
      sum0 = _mm512_mask_add_pd(sum0, __mmask8(above & 0xFF), sum0, _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
      sum1 = _mm512_mask_add_pd(sum1, __mmask8(above >> 8), sum1, _mm512_cvtps_pd(high));
      if (masks) masks[q / L] = above;
    } else {
      sum0 = _mm512_mask_add_pd(sum0, above, sum0, a);
    }
    count += __builtin_popcount(above);
    while (in) {
      inside.push_back(q + __builtin_ctz(in));
      in = decltype(in)(in & (in - 1));
    }
  }
  RowTally<acc_t> t;
  t.total = _mm512_reduce_add_pd(sum0) + _mm512_reduce_add_pd(sum1);
  t.count = count;
  t.lowest = S::reduce_min(lowest);
  return t;
}
#endif

template <typename acc_t>
RowTally<acc_t> tally(const acc_t* v, int64_t len, acc_t lo, acc_t hi, std::vector<int64_t>& inside,
                      uint16_t* masks) {
#if defined(__x86_64__) || defined(__i386__)
  if (has_avx512())
    return lo > acc_t(0) && hi > lo ? tally_avx512<acc_t, true>(v, len, lo, hi, inside, masks)
                                    : tally_avx512<acc_t, false>(v, len, lo, hi, inside, masks);
#endif
  return tally_plain(v, len, lo, hi, inside, masks);
}

}  // namespace tally_detail

// Tallies v[0 .. len) into t (the block's rows: in_block too); edge(offset, value) for each pair
// inside the bracket. `inside`: the caller's scratch. masks (float32): the pairs above the bracket
// as bits (csrc/block_bits.h's row).
template <typename acc_t, typename Edge>
void tally_row(const acc_t* v, int64_t len, const Bracket<acc_t>& b, bool block, Tally<acc_t>& t,
               std::vector<int64_t>& inside, Edge&& edge, uint16_t* masks = nullptr) {
  inside.clear();
  const tally_detail::RowTally<acc_t> row = tally_detail::tally(v, len, b.lo, b.hi, inside, masks);
  t.total += row.total;
  t.count += row.count;
  if (block) t.in_block += row.count;
  t.lowest = std::min(t.lowest, row.lowest);
  for (const int64_t q : inside) edge(q, v[q]);
}

template <typename acc_t>
class TopKSum {
 public:
  static constexpr int64_t kTileRows = 16;  // block rows per tile of a pass

  // block_bits: keep the block's kept pairs as bits for the backward (float32 rows with no
  // negative value: csrc/block_bits.h)
  TopKSum(const CoactivePairs<acc_t>& summed, const NormOrder<acc_t>* order, int64_t n, int threads,
          bool block_bits = false)
      : s_(summed), order_(order), n_(n), width_(summed.dense.size()) {
    // parts: contiguous ranges of latents balanced by their pairs (buckets and block row)
    std::vector<int64_t> start(n + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = s_.dense.position[i];
      start[i + 1] = start[i] + s_.distinct[i] + (p >= 0 ? std::max<int64_t>(0, s_.row_end(p) - p - 1) : 0);
    }
    upper_ = start[n];
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n, 8 * threads));
    part_begin_.assign(parts + 1, n);
    part_begin_[0] = 0;
    for (int64_t p = 1; p < parts; ++p)
      part_begin_[p] = std::lower_bound(start.begin(), start.end(), start[n] * p / parts) - start.begin();
    extent_ = width_ > 0 ? s_.row_end(0) : 0;
    if (block_bits && std::is_same<acc_t, float>::value && width_ > 0)
      bits_ = BlockBits(extent_, [&](int64_t p) { return s_.row_end(p); });
  }

  // bracket: the estimate's least slack (0: the exact histogram); step: every step-th row sampled (0: chosen here)
  SumResult run(int64_t k, double bracket, int64_t step) {
    SumResult r = sum(k, bracket, step);
    r.block_bits = std::move(bits_);
    return r;
  }

 private:
  SumResult sum(int64_t k, double bracket, int64_t step) {
    SumResult r;
    r.width = width_;
    if (upper_ <= k) return keep_all(k, r);  // at most k pairs, whatever their scores
    if (width_ == 0) return exact(k, s_.hist_total, r);
    if (bracket > 0) {
      if (step <= 0) step = std::clamp<int64_t>(extent_ / 256, 1, 32);
      const std::vector<int64_t> sample = row_histogram(step);
      r.block_passes += step == 1;  // (every row: the exact histogram)
      const double coarse = kSampleSpread * std::sqrt(static_cast<double>(step) / static_cast<double>(k));
      const double slack = std::max(bracket, std::min(kWidestBracket, coarse));
      // a second try where the first bracket missed, the sample's part of the estimate rescaled
      // to the pass's exact count (BatchTopK d_sae 262144: 2 of 21 calls missed by 1–4 %; the
      // exact histogram and its pass cost two passes more, 0.8 s)
      double scale = static_cast<double>(step);
      const int attempts = step > 1 ? 2 : 1;  // (step 1: the estimate is exact)
      for (int attempt = 0; attempt < attempts; ++attempt) {
        std::vector<double> est(kMagnitudeBins);
        for (int64_t b = 0; b < kMagnitudeBins; ++b)
          est[b] = static_cast<double>(s_.hist_total[b]) + scale * static_cast<double>(sample[b]);
        const Bracket<acc_t> br = bracket_of<acc_t>(est, k, step == 1 ? 0.0 : slack);
        std::vector<Tally<acc_t>> tallies = pass(br);
        ++r.block_passes;
        int64_t above = 0, edge = 0;
        for (const auto& t : tallies) {
          above += t.count;
          edge += static_cast<int64_t>(t.edge.size());
        }
        if (above < k && k <= above + edge) return finish(k, std::move(tallies), br, r);
        if (above + edge < k && br.lo == bin_start<acc_t>(0)) return every_pair(std::move(tallies), k, r);  // P < k
        if (attempt + 1 < attempts) scale = sample_scale(sample, br, above, edge, k);
        if (!(scale > 0)) break;  // (the sample saw no pair past the bracket's edge)
      }
    }
    std::vector<int64_t> hist = row_histogram(1);
    for (int64_t b = 0; b < kMagnitudeBins; ++b) hist[b] += s_.hist_total[b];
    ++r.block_passes;
    return exact(k, hist, r);
  }

  // After a pass missed the k-th score: the sample's weight that makes the estimate's count at
  // the bracket's edge past which the k-th lies (the buckets' exact histogram plus the weighted
  // sample) the pass's exact count there; 0 where none does (the sample saw no pair past it)
  double sample_scale(const std::vector<int64_t>& sample, const Bracket<acc_t>& br, int64_t above, int64_t edge,
                      int64_t k) const {
    const bool under = above + edge < k;  // the k-th best below br.lo; else at br.hi or above
    const acc_t line = under ? br.lo : br.hi;
    double buckets = 0, sampled = 0;
    for (int64_t b = 0; b < kMagnitudeBins; ++b)
      if (bin_start<acc_t>(b) >= line) {
        buckets += static_cast<double>(s_.hist_total[b]);
        sampled += static_cast<double>(sample[b]);
      }
    const double scale = (static_cast<double>(under ? above + edge : above) - buckets) / sampled;
    return sampled > 0 && scale > 0 ? scale : 0.0;
  }

  // the block's rows p = step/2, step/2 + step, ... (their live part), histogrammed
  std::vector<int64_t> row_histogram(int64_t step) const {
    const int threads = std::max(1, at::get_num_threads());
    std::vector<std::vector<int64_t>>& hists = ZeroedCounts<int64_t, 0>::lend(threads, kMagnitudeBins);
    const int64_t rows = extent_ > step / 2 ? (extent_ - step / 2 + step - 1) / step : 0;
#pragma omp parallel num_threads(threads)
    {
      std::vector<int64_t>& hist = hists[selection_thread()];
      std::vector<acc_t> row(width_);
#pragma omp for schedule(dynamic, 4)  // rows shorten down the triangle
      for (int64_t x = 0; x < rows; ++x) {
        const int64_t p = step / 2 + x * step, len = s_.row_end(p) - p - 1;
        s_.rows.row(p, p + 1, p + 1 + len, row.data());
        for (int64_t q = 0; q < len; ++q) hist[magnitude_bin(row[q])] += row[q] != acc_t(0);
      }
    }
    std::vector<int64_t> total(kMagnitudeBins, 0);
    ZeroedCounts<int64_t, 0>::drain(hists, 0, kMagnitudeBins, [&](int64_t b, int64_t c) { total[b] += c; });
    ZeroedCounts<int64_t, 0>::give_back();
    return total;
  }

  // the tie order's key of a pair: i·n + j of the original latents
  int64_t key_of(int64_t i, int64_t j) const { return order_ ? order_->key(i, j, n_) : i * n_ + j; }

  // every pair, per part: the sum and count of those above the bracket, the ones inside collected
  std::vector<Tally<acc_t>> pass(const Bracket<acc_t>& br) {
    const int64_t parts = static_cast<int64_t>(part_begin_.size()) - 1;
    std::vector<Tally<acc_t>> tallies(parts);
    const int64_t* latent = s_.dense.latents.data();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tile;
      std::vector<int64_t> inside;
      for (int64_t part = begin; part < end; ++part) {
        Tally<acc_t>& t = tallies[part];
        const int64_t i0 = part_begin_[part], i1 = part_begin_[part + 1];
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = s_.bucket_start[i];
          tally_row(s_.pv + b, s_.distinct[i], br, false, t, inside, [&](int64_t u, acc_t v) {
            t.edge.push_back({v, key_of(i, s_.pj[b + u])});
          });
        }
        t.bucket_edges = t.edge.size();
        // the part's block rows (U ascending: a contiguous range), kTileRows at a time: a tile
        // reads each stretch of A_H once for all its rows
        const int64_t p_lo = std::lower_bound(latent, latent + width_, i0) - latent;
        const int64_t p_hi = std::lower_bound(latent, latent + width_, i1) - latent;
        for (int64_t p0 = p_lo; p0 < p_hi; p0 += kTileRows) {
          const int64_t p1 = std::min(p_hi, p0 + kTileRows);
          int64_t q_end = p0 + 1;
          for (int64_t p = p0; p < p1; ++p) q_end = std::max(q_end, s_.row_end(p));
          const int64_t cols = q_end - p0 - 1;  // the tile's columns p0 + 1 .. q_end
          if (cols <= 0) continue;
          tile.resize((p1 - p0) * cols);
          s_.rows.tile(p0, p1, p0 + 1, q_end, tile.data(), cols);
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t len = s_.row_end(p) - p - 1;  // row p's pairs: q in (p, row_end(p))
            if (len <= 0) continue;
            const acc_t* row = tile.data() + (p - p0) * cols + (p - p0);  // column p + 1
            const int64_t i = latent[p];
            tally_row(row, len, br, true, t, inside, [&](int64_t q, acc_t v) {
              t.edge.push_back({v, key_of(i, latent[p + 1 + q])});
              if (bits_.defined()) t.edge_bits.push_back(bits_.bit_of(p, q));
            }, bits_.defined() ? bits_.row(p) : nullptr);
          }
        }
      }
    });
    return tallies;
  }

  // bin of the k-th best known exactly (hist: every pair)
  SumResult exact(int64_t k, const std::vector<int64_t>& hist, SumResult& r) {
    const KthBin kth_bin = find_kth_bin(hist, k);
    if (width_ > 0) ++r.block_passes;
    if (kth_bin.bin < 0) return every_pair(pass({acc_t(0), acc_t(0)}), k, r);
    const Bracket<acc_t> bin{bin_start<acc_t>(kth_bin.bin), bin_start<acc_t>(kth_bin.bin + 1)};
    return finish(k, pass(bin), bin, r);
  }

  SumResult keep_all(int64_t k, SumResult& r) {
    if (width_ > 0) ++r.block_passes;
    return every_pair(pass({acc_t(0), acc_t(0)}), k, r);
  }

  // every non-zero pair kept (P <= k): above the bracket or inside it
  SumResult every_pair(std::vector<Tally<acc_t>> tallies, int64_t k, SumResult& r) {
    acc_t lowest = std::numeric_limits<acc_t>::infinity();
    for (const auto& t : tallies) {
      r.total += t.total;
      r.kept += t.count;
      r.kept_in_block += t.in_block;
      lowest = std::min(lowest, t.lowest);
      each_edge_of(t, [&](const Candidate<acc_t>& c, bool block, int64_t bit) {
        r.total += std::abs(static_cast<double>(c.value));
        r.kept += 1;
        r.kept_in_block += block;
        if (bit >= 0) bits_.keep_bit(bit);
        lowest = std::min(lowest, std::abs(c.value));
      });
    }
    r.kth = 0;
    r.tie_cut = -1;
    if (r.kept == k) {  // exactly k pairs: the k-th score is the smallest, and every pair at it is kept
      r.kth = static_cast<double>(lowest);
      r.tie_cut = kEveryTieKept;
    }
    return r;
  }

  // the k-th best lies inside the bracket: its exact score, then the cut among the pairs tied at it
  SumResult finish(int64_t k, std::vector<Tally<acc_t>> tallies, const Bracket<acc_t>& br, SumResult& r) {
    int64_t above = 0, edge = 0;
    for (const auto& t : tallies) {
      above += t.count;
      edge += static_cast<int64_t>(t.edge.size());
      r.total += t.total;
      r.kept_in_block += t.in_block;
    }
    TORCH_CHECK(above < k && k - above <= edge, "sparse_csr_topk_sum: the pass counted ", above, " pairs above the k-th ",
                "score's bin and ", edge, " in it for k = ", k, ": a co-activation score is not finite (NaN or inf; ",
                "check the activations for overflow)");
    const int threads = std::max(1, at::get_num_threads());
    const int parts = static_cast<int>(tallies.size());
    const KthCut<acc_t> cut = kth_cut_between<acc_t>(
        parts, [&](int p, auto&& take) { for (const auto& c : tallies[p].edge) take(c); }, k - above, br.lo, br.hi,
        threads);
    // The kept pairs inside the bracket, part by part in parallel (millions at BatchTopK d_sae
    // 262144, where one thread spent ≈ 50 ms of CPU on them), each part's sum in a register, the
    // parts then added in order. A part's block pairs lie in its own block rows (pass), and rows
    // never share a word (csrc/block_bits.h); its bucket pairs are never in the block (U × U's
    // pairs are not in the buckets, csrc/coactive_pairs.h): no two parts write one word. A block
    // pair's bit comes with it from the pass (found from its key instead, it cost a division and
    // two random reads per pair).
    std::vector<double> part_total(parts, 0.0);
    std::vector<int64_t> part_in_block(parts, 0);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int p = 0; p < parts; ++p) {
      double total = 0;
      int64_t in_block = 0;
      each_edge_of(tallies[p], [&](const Candidate<acc_t>& c, bool block, int64_t bit) {
        const acc_t a = std::abs(c.value);
        if (!cut.keeps(a, c.key)) return;
        total += static_cast<double>(a);
        in_block += block;
        if (bit >= 0) bits_.keep_bit(bit);
      });
      part_total[p] = total;
      part_in_block[p] = in_block;
    }
    for (int p = 0; p < parts; ++p) {
      r.total += part_total[p];
      r.kept_in_block += part_in_block[p];
    }
    r.kth = static_cast<double>(cut.kth);
    r.tie_cut = cut.tie_cut;
    r.kept = k;
    return r;
  }

  // f(pair, block, bit) for each of part t's pairs inside the bracket: its bucket pairs (block
  // false: U × U's pairs are not in the buckets, csrc/coactive_pairs.h), then its block rows' with
  // their bit from the pass (BlockBits::bit_of; -1 without bits)
  template <typename F>
  void each_edge_of(const Tally<acc_t>& t, F&& f) const {
    auto c = t.edge.begin();
    for (size_t x = 0; x < t.bucket_edges; ++x, ++c) f(*c, false, int64_t(-1));
    const bool bits = bits_.defined();
    auto bit = t.edge_bits.begin();
    for (; c != t.edge.end(); ++c) {
      f(*c, true, bits ? *bit : int64_t(-1));
      if (bits) ++bit;
    }
  }

  const CoactivePairs<acc_t>& s_;
  const NormOrder<acc_t>* order_;
  int64_t n_, width_, upper_ = 0, extent_ = 0;
  std::vector<int64_t> part_begin_;
  BlockBits bits_;
};

}  // namespace aosae

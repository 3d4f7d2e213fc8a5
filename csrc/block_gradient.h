// The moved rows' gradient of the sum of the k best pairs inside the GEMM block, A_H · G_U
// (csrc/topk_sum_backward.cpp), from tiles of G_U: nothing the size of the block is stored or read
// from memory but, where the forward kept them, its kept pairs' bits (csrc/block_bits.h).
//
// G_U is symmetric with G[p, q] (p < q < live_end[p]) = ±g where the pair is kept, else 0. Per tile
// of 16 block rows × 256 columns (in L1), each row's span is classified (RowKind): kept nowhere
// (skipped; a tile with no kept pair at all adds nothing), kept everywhere (O(h) per row: prefix
// sums and a difference array), or cut. The cut rows' gradients (the scores recomputed,
// csrc/recomputed_block.h, and turned into gradients; or +g where a kept bit is set) and both
// halves of their product (csrc/tile_products.h): prod[:, q] += Σ_p A_H[:, p]·G[p, q] from the tile's columns,
// prod[:, p] += Σ_q A_H[:, q]·G[p, q] as dot products along the tile's rows (reading A_H
// row-major, as the block keeps it beside its transpose: no transpose of the tile, which took a
// fifth of the backward; its partial sums kept per lane across a panel's tiles and added up once
// per panel). The panels and BLAS GEMMs this replaces wrote 1 GB of G_U at d_sae 262144
// mid-training and packed it twice more.
// Each thread adds its panels (dealt round-robin: deterministic) into its own copy of prod.

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "block_bits.h"
#include "recomputed_block.h"
#include "simd512.h"
#include "tile_products.h"

namespace aosae {

namespace block_gradient_detail {
constexpr int64_t kTileRows = 16;  // a tile of G_U: 16 block rows × 256 columns (in L1)
constexpr int64_t kTileCols = 256;
}  // namespace block_gradient_detail

// Row p's pairs (q in (p, row_end(p))) among the columns [q0, q1): [lo, hi)
struct RowSpan {
  int64_t lo, hi;
};
template <typename RowEnd>
RowSpan row_span(int64_t p, int64_t q0, int64_t q1, RowEnd& row_end) {
  const int64_t lo = std::clamp(p + 1, q0, q1);
  return {lo, std::clamp(row_end(p), lo, q1)};
}

// What a tile's row holds of G_U over its span: nothing (0 everywhere), g at every pair (its
// products from A_H's prefix sums, block_gradient below), or a mix (its part of the tile's
// products). BatchTopK d_sae 262144's kept pairs lie in long runs: in most early steps 96–98 % of
// the tiles' area is in rows kept whole or not at all, later 24–66 % (benchmarks/NOTES.md,
// twenty-second pass).
enum class RowKind : uint8_t { kEmpty, kFull, kMixed };

// Row p of a tile: v (column q0) set to its gradients at its span [lo, hi) (fill(v + lo − q0, p,
// lo, hi)), 0 elsewhere; returns the span
template <typename acc_t, typename RowEnd, typename Fill>
RowSpan tile_row(int64_t p, int64_t q0, int64_t q1, acc_t* v, RowEnd& row_end, Fill&& fill) {
  const RowSpan span = row_span(p, q0, q1, row_end);
  std::fill(v, v + (span.lo - q0), acc_t(0));
  fill(v + (span.lo - q0), p, span.lo, span.hi);
  std::fill(v + (span.hi - q0), v + (q1 - q0), acc_t(0));
  return span;
}

// A tile's gradients from recomputed scores: to_gradients(v, len, p, q_first): v[x] = score
// (p, q_first + x) -> its gradient, x < len. A row is full where every gradient of its span is g
// exactly: kept bits classify the same rows alike, so both paths give the same bits.
template <typename acc_t, typename RowEnd, typename ToGradients>
auto recomputed_gradients(const RecomputedBlock<acc_t>& scores, RowEnd& row_end, ToGradients& to_gradients, acc_t g) {
  return [&scores, &row_end, &to_gradients, g](int64_t p0, int64_t p1, int64_t q0, int64_t q1, acc_t* tile,
                                               RowKind* kind) {
    const int64_t cols = q1 - q0;
    scores.tile(p0, p1, q0, q1, tile, cols);
    bool any = false;
    for (int64_t p = p0; p < p1; ++p) {
      acc_t* v = tile + (p - p0) * cols;
      const RowSpan span = tile_row(p, q0, q1, v, row_end, [&](acc_t* w, int64_t pp, int64_t lo, int64_t hi) {
        to_gradients(w, hi - lo, pp, lo);
      });
      bool all_g = true, all_0 = true;  // (an empty span: all 0, so kEmpty)
      for (int64_t q = span.lo; q < span.hi; ++q) {
        all_g &= v[q - q0] == g;
        all_0 &= v[q - q0] == acc_t(0);
      }
      kind[p - p0] = all_0 ? RowKind::kEmpty : all_g ? RowKind::kFull : RowKind::kMixed;
      any |= !all_0;
    }
    return any;
  };
}

// A tile's gradients from the forward's kept bits (csrc/block_bits.h): +g where kept, else 0, the
// rows classified from the bits (only the mixed ones written). False where none of the tile's
// pairs is kept (where the block's scores fall below the k-th, half of a BatchTopK d_sae 262144
// staircase).
template <typename acc_t, typename RowEnd>
auto kept_bit_gradients(const BlockBits& bits, RowEnd& row_end, acc_t g) {
  return [&bits, &row_end, g](int64_t p0, int64_t p1, int64_t q0, int64_t q1, acc_t* tile, RowKind* kind) {
    bool any = false;
    for (int64_t p = p0; p < p1; ++p) {
      const RowSpan span = row_span(p, q0, q1, row_end);
      const int64_t b0 = span.lo - p - 1, b1 = span.hi - p - 1;
      RowKind& k = kind[p - p0];
      k = !bits.any(p, b0, b1) ? RowKind::kEmpty : bits.all(p, b0, b1) ? RowKind::kFull : RowKind::kMixed;
      any |= k != RowKind::kEmpty;
      if (k == RowKind::kMixed)
        tile_row(p, q0, q1, tile + (p - p0) * (q1 - q0), row_end,
                 [&](acc_t* v, int64_t pp, int64_t lo, int64_t hi) {
                   expand_bits(bits.row_bytes(pp), lo - pp - 1, hi - lo, g, v);
                 });
    }
    return any;
  };
}

// A_H · G_U [h, width] for the block rows [0, extent) (row p's pairs: q in (p, row_end(p))), G_U's
// non-zeros g or ±g. gradients(p0, p1, q0, q1, tile, kind): each row's RowKind over the tile, and
// the mixed rows' G_U in the tile [p1 − p0, q1 − q0] (0 off the row's pairs); false where all are
// empty. A full row's halves cost O(h), not O(h) per pair: its dots are g·(P[hi] − P[lo]) with P
// A_H's prefix sums over latents (float64), and its columns' share g·A_H[:, p] over [lo, hi) goes
// into a difference array (float64, per thread; rows of one span added first) summed once at the
// end.
template <typename acc_t, typename RowEnd, typename Gradients>
torch::Tensor block_gradient(const RecomputedBlock<acc_t>& scores, int64_t extent, RowEnd&& row_end,
                             Gradients&& gradients, acc_t g, int threads) {
  namespace d = block_gradient_detail;
  const int64_t h = scores.moved_rows(), width = scores.width();
  const acc_t* coefs = scores.coefficients();  // [width, h]: A_H's column p at coefs + p·h
  // no score and no coefficient negative, g > 0 and finite: no gradient negative, and the products
  // skip their terms with zero coefficients (exact +0s; csrc/tile_products.h)
  const bool skip_zeros = scores.nonnegative() && g > acc_t(0) && std::isfinite(g);
  // every entry of the moved rows non-zero: prod[r, p] is read (add_moved_rows_product) only where
  // A_H[r, p] != 0, and the rows' dots may leave the others unsummed
  const bool skip_unread = scores.entries_nonzero();
  const acc_t* coefs_t = scores.moved_rows_matrix().template data_ptr<acc_t>();  // [h, width]: A_H's rows
  // (the pool's buffers, not fresh ones: 2–13 MiB each at d_sae 262144, faulted in afresh every
  // step otherwise; csrc/buffer_pool.h)
  const at::ScalarType dtype = scores.moved_rows_matrix().scalar_type();
  constexpr int64_t L = d::lanes<acc_t>();
  const torch::Tensor copies = empty_pooled(threads * h * width, dtype);  // each thread's A_H · G_U
  acc_t* const parts = copies.data_ptr<acc_t>();
  // P [h, width + 1]: P[r, q] = Σ_{q' < q} A_H[r, q']
  const torch::Tensor prefix_t = empty_pooled(h * (width + 1), at::kDouble);
  double* const prefix = prefix_t.data_ptr<double>();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < h; ++r) {
    double* pr = prefix + r * (width + 1);
    const acc_t* a = coefs_t + r * width;
    pr[0] = 0;
    for (int64_t q = 0; q < width; ++q) pr[q + 1] = pr[q] + static_cast<double>(a[q]);
  }
  const torch::Tensor steps_t = empty_pooled(threads * (width + 1) * h, at::kDouble);  // each thread's differences
  double* const steps_all = steps_t.data_ptr<double>();
  int team = 1;  // the threads the region got (at most `threads`): the parts summed
  const int64_t panels = (extent + d::kTileRows - 1) / d::kTileRows;
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int me = omp_get_thread_num();
#pragma omp single nowait
    team = omp_get_num_threads();
#else
    const int me = 0;
#endif
    acc_t* prod = parts + me * h * width;
    std::fill(prod, prod + h * width, acc_t(0));  // (each thread its own part, in parallel)
    double* steps = nullptr;  // [width + 1, h], zeroed at the first full row
    std::vector<acc_t> tile(d::kTileRows * d::kTileCols), sums(d::kTileRows * h * L);
    std::vector<acc_t> mixed(d::kTileRows * d::kTileCols), mixed_coefs(d::kTileRows * h),
        mixed_sums(d::kTileRows * h * L);
    std::vector<double> full_dots(d::kTileRows * h), run(h);
    RowKind kind[d::kTileRows];
    int64_t mixed_rows[d::kTileRows];
#pragma omp for schedule(static, 1)  // panels dealt round-robin: the same split every call
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int64_t p0 = panel * d::kTileRows, p1 = std::min(extent, p0 + d::kTileRows), rows = p1 - p0;
      const int64_t end = std::max(row_end(p0), p1);  // the panel's widest row (ends do not grow)
      std::fill(sums.begin(), sums.end(), acc_t(0));
      std::fill(full_dots.begin(), full_dots.end(), 0.0);
      for (int64_t q0 = p0 + 1; q0 < end; q0 += d::kTileCols) {
        const int64_t q1 = std::min(end, q0 + d::kTileCols), cols = q1 - q0;
        if (!gradients(p0, p1, q0, q1, tile.data(), kind)) continue;  // (no pair of the tile kept)
        int64_t n_mixed = 0;
        for (int64_t x = 0; x < rows; ++x)
          if (kind[x] == RowKind::kMixed) mixed_rows[n_mixed++] = x;
        if (n_mixed == rows) {  // every row mixed: the tile as it is
          d::add_product(coefs, h, p0, p1, tile.data(), cols, q0, q1, prod, width, skip_zeros);  // prod[:, q]
          d::add_row_dots(coefs_t, h, width, rows, tile.data(), cols, q0, q1, sums.data(),  // prod[:, p] (rows)
                          skip_unread ? coefs + p0 * h : nullptr);
        } else if (n_mixed > 0) {  // the mixed rows gathered, their dots added to their rows' lanes
          for (int64_t j = 0; j < n_mixed; ++j) {
            std::copy_n(tile.data() + mixed_rows[j] * cols, cols, mixed.data() + j * cols);
            std::copy_n(coefs + (p0 + mixed_rows[j]) * h, h, mixed_coefs.data() + j * h);
          }
          std::fill(mixed_sums.begin(), mixed_sums.begin() + n_mixed * h * L, acc_t(0));
          d::add_product(mixed_coefs.data(), h, 0, n_mixed, mixed.data(), cols, q0, q1, prod, width, skip_zeros);
          d::add_row_dots(coefs_t, h, width, n_mixed, mixed.data(), cols, q0, q1, mixed_sums.data(),
                          skip_unread ? mixed_coefs.data() : nullptr);
          for (int64_t j = 0; j < n_mixed; ++j)
            for (int64_t e = 0; e < h * L; ++e) sums[mixed_rows[j] * h * L + e] += mixed_sums[j * h * L + e];
        }
        if (n_mixed == rows) continue;
        // the full rows: their dots from P, their columns' share as steps at lo and hi
        int64_t span_lo = -1, span_hi = -1;
        auto flush = [&]() {
          if (span_lo < 0) return;
          if (!steps) {
            steps = steps_all + me * (width + 1) * h;
            std::fill(steps, steps + (width + 1) * h, 0.0);
          }
          for (int64_t r = 0; r < h; ++r) {
            steps[span_lo * h + r] += run[r];
            steps[span_hi * h + r] -= run[r];
          }
        };
        for (int64_t x = 0; x < rows; ++x) {
          if (kind[x] != RowKind::kFull) continue;
          const RowSpan span = row_span(p0 + x, q0, q1, row_end);
          for (int64_t r = 0; r < h; ++r)
            full_dots[x * h + r] += prefix[r * (width + 1) + span.hi] - prefix[r * (width + 1) + span.lo];
          if (span.lo != span_lo || span.hi != span_hi) {
            flush();
            span_lo = span.lo, span_hi = span.hi;
            std::fill(run.begin(), run.end(), 0.0);
          }
          const acc_t* ap = coefs + (p0 + x) * h;
          for (int64_t r = 0; r < h; ++r) run[r] += static_cast<double>(ap[r]);
        }
        flush();
      }
      for (int64_t x = 0; x < rows; ++x)  // the rows' half: each lane's partial sum, in lane order
        for (int64_t r = 0; r < h; ++r) {
          acc_t total = 0;
          for (int64_t l = 0; l < L; ++l) total += sums[(x * h + r) * L + l];
          prod[r * width + p0 + x] += total + static_cast<acc_t>(static_cast<double>(g) * full_dots[x * h + r]);
        }
    }
    if (steps) {  // the full rows' columns: the steps summed along the latents
      std::fill(run.begin(), run.end(), 0.0);
      for (int64_t q = 0; q < width; ++q)
        for (int64_t r = 0; r < h; ++r) {
          run[r] += steps[q * h + r];
          prod[r * width + q] += static_cast<acc_t>(static_cast<double>(g) * run[r]);
        }
    }
  }
  torch::Tensor out = empty_pooled(h * width, dtype).view({h, width});
  acc_t* o = out.data_ptr<acc_t>();
  for (int64_t e = 0; e < h * width; ++e) {
    acc_t total = 0;
    for (int t = 0; t < team; ++t) total += parts[t * h * width + e];  // in thread order
    o[e] = total;
  }
  return out;
}

}  // namespace aosae

// The GEMM block's entries A_Hᵀ A_H (csrc/dense_rows.h), row by row over any stretch of columns.
//
// Each entry is Σ_r a_rp·a_rq accumulated over the moved rows in the plan's order with one fused
// multiply-add per row, from zero: acc = fma(a_rp, a_rq, acc). Every code path (vector lanes,
// masked tails, the single entries of block_entries) does that sequence, or leaves out only
// terms that are exact zeros (skip_zeros, where A_H has no negative value: live_rows), so an
// entry's bits depend neither on which stretch of the block is computed nor on the vector width: the
// selection (whole upper triangle, stored), the sum of the k best (a staircase of it, latents in
// another order, recomputed pass after pass) and the backward (recomputed) see the same scores.
// A BLAS GEMM gave the same entry different last bits at different positions. The compiler is
// told not to contract other multiply-adds (-ffp-contract=off): only these are fused, by hand.
// AVX-512: 64 columns (32 in float64) of four rows kept in sixteen registers while the moved rows
// are added, the tile's rows four at a time over the same 64 columns of A_H (read from L1);
// elsewhere a plain loop over an L1 stretch (std::fma: one instruction where the machine has it,
// a correctly rounded library call where not).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd512.h"

namespace aosae {

// whether coefficients [r0, r0 + nr) of kX rows from `coefs` (h each) are all 0
template <typename acc_t>
inline bool all_zero(const acc_t* coefs, int64_t h, int kX, int64_t r0, int64_t nr) {
  for (int i = 0; i < kX; ++i)
    for (int64_t j = 0; j < nr; ++j)
      if (coefs[i * h + r0 + j] != acc_t(0)) return false;
  return true;
}

namespace block_product_detail {

// Columns per pass of the plain loop: the stretch being summed stays in L1 while the moved rows are added.
constexpr int64_t kStretch = 2048;

// out[(p - p0)·ld + q - q0] for p in [p0, p1), q in [q0, q1): Σ_r fma over a's rows (a: [h, u]
// row-major, coefs: [u, h], row p's coefficients at coefs[p·h]). Rows are taken stretch by stretch,
// so a stretch of A_H is read from L1 for every row of the tile.
template <typename acc_t>
__attribute__((always_inline)) inline void tile_generic(const acc_t* a, const acc_t* coefs, int64_t h, int64_t u,
                                                        int64_t p0, int64_t p1, int64_t q0, int64_t q1, acc_t* out,
                                                        int64_t ld, bool skip_zeros) {
  for (int64_t s0 = q0; s0 < q1; s0 += kStretch) {
    const int64_t s1 = std::min(q1, s0 + kStretch);
    for (int64_t p = p0; p < p1; ++p) {
      acc_t* o = out + (p - p0) * ld + (s0 - q0);
      const acc_t* coef = coefs + p * h;
      for (int64_t q = s0; q < s1; ++q) o[q - s0] = acc_t(0);
      for (int64_t r = 0; r < h; ++r) {
        const acc_t c = coef[r];
        if (skip_zeros && c == acc_t(0)) continue;  // (its terms are exact zeros: see live_rows)
        const acc_t* ar = a + r * u;
        for (int64_t q = s0; q < s1; ++q) o[q - s0] = std::fma(c, ar[q], o[q - s0]);
      }
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
// kRows rows of the tile at once over 4 registers of columns: 4·kRows independent sums, each
// still its own fma sequence (one row's 4 left the two FMA units waiting on the adds' latency:
// the tiles ran at ≈ 40 GMAC/s of this Xeon's ≈ 147; benchmarks/NOTES.md, eighteenth pass)
template <typename acc_t, int kRows>
__attribute__((target("avx512f"), always_inline)) inline void tile_rows_avx512(const acc_t* a, const acc_t* coef,
                                                                               int64_t h, int64_t u, int64_t q,
                                                                               acc_t* o, int64_t ld,
                                                                               const int32_t* live, int64_t count) {
  using S = Simd512<acc_t>;
  constexpr int64_t L = S::kLanes;
  typename S::V s[kRows][4];
#pragma GCC unroll 4
  for (int x = 0; x < kRows; ++x)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) s[x][c] = S::zero();
  for (int64_t n = 0; n < count; ++n) {
    const int64_t r = live[n];
    const acc_t* ar = a + r * u + q;
    const auto a0 = S::load(ar), a1 = S::load(ar + L), a2 = S::load(ar + 2 * L), a3 = S::load(ar + 3 * L);
#pragma GCC unroll 4
    for (int x = 0; x < kRows; ++x) {
      const auto c = S::set1(coef[x * h + r]);
      s[x][0] = S::fmadd(c, a0, s[x][0]);
      s[x][1] = S::fmadd(c, a1, s[x][1]);
      s[x][2] = S::fmadd(c, a2, s[x][2]);
      s[x][3] = S::fmadd(c, a3, s[x][3]);
    }
  }
#pragma GCC unroll 4
  for (int x = 0; x < kRows; ++x)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) S::store(o + x * ld + c * L, s[x][c]);
}

// The rows r < h at which any of `rows` rows of coefficients from coef (h each) is non-zero, ascending,
// into live; returns their count (every row without skip_zeros). Where A_H has no negative value
// the rows left out add exact zeros: fma(0, a, s) = s bit for bit, s never being -0 (no product is
// negative, so no sum underflows to -0). BatchTopK's first steps at d_sae 262144 hold 18–29 moved
// rows, few of them long: a block row has 3.5–5.7 of them, a tile of four rows 8–14
// (benchmarks/NOTES.md, twenty-seventh pass).
template <typename acc_t>
inline int64_t live_rows(const acc_t* coef, int64_t h, int rows, bool skip_zeros, int32_t* live) {
  int64_t count = 0;
  for (int64_t r = 0; r < h; ++r) {
    live[count] = static_cast<int32_t>(r);
    count += !skip_zeros || !all_zero(coef, h, rows, r, 1);
  }
  return count;
}

template <typename acc_t>
__attribute__((target("avx512f"))) void tile_avx512(const acc_t* a, const acc_t* coefs, int64_t h, int64_t u, int64_t p0,
                                                    int64_t p1, int64_t q0, int64_t q1, acc_t* out, int64_t ld,
                                                    bool skip_zeros) {
  using S = Simd512<acc_t>;
  constexpr int64_t L = S::kLanes;
  constexpr int kRows = 4;
  // each group's live rows (groups of kRows rows, then the rest one by one), found once for every
  // stretch of columns
  thread_local std::vector<int32_t> live;
  thread_local std::vector<int64_t> count;
  const int64_t whole = (p1 - p0) / kRows * kRows, groups = whole / kRows + (p1 - p0 - whole);
  live.resize(static_cast<size_t>(groups * h + 1));
  count.resize(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) {
    const bool four = g * kRows < whole;
    const int64_t p = four ? p0 + g * kRows : p0 + whole + (g - whole / kRows);
    count[g] = live_rows(coefs + p * h, h, four ? kRows : 1, skip_zeros, live.data() + g * h);
  }
  int64_t q = q0;
  for (; q + 4 * L <= q1; q += 4 * L) {
    int64_t p = p0, g = 0;
    for (; p + kRows <= p1; p += kRows, ++g)
      tile_rows_avx512<acc_t, kRows>(a, coefs + p * h, h, u, q, out + (p - p0) * ld + (q - q0), ld,
                                     live.data() + g * h, count[g]);
    for (; p < p1; ++p, ++g)
      tile_rows_avx512<acc_t, 1>(a, coefs + p * h, h, u, q, out + (p - p0) * ld + (q - q0), ld, live.data() + g * h,
                                 count[g]);
  }
  for (; q < q1; q += L) {  // the last columns, a register (or fewer lanes, masked) at a time
    const auto mask = S::first(q1 - q);
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t* coef = coefs + p * h;
      auto s = S::zero();
      for (int64_t r = 0; r < h; ++r)
        if (!skip_zeros || coef[r] != acc_t(0)) s = S::fmadd(S::set1(coef[r]), S::load(mask, a + r * u + q), s);
      S::store(out + (p - p0) * ld + (q - q0), mask, s);
    }
  }
}

template <typename acc_t>
__attribute__((target("avx2,fma"))) void tile_avx2(const acc_t* a, const acc_t* coefs, int64_t h, int64_t u, int64_t p0,
                                                   int64_t p1, int64_t q0, int64_t q1, acc_t* out, int64_t ld,
                                                   bool skip_zeros) {
  tile_generic(a, coefs, h, u, p0, p1, q0, q1, out, ld, skip_zeros);
}
#endif

template <typename acc_t>
void tile_default(const acc_t* a, const acc_t* coefs, int64_t h, int64_t u, int64_t p0, int64_t p1, int64_t q0,
                  int64_t q1, acc_t* out, int64_t ld, bool skip_zeros) {
  tile_generic(a, coefs, h, u, p0, p1, q0, q1, out, ld, skip_zeros);
}

template <typename acc_t>
using TileKernel = void (*)(const acc_t*, const acc_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t*,
                            int64_t, bool);

// The fastest tile kernel this machine runs (chosen once).
template <typename acc_t>
TileKernel<acc_t> tile_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  static const TileKernel<acc_t> kernel =
      __builtin_cpu_supports("avx512f")                                   ? tile_avx512<acc_t>
      : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? tile_avx2<acc_t>
                                                                          : tile_default<acc_t>;
  return kernel;
#else
  return tile_default<acc_t>;  // (NEON's fused multiply-add is the baseline on arm64)
#endif
}

}  // namespace block_product_detail

// A_H's columns contiguous, [u, h]: row p's coefficients at coefs[p·h ..].
template <typename acc_t>
std::vector<acc_t> block_coefficients(const acc_t* a, int64_t h, int64_t u) {
  std::vector<acc_t> coefs(static_cast<size_t>(u * h));
  for (int64_t r = 0; r < h; ++r)
    for (int64_t p = 0; p < u; ++p) coefs[p * h + r] = a[r * u + p];
  return coefs;
}

// out[(p - p0)·ld + q - q0] = Σ_r a[r, p]·a[r, q] for p in [p0, p1), q in [q0, q1); a: [h, u]
// row-major, coefs: block_coefficients(a). skip_zeros (a has no negative value): the rows where
// the tile's own coefficients are 0 are not added (the same bits: tile_avx512's live_rows).
template <typename acc_t>
inline void block_tile(const acc_t* a, const acc_t* coefs, int64_t h, int64_t u, int64_t p0, int64_t p1, int64_t q0,
                       int64_t q1, acc_t* out, int64_t ld, bool skip_zeros = false) {
  if (q1 > q0 && p1 > p0)
    block_product_detail::tile_kernel<acc_t>()(a, coefs, h, u, p0, p1, q0, q1, out, ld, skip_zeros);
}

// One row of it: out[q - q0], q in [q0, q1).
template <typename acc_t>
inline void block_row(const acc_t* a, const acc_t* coefs, int64_t h, int64_t u, int64_t p, int64_t q0, int64_t q1,
                      acc_t* out, bool skip_zeros = false) {
  block_tile(a, coefs, h, u, p, p + 1, q0, q1, out, q1 - q0, skip_zeros);
}

namespace block_product_detail {

// both columns from coefs (contiguous: a's column q is coefs[q·h ..]); the same fma sequence
template <typename acc_t>
__attribute__((always_inline)) inline acc_t entry_generic(const acc_t* cp, const acc_t* cq, int64_t h) {
  acc_t acc = acc_t(0);
  for (int64_t r = 0; r < h; ++r) acc = std::fma(cp[r], cq[r], acc);
  return acc;
}

// out[x] = entry (p, qs[x]) for x < count, each the same fma sequence; kChains entries at a time
// (one entry's h multiply-adds each wait for the one before: eight chains side by side keep the
// units busy where one left them waiting on the add's latency)
template <typename acc_t>
__attribute__((always_inline)) inline void entries_generic(const acc_t* coefs, int64_t h, const acc_t* cp,
                                                           const int32_t* qs, int64_t count, acc_t* out) {
  constexpr int kChains = 8;
  int64_t x = 0;
  for (; x + kChains <= count; x += kChains) {
    const acc_t* cq[kChains];
    acc_t acc[kChains];
    for (int g = 0; g < kChains; ++g) {
      cq[g] = coefs + static_cast<int64_t>(qs[x + g]) * h;
      acc[g] = acc_t(0);
    }
    for (int64_t r = 0; r < h; ++r) {
      const acc_t c = cp[r];
      for (int g = 0; g < kChains; ++g) acc[g] = std::fma(c, cq[g][r], acc[g]);
    }
    for (int g = 0; g < kChains; ++g) out[x + g] = acc[g];
  }
  for (; x < count; ++x) out[x] = entry_generic(cp, coefs + static_cast<int64_t>(qs[x]) * h, h);
}

#if defined(__x86_64__) || defined(__i386__)
// std::fma inlined as one instruction (the default target has no FMA: each was a library call,
// a fifth of the backward at d_sae 16384, where the other rows' pairs inside U × U read entries one by one)
template <typename acc_t>
__attribute__((target("fma"))) void entries_fma(const acc_t* coefs, int64_t h, const acc_t* cp, const int32_t* qs,
                                                int64_t count, acc_t* out) {
  entries_generic(coefs, h, cp, qs, count, out);
}
#endif

}  // namespace block_product_detail

// out[x] = entry (p, qs[x]) for x < count, each summed as block_tile sums it (fma over the moved
// rows in order, from zero; every row: block_tile's skip_zeros leaves out only exact zeros).
template <typename acc_t>
inline void block_entries(const acc_t* coefs, int64_t h, int64_t p, const int32_t* qs, int64_t count, acc_t* out) {
  const acc_t* cp = coefs + p * h;
#if defined(__x86_64__) || defined(__i386__)
  static const bool fma = __builtin_cpu_supports("fma");
  if (fma) return block_product_detail::entries_fma(coefs, h, cp, qs, count, out);
#endif
  block_product_detail::entries_generic(coefs, h, cp, qs, count, out);
}

// block[p, q] = Σ_r a[r, p]·a[r, q] for q in [first[p], last[p]), every row p < u; a: [h, u]
// row-major (the moved rows over the block's latents), block: [u, width] row-major.
template <typename acc_t>
void block_product(const acc_t* a, int64_t h, int64_t u, acc_t* block, int64_t width, const std::vector<int64_t>& first,
                   const std::vector<int64_t>& last) {
  const std::vector<acc_t> coefs = block_coefficients(a, h, u);
  // rows differ in length (a triangle): dealt in small chunks; each entry is one thread's
  constexpr int64_t kChunk = 8;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(1, at::get_num_threads()))
  for (int64_t p0 = 0; p0 < u; p0 += kChunk)
    for (int64_t p = p0; p < std::min(u, p0 + kChunk); ++p)
      block_row(a, coefs.data(), h, u, p, first[p], last[p], block + p * width + first[p]);
}

}  // namespace aosae

// The two products of a tile of G_U with A_H that the block backward adds (csrc/block_gradient.h):
// the tile's columns, prod[:, q] += Σ_p A_H[:, p]·G[p, q] (add_product), and the dot products along
// its rows, prod[:, p] += Σ_q A_H[:, q]·G[p, q], kept as per-lane partial sums (add_row_dots). Each
// has an AVX-512 path that holds its sums in registers and a portable one that adds in the same order.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "block_product.h"  // all_zero
#include "simd512.h"

namespace aosae {

namespace block_gradient_detail {

// prod[r·width + c] += Σ_{x in [x0, x1)} coefs[x·h + r] · m[(x − x0)·ld + c − c0], c in [c0, c1), r < h.
// skip_zeros (no coefficient and no value of m negative): the terms with a zero coefficient are
// not added; each is an exact +0, and no sum of such terms is -0, so the sums keep their bits.
template <typename acc_t>
void add_product_plain(const acc_t* coefs, int64_t h, int64_t x0, int64_t x1, const acc_t* m, int64_t ld, int64_t c0,
                       int64_t c1, acc_t* prod, int64_t width, bool skip_zeros) {
  for (int64_t x = x0; x < x1; ++x)
    for (int64_t r = 0; r < h; ++r) {
      const acc_t c = coefs[x * h + r];
      if (skip_zeros && c == acc_t(0)) continue;
      const acc_t* mx = m + (x - x0) * ld - c0;
      acc_t* o = prod + r * width;
      for (int64_t col = c0; col < c1; ++col) o[col] += c * mx[col];
    }
}

#if defined(__x86_64__) || defined(__i386__)
// kCols registers of columns × 8 rows of prod held in registers while the x are added (8·kCols
// independent sums: the loads of one register's coefficients served two)
// live[b·(x1 − x0) ..], count[b]: the x whose coefficients in rows [8b, 8b + 8) are not all zero
// (every x without skip_zeros), ascending
template <typename acc_t, int kCols>
__attribute__((target("avx512f"), always_inline)) inline void add_product_cols_avx512(
    const acc_t* coefs, int64_t h, int64_t x0, int64_t x1, const acc_t* m, int64_t ld, int64_t c, int64_t c1,
    int64_t c0, acc_t* prod, int64_t width, const int32_t* live, const int64_t* count) {
  using S = Simd512<acc_t>;
  constexpr int64_t L = S::kLanes;
  typename S::M mask[kCols];
#pragma GCC unroll 2
  for (int k = 0; k < kCols; ++k) mask[k] = S::first(c1 - c - k * L);
  for (int64_t r0 = 0; r0 < h; r0 += 8) {
    const int64_t nr = std::min<int64_t>(8, h - r0);
    typename S::V acc[8][kCols];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
#pragma GCC unroll 2
      for (int k = 0; k < kCols; ++k)
        acc[j][k] = j < nr ? S::load(mask[k], prod + (r0 + j) * width + c + k * L) : S::zero();
    const int32_t* xs = live + (r0 / 8) * (x1 - x0);
    for (int64_t n = 0; n < count[r0 / 8]; ++n) {
      const int64_t x = xs[n];
      typename S::V mv[kCols];
#pragma GCC unroll 2
      for (int k = 0; k < kCols; ++k) mv[k] = S::load(mask[k], m + (x - x0) * ld + (c - c0) + k * L);
      const acc_t* cf = coefs + x * h + r0;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        if (j < nr) {
          const auto cj = S::set1(cf[j]);
#pragma GCC unroll 2
          for (int k = 0; k < kCols; ++k) acc[j][k] = S::fmadd(cj, mv[k], acc[j][k]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
#pragma GCC unroll 2
      for (int k = 0; k < kCols; ++k)
        if (j < nr) S::store(prod + (r0 + j) * width + c + k * L, mask[k], acc[j][k]);
  }
}

template <typename acc_t>
__attribute__((target("avx512f"))) void add_product_avx512(const acc_t* coefs, int64_t h, int64_t x0, int64_t x1,
                                                           const acc_t* m, int64_t ld, int64_t c0, int64_t c1,
                                                           acc_t* prod, int64_t width, bool skip_zeros) {
  using S = Simd512<acc_t>;
  // each block of 8 rows' live x, found once for all the columns (the moved rows come densest
  // first: BatchTopK's sparse ones share blocks, whose coefficients are mostly all zero)
  thread_local std::vector<int32_t> live;
  thread_local std::vector<int64_t> count;
  const int64_t blocks = (h + 7) / 8, xs = x1 - x0;
  live.resize(static_cast<size_t>(blocks * xs + 1));
  count.resize(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t n = 0;
    for (int64_t x = x0; x < x1; ++x) {
      live[b * xs + n] = static_cast<int32_t>(x);
      n += !skip_zeros || !all_zero<acc_t>(coefs + x * h, h, 1, 8 * b, std::min<int64_t>(8, h - 8 * b));
    }
    count[b] = n;
  }
  int64_t c = c0;
  for (; c + S::kLanes < c1; c += 2 * S::kLanes)
    add_product_cols_avx512<acc_t, 2>(coefs, h, x0, x1, m, ld, c, c1, c0, prod, width, live.data(), count.data());
  if (c < c1)
    add_product_cols_avx512<acc_t, 1>(coefs, h, x0, x1, m, ld, c, c1, c0, prod, width, live.data(), count.data());
}
#endif

template <typename acc_t>
void add_product(const acc_t* coefs, int64_t h, int64_t x0, int64_t x1, const acc_t* m, int64_t ld, int64_t c0,
                 int64_t c1, acc_t* prod, int64_t width, bool skip_zeros = false) {
#if defined(__x86_64__) || defined(__i386__)
  if (has_avx512()) return add_product_avx512<acc_t>(coefs, h, x0, x1, m, ld, c0, c1, prod, width, skip_zeros);
#endif
  add_product_plain(coefs, h, x0, x1, m, ld, c0, c1, prod, width, skip_zeros);
}

// The partial sums of the rows' half: lanes[(x·h + r)·L + l] += Σ_{q in [q0, q1), q − q0 ≡ l (mod L)}
// m[x·ld + q − q0] · coefs_t[r·width + q], x < rows, r < h; L = lanes<acc_t>. Every path adds in
// the same order (each lane's q ascending), so the sums do not depend on the vector width.
template <typename acc_t>
constexpr int64_t lanes() {
  return 64 / static_cast<int64_t>(sizeof(acc_t));  // an AVX-512 register
}

template <typename acc_t>
__attribute__((always_inline)) inline void add_row_dots_plain(const acc_t* coefs_t, int64_t h, int64_t width,
                                                              int64_t rows, const acc_t* m, int64_t ld, int64_t q0,
                                                              int64_t q1, acc_t* sums) {
  constexpr int64_t L = lanes<acc_t>();
  for (int64_t x = 0; x < rows; ++x)
    for (int64_t r = 0; r < h; ++r) {
      acc_t* out = sums + (x * h + r) * L;
      const acc_t* c = coefs_t + r * width;
      for (int64_t q = q0; q < q1; ++q) out[(q - q0) % L] = std::fma(m[x * ld + q - q0], c[q], out[(q - q0) % L]);
    }
}

#if defined(__x86_64__) || defined(__i386__)
// without AVX-512: the same loop with std::fma as one instruction (the default target has none)
template <typename acc_t>
__attribute__((target("fma"))) void add_row_dots_fma(const acc_t* coefs_t, int64_t h, int64_t width, int64_t rows,
                                                     const acc_t* m, int64_t ld, int64_t q0, int64_t q1, acc_t* sums) {
  add_row_dots_plain(coefs_t, h, width, rows, m, ld, q0, q1, sums);
}

// kX rows of the tile's gradients loaded once per register of columns, 8 rows of A_H's partial
// sums each in registers (8·kX independent sums; A_H's loads serve kX rows)
template <typename acc_t, int kX>
__attribute__((target("avx512f"), always_inline)) inline void add_row_dots_rows_avx512(
    const acc_t* coefs_t, int64_t h, int64_t width, int64_t x, const acc_t* m, int64_t ld, int64_t q0, int64_t q1,
    acc_t* sums, const acc_t* row_coefs) {
  using S = Simd512<acc_t>;
  constexpr int64_t L = S::kLanes;
  for (int64_t r0 = 0; r0 < h; r0 += 8) {
    const int64_t nr = std::min<int64_t>(8, h - r0);
    if (row_coefs && all_zero<acc_t>(row_coefs + x * h, h, kX, r0, nr)) continue;
    typename S::V acc[kX][8];
#pragma GCC unroll 2
    for (int i = 0; i < kX; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[i][j] = j < nr ? S::load(sums + ((x + i) * h + r0 + j) * L) : S::zero();
    for (int64_t q = q0; q < q1; q += L) {
      const auto mask = S::first(q1 - q);
      typename S::V g[kX];
#pragma GCC unroll 2
      for (int i = 0; i < kX; ++i) g[i] = S::load(mask, m + (x + i) * ld + (q - q0));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        if (j < nr) {
          const auto cj = S::load(mask, coefs_t + (r0 + j) * width + q);
#pragma GCC unroll 2
          for (int i = 0; i < kX; ++i) acc[i][j] = S::fmadd(g[i], cj, acc[i][j]);
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < kX; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        if (j < nr) S::store(sums + ((x + i) * h + r0 + j) * L, acc[i][j]);
  }
}

template <typename acc_t>
__attribute__((target("avx512f"))) void add_row_dots_avx512(const acc_t* coefs_t, int64_t h, int64_t width,
                                                            int64_t rows, const acc_t* m, int64_t ld, int64_t q0,
                                                            int64_t q1, acc_t* sums, const acc_t* row_coefs) {
  int64_t x = 0;
  for (; x + 2 <= rows; x += 2)
    add_row_dots_rows_avx512<acc_t, 2>(coefs_t, h, width, x, m, ld, q0, q1, sums, row_coefs);
  if (x < rows) add_row_dots_rows_avx512<acc_t, 1>(coefs_t, h, width, x, m, ld, q0, q1, sums, row_coefs);
}
#endif

// row_coefs (or null): the tile rows' own coefficients, [rows, h]. Where given, the sums of a row r
// and tile row x whose coefficient is 0 may be left unsummed: the caller reads prod[r, p] only at
// the moved rows' entries, and every entry's value is non-zero (RecomputedBlock::entries_nonzero).
// The AVX-512 path leaves a block of 8 r and its kX rows x where all their coefficients are 0:
// the moved rows come densest first, and BatchTopK's sparse ones hold few of the block's latents.
template <typename acc_t>
void add_row_dots(const acc_t* coefs_t, int64_t h, int64_t width, int64_t rows, const acc_t* m, int64_t ld, int64_t q0,
                  int64_t q1, acc_t* sums, const acc_t* row_coefs = nullptr) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool avx512 = __builtin_cpu_supports("avx512f"), fma = __builtin_cpu_supports("fma");
  if (avx512) return add_row_dots_avx512<acc_t>(coefs_t, h, width, rows, m, ld, q0, q1, sums, row_coefs);
  if (fma) return add_row_dots_fma<acc_t>(coefs_t, h, width, rows, m, ld, q0, q1, sums);
#endif
  add_row_dots_plain(coefs_t, h, width, rows, m, ld, q0, q1, sums);
}

}  // namespace block_gradient_detail

}  // namespace aosae

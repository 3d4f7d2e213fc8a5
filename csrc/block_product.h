// The GEMM block's entries A_Hᵀ A_H (csrc/dense_rows.h), row by row over any stretch of columns.
//
// Each entry is Σ_r a_rp·a_rq summed over the moved rows in the plan's order, one multiply and
// one add at a time (the extension builds with -ffp-contract=off: no fused multiply-add), so its
// bits depend neither on which stretch of the block is computed nor on the vector width. The
// selection (whole upper triangle) and the sum of the k best (a staircase of it, latents in
// another order) then see the same scores; a BLAS GEMM gave the same entry different last bits
// at different positions. Vectorised for the machine it runs on (x86: AVX-512, AVX2 or SSE2).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace aosae {

namespace block_product_detail {

// Columns per pass: the stretch of the row being summed stays in L1 while every moved row is added.
constexpr int64_t kStretch = 2048;

template <typename acc_t>
__attribute__((always_inline)) inline void rows_generic(const acc_t* a, const acc_t* at, int64_t h, int64_t u,
                                                        acc_t* block, int64_t width, int64_t p0, int64_t p1,
                                                        const int64_t* first, const int64_t* last) {
  for (int64_t p = p0; p < p1; ++p) {
    acc_t* row = block + p * width;
    const acc_t* coef = at + p * h;
    for (int64_t q0 = first[p]; q0 < last[p]; q0 += kStretch) {
      const int64_t q1 = std::min(last[p], q0 + kStretch);
      for (int64_t q = q0; q < q1; ++q) row[q] = acc_t(0);
      for (int64_t r = 0; r < h; ++r) {
        const acc_t c = coef[r];
        const acc_t* ar = a + r * u;
        for (int64_t q = q0; q < q1; ++q) row[q] = row[q] + c * ar[q];
      }
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
template <typename acc_t>
__attribute__((target("avx512f,avx512vl"))) void rows_avx512(const acc_t* a, const acc_t* at, int64_t h, int64_t u,
                                                            acc_t* block, int64_t width, int64_t p0, int64_t p1,
                                                            const int64_t* first, const int64_t* last) {
  rows_generic(a, at, h, u, block, width, p0, p1, first, last);
}

template <typename acc_t>
__attribute__((target("avx2"))) void rows_avx2(const acc_t* a, const acc_t* at, int64_t h, int64_t u, acc_t* block,
                                               int64_t width, int64_t p0, int64_t p1, const int64_t* first,
                                               const int64_t* last) {
  rows_generic(a, at, h, u, block, width, p0, p1, first, last);
}

#endif

template <typename acc_t>
void rows_default(const acc_t* a, const acc_t* at, int64_t h, int64_t u, acc_t* block, int64_t width, int64_t p0,
                  int64_t p1, const int64_t* first, const int64_t* last) {
  rows_generic(a, at, h, u, block, width, p0, p1, first, last);
}

}  // namespace block_product_detail

// block[p, q] = Σ_r a[r, p]·a[r, q] for q in [first[p], last[p]), every row p < u; a: [h, u]
// row-major (the moved rows over the block's latents), block: [u, width] row-major.
template <typename acc_t>
void block_product(const acc_t* a, int64_t h, int64_t u, acc_t* block, int64_t width, const std::vector<int64_t>& first,
                   const std::vector<int64_t>& last) {
  namespace d = block_product_detail;
  std::vector<acc_t> coefs(static_cast<size_t>(u * h));  // A_H's columns contiguous: row p's coefficients
  for (int64_t r = 0; r < h; ++r)
    for (int64_t p = 0; p < u; ++p) coefs[p * h + r] = a[r * u + p];
#if defined(__x86_64__) || defined(__i386__)
  static const auto rows = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                               ? d::rows_avx512<acc_t>
                           : __builtin_cpu_supports("avx2")  ? d::rows_avx2<acc_t>
                                                             : d::rows_default<acc_t>;
#else
  const auto rows = d::rows_default<acc_t>;  // (NEON is the baseline on arm64)
#endif
  // rows differ in length (a triangle, a staircase): dealt in small chunks; each entry is one thread's
  constexpr int64_t kChunk = 8;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(1, at::get_num_threads()))
  for (int64_t p0 = 0; p0 < u; p0 += kChunk)
    rows(a, coefs.data(), h, u, block, width, p0, std::min(u, p0 + kChunk), first.data(), last.data());
}

}  // namespace aosae

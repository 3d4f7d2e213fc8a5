// The summing loop's three passes over one latent's row pairs (csrc/coactive_pairs.h), sixteen
// at a time: the partners of one occurrence are its row's later latents, distinct, so one
// gather and one scatter of the dense accumulator serve sixteen pairs with no conflict between
// lanes. Each lane does what the scalar loop does for its pair, in the same order: the same sums
// (a product, then an add), the same listing, the same scores. float; latents as uint16 (n <=
// 65536) or int32. Sixteen of the accumulator's L2 hits in flight instead of one pair's chain: the
// op's forward inside the step at TopK d_sae 16384 went from 13.2–13.8 to 11.6–11.8 ms
// (benchmarks/NOTES.md, sixteenth pass).

#pragma once

#include <cstdint>

#include "simd512.h"  // has_avx512_bw_vl, Simd512<float>::first

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define AOSAE_GUSTAVSON __attribute__((target("avx512f,avx512bw,avx512vl"))) static inline

namespace aosae {
namespace gustavson {

using Simd512f = Simd512<float>;

// the m lanes of cols from `cols` on, as 32-bit indices
AOSAE_GUSTAVSON __m512i latents(__mmask16 m, const uint16_t* cols) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, cols));
}
AOSAE_GUSTAVSON __m512i latents(__mmask16 m, const int32_t* cols) { return _mm512_maskz_loadu_epi32(m, cols); }

// acc[cols[q]] += vi·vals[q], q < len; each j met while acc[j] is 0 listed at pj[touched++].
// Returns touched; `returned` set where a sum is exactly 0 after an add (its j may be listed again).
template <typename col_t>
AOSAE_GUSTAVSON int64_t add_run(float* acc, const col_t* cols, const float* vals, int64_t len, float vi,
                                int32_t* pj, int64_t touched, bool& returned) {
  const __m512 scale = _mm512_set1_ps(vi), zero = _mm512_setzero_ps();
  for (int64_t q = 0; q < len; q += 16) {
    const __mmask16 m = Simd512f::first(len - q);
    const __m512i j = latents(m, cols + q);
    const __m512 v = _mm512_maskz_loadu_ps(m, vals + q);
    const __m512 before = _mm512_mask_i32gather_ps(zero, m, j, acc, 4);
    const __mmask16 fresh = _mm512_mask_cmp_ps_mask(m, before, zero, _CMP_EQ_OQ);
    const int count = __builtin_popcount(fresh);
    _mm512_mask_storeu_epi32(pj + touched, Simd512f::first(count), _mm512_maskz_compress_epi32(fresh, j));
    touched += count;
    const __m512 after = _mm512_add_ps(before, _mm512_mul_ps(scale, v));
    returned |= _mm512_mask_cmp_ps_mask(m, after, zero, _CMP_EQ_OQ) != 0;
    _mm512_mask_i32scatter_ps(acc, m, j, after, 4);
  }
  return touched;
}

// out[q] = acc[cols[q]], q < len
template <typename col_t>
AOSAE_GUSTAVSON void gather_run(const float* acc, const col_t* cols, int64_t len, float* out) {
  for (int64_t q = 0; q < len; q += 16) {
    const __mmask16 m = Simd512f::first(len - q);
    const __m512i j = latents(m, cols + q);
    _mm512_mask_storeu_ps(out + q, m, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, j, acc, 4));
  }
}

// The listed partners pj[b .. touched) (no j twice): their sums into pv, the accumulator
// cleared, the non-zero ones kept in place. Returns the end of the kept ones.
AOSAE_GUSTAVSON int64_t list_run(float* acc, int32_t* pj, float* pv, int64_t b, int64_t touched) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t w = b;
  for (int64_t x = b; x < touched; x += 16) {
    const __mmask16 m = Simd512f::first(touched - x);
    const __m512i j = _mm512_maskz_loadu_epi32(m, pj + x);
    const __m512 v = _mm512_mask_i32gather_ps(zero, m, j, acc, 4);
    _mm512_mask_i32scatter_ps(acc, m, j, zero, 4);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, v, zero, _CMP_NEQ_UQ);
    const int count = __builtin_popcount(keep);
    _mm512_mask_storeu_epi32(pj + w, Simd512f::first(count), _mm512_maskz_compress_epi32(keep, j));
    _mm512_mask_storeu_ps(pv + w, Simd512f::first(count), _mm512_maskz_compress_ps(keep, v));
    w += count;
  }
  return w;
}

}  // namespace gustavson
}  // namespace aosae
#endif

// AVX-512 registers of float or double behind one name (csrc/block_product.h, topk_sum.h,
// block_gradient.h), so that one template serves both precisions. Every function is compiled for
// AVX-512 and inlined into callers that are too; callers pick these paths only where the machine
// has AVX-512 (has_avx512).

#pragma once

namespace aosae {

// Whether this CPU runs the AVX-512 paths (asked once; false off x86).
inline bool has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

// The same with BW and VL, for paths that load 16-bit lanes (csrc/gustavson_avx512.h): a CPU with F
// alone (Knights Landing) would fault on them.
inline bool has_avx512_bw_vl() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

}  // namespace aosae

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>

#define AOSAE_AVX512 __attribute__((target("avx512f"), always_inline)) static inline

namespace aosae {

template <typename T>
struct Simd512;

template <>
struct Simd512<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  AOSAE_AVX512 M first(int64_t n) { return n >= kLanes ? M(0xFFFF) : M((1u << n) - 1); }  // the first n lanes
  AOSAE_AVX512 V zero() { return _mm512_setzero_ps(); }
  AOSAE_AVX512 V set1(float x) { return _mm512_set1_ps(x); }
  AOSAE_AVX512 V load(const float* p) { return _mm512_loadu_ps(p); }
  AOSAE_AVX512 V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  AOSAE_AVX512 void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  AOSAE_AVX512 void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  AOSAE_AVX512 V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  AOSAE_AVX512 V abs(V a) { return _mm512_abs_ps(a); }
  template <int kPredicate>
  AOSAE_AVX512 M compare(M m, V a, V b) { return _mm512_mask_cmp_ps_mask(m, a, b, kPredicate); }
  AOSAE_AVX512 V min(V src, M m, V a, V b) { return _mm512_mask_min_ps(src, m, a, b); }
  AOSAE_AVX512 V blend(M m, V a, V b) { return _mm512_mask_blend_ps(m, a, b); }  // b where m, else a
  AOSAE_AVX512 float reduce_min(V a) { return _mm512_reduce_min_ps(a); }
  AOSAE_AVX512 V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  AOSAE_AVX512 V add(V a, V b) { return _mm512_add_ps(a, b); }
  AOSAE_AVX512 V add(V src, M m, V a, V b) { return _mm512_mask_add_ps(src, m, a, b); }  // src outside m
  // lane l + 8 into lane l, then + 4, + 2, + 1: csrc/row_slots.h's halving_sum, the same adds
  AOSAE_AVX512 float halving_sum(V a) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
};

template <>
struct Simd512<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int kLanes = 8;
  AOSAE_AVX512 M first(int64_t n) { return n >= kLanes ? M(0xFF) : M((1u << n) - 1); }
  AOSAE_AVX512 V zero() { return _mm512_setzero_pd(); }
  AOSAE_AVX512 V set1(double x) { return _mm512_set1_pd(x); }
  AOSAE_AVX512 V load(const double* p) { return _mm512_loadu_pd(p); }
  AOSAE_AVX512 V load(M m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  AOSAE_AVX512 void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  AOSAE_AVX512 void store(double* p, M m, V v) { _mm512_mask_storeu_pd(p, m, v); }
  AOSAE_AVX512 V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  AOSAE_AVX512 V abs(V a) { return _mm512_abs_pd(a); }
  template <int kPredicate>
  AOSAE_AVX512 M compare(M m, V a, V b) { return _mm512_mask_cmp_pd_mask(m, a, b, kPredicate); }
  AOSAE_AVX512 V min(V src, M m, V a, V b) { return _mm512_mask_min_pd(src, m, a, b); }
  AOSAE_AVX512 V blend(M m, V a, V b) { return _mm512_mask_blend_pd(m, a, b); }  // b where m, else a
  AOSAE_AVX512 double reduce_min(V a) { return _mm512_reduce_min_pd(a); }
  AOSAE_AVX512 V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  AOSAE_AVX512 V add(V a, V b) { return _mm512_add_pd(a, b); }
  AOSAE_AVX512 V add(V src, M m, V a, V b) { return _mm512_mask_add_pd(src, m, a, b); }  // src outside m
  // lane l + 4 into lane l, then + 2, + 1: csrc/row_slots.h's halving_sum, the same adds
  AOSAE_AVX512 double halving_sum(V a) {
    const __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
    const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
  }
};

}  // namespace aosae

#undef AOSAE_AVX512
#endif

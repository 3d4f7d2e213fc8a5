// AVX-512 registers of float or double behind one name (csrc/block_product.h, topk_sum.h,
// block_gradient.h), so that one template serves both precisions. Every function is compiled for
// AVX-512 and inlined into callers that are too; callers pick these paths only where the machine
// has AVX-512 (__builtin_cpu_supports).

#pragma once

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
  AOSAE_AVX512 float reduce_add(V a) { return _mm512_reduce_add_ps(a); }
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
  AOSAE_AVX512 double reduce_add(V a) { return _mm512_reduce_add_pd(a); }
};

}  // namespace aosae

#undef AOSAE_AVX512
#endif

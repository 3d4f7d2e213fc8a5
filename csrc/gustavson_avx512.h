// The summing loops' passes over one latent's row pairs, sixteen at a time: the partners of one
// occurrence are its row's later latents, distinct, so one gather and one scatter of the dense
// accumulator serve sixteen pairs with no conflict between lanes. Each lane does what the scalar
// loop does for its pair, in the same order: the same sums (a product, then an add), the same
// listing, the same scores. float; latents as uint16 (n <= 65536) or int32.
//   - csrc/coactive_pairs.h (the full path): add_run, gather_run (every row pair's score),
//     list_run. Sixteen of the accumulator's L2 hits in flight instead of one pair's chain: the
//     op's forward inside the step at TopK d_sae 16384 went from 13.2–13.8 to 11.6–11.8 ms
//     (benchmarks/NOTES.md, sixteenth pass).
//   - csrc/bracketed_sum.h: add_runs, mark_runs (a kept bit per row pair, and one for those
//     inside the bracket) and tally_list (the pairs above the bracket summed, those inside
//     collected), with BitWriter and TaggedList (seventeenth pass).

#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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
// kNonZeroProducts: only a non-zero product lists j, and only a non-zero product that leaves 0
// sets `returned` (the bracketed sum's values are never negative, so its sums never return to 0;
// TopK's zeros, whose products are 0, would otherwise list j early and set `returned`, which
// sends a latent to the scalar listing).
template <typename col_t, bool kNonZeroProducts = false>
AOSAE_GUSTAVSON int64_t add_run(float* acc, const col_t* cols, const float* vals, int64_t len, float vi,
                                int32_t* pj, int64_t touched, bool& returned) {
  const __m512 scale = _mm512_set1_ps(vi), zero = _mm512_setzero_ps();
  __mmask16 back_at_zero = 0;  // (a local: `returned` written at every step went through memory)
  for (int64_t q = 0; q < len; q += 16) {
    const __mmask16 m = Simd512f::first(len - q);
    const __m512i j = latents(m, cols + q);
    const __m512 v = _mm512_maskz_loadu_ps(m, vals + q);
    const __m512 before = _mm512_mask_i32gather_ps(zero, m, j, acc, 4);
    const __m512 product = _mm512_mul_ps(scale, v);
    const __mmask16 counted = kNonZeroProducts ? _mm512_mask_cmp_ps_mask(m, product, zero, _CMP_NEQ_UQ) : m;
    const __mmask16 fresh = _mm512_mask_cmp_ps_mask(counted, before, zero, _CMP_EQ_OQ);
    const int count = __builtin_popcount(fresh);
    _mm512_mask_storeu_epi32(pj + touched, Simd512f::first(count), _mm512_maskz_compress_epi32(fresh, j));
    touched += count;
    const __m512 after = _mm512_add_ps(before, product);
    back_at_zero |= _mm512_mask_cmp_ps_mask(counted, after, zero, _CMP_EQ_OQ);
    _mm512_mask_i32scatter_ps(acc, m, j, after, 4);
  }
  returned |= back_at_zero != 0;
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

// A stream of one bit per row pair, written in order from a word boundary (each latent's run of
// row pairs starts on one, so threads never share a word). put appends the low `count` bits.
struct BitWriter {
  uint64_t* word;
  uint64_t bits = 0;
  int fill = 0;
  explicit BitWriter(uint64_t* first) : word(first) {}
  void put(uint32_t mask, int count) {
    bits |= static_cast<uint64_t>(mask) << fill;
    fill += count;
    if (fill >= 64) {
      *word++ = bits;
      fill -= 64;
      bits = fill > 0 ? static_cast<uint64_t>(mask) >> (count - fill) : 0;
    }
  }
  void flush() {
    if (fill > 0) *word = bits;
  }
};

// Values with a 64-bit tag each (two arrays), appended sixteen lanes at a time (append): no
// branch on which lanes go (a few per cent of lanes, in no pattern, mispredicted the branch that
// tested for them). room(extra) makes space for extra more; an append stores sixteen lanes
// whatever it keeps, so room for the most it will keep plus 16.
struct TaggedList {
  std::vector<float> value;
  std::vector<int64_t> tag;
  int64_t size = 0;
  void clear() { size = 0; }
  void room(int64_t extra) {
    if (size + extra > static_cast<int64_t>(value.size())) {
      const int64_t grown = std::max<int64_t>(2 * static_cast<int64_t>(value.size()), size + extra + 1024);
      value.resize(grown);
      tag.resize(grown);
    }
  }
};

// A TaggedList's end, held by a run while it appends (a local: the compiler keeps it in registers,
// where the list's own members, which the lanes' stores might alias, were stored and reloaded at
// every step); close() hands the size back.
struct TaggedCursor {
  float* value;
  int64_t* tag;
  explicit TaggedCursor(TaggedList& list)
      : value(list.value.data() + list.size), tag(list.tag.data() + list.size) {}
  void close(TaggedList& list) const { list.size = value - list.value.data(); }
};

// the lanes of `keep` of v with tags (lo: lanes 0–7, hi: lanes 8–15) appended at out: compressed
// in registers, all sixteen lanes stored (out needs room for 16); those past count lie beyond the
// end, overwritten by the next append, never read. (A compress straight to memory is microcoded
// on AMD Zen 4: there it took most of tally_list; benchmarks/NOTES.md, twenty-fourth pass.)
AOSAE_GUSTAVSON void append(TaggedCursor& out, __mmask16 keep, __m512 v, __m512i tag_lo, __m512i tag_hi) {
  const int low = __builtin_popcount(keep & 0xFF), count = __builtin_popcount(keep);
  _mm512_storeu_ps(out.value, _mm512_maskz_compress_ps(keep, v));
  _mm512_storeu_si512(out.tag, _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep & 0xFF), tag_lo));
  _mm512_storeu_si512(out.tag + low, _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep >> 8), tag_hi));
  out.value += count;
  out.tag += count;
}

// Latent i's occurrences u in [u0, u1) (occurrence u: entry[u] and the end of its row; its row
// pairs are the row's later entries), each one's add_run in turn. One call per latent (as
// mark_runs): add_run called for each occurrence from code built without AVX-512 could not be
// inlined, and its entry and exit cost about as much as a short run's work (benchmarks/NOTES.md,
// nineteenth pass).
template <typename col_t, bool kNonZeroProducts = false>
AOSAE_GUSTAVSON int64_t add_runs(float* acc, const col_t* cols, const float* vals, const int64_t* entry,
                                 const int64_t* end, int64_t u0, int64_t u1, int32_t* pj, bool& returned) {
  int64_t touched = 0;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t s = entry[u];
    touched = add_run<col_t, kNonZeroProducts>(acc, cols + s + 1, vals + s + 1, end[u] - s - 1, vals[s], pj, touched,
                                               returned);
  }
  return touched;
}

// The kept bits of latent i's row pairs (occurrences u in [u0, u1), as add_runs), written from
// `first` (a word boundary) on, occurrence u's run from position runs[entry[u]] = pos on:
// acc[j] >= hi (acc >= 0: no negative value); and the same positions' bits of the pairs inside
// [lo, hi), from `inside_first` on, settled once the k-th score is known. Bits, not a list of the
// inside pairs' values and positions: the compress stores that appended them, sixteen lanes at a
// time whether any lane was inside or not, took about half of mark_runs' time (benchmarks/NOTES.md,
// nineteenth pass).
template <typename col_t>
AOSAE_GUSTAVSON void mark_runs(const float* acc, const col_t* cols, const int64_t* entry, const int64_t* end,
                               int64_t u0, int64_t u1, float lo, float hi, uint64_t* first, uint64_t* inside_first,
                               int64_t pos, int64_t* runs) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  BitWriter bits(first), inside(inside_first);  // (locals, in registers for the latent)
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t s = entry[u], len = end[u] - s - 1;
    runs[s] = pos;
    const col_t* c = cols + s + 1;
    for (int64_t q = 0; q < len; q += 16) {
      const __mmask16 m = Simd512f::first(len - q);
      const __m512 a = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, latents(m, c + q), acc, 4);
      const __mmask16 above = _mm512_mask_cmp_ps_mask(m, a, vhi, _CMP_GE_OQ);
      const int count = static_cast<int>(len - q < 16 ? len - q : 16);
      bits.put(above, count);
      inside.put(_mm512_mask_cmp_ps_mask(m & ~above, a, vlo, _CMP_GE_OQ), count);
    }
    pos += len;
  }
  bits.flush();
  inside.flush();
}

// The listed partners pj[0 .. count) (no j twice) of latent i: the accumulator cleared, the
// sums >= hi added (float64, lane order fixed) into total and counted, the non-zero ones below lo
// counted, those inside [lo, hi) appended to inside with their keys i·n + j.
AOSAE_GUSTAVSON void tally_list(float* acc, const int32_t* pj, int64_t count, float lo, float hi, int64_t i, int64_t n,
                                double& total, int64_t& above_count, int64_t& below_count, TaggedList& inside) {
  const __m512 zero = _mm512_setzero_ps(), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const __m512i base = _mm512_set1_epi64(i * n);
  __m512d sum0 = _mm512_setzero_pd(), sum1 = _mm512_setzero_pd();
  inside.room(count + 16);  // (each append stores sixteen lanes)
  TaggedCursor out(inside);
  int64_t above_here = 0, below_here = 0;
  for (int64_t x = 0; x < count; x += 16) {
    const __mmask16 m = Simd512f::first(count - x);
    const __m512i j = _mm512_maskz_loadu_epi32(m, pj + x);
    const __m512 v = _mm512_mask_i32gather_ps(zero, m, j, acc, 4);
    _mm512_mask_i32scatter_ps(acc, m, j, zero, 4);
    const __mmask16 above = _mm512_mask_cmp_ps_mask(m, v, vhi, _CMP_GE_OQ);
    sum0 = _mm512_mask_add_pd(sum0, static_cast<__mmask8>(above & 0xFF), sum0,
                              _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    sum1 = _mm512_mask_add_pd(sum1, static_cast<__mmask8>(above >> 8), sum1,
                              _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    above_here += __builtin_popcount(above);
    const __mmask16 in = _mm512_mask_cmp_ps_mask(m & ~above, v, vlo, _CMP_GE_OQ);
    below_here += __builtin_popcount(_mm512_mask_cmp_ps_mask(m & ~above & ~in, v, zero, _CMP_NEQ_OQ));
    const __m512i key_lo = _mm512_add_epi64(base, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(j)));
    const __m512i key_hi = _mm512_add_epi64(base, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(j, 1)));
    append(out, in, v, key_lo, key_hi);
  }
  out.close(inside);
  above_count += above_here;
  below_count += below_here;
  total += _mm512_reduce_add_pd(sum0) + _mm512_reduce_add_pd(sum1);
}

}  // namespace gustavson
}  // namespace aosae
#endif

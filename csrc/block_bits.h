// The GEMM block's kept pairs, one bit per pair of its staircase: the sum of the k best
// (csrc/topk_sum.h) writes them as its pass tallies the block's rows, and its backward
// (csrc/topk_sum_backward.cpp, csrc/block_gradient.h) reads them instead of recomputing every
// score of the staircase once more, which was a third of block_gradient's multiply-adds (BatchTopK
// d_sae 65536's early steps: a staircase of 2.9·10⁷ pairs, h 16–33 multiply-adds per score;
// benchmarks/NOTES.md, eighteenth pass). Float32 rows with no negative value only: a kept pair's
// gradient is then +g, its score being positive.
//
// Row p's pairs (p, q), q in (p, row_end(p)), are bits 0 .. of its own run of 16-bit words: a
// pass writes a register's 16 masks at once, and rows never share a word.

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "buffer_pool.h"
#include "simd512.h"  // has_avx512

namespace aosae {

class BlockBits {
 public:
  BlockBits() = default;

  // rows [0, extent), row p holding the pairs (p, q < row_end(p))
  template <typename RowEnd>
  BlockBits(int64_t extent, RowEnd&& row_end) : end_(extent), start_(extent + 1, 0) {
    for (int64_t p = 0; p < extent; ++p) {
      end_[p] = row_end(p);
      start_[p + 1] = start_[p] + (std::max<int64_t>(0, end_[p] - p - 1) + 15) / 16;
    }
    // (two spare words: bits_at reads 4 bytes from the last bit's byte; from the pool past 1 MiB)
    words_ = empty_pooled(start_[extent] + 2, at::kShort);
    base_ = reinterpret_cast<uint16_t*>(words_.data_ptr<int16_t>());
    base_[start_[extent]] = 0;
    base_[start_[extent] + 1] = 0;
  }

  bool defined() const { return words_.defined(); }
  const torch::Tensor& words() const { return words_; }

  // whether these are the bits of rows [0, extent) ending at row_end (the backward's check: other
  // ends would read other rows' bits, or past the last)
  template <typename RowEnd>
  bool covers(int64_t extent, RowEnd&& row_end) const {
    if (static_cast<int64_t>(end_.size()) != extent) return false;
    for (int64_t p = 0; p < extent; ++p)
      if (end_[p] != row_end(p)) return false;
    return true;
  }

  // row p's words: bit x of the run is pair (p, p + 1 + x)
  uint16_t* row(int64_t p) { return base_ + start_[p]; }
  const uint16_t* row(int64_t p) const { return base_ + start_[p]; }

  // row p's bits as a stream of bytes (expand_bits)
  const uint8_t* row_bytes(int64_t p) const { return reinterpret_cast<const uint8_t*>(row(p)); }

  // whether any of row p's bits [b0, b1) is set
  bool any(int64_t p, int64_t b0, int64_t b1) const {
    return b1 > b0 && !every_word(p, b0, b1, [](uint16_t bits, uint16_t) { return bits == 0; });
  }

  // whether every one of row p's bits [b0, b1) is set (b0 < b1)
  bool all(int64_t p, int64_t b0, int64_t b1) const {
    return every_word(p, b0, b1, [](uint16_t bits, uint16_t mask) { return bits == mask; });
  }

  // pair (p, p + 1 + x)'s bit, counted over all the words
  int64_t bit_of(int64_t p, int64_t x) const { return start_[p] * 16 + x; }
  void keep_bit(int64_t bit) { base_[bit >> 4] |= static_cast<uint16_t>(1u << (bit & 15)); }

 private:
  // whether ok(bits, mask) holds for each word over row p's bits [b0, b1) (b0 < b1): mask, the
  // word's bits in the range; bits, those of them that are set. Stops at the first word that fails.
  template <typename Ok>
  bool every_word(int64_t p, int64_t b0, int64_t b1, Ok&& ok) const {
    const uint16_t* w = row(p);
    const int64_t first = b0 >> 4, last = (b1 - 1) >> 4;
    const uint16_t head = static_cast<uint16_t>(0xFFFFu << (b0 & 15));
    const uint16_t tail = static_cast<uint16_t>(0xFFFFu >> (15 - ((b1 - 1) & 15)));
    if (first == last) return ok(static_cast<uint16_t>(w[first] & head & tail), static_cast<uint16_t>(head & tail));
    if (!ok(static_cast<uint16_t>(w[first] & head), head)) return false;
    for (int64_t x = first + 1; x < last; ++x)
      if (!ok(w[x], uint16_t(0xFFFFu))) return false;
    return ok(static_cast<uint16_t>(w[last] & tail), tail);
  }

  std::vector<int64_t> end_;    // [extent]: row p's end (its pairs: q in (p, end))
  std::vector<int64_t> start_;  // [extent + 1]: row p's first word
  torch::Tensor words_;         // the bits, uint16 words held as int16
  uint16_t* base_ = nullptr;    // words_'s data (data_ptr checks the tensor on every call: per bit, a tenth of the sum's cut)
};

// A stream of bits as little-endian bytes (these rows' words; the bracketed sum's kept bits,
// csrc/kept_bits_backward.h): the 16 bits from bit `at` on (4 bytes are read: the stream needs a
// spare 4 bytes past its last bit)
inline uint32_t bits_at(const uint8_t* bits, int64_t at) {
  uint32_t w;
  std::memcpy(&w, bits + (at >> 3), sizeof(w));
  return (w >> (at & 7)) & 0xFFFFu;
}

// v[x] = g where bit at + x of the stream is set, else 0, x < count
template <typename acc_t>
void expand_bits_plain(const uint8_t* bits, int64_t at, int64_t count, acc_t g, acc_t* v) {
  for (int64_t x = 0; x < count; ++x) v[x] = (bits[(at + x) >> 3] >> ((at + x) & 7)) & 1 ? g : acc_t(0);
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx512f"))) inline void expand_bits_avx512(const uint8_t* bits, int64_t at, int64_t count,
                                                                  float g, float* v) {
  const __m512 vg = _mm512_set1_ps(g);
  for (int64_t x = 0; x < count; x += 16) {
    const __mmask16 lanes = Simd512<float>::first(count - x);
    _mm512_mask_storeu_ps(v + x, lanes, _mm512_maskz_mov_ps(static_cast<__mmask16>(bits_at(bits, at + x)), vg));
  }
}
#endif

template <typename acc_t>
void expand_bits(const uint8_t* bits, int64_t at, int64_t count, acc_t g, acc_t* v) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (std::is_same<acc_t, float>::value) {
    if (has_avx512()) return expand_bits_avx512(bits, at, count, g, v);
  }
#endif
  expand_bits_plain(bits, at, count, g, v);
}

}  // namespace aosae

// Exact top-k selection of scored latent pairs, shared by the sparse CPU backend.
//
// The k-th best |score| is found without sorting or nth_element over every pair: while the
// pairs are produced, each thread counts them in a 65536-bin histogram of the top 16 bits of
// |score| (the IEEE bits of a non-negative float order like the float). The bin holding the
// k-th best is then known; only the pairs inside that one bin need an nth_element.
// The survivors (about k) are ordered by (|score| desc, i·n + j asc), the contract's order,
// with an LSD radix sort of one 64-bit key per pair that also carries the score itself.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__GLIBCXX__) && defined(_OPENMP)
#include <parallel/algorithm>
#define AOSAE_PARALLEL_SORT 1
#endif

namespace aosae {

template <typename acc_t>
struct Candidate {
  acc_t value;  // signed score
  int64_t key;  // i * n + j
};

constexpr int64_t kMagnitudeBins = int64_t(1) << 16;

// Bin of |v|: the top 16 bits of its IEEE magnitude (31 bits for float, 63 for double).
template <typename acc_t>
inline uint32_t magnitude_bin(acc_t v) {
  const acc_t mag = std::abs(v);
  if constexpr (std::is_same<acc_t, float>::value) {
    uint32_t bits;
    std::memcpy(&bits, &mag, sizeof(bits));
    return bits >> 15;
  } else {
    uint64_t bits;
    std::memcpy(&bits, &mag, sizeof(bits));
    return static_cast<uint32_t>(bits >> 47);
  }
}

// Where the k-th best lies: every pair in a bin above `bin` is kept, `above` of them; the
// k − above best of bin `bin` complete the top k. bin = -1: there are at most k pairs.
struct KthBin {
  int64_t bin;
  int64_t above;
};

inline KthBin find_kth_bin(const std::vector<int64_t>& hist, int64_t k) {
  int64_t above = 0;
  for (int64_t b = kMagnitudeBins - 1; b >= 0; --b) {
    if (above + hist[b] >= k) return {b, above};
    above += hist[b];
  }
  return {-1, above};
}

// The tie cut where every pair tied at the k-th score is kept: the same cut whichever path
// collected the pairs (the sum's every-pair path has no keys to give).
constexpr int64_t kEveryTieKept = std::numeric_limits<int64_t>::max();

// The k-th best |value| among candidates (need-th best of them, 1 <= need <= their number) and,
// of those tied at it, the key of the last one kept (smallest keys first; kEveryTieKept where all
// of them are). for_each(take) calls take(candidate) for each.
template <typename acc_t>
struct KthCut {
  acc_t kth;
  int64_t tie_cut;
  bool keeps(acc_t magnitude, int64_t key) const { return magnitude > kth || (magnitude == kth && key <= tie_cut); }
};

// The need-th best |value| among candidates (1 <= need <= their number).
template <typename acc_t, typename ForEach>
acc_t kth_magnitude(ForEach&& for_each, int64_t need) {
  // millions of candidates (the sum's bracket at d_sae 262144): counted first, into a buffer the
  // calling thread keeps between calls (up to 64 MB), so no copy per doubling and no fresh pages
  thread_local std::vector<acc_t> magnitudes;
  size_t count = 0;
  for_each([&](const Candidate<acc_t>&) { ++count; });
  magnitudes.clear();
  magnitudes.reserve(count);
  for_each([&](const Candidate<acc_t>& c) { magnitudes.push_back(std::abs(c.value)); });
  std::nth_element(magnitudes.begin(), magnitudes.begin() + (need - 1), magnitudes.end(), std::greater<acc_t>());
  const acc_t kth = magnitudes[need - 1];
  if (magnitudes.capacity() * sizeof(acc_t) > (size_t(64) << 20)) std::vector<acc_t>().swap(magnitudes);
  return kth;
}

template <typename acc_t, typename ForEach>
KthCut<acc_t> kth_cut(ForEach&& for_each, int64_t need) {
  const acc_t kth = kth_magnitude<acc_t>(for_each, need);
  int64_t greater = 0;
  std::vector<int64_t> tie_keys;
  for_each([&](const Candidate<acc_t>& c) {
    const acc_t a = std::abs(c.value);
    greater += a > kth;
    if (a == kth) tie_keys.push_back(c.key);
  });
  const int64_t ties_kept = need - greater;  // 1 <= ties_kept <= tie_keys.size()
  if (ties_kept == static_cast<int64_t>(tie_keys.size())) return {kth, kEveryTieKept};
  std::nth_element(tie_keys.begin(), tie_keys.begin() + (ties_kept - 1), tie_keys.end());
  return {kth, tie_keys[ties_kept - 1]};
}

// kth_cut of candidates whose magnitudes lie in a bracket [lo, hi), in `parts` parts (for_each_in(p,
// take): part p's), without ordering them all: their magnitudes' bits (in order, as the magnitudes
// are) counted in at most 4096 bins, the parts in parallel, then kth_cut over the one bin that holds
// the need-th (the bins above it hold larger magnitudes only): the same cut. nth_element over all
// of them was most of the sum's cut at BatchTopK d_sae 65536 (≈ 2·10⁵ pairs inside the bracket;
// benchmarks/NOTES.md, nineteenth pass). A magnitude outside the bracket: kth_cut over them all.
template <typename acc_t, typename ForEachIn>
KthCut<acc_t> kth_cut_between(int parts, ForEachIn&& for_each_in, int64_t need, acc_t lo, acc_t hi, int threads) {
  auto each = [&](auto&& take) {
    for (int p = 0; p < parts; ++p) for_each_in(p, take);
  };
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  bits_t lo_bits, hi_bits;
  std::memcpy(&lo_bits, &lo, sizeof(lo_bits));
  std::memcpy(&hi_bits, &hi, sizeof(hi_bits));
  if (!(lo >= acc_t(0) && lo < hi)) return kth_cut<acc_t>(each, need);
  int shift = 0;
  while (((hi_bits - lo_bits) >> shift) >= 4096) ++shift;
  const int64_t bins = static_cast<int64_t>((hi_bits - lo_bits) >> shift) + 1;
  auto bin_of = [&](acc_t magnitude) {
    bits_t b;
    std::memcpy(&b, &magnitude, sizeof(b));
    return static_cast<int64_t>((b - lo_bits) >> shift);
  };
  std::vector<std::vector<int64_t>> counts(parts, std::vector<int64_t>(bins, 0));
  std::vector<uint8_t> outside(parts, 0);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int p = 0; p < parts; ++p)
    for_each_in(p, [&](const Candidate<acc_t>& c) {
      const acc_t a = std::abs(c.value);
      if (a >= lo && a < hi)
        ++counts[p][bin_of(a)];
      else
        outside[p] = 1;
    });
  if (std::find(outside.begin(), outside.end(), 1) != outside.end()) return kth_cut<acc_t>(each, need);
  int64_t bin = bins - 1, above = 0;
  for (; bin >= 0; --bin) {
    int64_t here = 0;
    for (int p = 0; p < parts; ++p) here += counts[p][bin];
    if (above + here >= need) break;
    above += here;
  }
  if (bin < 0) return kth_cut<acc_t>(each, need);  // (fewer than need: kth_cut's own precondition)
  std::vector<std::vector<Candidate<acc_t>>> in_bin(parts);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    in_bin[p].reserve(counts[p][bin]);
    for_each_in(p, [&](const Candidate<acc_t>& c) {
      if (bin_of(std::abs(c.value)) == bin) in_bin[p].push_back(c);
    });
  }
  return kth_cut<acc_t>(
      [&](auto&& take) {
        for (const auto& part : in_bin)
          for (const auto& c : part) take(c);
      },
      need - above);
}

// Per-thread scratch that outlives the call: a training step asks for the same sizes every
// step, and fresh pages (first-touch faults) cost as much as the work that fills them.
// Slot tells apart buffers of the same type. get() grows it (contents undefined: no zero
// fill) by a quarter more than asked: the pair count moves by ±10 % from step to step, and
// growing to each new largest count exactly mapped 25–50 MB of fresh pages every few steps
// (up to 16 000 faults, +20 ms, in a BatchTopK d_sae 16384 forward of 14 ms; benchmarks/NOTES.md,
// fourteenth pass); trim() frees it when the last call asked for more than keep_bytes (not when
// the quarter's headroom alone takes it past them: it would be freed and mapped again every call).
template <typename T, int Slot>
struct Scratch {
  static T* get(size_t count) {
    asked() = count;
    if (count > capacity()) {
      buffer().reset();
      const size_t grown = count + count / 4;
      buffer().reset(new T[grown]);  // default-initialised
      capacity() = grown;
    }
    return buffer().get();
  }
  static void trim(size_t keep_bytes) {
    if (asked() * sizeof(T) > keep_bytes) {
      buffer().reset();
      capacity() = 0;
    }
  }

 private:
  static std::unique_ptr<T[]>& buffer() {
    thread_local std::unique_ptr<T[]> b;
    return b;
  }
  static size_t& capacity() {
    thread_local size_t c = 0;
    return c;
  }
  static size_t& asked() {  // the last get()'s count
    thread_local size_t c = 0;
    return c;
  }
};

// Per-thread count arrays (the |C| histograms) that outlive the call, zero between calls:
// allocated and zeroed afresh, 1 MiB per thread of a summing loop's histograms cost every call its
// page faults and a memset (≈ 1.3 ms of TopK d_sae 16384's forward on a 2-core Xeon;
// benchmarks/NOTES.md, fifteenth pass). lend(parts, size): `parts` arrays of `size` zero counts,
// kept by the calling thread (bind the reference before an OpenMP team: inside it each thread
// has its own thread_local). drain() hands each count over and zeroes it (any thread, disjoint
// ranges), then give_back(); a call that did not give them back (it threw) leaves them to be
// zeroed by the next lend().
template <typename T, int Slot>
struct ZeroedCounts {
  static std::vector<std::vector<T>>& lend(int parts, size_t size) {
    auto& arrays = pool();
    if (static_cast<int>(arrays.size()) < parts) arrays.resize(parts);
    for (auto& a : arrays) {
      if (!zero()) std::fill(a.begin(), a.end(), T(0));
      a.resize(std::max(a.size(), size), T(0));
    }
    zero() = false;
    return arrays;
  }
  // take(x, count) for every array's counts x in [lo, hi), each then zeroed
  template <typename Take>
  static void drain(std::vector<std::vector<T>>& arrays, int64_t lo, int64_t hi, Take&& take) {
    for (auto& a : arrays)
      for (int64_t x = lo; x < hi; ++x) {
        take(x, a[x]);
        a[x] = T(0);
      }
  }
  static void give_back() { zero() = true; }

 private:
  static std::vector<std::vector<T>>& pool() {
    thread_local std::vector<std::vector<T>> arrays;
    return arrays;
  }
  static bool& zero() {
    thread_local bool z = true;
    return z;
  }
};

// LSD radix sort on 8-bit digits of a 64-bit key per item, skipping digits that every key shares;
// stable (items with equal keys keep their order).
// 8-bit digits: each scatter pass writes to 256 streams, which stay in cache and TLB; with
// 11-bit digits (2048 streams) a pass over 10⁷ keys missed on nearly every write and the
// sort took 2.5× longer although it has 6 passes instead of 8 (BatchTopK's block, 10.7 M pairs).
template <typename T, typename KeyOf>
void radix_sort_by(std::vector<T>& items, KeyOf&& key_of) {
  const size_t count = items.size();
  if (count < 2) return;
  uint64_t any = 0, all = ~uint64_t(0);
  for (const T& x : items) {
    any |= key_of(x);
    all &= key_of(x);
  }
  const uint64_t varying = any ^ all;
  std::vector<T> other(count);
  size_t hist[256];
  for (int shift = 0; shift < 64; shift += 8) {
    const uint64_t digit_mask = uint64_t(0xff) << shift;
    if (!(varying & digit_mask)) continue;
    std::fill(hist, hist + 256, 0);
    for (const T& x : items) ++hist[(key_of(x) >> shift) & 0xff];
    size_t run = 0;
    for (auto& h : hist) {
      const size_t c = h;
      h = run;
      run += c;
    }
    for (const T& x : items) other[hist[(key_of(x) >> shift) & 0xff]++] = x;
    items.swap(other);
  }
}

inline void radix_sort(std::vector<uint64_t>& keys) {
  radix_sort_by(keys, [](uint64_t x) { return x; });
}

// One float pair as a 64-bit key that sorts ascending in the contract's order (|value| desc,
// then key asc) and carries the score exactly: [inverted |value| bits:31][key:key_bits][sign:1].
// Needs key_bits + 32 <= 64.
inline uint64_t sort_key(float value, int64_t key, int key_bits) {
  const float mag = std::abs(value);
  uint32_t bits;
  std::memcpy(&bits, &mag, sizeof(bits));
  return (uint64_t(0x7fffffffu - bits) << (key_bits + 1)) | (uint64_t(key) << 1) | uint64_t(value < 0);
}

inline float decode_sort_key(uint64_t x, int key_bits, int64_t* key) {
  const uint32_t bits = 0x7fffffffu - static_cast<uint32_t>(x >> (key_bits + 1));
  float mag;
  std::memcpy(&mag, &bits, sizeof(mag));
  *key = static_cast<int64_t>((x >> 1) & ((uint64_t(1) << key_bits) - 1));
  return (x & 1) ? -mag : mag;
}

// Orders candidates by |value| desc, then key asc (keys are distinct), and keeps the first
// `limit`. float scores with n ≤ 65536: one 64-bit key per pair, [inverted |value| bits:31]
// [key:key_bits][sign:1], radix sorted and decoded back (the score is carried exactly);
// otherwise a comparison sort.
template <typename acc_t>
void sort_candidates(std::vector<Candidate<acc_t>>& cand, int64_t n, size_t limit) {
  int key_bits = 1;
  while (key_bits < 63 && (uint64_t(1) << key_bits) < uint64_t(n) * uint64_t(n)) ++key_bits;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (key_bits + 32 <= 64) {
      std::vector<uint64_t> keys(cand.size());
      for (size_t p = 0; p < cand.size(); ++p) {
        const float mag = std::abs(cand[p].value);
        uint32_t bits;
        std::memcpy(&bits, &mag, sizeof(bits));
        keys[p] = (uint64_t(0x7fffffffu - bits) << (key_bits + 1)) | (uint64_t(cand[p].key) << 1) |
                  uint64_t(cand[p].value < 0);
      }
      radix_sort(keys);
      const size_t kept = std::min(limit, keys.size());
      cand.resize(kept);
      const uint64_t key_mask = (uint64_t(1) << key_bits) - 1;
      for (size_t p = 0; p < kept; ++p) {
        const uint64_t x = keys[p];
        const uint32_t bits = 0x7fffffffu - static_cast<uint32_t>(x >> (key_bits + 1));
        float mag;
        std::memcpy(&mag, &bits, sizeof(mag));
        cand[p] = {(x & 1) ? -mag : mag, static_cast<int64_t>((x >> 1) & key_mask)};
      }
      return;
    }
  }
  auto better = [](const Candidate<acc_t>& x, const Candidate<acc_t>& y) {
    const acc_t ax = std::abs(x.value), ay = std::abs(y.value);
    return ax > ay || (ax == ay && x.key < y.key);
  };
#ifdef AOSAE_PARALLEL_SORT
  __gnu_parallel::sort(cand.begin(), cand.end(), better);
#else
  std::sort(cand.begin(), cand.end(), better);
#endif
  if (cand.size() > limit) cand.resize(limit);
}

}  // namespace aosae

// Latents relabelled by column norm, largest first (the sum of the k best pairs, csrc/
// gram_topk_sparse.cpp, and its backward). With positive values |C_ij| <= ‖a_i‖‖a_j‖
// (Cauchy–Schwarz), so once the GEMM block's latents are in this order the pairs that can reach
// a score lie in a staircase at its top-left corner (csrc/dense_rows.h, block_staircase). Ties
// keep the original order; the same rows give the same labels, forward and backward.

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "pair_select.h"  // radix_sort_by

namespace aosae {

template <typename acc_t>
struct NormOrder {
  std::vector<int64_t> original;  // [n]: new label -> original latent
  std::vector<int64_t> label;     // [n]: original latent -> new label
  std::vector<double> norm;       // [n]: by new label, non-increasing
  std::vector<int64_t> cols;      // [nnz]: the rows' new labels, ascending within each row
  std::vector<acc_t> vals;        // [nnz]: their values
  std::vector<int64_t> entry;     // [nnz]: new entry -> original entry (same row)
  // the original (i, j), i < j, of a pair of new labels, as the tie order's key i·n + j
  int64_t key(int64_t a, int64_t b, int64_t n) const {
    const int64_t i = original[a], j = original[b];
    return i < j ? i * n + j : j * n + i;
  }
};

template <typename acc_t>
NormOrder<acc_t> order_by_norm(const int64_t* rp, const int64_t* cp, const acc_t* vp, int64_t m, int64_t n) {
  NormOrder<acc_t> out;
  const int64_t nnz = rp[m];
  std::vector<double> sq(n, 0.0);
  for (int64_t e = 0; e < nnz; ++e) sq[cp[e]] += static_cast<double>(vp[e]) * static_cast<double>(vp[e]);
  // the active latents sorted (stably), then the others in their order: the same as sorting all
  // n, without sorting the n − u zeros (d_sae 262144: u ≈ 2·10⁴)
  // (a stable radix sort on ~bits of sq: a positive double's bits order as its value does, so
  // this is the order by sq descending, ties in latent order; std::sort of (~bits, latent) pairs
  // took 0.8–1.9 ms of BatchTopK's block steps)
  std::vector<std::pair<uint64_t, int64_t>> active;
  for (int64_t i = 0; i < n; ++i)
    if (sq[i] > 0) {
      uint64_t bits;
      std::memcpy(&bits, &sq[i], sizeof(bits));
      active.emplace_back(~bits, i);
    }
  radix_sort_by(active, [](const std::pair<uint64_t, int64_t>& a) { return a.first; });
  out.original.clear();
  out.original.reserve(n);
  for (const auto& a : active) out.original.push_back(a.second);
  for (int64_t i = 0; i < n; ++i)
    if (!(sq[i] > 0)) out.original.push_back(i);
  out.label.resize(n);
  out.norm.resize(n);
  for (int64_t a = 0; a < n; ++a) {
    out.label[out.original[a]] = a;
    out.norm[a] = std::sqrt(sq[out.original[a]]);
  }
  out.cols.resize(nnz);
  out.vals.resize(nnz);
  out.entry.resize(nnz);
  // Each row's entries by new label, rows in parallel, each written to its own stretch: a row
  // short against n sorts its (label, place) keys; a longer one marks its labels in a bitmap of
  // the n labels and reads them back in order (n/64 words: cheaper than sorting past about n/256
  // entries; BatchTopK's outlier rows hold thousands). A counting sort of all the entries by label,
  // dealt to the rows in turn, took 3.5–5.5 ms serial at BatchTopK d_sae 16384–65536's block
  // steps, most of it reads and writes scattered over every row (benchmarks/NOTES.md, eighteenth
  // pass); per-row std::sort of pairs, 4.5 ms at d_sae 65536's initialisation.
  const int64_t words = (n + 63) / 64;
  at::parallel_for(0, m, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint64_t> keys, bits;
    std::vector<int64_t> place;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = rp[t], len = rp[t + 1] - b;
      auto put = [&](int64_t x, int64_t label, int64_t e) {
        out.cols[b + x] = label;
        out.vals[b + x] = vp[e];
        out.entry[b + x] = e;
      };
      if (len * 256 < n) {
        keys.resize(len);
        for (int64_t x = 0; x < len; ++x)
          keys[x] = static_cast<uint64_t>(out.label[cp[b + x]]) << 32 | static_cast<uint64_t>(x);
        std::sort(keys.begin(), keys.end());
        for (int64_t x = 0; x < len; ++x)
          put(x, static_cast<int64_t>(keys[x] >> 32), b + static_cast<int64_t>(keys[x] & 0xFFFFFFFFu));
        continue;
      }
      if (bits.empty()) {
        bits.assign(words, 0);
        place.resize(n);
      }
      for (int64_t e = b; e < b + len; ++e) {  // (a row's latents are distinct: one entry per label)
        const int64_t label = out.label[cp[e]];
        bits[label >> 6] |= uint64_t(1) << (label & 63);
        place[label] = e;
      }
      int64_t x = 0;
      for (int64_t w = 0; w < words && x < len; ++w)
        for (uint64_t word = bits[w]; word; word &= word - 1) {
          const int64_t label = w * 64 + __builtin_ctzll(word);
          put(x++, label, place[label]);
        }
      for (int64_t e = b; e < b + len; ++e) bits[out.label[cp[e]] >> 6] = 0;
    }
  });
  return out;
}

// Whether order_by_norm's bound applies: every value positive and finite (ReLU, TopK and
// BatchTopK latents).
template <typename acc_t>
bool all_positive(const acc_t* vp, int64_t nnz) {
  for (int64_t e = 0; e < nnz; ++e)
    if (!(vp[e] > acc_t(0) && std::isfinite(vp[e]))) return false;
  return true;
}

}  // namespace aosae

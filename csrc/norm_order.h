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
  // (sorted as (~bits of sq, latent) pairs: a positive double's bits order as its value does, so
  // this is the stable order by sq descending, with integer compares)
  std::vector<std::pair<uint64_t, int64_t>> active;
  for (int64_t i = 0; i < n; ++i)
    if (sq[i] > 0) {
      uint64_t bits;
      std::memcpy(&bits, &sq[i], sizeof(bits));
      active.emplace_back(~bits, i);
    }
  std::sort(active.begin(), active.end());
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
  // Each row's entries by new label: a counting sort of all the entries by label (row order kept
  // within a label), then each label's entries dealt to their rows in turn. Linear and serial; the
  // order took 4.5 ms with per-row sorts at BatchTopK d_sae 65536's initialisation (rows of up to
  // thousands).
  std::vector<int64_t> start(n + 1, 0), row_of(nnz);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t e = rp[t]; e < rp[t + 1]; ++e) {
      row_of[e] = t;
      ++start[out.label[cp[e]] + 1];
    }
  for (int64_t a = 0; a < n; ++a) start[a + 1] += start[a];
  std::vector<int64_t> by_label(nnz);
  for (int64_t e = 0; e < nnz; ++e) by_label[start[out.label[cp[e]]]++] = e;
  std::vector<int64_t> next(rp, rp + m);
  for (const int64_t e : by_label) {
    const int64_t d = next[row_of[e]]++;
    out.cols[d] = out.label[cp[e]];
    out.vals[d] = vp[e];
    out.entry[d] = e;
  }
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

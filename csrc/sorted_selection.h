// The ordered outputs of the sparse selection (csrc/gram_topk_sparse.cpp): the k best pairs in
// the contract's order (|value| desc, then (i, j) asc), padded to k slots or not. The pairs come
// from pairs_of(i, offer) for each row latent i (offer(value, i, j), j > i); the histogram has
// already named the k-th's bin (kth_bin): pairs above it are kept, the ones in it settled by an
// nth_element. float: one 64-bit sort key per kept pair and a radix sort; double: candidates
// and a sort. release_scratch() is called once the pairs have all been offered.

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "pair_select.h"

namespace aosae {

inline int selection_thread() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int selection_team() {  // the threads of the enclosing parallel region
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// The pairs of the k-th's bin (per-thread parts) whose |value| is at least the need-th best
// among them (need >= 1 when there are any): take(candidate) for each, ties at it included.
template <typename acc_t, typename Take>
void for_each_at_least_kth(const std::vector<std::vector<Candidate<acc_t>>>& parts, int64_t need, Take&& take) {
  auto each = [&](auto&& f) {
    for (const auto& part : parts)
      for (const auto& c : part) f(c);
  };
  bool any = false;
  for (const auto& part : parts) any |= !part.empty();
  if (!any) return;
  const acc_t kth = kth_magnitude<acc_t>(each, need);
  each([&](const Candidate<acc_t>& c) {
    if (std::abs(c.value) >= kth) take(c);
  });
}

template <typename acc_t, typename PairsOf, typename Release>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sorted_selection(
    PairsOf&& pairs_of, Release&& release_scratch, int64_t n, int64_t k, bool pad, const KthBin& kth_bin,
    const std::vector<int64_t>& hist_total, int threads, const torch::Tensor& vals_t) {
  using torch::Tensor;
  const int64_t bar = kth_bin.bin;
  if constexpr (std::is_same<acc_t, float>::value) {
    int key_bits = 1;
    while (key_bits < 63 && (uint64_t(1) << key_bits) < uint64_t(n) * uint64_t(n)) ++key_bits;
    if (key_bits + 32 <= 64) {
      // float: each kept pair goes straight to its 64-bit sort key (sort_key), no
      // 16-byte candidate and no copy of them (BatchTopK's block at d_sae 65536 keeps
      // 10.7 M of 40 M pairs: building, copying and converting candidates took 0.6 s).
      std::vector<std::vector<uint64_t>> sure_keys(threads);
      std::vector<std::vector<Candidate<acc_t>>> edge_pairs(threads);
#pragma omp parallel num_threads(threads)
      {
        auto& mine = sure_keys[selection_thread()];
        auto& edge = edge_pairs[selection_thread()];
        mine.reserve(kth_bin.above);
        if (bar >= 0) edge.reserve(hist_total[bar]);
        auto offer = [&](float v, int64_t i, int64_t j) {
          const int64_t bin = magnitude_bin(v);
          if (bin > bar) mine.push_back(sort_key(v, i * n + j, key_bits));
          else if (bin == bar) edge.push_back({v, i * n + j});
        };
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) pairs_of(i, offer);
      }
      release_scratch();
      std::vector<uint64_t> keys;
      if (threads == 1) {
        keys.swap(sure_keys[0]);
      } else {
        keys.reserve(kth_bin.above + (bar >= 0 ? hist_total[bar] : 0));
        for (auto& part : sure_keys) {
          keys.insert(keys.end(), part.begin(), part.end());
          std::vector<uint64_t>().swap(part);
        }
      }
      for_each_at_least_kth(edge_pairs, k - kth_bin.above,
                            [&](const Candidate<float>& c) { keys.push_back(sort_key(c.value, c.key, key_bits)); });
      radix_sort(keys);  // ties at the k-th score may leave more than k: (i, j) breaks them
      const int64_t kept = std::min<int64_t>(k, static_cast<int64_t>(keys.size()));
      const int64_t slots = pad ? k : kept;
      auto values = pad ? torch::zeros({slots}, vals_t.options()) : torch::empty({slots}, vals_t.options());
      auto rows = pad ? torch::full({slots}, -1, torch::kInt64) : torch::empty({slots}, torch::kInt64);
      auto cols = pad ? torch::full({slots}, -1, torch::kInt64) : torch::empty({slots}, torch::kInt64);
      float* ov = values.data_ptr<float>();
      int64_t* orow = rows.data_ptr<int64_t>();
      int64_t* ocol = cols.data_ptr<int64_t>();
      at::parallel_for(0, kept, 1 << 16, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          int64_t key;
          ov[p] = decode_sort_key(keys[p], key_bits, &key);
          orow[p] = key / n;
          ocol[p] = key % n;
        }
      });
      return {values, rows, cols};
    }
  }
  std::vector<std::vector<Candidate<acc_t>>> sure(threads), border(threads);
#pragma omp parallel num_threads(threads)
  {
    auto& mine = sure[selection_thread()];
    auto& edge = border[selection_thread()];
    // capacity only (untouched pages cost nothing): no regrowth while pushing
    mine.reserve(kth_bin.above);
    if (bar >= 0) edge.reserve(hist_total[bar]);
    auto offer = [&](acc_t v, int64_t i, int64_t j) {  // above the k-th bin: kept; in it: settled later
      const int64_t bin = magnitude_bin(v);
      if (bin > bar) mine.push_back({v, i * n + j});
      else if (bin == bar) edge.push_back({v, i * n + j});
    };
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) pairs_of(i, offer);
  }
  release_scratch();
  std::vector<Candidate<acc_t>> cand;
  cand.reserve(kth_bin.above + (bar >= 0 ? hist_total[bar] : 0));
  for (auto& part : sure) cand.insert(cand.end(), part.begin(), part.end());
  for_each_at_least_kth(border, k - kth_bin.above, [&](const Candidate<acc_t>& c) { cand.push_back(c); });
  // Ties at the k-th score may leave more than k: the contract order breaks them by (i, j).
  sort_candidates(cand, n, static_cast<size_t>(k));

  // Padded (gram_topk's contract): k slots, empty ones (0, -1, -1). Unpadded: min(k, pairs).
  const int64_t slots = pad ? k : static_cast<int64_t>(cand.size());
  auto values = torch::zeros({slots}, vals_t.options());
  auto rows = torch::full({slots}, -1, torch::kInt64);
  auto cols = torch::full({slots}, -1, torch::kInt64);
  acc_t* ov = values.data_ptr<acc_t>();
  int64_t* orow = rows.data_ptr<int64_t>();
  int64_t* ocol = cols.data_ptr<int64_t>();
  for (size_t p = 0; p < cand.size(); ++p) {
    ov[p] = cand[p].value;
    orow[p] = cand[p].key / n;
    ocol[p] = cand[p].key % n;
  }
  return {values, rows, cols};
}

}  // namespace aosae

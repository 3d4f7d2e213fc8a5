// The slot layout that the CPU backwards share (coactive_backward.cpp, topk_sum_backward.cpp):
// one slot per row pair (s < q) of the rows outside the GEMM block, filled latent by latent
// (each slot written once, by the thread that owns the smaller latent), then reduced row by
// row (each entry summed in a fixed order whatever the thread count: deterministic, no atomics).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "pair_select.h"  // Scratch

namespace aosae {

struct RowSlots {
  std::vector<int64_t> occ_ptr;  // [n+1]: latent i's entries in the slot rows are occ[occ_ptr[i] : occ_ptr[i+1]]
  std::vector<int64_t> occ;      // entry ids, in row order within each latent
  std::vector<int64_t> row_of;   // [nnz]: each slot-row entry's row
  std::vector<int64_t> slot0;    // [m+1]: each row's first slot; slot0[m] slots in all
  // first slot of entry e's pairs with the later entries of its row t: (e, e+1), (e, e+2), ..
  int64_t first(int64_t e, int64_t t, const int64_t* rp) const {
    const int64_t s0 = e - rp[t], L = rp[t + 1] - rp[t];
    return slot0[t] + s0 * L - s0 * (s0 + 1) / 2;
  }
};

// rows t with moved[t] (the block's) get no slots
inline RowSlots row_slots(const int64_t* rp, const int64_t* cols, const uint8_t* moved, int64_t m, int64_t n,
                          int64_t nnz) {
  RowSlots s;
  s.occ_ptr.assign(n + 1, 0);
  s.row_of.assign(nnz, 0);
  s.slot0.assign(m + 1, 0);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t e = rp[t]; e < rp[t + 1] && !moved[t]; ++e) ++s.occ_ptr[cols[e] + 1];
  for (int64_t i = 0; i < n; ++i) s.occ_ptr[i + 1] += s.occ_ptr[i];
  s.occ.resize(s.occ_ptr[n]);
  std::vector<int64_t> fill(s.occ_ptr.begin(), s.occ_ptr.end() - 1);
  for (int64_t t = 0; t < m; ++t) {
    const int64_t L = moved[t] ? 0 : rp[t + 1] - rp[t];
    s.slot0[t + 1] = s.slot0[t] + L * (L - 1) / 2;
    for (int64_t e = rp[t]; e < rp[t] + L; ++e) {
      s.occ[fill[cols[e]]++] = e;
      s.row_of[e] = t;
    }
  }
  return s;
}

// The slots, G [slot0[m]] (kept between calls: no zero fill, no faults; each is written once),
// and fill(i, row) for every latent i in parallel (dynamic: latents differ in work), row a
// thread's zeroed scratch of n values that fill must leave zeroed.
template <typename acc_t, typename Fill>
acc_t* fill_slots(const RowSlots& s, int64_t n, Fill&& fill) {
  const int64_t count = s.slot0.back();
  acc_t* G = Scratch<acc_t, 2>::get(static_cast<size_t>(count));
  if (count == 0) return G;
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    std::vector<acc_t> row(n, acc_t(0));
#pragma omp for schedule(dynamic, 64)
    for (int64_t i = 0; i < n; ++i) fill(i, G, row.data());
  }
  return G;
}

constexpr int64_t kPrefetchAhead = 4;  // runs fetched this many entries ahead

// to_grad for runs that hold the gradients already: read in place
struct NoConversion {};

// body(w, len, e, scratch) for each entry e of the rows without moved[t]: w = run_of(e, t), where
// entry e's run of pair values (its pairs with the row's len next entries, in order) starts;
// scratch: the thread's room for len values of acc_t. The rows are split between the threads,
// and each row's entries are visited in order by one of them. kPrefetch: the runs lie apart in
// memory.
template <typename acc_t, bool kPrefetch, typename RunOf, typename Body>
void for_each_run(RunOf&& run_of, const int64_t* rp, const uint8_t* moved, int64_t m, Body&& body) {
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch;
    for (int64_t t = begin; t < end; ++t) {
      if (moved[t]) continue;
      const int64_t e_end = rp[t + 1];
      scratch.resize(std::max<int64_t>(e_end - rp[t], 1));
      for (int64_t e = rp[t]; e + 1 < e_end; ++e) {
        const int64_t len = e_end - e - 1;
        const auto* w = run_of(e, t);
        if (kPrefetch && e + kPrefetchAhead + 1 < e_end) {
          const char* next = reinterpret_cast<const char*>(run_of(e + kPrefetchAhead, t));
          const int64_t bytes = (len - kPrefetchAhead) * static_cast<int64_t>(sizeof(*w));
          for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(next + at);
        }
        body(w, len, e, scratch.data());
      }
    }
  });
}

// o[e] += Σ_q G(e, q) · x[q] over e's row pairs, both ways round, for the rows without moved[t]
// (runs: for_each_run's). to_grad(w, run, len, e): writes the gradients the product takes into
// run (the runs hold scores); NoConversion: they hold the gradients already.
template <typename acc_t, bool kPrefetch = true, typename RunOf, typename ToGrad>
void add_pair_products(RunOf&& run_of, const int64_t* rp, const acc_t* x, const uint8_t* moved, int64_t m, acc_t* o,
                       ToGrad&& to_grad) {
  constexpr int64_t kLanes = 32 / sizeof(acc_t);  // (16 took longer to add up than to fill)
  for_each_run<acc_t, kPrefetch>(run_of, rp, moved, m, [&](const acc_t* w, int64_t len, int64_t e, acc_t* run) {
    const acc_t* gr = w;
    if constexpr (!std::is_same<std::decay_t<ToGrad>, NoConversion>::value) {
      to_grad(w, run, len, e);
      gr = run;
    }
    const acc_t xe = x[e];
    acc_t* oq = o + e + 1;
    const acc_t* xq = x + e + 1;
    // e's own sum in kLanes running sums (a single one chained every add on the last: the loop
    // ran scalar), added up in a fixed order: the same bits whatever the thread count
    acc_t lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= len; c += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        lanes[l] += gr[c + l] * xq[c + l];
        oq[c + l] += gr[c + l] * xe;
      }
    acc_t own = acc_t(0);
    for (; c < len; ++c) {
      own += gr[c] * xq[c];
      oq[c] += gr[c] * xe;
    }
    for (int64_t l = 0; l < kLanes; ++l) own += lanes[l];
    o[e] += own;
  });
}

// The same over the slots G of row_slots' layout, which hold the gradients.
template <typename acc_t>
void add_slot_products(const RowSlots& s, const acc_t* G, const int64_t* rp, const acc_t* x, const uint8_t* moved,
                       int64_t m, acc_t* o) {
  // (the slots of a row lie together: no prefetch)
  add_pair_products<acc_t, false>([&](int64_t e, int64_t t) { return G + s.first(e, t, rp); }, rp, x, moved, m, o,
                                  NoConversion());
}

}  // namespace aosae

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
#include "simd512.h"

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

// the cache lines of `bytes` from `at` on asked for (a run kPrefetchAhead entries ahead)
inline void prefetch_run(const void* at, int64_t bytes) {
  const char* first = static_cast<const char*>(at);
  for (int64_t x = 0; x < bytes; x += 64) __builtin_prefetch(first + x);
}

// to_grad for runs that hold the gradients already: read in place
struct NoConversion {};

// body(w, len, e, scratch) for each entry e of the rows without moved[t]: w = run_of(e, t), where
// entry e's run of pair values (its pairs with the row's len next entries, in order) starts;
// scratch: room for len values of acc_t (the rows' chunk's own). The rows are split between the threads,
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
        if (kPrefetch && e + kPrefetchAhead + 1 < e_end)
          prefetch_run(run_of(e + kPrefetchAhead, t), (len - kPrefetchAhead) * static_cast<int64_t>(sizeof(*w)));
        body(w, len, e, scratch.data());
      }
    }
  });
}

// An entry's own sum Σ_c G_c · xq[c] goes through kRunLanes lanes: lane l adds the products
// c ≡ l (mod kRunLanes) in order of c (a single running sum chained every add on the last: the
// loop ran scalar), then halving_sum adds the lanes pairwise. Every path (the AVX-512 one of
// csrc/topk_sum_backward.cpp too, a register of kRunLanes) rounds each product and then adds it,
// in this order: the row pass's bits depend neither on the thread count nor on the machine (with
// setup.py's -ffp-contract=off, which keeps the compiler from fusing a product into its add).
template <typename acc_t>
constexpr int64_t kRunLanes = 64 / static_cast<int64_t>(sizeof(acc_t));

template <typename acc_t>
acc_t halving_sum(acc_t* lanes) {  // lane l + w into lane l, w = kRunLanes / 2, / 4, .., 1
  for (int64_t w = kRunLanes<acc_t> / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) lanes[l] = lanes[l] + lanes[l + w];
  return lanes[0];
}

// oq[c] += G_c · xe for c < len, and the own sum Σ_c G_c · xq[c] returned (the order above)
template <typename acc_t>
acc_t run_product(const acc_t* gr, int64_t len, acc_t xe, const acc_t* xq, acc_t* oq) {
  constexpr int64_t kLanes = kRunLanes<acc_t>;
  acc_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += gr[c + l] * xq[c + l];
      oq[c + l] += gr[c + l] * xe;
    }
  for (int64_t l = 0; c + l < len; ++l) {
    lanes[l] += gr[c + l] * xq[c + l];
    oq[c + l] += gr[c + l] * xe;
  }
  return halving_sum(lanes);
}

#if defined(__x86_64__) || defined(__i386__)
// run_product's step on a register of gradients at c (valid: the lanes inside the run): the
// same rounding and order, so the same bits (csrc/topk_sum_backward.cpp's kept_run_product too)
template <typename acc_t>
__attribute__((target("avx512f"), always_inline)) inline void run_step(
    typename Simd512<acc_t>::V& own, typename Simd512<acc_t>::V grad, typename Simd512<acc_t>::M valid,
    const acc_t* xq, acc_t* oq, typename Simd512<acc_t>::V xe) {
  using S = Simd512<acc_t>;
  static_assert(S::kLanes == kRunLanes<acc_t>, "a register holds run_product's lanes");
  own = S::add(own, valid, own, S::mul(grad, S::load(valid, xq)));  // (lanes past the run: untouched)
  S::store(oq, valid, S::add(S::load(valid, oq), S::mul(grad, xe)));
}

// run_product a register at a time (the tail masked)
template <typename acc_t>
__attribute__((target("avx512f"))) acc_t run_product_avx512(const acc_t* gr, int64_t len, acc_t xe, const acc_t* xq,
                                                            acc_t* oq) {
  using S = Simd512<acc_t>;
  const auto vxe = S::set1(xe);
  auto own = S::zero();
  for (int64_t c = 0; c < len; c += S::kLanes) {
    const auto valid = S::first(len - c);
    run_step<acc_t>(own, S::load(valid, gr + c), valid, xq + c, oq + c, vxe);
  }
  return S::halving_sum(own);
}
#endif

// o[e] += Σ_q G(e, q) · x[q] over e's row pairs, both ways round, for the rows without moved[t]
// (runs: for_each_run's). to_grad(w, run, len, e): writes the gradients the product takes into
// run (the runs hold scores); NoConversion: they hold the gradients already. vectorised: the
// AVX-512 product where the machine has it (the same bits; false: the portable one, for tests).
template <typename acc_t, bool kPrefetch = true, typename RunOf, typename ToGrad>
void add_pair_products(RunOf&& run_of, const int64_t* rp, const acc_t* x, const uint8_t* moved, int64_t m, acc_t* o,
                       ToGrad&& to_grad, bool vectorised = true) {
  vectorised = vectorised && has_avx512();
  for_each_run<acc_t, kPrefetch>(run_of, rp, moved, m, [&](const acc_t* w, int64_t len, int64_t e, acc_t* run) {
    const acc_t* gr = w;
    if constexpr (!std::is_same<std::decay_t<ToGrad>, NoConversion>::value) {
      to_grad(w, run, len, e);
      gr = run;
    }
#if defined(__x86_64__) || defined(__i386__)
    if (vectorised) {
      o[e] += run_product_avx512(gr, len, x[e], x + e + 1, o + e + 1);
      return;
    }
#endif
    o[e] += run_product(gr, len, x[e], x + e + 1, o + e + 1);
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

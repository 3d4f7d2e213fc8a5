// The latent-major view of CSR rows that the summing loops read (csrc/coactive_pairs.h,
// csrc/bracketed_sum.h): latent i's entries in row order, each with the end of its row, and
// where i's row pairs (its entries with their rows' later entries) start in a per-pair stream.

#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "sorted_selection.h"  // selection_thread, selection_team

namespace aosae {

struct Occurrences {
  std::vector<int64_t> ptr;          // [n+1]: latent i's entries are entry[ptr[i] .. ptr[i+1])
  std::vector<int64_t> entry, end;   // the entry e, and the end of its row
  std::vector<int64_t> pairs_start;  // [n+1]: latent i's row pairs from here (each latent's count rounded up to align)
};

// o filled from the rows; rows t with moved[t] (the GEMM block's) are left out. o's lists keep
// their room: at the same nnz as its last fill, entry and end are neither mapped nor zeroed again.
inline void fill_occurrences(Occurrences& o, const int64_t* rp, const int64_t* cp, const uint8_t* moved, int64_t m,
                             int64_t n, int64_t nnz, int threads, int64_t align = 1) {
  o.ptr.assign(n + 1, 0);
  o.pairs_start.assign(n + 1, 0);
  // Each thread counts and places the entries of its own range of latents, reading every row: the
  // scattered counts and writes are split between the threads, and each latent's entries stay in
  // row order (serial, this was 1 ms of TopK d_sae 16384's forward)
#pragma omp parallel num_threads(nnz >= 8192 ? threads : 1)  // (fewer entries: waking a team costs more)
  {
    const int64_t id = selection_thread(), parts = selection_team();
    const int64_t lo = n * id / parts, hi = n * (id + 1) / parts;
    for (int64_t t = 0; t < m; ++t) {
      if (moved[t]) continue;
      for (int64_t e = rp[t]; e < rp[t + 1]; ++e) {
        const int64_t i = cp[e];
        if (i < lo || i >= hi) continue;
        ++o.ptr[i + 1];
        o.pairs_start[i + 1] += rp[t + 1] - e - 1;
      }
    }
#pragma omp barrier
#pragma omp single
    {
      for (int64_t i = 0; i < n; ++i) {
        o.ptr[i + 1] += o.ptr[i];
        o.pairs_start[i + 1] = o.pairs_start[i] + (o.pairs_start[i + 1] + align - 1) / align * align;
      }
      o.entry.resize(o.ptr[n]);
      o.end.resize(o.ptr[n]);
    }
    std::vector<int64_t> fill(o.ptr.begin() + lo, o.ptr.begin() + hi);
    for (int64_t t = 0; t < m; ++t) {
      if (moved[t]) continue;
      for (int64_t e = rp[t]; e < rp[t + 1]; ++e) {
        const int64_t i = cp[e];
        if (i < lo || i >= hi) continue;
        const int64_t f = fill[i - lo]++;
        o.entry[f] = e;
        o.end[f] = rp[t + 1];
      }
    }
  }
}

inline Occurrences occurrences(const int64_t* rp, const int64_t* cp, const uint8_t* moved, int64_t m, int64_t n,
                               int64_t nnz, int threads, int64_t align = 1) {
  Occurrences o;
  fill_occurrences(o, rp, cp, moved, m, n, nnz, threads, align);
  return o;
}

// The calling thread's Occurrences, kept between calls (the bracketed sum's: its 2 × nnz int64
// lists, fresh each call, were zeroed and, inside a training step, faulted in again), given up
// when a call leaves them larger than kKeepBytes
struct KeptOccurrences {
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  Occurrences& lists = of_this_thread();
  ~KeptOccurrences() {
    const size_t room =
        lists.entry.capacity() + lists.end.capacity() + lists.ptr.capacity() + lists.pairs_start.capacity();
    if (room * sizeof(int64_t) > kKeepBytes) lists = Occurrences();
  }

 private:
  static Occurrences& of_this_thread() {
    thread_local Occurrences kept;
    return kept;
  }
};

// cp [nnz] as narrower latent ids T: the summing loops read the rows' ids at random rows, and as
// uint16 (n <= 65536) they and the values stay in L2 where int64 ids spilled; int32 past that
// (the sixteen-lane passes index in 32 bits)
template <typename T>
std::vector<T> narrowed_latents(const int64_t* cp, int64_t nnz) {
  std::vector<T> out(nnz);
  at::parallel_for(0, nnz, 16384, [&](int64_t a, int64_t b) {
    for (int64_t e = a; e < b; ++e) out[e] = static_cast<T>(cp[e]);
  });
  return out;
}

}  // namespace aosae

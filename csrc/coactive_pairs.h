// The co-active pairs of CSR rows, summed but not yet selected (csrc/gram_topk_sparse.cpp's
// first stage): the densest rows' pairs in one GEMM block over the latents they touch
// (csrc/dense_rows.h), every other pair in its smaller latent's bucket (Gustavson, each C_ij
// summed in row order whatever the thread count; float: sixteen pairs at a time,
// csrc/gustavson_avx512.h), and a histogram of their |C| (csrc/pair_select.h). Cosine: each C_ij
// divided by the two column norms. The buckets live in per-thread Scratch slots 0 and 1 until the
// caller trims them.

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "block_staircase.h"
#include "dense_rows.h"
#include "pair_select.h"
#include "recomputed_block.h"
#include "buffer_pool.h"
#include "gustavson_avx512.h"
#include "occurrences.h"
#include "sorted_selection.h"  // selection_thread, selection_team

namespace aosae {

template <typename acc_t>
struct CoactivePairs {
  DenseRows<acc_t> dense;             // the block (dense.block: its scores, upper triangle; undefined with rows)
  std::vector<int64_t> bucket_start;  // [n+1]: latent i's bucket starts here
  std::vector<int64_t> distinct;      // [n]: its distinct partners (pj, pv from bucket_start[i])
  std::vector<int64_t> kept;          // [n]: those plus its non-zero block pairs (stored block only)
  std::vector<int64_t> hist_total;    // [kMagnitudeBins]: the non-zero pairs by |C| bin (with rows: the buckets')
  int64_t nonzero_pairs = 0;
  int32_t* pj = nullptr;              // partner ids
  acc_t* pv = nullptr;                // their scores
  std::vector<int64_t> live_end;      // [u] or empty: block row p holds pairs (p, q < live_end[p]) only
  double staircase_floor = 0;         // > 0: every pair past live_end scores below it (the caller checks the k-th)
  bool staircase_second_look = false;  // that floor is the second look's (csrc/block_staircase.h)
  RecomputedBlock<acc_t> rows;        // the block's scores where it is not stored (width 0 otherwise)
  torch::Tensor pair_scores;          // asked for: every row pair's C_ij, entry e's pairs with its row's later
  torch::Tensor pair_runs;            // entries from pair_scores[pair_runs[e]] on ([nnz] int64; moved rows: -1)
  int64_t row_end(int64_t p) const { return live_end.empty() ? dense.size() : live_end[p]; }
  // latent i's non-zero pairs (i, j > i), from its bucket and its stored block row (not with rows): offer(value, i, j)
  // (the key i·n + j is formed where it is needed: dividing it back cost 2 divisions per pair)
  template <typename Offer>
  void pairs_of(int64_t i, Offer&& offer) const {
    const int64_t b = bucket_start[i];
    for (int64_t u = 0; u < distinct[i]; ++u) offer(pv[b + u], i, static_cast<int64_t>(pj[b + u]));
    const int64_t pi = dense.position[i];
    if (pi < 0) return;
    const acc_t* row = dense.block.template data_ptr<acc_t>() + pi * dense.size();
    for (int64_t q = pi + 1; q < row_end(pi); ++q)
      if (row[q] != acc_t(0)) offer(row[q], i, dense.latents[q]);
  }
};

// rows: row_ptr rp [m+1], cols cp ascending within each row in [0, n), vals vp. recompute: the
// block is not stored (the sum of the k best, csrc/topk_sum.h): `rows` recomputes its scores
// where they are read, the pairs inside U × U are neither in the buckets nor in the histogram,
// and with norm (the columns' norms, non-increasing in latent order: csrc/norm_order.h; positive
// values, dot) and k only the staircase of pairs that can be among the k best is live
// (csrc/block_staircase.h, reach: its samples' margins; the caller checks that the k-th best
// score is at least staircase_floor). pair_scores (with recompute): every pair (s, q), s < q, of the rows
// outside the block gets its summed score written out (in bucket order, one stream; pairs inside
// U × U: the recomputed block's score, 0 past the staircase), so that the backward reads the
// scores instead of summing them again.
template <typename acc_t>
CoactivePairs<acc_t> coactive_pairs(const int64_t* rp, const int64_t* cp, const acc_t* vp, int64_t m, int64_t n,
                                    int64_t nnz, bool cosine, int threads, bool recompute = false,
                                    const std::vector<double>* norm = nullptr, int64_t k = 0,
                                    bool pair_scores = false, StaircaseReach reach = {}) {
  TORCH_CHECK(!pair_scores || (recompute && !cosine), "coactive_pairs: pair scores are for the recomputed dot sum");
  CoactivePairs<acc_t> out;
  // Cosine: divide each reduced C_ij by the column norms (over all rows; zeros add 0).
  std::vector<acc_t> inv_norm;
  if (cosine) {
    std::vector<acc_t> sq(n, acc_t(0));
    for (int64_t e = 0; e < nnz; ++e) sq[cp[e]] += vp[e] * vp[e];
    inv_norm.resize(n);
    for (int64_t i = 0; i < n; ++i) inv_norm[i] = sq[i] > acc_t(0) ? acc_t(1) / std::sqrt(sq[i]) : acc_t(0);
  }

  // The densest rows (outlier tokens) go to one GEMM block over the latents they touch.
  out.dense = plan_dense_rows<acc_t>(rp, cp, vp, m, n, block_cost(recompute), !recompute);
  if (recompute) {
    out.rows = RecomputedBlock<acc_t>(out.dense, rp, cp, vp, m);
    if (norm != nullptr && out.dense.size() > 0) {
      std::vector<double> s(out.dense.size());
      for (int64_t p = 0; p < out.dense.size(); ++p) s[p] = (*norm)[out.dense.latents[p]];
      Staircase stairs = block_staircase(out.rows, m, s, k, reach);
      if (stairs.floor > 0) {
        out.live_end = std::move(stairs.end);
        out.staircase_floor = stairs.floor;
        out.staircase_second_look = stairs.second_look;
      }
    }
  }
  const DenseRows<acc_t>& dense = out.dense;
  const uint8_t* moved = dense.moved.data();
  const int32_t* position = dense.position.data();
  const int64_t* block_latent = dense.latents.data();
  const int64_t width = dense.size();
  acc_t* block = width > 0 && !recompute ? dense.block.template data_ptr<acc_t>() : nullptr;

  // Latent-major view of the other rows (CSC): latent i's entries in row order, each with the
  // end of its row. Row i of C is then summed where it is needed (Gustavson): for each entry
  // of i, its row's later entries j > i add a_ti·a_tj into a dense accumulator of n slots, and
  // the distinct j are listed in bucket i. Only the distinct pairs go to memory (and, kept for the
  // backward, every row pair's score): the rows (6–12 B per entry in float32) stay in cache, and
  // each C_ij is summed in row order whatever the thread count.
  // bucket_start[i]: first slot of bucket i, sized by its row pairs (an upper bound on its partners)
  Occurrences occ_lists = occurrences(rp, cp, moved, m, n, nnz, threads);
  const std::vector<int64_t>& occ_ptr = occ_lists.ptr;
  const std::vector<int64_t>& occ = occ_lists.entry;
  const std::vector<int64_t>& occ_end = occ_lists.end;
  std::vector<int64_t>& bucket_start = out.bucket_start;
  bucket_start = std::move(occ_lists.pairs_start);
  const int64_t pairs = bucket_start[n];
  int32_t* pj = out.pj = Scratch<int32_t, 0>::get(pairs);
  acc_t* pv = out.pv = Scratch<acc_t, 1>::get(pairs);
  acc_t* score_out = nullptr;
  int64_t* run_out = nullptr;
  if (pair_scores) {
    out.pair_scores = empty_pooled(pairs, std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat);
    out.pair_runs = at::full({nnz}, -1, at::TensorOptions().dtype(at::kLong));
    score_out = out.pair_scores.template data_ptr<acc_t>();
    run_out = out.pair_runs.template data_ptr<int64_t>();
  }

  // Per latent i: sum its row pairs into the accumulator; then list the distinct non-zero
  // (j, C_ij) in bucket i in the order of their first row pair and count them in the thread's |C|
  // histogram.
  std::vector<int64_t>& distinct = out.distinct;
  std::vector<int64_t>& kept = out.kept;
  distinct.assign(n, 0);
  kept.assign(n, 0);  // kept: distinct + the block row's non-zeros
  // sized here, not in the region: a smaller team than asked for leaves some unused
  // four interleaved counts per thread: consecutive pairs often share a bin, and one count would
  // chain every increment on the one before (its hottest instruction at TopK d_sae 16384)
  constexpr int64_t kStripes = 4;
  std::vector<std::vector<uint32_t>>& hists = ZeroedCounts<uint32_t, 0>::lend(threads, kStripes * kMagnitudeBins);
  // The loop reads the rows' cols at random rows: as uint16 (n <= 65536) they and the values, 6 B
  // per entry (0.8 MB at TopK B 2048, L 64), stay in a 1 MB L2, where int64 cols spilled
  // (0.2–0.64 ms of TopK d_sae 16384's forward, benchmarks/NOTES.md, thirteenth pass). Past 65536
  // latents: int32 for float (the sixteen-lane passes' indices), int64 for double.
  auto sum_latents = [&](const auto* cols) {
    using col_t = std::remove_cv_t<std::remove_pointer_t<decltype(cols)>>;
    constexpr bool kSimdPasses = std::is_same<acc_t, float>::value && !std::is_same<col_t, int64_t>::value;
    const bool simd = kSimdPasses && has_avx512_bw_vl();
#pragma omp parallel num_threads(threads)
    {
      std::vector<acc_t> acc(n, acc_t(0));
      uint32_t* hist = hists[selection_thread()].data();
#pragma omp for schedule(dynamic, 64)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = bucket_start[i];
        const int64_t pi = position[i];
        acc_t* block_row = pi >= 0 && block ? block + pi * width : nullptr;
        const int64_t row_end = pi >= 0 ? out.row_end(pi) : 0;
        int64_t o = b;  // (the pairs so far: where an occurrence's run of scores starts)
        // a partner is listed in bucket i where the accumulator is touched while 0 (its first pair;
        // a sum that returns to exactly 0 lists it again, and that copy reads 0 below and is dropped)
        int64_t touched = b;
        bool returned = false;  // the sixteen-lane adds saw a sum at exactly 0 (its partner may be listed twice)
        auto add = [&](int64_t j, acc_t product) {
          const acc_t before = acc[j];
          pj[touched] = static_cast<int32_t>(j);
          touched += before == acc_t(0);
          acc[j] = before + product;
        };
        for (int64_t u = occ_ptr[i]; u < occ_ptr[i + 1]; ++u) {
          const int64_t s = occ[u], end = occ_end[u];
          const acc_t vi = vp[s];
          if (run_out) run_out[s] = o;
          o += end - s - 1;
          if (pi >= 0) {  // pairs inside U × U join the block (row pi is this latent's alone)
            for (int64_t q = s + 1; q < end; ++q) {
              const int64_t j = cols[q];
              const int32_t pj_block = position[j];
              if (pj_block >= 0) {  // (recomputed: rows adds them; past row_end: below the k-th score)
                if (block_row && pj_block < row_end) block_row[pj_block] += vi * vp[q];
              } else {
                add(j, vi * vp[q]);
              }
            }
          } else {
#if defined(__x86_64__) || defined(__i386__)
            if constexpr (kSimdPasses) {
              if (simd) {
                touched = gustavson::add_run(acc.data(), cols + s + 1, vp + s + 1, end - s - 1, vi, pj, touched, returned);
                continue;
              }
            }
#endif
            for (int64_t q = s + 1; q < end; ++q) add(cols[q], vi * vp[q]);
          }
        }
        if (score_out) {
          // every row pair's score, a plain gather: each occurrence's partners are its row's later
          // entries, cols[s + 1 .. end), in cache (a byte per latent marking the listed ones, tested
          // and set at every row pair, was most of this pass at TopK d_sae 16384)
          acc_t* g = score_out + b;
          const acc_t* listed = pi >= 0 ? out.rows.listed_scores(pi) : nullptr;
          for (int64_t u = occ_ptr[i]; u < occ_ptr[i + 1]; ++u) {
            const int64_t s = occ[u], end = occ_end[u];
            if (pi < 0) {
#if defined(__x86_64__) || defined(__i386__)
              if constexpr (kSimdPasses) {
                if (simd) {
                  gustavson::gather_run(acc.data(), cols + s + 1, end - s - 1, g);
                  g += end - s - 1;
                  continue;
                }
              }
#endif
              for (int64_t q = s + 1; q < end; ++q) *g++ = acc[cols[q]];
              continue;
            }
            for (int64_t q = s + 1; q < end; ++q) {  // pairs inside U × U: the block's score (acc holds 0)
              const int64_t j = cols[q];
              const int32_t pq = position[j];
              if (pq < 0) {
                *g++ = acc[j];
              } else {  // the corrections of block row pi, met in the order they were listed
                const acc_t v = *listed++;
                *g++ = pq < row_end ? v : acc_t(0);
              }
            }
          }
        }
        // the listed partners' sums, the accumulator cleared, the non-zero ones kept (in place: w <= read)
        const acc_t scale = cosine ? inv_norm[i] : acc_t(1);
        int64_t w = b, read = b;  // (read: the listed partners read so far)
#if defined(__x86_64__) || defined(__i386__)
        // (not where a partner may be listed twice, nor with cosine's scaling; not for a block latent,
        // whose scalar adds do not watch for a sum back at 0)
        if constexpr (kSimdPasses) {
          if (simd && pi < 0 && !cosine && !returned) {
            w = gustavson::list_run(acc.data(), pj, pv, b, touched);
            read = touched;
          }
        }
#endif
        for (; read < touched; ++read) {
          const int32_t j = pj[read];
          acc_t v = acc[j];
          acc[j] = acc_t(0);
          if (cosine) v = v * scale * inv_norm[j];
          pj[w] = j;
          pv[w] = v;
          w += v != acc_t(0);
        }
        int64_t x = b;
        for (; x + kStripes <= w; x += kStripes)
          for (int64_t r = 0; r < kStripes; ++r) ++hist[r * kMagnitudeBins + magnitude_bin(pv[x + r])];
        for (; x < w; ++x) ++hist[magnitude_bin(pv[x])];
        distinct[i] = w - b;
        kept[i] = w - b;
        if (block_row) {  // the block's upper triangle: U ascending, so j > i is p > pi
          int64_t nonzero = 0;
          for (int64_t p = pi + 1; p < row_end; ++p) {
            acc_t v = block_row[p];
            if (cosine) {  // (dot: no write back: the block is ~u²/2 entries, 76 MB at u 6168)
              v = v * scale * inv_norm[block_latent[p]];
              block_row[p] = v;
            }
            hist[magnitude_bin(v)] += v != acc_t(0);
            nonzero += v != acc_t(0);
          }
          kept[i] += nonzero;
        }
      }
    }
  };
  if (n <= 65536) {
    sum_latents(narrowed_latents<uint16_t>(cp, nnz).data());
  } else if (std::is_same<acc_t, float>::value && n <= INT32_MAX) {  // (the sixteen-lane passes index in 32 bits)
    sum_latents(narrowed_latents<int32_t>(cp, nnz).data());
  } else {
    sum_latents(cp);
  }

  std::vector<int64_t>& hist_total = out.hist_total;
  hist_total.assign(kMagnitudeBins, 0);
  at::parallel_for(0, kMagnitudeBins, 4096, [&](int64_t b0, int64_t b1) {  // (counts: any order)
    for (int64_t r = 0; r < kStripes; ++r) {
      const int64_t stripe = r * kMagnitudeBins;
      ZeroedCounts<uint32_t, 0>::drain(hists, stripe + b0, stripe + b1,
                                       [&](int64_t x, uint32_t c) { hist_total[x - stripe] += c; });
    }
  });
  ZeroedCounts<uint32_t, 0>::give_back();
  for (const int64_t h : hist_total) out.nonzero_pairs += h;
  return out;
}

}  // namespace aosae

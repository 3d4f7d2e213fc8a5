// The few dense rows of a sparse activation matrix, handled by GEMMs (sparse CPU backend).
//
// Real ReLU SAE batches are sparse except for a few outlier tokens (massive-activation tokens
// fire on thousands of latents): at d_sae 16384, mean L0 86, the 50 densest of 2048 rows hold
// 95 % of the Σ_t L0_t²/2 co-active pairs. Emitting those pairs one by one costs ~10 ns each;
// their sum over the rows is a rank-h product A_Hᵀ A_H over the latents they touch (U, |U| = u),
// which a GEMM does at ~0.01 ns per multiply-add. The sparse backend then reduces the other
// rows' pairs as usual and adds the ones that fall inside U × U to this u × u block.
//
// plan_dense_rows picks how many of the densest rows to move (by a cost model, possibly none)
// and computes the block. Exact: every pair is still summed, only in a different place.

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "block_product.h"
#include "buffer_pool.h"

namespace aosae {

// Cost model (ns, 2-core AMD EPYC; see benchmarks/NOTES.md): a co-active pair through the
// per-latent (Gustavson) path, a multiply-add of the block's product, an entry of the u × u block
// (written once, scanned three times). Calibrated when an MKL GEMM wrote the whole block; the
// block's own product (csrc/block_product.h) writes the upper triangle at about the same cost
// per multiply-add, so the block's side is overstated (rows move a little late).
struct DenseRowCost {
  double pair = 8.0;
  double mac = 0.012;
  double entry = 1.5;
  double fixed = 0.0;       // per entry of the rows, once there is a block at all
  double correction = 0.0;  // per pair of another row inside U × U (counted for each prefix of the rows)
  bool stored = true;       // the block is stored (u² accumulators), which bounds its width (block_fits)
};

// The cost model of a block: the stored one's (the selection), or with recomputed the sum of the
// k best's (csrc/topk_sum.h), whose block is recomputed where it is read (csrc/recomputed_block.h)
// and whose latents are relabelled by norm once it exists. That one was fitted to its forward +
// backward on BatchTopK d_sae 16384 batches from steps 0–60 (benchmarks/NOTES.md, fourteenth
// pass): a row pair costs ≈ 2.2 ns through the buckets; the block, ≈ 45 ns per entry of the rows
// (the norm order and the block's build) and ≈ 80 ns per correction (listed, sorted, looked up,
// as they were then), so mid-training, where 24 rows of ≤ 700 latents hold 1.5·10⁶ of 6.3·10⁶
// row pairs, it cost 31 ms against 19 ms without it; with the corrections' scores computed once
// and their lists counting-sorted, 25 against 19 ms there, and 23.4 against 22.6 ms at step 50.
// A correction is counted at that cost instead of a row pair's (it never reaches the buckets),
// for every prefix of the moved rows (benchmarks/NOTES.md, twentieth pass).
inline DenseRowCost block_cost(bool recomputed) {
  DenseRowCost c;
  if (!recomputed) return c;
  c.pair = 2.2;
  c.mac = 0.0065;  // per h·u²: the staircase's h multiply-adds per pair, read about twice
  c.entry = 0.0;
  c.fixed = 45.0;
  c.correction = 80.0;
  c.stored = false;
  return c;
}

// Rows below this L0 never move: their pairs are cheap and they would widen U.
constexpr int64_t kMinDenseRowL0 = 128;
// Largest block: u² accumulators, at most 1 GiB (16384² float32; 11585² float64). BatchTopK
// at initialisation puts the batch's B·k entries on a few dozen tokens (d_sae 262144, B 2048,
// k 64: 28 rows, u = 12381, 5·10⁸ row pairs): their pairs fill most of U × U, so the block's
// 4 B per pair is below what the caller's output of those pairs takes anyway (20–36 B).
constexpr int64_t kMaxDenseLatents = 16384;
constexpr int64_t kMaxDenseBlockBytes = int64_t(1) << 30;
// Past that, a block is allowed while it takes no more memory than the pair path would for the
// row pairs it replaces: a partner id and a score in the forward's buckets and a gradient slot
// in the backward, 4 + 2·sizeof(acc_t) bytes per row pair. BatchTopK mid-training at d_sae 262144
// has one token on every one of the batch's 22 897 active latents: 2.6·10⁸ row pairs, 3.1 GB on
// the pair path (and ≈ 8 ns each), 2.1 GB as a block (a GEMM and a few scans). A block that is
// not stored (the sum of the k best's) is held to its kept bits instead (block_fits). Never past 2¹⁶.
constexpr int64_t kMaxDenseLatentsHard = int64_t(1) << 16;

template <typename acc_t>
constexpr int64_t max_dense_latents() {
  return sizeof(acc_t) <= 4 ? kMaxDenseLatents : 11585;  // floor(sqrt(kMaxDenseBlockBytes / 8))
}

// The pair path's memory per row pair: a partner id and a score in the buckets, a gradient slot.
template <typename acc_t>
constexpr double pair_path_bytes() {
  return 4.0 + 2.0 * sizeof(acc_t);
}

// Whether a block over u latents may replace the pair path for `row_pairs` row pairs. A block
// that is not stored (the sum of the k best recomputes it where it is read, csrc/recomputed_block.h)
// keeps at most a bit per pair of it (csrc/block_bits.h) instead of u² accumulators: with the
// stored block's bound, BatchTopK d_sae 262144 35 steps from initialisation left out a token of
// 12 685 latents that would have widened the block from 25 849 to 30 951 latents (0.1 % past the
// bound), and its 4.6·10⁷ pairs inside U × U, priced as corrections, kept the whole batch off the
// block (forward + backward 1.5–1.7 s against 0.44–0.67 s; benchmarks/NOTES.md, twenty-fifth pass).
template <typename acc_t>
inline bool block_fits(double u, double row_pairs, bool stored = true) {
  if (u <= max_dense_latents<acc_t>()) return true;
  const double bytes = stored ? u * u * sizeof(acc_t) : u * u / 16;
  return u <= kMaxDenseLatentsHard && bytes <= pair_path_bytes<acc_t>() * row_pairs;
}

template <typename acc_t>
struct DenseRows {
  std::vector<uint8_t> moved;     // [m]: 1 for a row handled by the block
  std::vector<int32_t> position;  // [n]: index of a latent in U, or -1
  std::vector<int64_t> latents;   // U, ascending (so position order is latent order)
  std::vector<int64_t> taken;     // the moved rows, densest first (A_H's row order)
  torch::Tensor block;            // [u, u] acc_t: Σ over moved rows of a_ti·a_tj (upper triangle), pooled
  int64_t size() const { return static_cast<int64_t>(latents.size()); }
  DenseRows() = default;
  DenseRows(DenseRows&&) = default;
  DenseRows& operator=(DenseRows&&) = default;
  DenseRows(const DenseRows&) = delete;
  DenseRows& operator=(const DenseRows&) = delete;
};

// A_H [h, u]: the moved rows (in the plan's order, which fixes the GEMM's order of summation)
// over the block's latents.
template <typename acc_t>
torch::Tensor moved_rows_matrix(const DenseRows<acc_t>& plan, const int64_t* rp, const int64_t* cp, const acc_t* vp) {
  const int64_t width = plan.size(), h = static_cast<int64_t>(plan.taken.size());
  const auto dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  torch::Tensor dense = at::zeros({h, width}, at::TensorOptions().dtype(dtype));
  acc_t* d = dense.data_ptr<acc_t>();
  for (int64_t r = 0; r < h; ++r) {
    const int64_t t = plan.taken[r];
    for (int64_t e = rp[t]; e < rp[t + 1]; ++e) d[r * width + plan.position[cp[e]]] = vp[e];
  }
  return dense;
}

// block[p, q] = (A_Hᵀ A_H)[p, q] for q in [first[p], last[p]) (csrc/block_product.h); the rest of
// the block is left as it was (stale or uninitialised: only the upper triangle is ever read).
template <typename acc_t>
void fill_block(DenseRows<acc_t>& plan, const torch::Tensor& dense, const std::vector<int64_t>& first,
                const std::vector<int64_t>& last) {
  block_product<acc_t>(dense.data_ptr<acc_t>(), dense.size(0), plan.size(), plan.block.template data_ptr<acc_t>(),
                       plan.size(), first, last);
}

// The corrections after each of the first `through` prefixes of the rows taken (corrections[h - 1]:
// the first h), from each latent's entry into U (enter[i]: the index of the first row taken that
// holds it): Σ over the rows s not among the first h of C(|s ∩ U_h|, 2), counted latent by latent
// as U grows, through a CSC of every entry (each latent's rows).
inline std::vector<int64_t> corrections_after_each(const int64_t* rp, const int64_t* cp, int64_t m, int64_t n,
                                                   const int32_t* enter, const std::vector<int64_t>& taken,
                                                   int64_t through) {
  if (through == 0) return {};
  std::vector<int64_t> latent_start(n + 1, 0), latent_rows(rp[m]), inside(m, 0);
  std::vector<uint8_t> is_moved(m, 0);
  for (int64_t e = 0; e < rp[m]; ++e) ++latent_start[cp[e] + 1];
  for (int64_t i = 0; i < n; ++i) latent_start[i + 1] += latent_start[i];
  std::vector<int64_t> next(latent_start.begin(), latent_start.end() - 1);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t e = rp[t]; e < rp[t + 1]; ++e) latent_rows[next[cp[e]]++] = t;
  std::vector<int64_t> corrections(through);
  int64_t count = 0;
  for (int64_t h = 0; h < through; ++h) {
    const int64_t t = taken[h];
    for (int64_t e = rp[t]; e < rp[t + 1]; ++e) {
      const int64_t i = cp[e];
      if (enter[i] != static_cast<int32_t>(h)) continue;  // (in U already)
      for (int64_t x = latent_start[i]; x < latent_start[i + 1]; ++x) {
        const int64_t s = latent_rows[x];  // latent i pairs with row s's latents already in U
        if (!is_moved[s]) count += inside[s];
        ++inside[s];
      }
    }
    is_moved[t] = 1;  // row t's pairs are the block's own now
    count -= inside[t] * (inside[t] - 1) / 2;
    corrections[h] = count;
  }
  return corrections;
}

// with_block = false: the plan only (moved rows, U), for callers that build their own product
// over the moved rows (coactive_topk's backward).
template <typename acc_t>
DenseRows<acc_t> plan_dense_rows(const int64_t* rp, const int64_t* cp, const acc_t* vp, int64_t m, int64_t n,
                                 const DenseRowCost& cost = DenseRowCost(), bool with_block = true) {
  DenseRows<acc_t> out;
  out.moved.assign(m, 0);
  out.position.assign(n, -1);
  std::vector<int64_t> order;
  double total_pairs = 0;
  for (int64_t t = 0; t < m; ++t) {
    const double L = static_cast<double>(rp[t + 1] - rp[t]);
    total_pairs += L * (L - 1) / 2;
    if (rp[t + 1] - rp[t] >= kMinDenseRowL0) order.push_back(t);
  }
  if (order.empty()) return out;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return rp[x + 1] - rp[x] > rp[y + 1] - rp[y]; });
  // Grow the moved set densest first, skipping a row that would widen U past the largest block
  // (one token on more latents than that, as BatchTopK has mid-training at d_sae 262144, must
  // not keep the other dense rows out of the block); keep the cheapest prefix of the rows taken.
  // The rows taken and U's size after each do not depend on the cost: they come first.
  // enter[i]: the first row taken that holds latent i (its index among those taken), or kNever
  constexpr int32_t kNever = std::numeric_limits<int32_t>::max();
  std::vector<int32_t> enter(n, kNever);
  std::vector<int64_t> taken, width;     // width[h - 1]: |U| over the first h rows taken
  std::vector<double> moved_pairs_after;  // moved_pairs_after[h - 1]: their row pairs
  double u = 0, moved_pairs = 0;
  for (const int64_t t : order) {
    int64_t fresh = 0;  // latents of row t not in U yet (a row's latents are distinct)
    for (int64_t e = rp[t]; e < rp[t + 1]; ++e) fresh += enter[cp[e]] == kNever;
    const double L = static_cast<double>(rp[t + 1] - rp[t]);
    if (!block_fits<acc_t>(u + fresh, moved_pairs + L * (L - 1) / 2, cost.stored)) continue;
    const int32_t h = static_cast<int32_t>(taken.size());  // (< m / kMinDenseRowL0 rows taken)
    for (int64_t e = rp[t]; e < rp[t + 1]; ++e)
      if (enter[cp[e]] == kNever) enter[cp[e]] = h;
    u += fresh;
    moved_pairs += L * (L - 1) / 2;
    taken.push_back(t);
    width.push_back(static_cast<int64_t>(u));
    moved_pairs_after.push_back(moved_pairs);
  }
  const double none_cost = cost.pair * total_pairs, fixed_cost = cost.fixed * static_cast<double>(rp[m]);
  auto cost_of = [&](int64_t h, double corrections) {  // the first h rows taken
    const double w = static_cast<double>(width[h - 1]);
    return cost.pair * (total_pairs - moved_pairs_after[h - 1] - corrections) + cost.correction * corrections +
           cost.mac * static_cast<double>(h) * w * w + cost.entry * w * w + fixed_cost;
  };
  // With a cost per correction (the other rows' pairs inside U × U), a correction dearer than the
  // row pair it replaces only adds to a prefix's cost: a prefix that does not pay without them
  // never does, and they are counted only up to the last one that does (where none does, not at
  // all: 0.8 ms of BatchTopK d_sae 16384's 11 ms forward, where no block pays after the first
  // steps; benchmarks/NOTES.md, twenty-third pass). Counting them for each prefix is what kept
  // BatchTopK d_sae 262144's later steps (30–50 rows of 10³–10⁴ latents) on few moved rows and
  // 2–6·10⁷ corrections (whose build alone took 0.2–0.6 s), or off the block altogether.
  int64_t through = static_cast<int64_t>(taken.size());
  if (cost.correction > cost.pair)
    while (through > 0 && !(cost_of(through, 0.0) < none_cost)) --through;
  const std::vector<int64_t> corrections = cost.correction > 0
                                               ? corrections_after_each(rp, cp, m, n, enter.data(), taken, through)
                                               : std::vector<int64_t>(through, 0);
  int64_t best = 0;  // the cheapest prefix (0: none), the first of equals
  double best_cost = none_cost;
  for (int64_t h = 1; h <= through; ++h) {
    const double c = cost_of(h, static_cast<double>(corrections[h - 1]));
    if (c < best_cost) {
      best_cost = c;
      best = h;
    }
  }
  if (best == 0) return out;
  out.taken.assign(taken.begin(), taken.begin() + best);
  for (int64_t h = 0; h < best; ++h) out.moved[taken[h]] = 1;
  for (int64_t i = 0; i < n; ++i) {
    if (enter[i] >= best) continue;
    out.position[i] = static_cast<int32_t>(out.latents.size());
    out.latents.push_back(i);
  }
  if (!with_block) return out;
  const auto rows = moved_rows_matrix(out, rp, cp, vp);
  out.block = empty_pooled(out.size() * out.size(), rows.scalar_type()).view({out.size(), out.size()});
  std::vector<int64_t> first(out.size()), last(out.size(), out.size());
  for (int64_t p = 0; p < out.size(); ++p) first[p] = p + 1;
  fill_block(out, rows, first, last);
  return out;
}

// The moved rows' gradient from the dense product prod = A_H · G_U [h, u] (rows in plan.taken's
// order): o[e] += prod[r, position[latent of e]] over each moved row r's entries.
template <typename acc_t>
void add_moved_rows_product(const torch::Tensor& prod, const DenseRows<acc_t>& plan, const int64_t* rp,
                            const int64_t* cols, acc_t* o) {
  const torch::Tensor rows = prod.contiguous();
  const acc_t* pr = rows.data_ptr<acc_t>();
  const int64_t h = static_cast<int64_t>(plan.taken.size()), width = plan.size();
  at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t e = rp[plan.taken[r]]; e < rp[plan.taken[r] + 1]; ++e) o[e] += pr[r * width + plan.position[cols[e]]];
  });
}

// The moved rows' gradient from per-thread copies of A_H · G_U kept latent-major ([u, h], row
// position[latent] · h + r): o[e] += Σ over the copies, in thread order (deterministic).
template <typename acc_t>
void add_moved_rows_gradient(const std::vector<std::vector<acc_t>>& copies, const std::vector<int64_t>& moved_rows,
                             const int64_t* rp, const int64_t* cols, const int32_t* position, acc_t* o) {
  const int64_t h = static_cast<int64_t>(moved_rows.size());
  at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t e = rp[moved_rows[r]]; e < rp[moved_rows[r] + 1]; ++e) {
        acc_t sum = acc_t(0);
        for (const auto& part : copies) sum += part[position[cols[e]] * h + r];
        o[e] += sum;
      }
  });
}

}  // namespace aosae

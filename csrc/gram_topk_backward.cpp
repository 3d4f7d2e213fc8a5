// Backward of gram_topk / gram_topk_sparse on CPU whose cost follows the non-zeros of a.
//
// With g_p the upstream gradient of the selected pair p = (r_p, c_p) and G the symmetric
// sparse n × n matrix holding g_p at (r_p, c_p) and (c_p, r_p):
//   dot:    grad_a = a · G
//   cosine: grad_a = a · W + a ⊙ d,  W_ij = G_ij / (‖a_i‖‖a_j‖),  d_i = −u_i / ‖a_i‖²,
//           u_i = Σ_{p ∋ i} g_p v_p   (the same as (â·G − â ⊙ u) / ‖a‖, expanded)
// Row b of grad_a is Σ_{j: a_bj ≠ 0} a_bj · W[j, :] (+ the diagonal term): a scatter of
// each non-zero into its selected partners. Work O(m·n) to scan a and write the dense
// gradient (which the contract requires, zeros of a included) plus one multiply-add per
// (non-zero a_bj, partner of j), instead of O(m·k) for a sparse-dense product.
//
// W is held as an adjacency list (CSR over the n latents). Threads own whole rows of the
// output and accumulate a row in a private buffer that stays in cache: no atomics, and
// each entry is summed in a fixed order, so the result is deterministic.
//
// gram_topk_sparse's gradient (w.r.t. values [B, L] of (indices, values)) is never dense:
// grad[t, s] = Σ_q W[idx_ts, idx_tq] x_tq (+ d_i x_ts), computed latent by latent.
//
// No PYBIND11_MODULE here: csrc/gram_topk_cpu.cpp calls register_backward(m).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <string>
#include <vector>

#include "dense_rows.h"
#include "pair_select.h"


namespace {

using torch::Tensor;

template <typename acc_t>
struct Edge {
  int32_t nbr;  // the partner latent
  acc_t weight; // W_ij
};

template <typename acc_t>
struct Adjacency {
  std::vector<int64_t> ptr;         // [n + 1]
  std::vector<Edge<acc_t>> edges;   // one (partner, weight) per selected pair and endpoint
  std::vector<acc_t> diag;          // d_i (cosine only, else empty)
};

// The selected pairs as an adjacency list per latent. Threads own disjoint latent ranges and
// each scans the whole (sequential, cheap) pair list, so the random writes are split without
// atomics and every list keeps the pairs' order: the same lists whatever the thread count.
// inv: 1/‖a_i‖ per latent (0 for a zero column), or nullptr for dot similarity.
template <typename acc_t>
Adjacency<acc_t> build_adjacency(const Tensor& grad_values, const Tensor& values, const Tensor& rows,
                                 const Tensor& cols, int64_t n, const acc_t* inv) {
  const int64_t k = rows.size(0);
  const acc_t* g = grad_values.data_ptr<acc_t>();
  const acc_t* v = values.data_ptr<acc_t>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  int64_t used = 0;  // one past the last filled slot: the ops put empty slots last, and a
                     // large k (n = 65536: 10.7M slots) is mostly empty at small batches
  for (int64_t p = 0; p < k; ++p) {
    TORCH_CHECK(r[p] < n && c[p] < n && (r[p] < 0) == (c[p] < 0), "gram_topk backward: pair (", r[p], ", ", c[p],
                ") lies outside [0, ", n, ")");
    if (r[p] >= 0) used = p + 1;
  }
  Adjacency<acc_t> adj;
  adj.ptr.assign(n + 1, 0);
  if (inv) adj.diag.assign(n, acc_t(0));
  // at most 8 ranges: each range re-reads all k pairs
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), 8, n}));
  const int64_t width = (n + ranges - 1) / ranges;
  int64_t* ptr = adj.ptr.data();
  acc_t* diag = inv ? adj.diag.data() : nullptr;
  at::parallel_for(0, ranges, 1, [&](int64_t q0, int64_t q1) {
    const int64_t lo = q0 * width, hi = std::min(n, q1 * width);
    for (int64_t p = 0; p < used; ++p) {
      const int64_t i = r[p], j = c[p];
      if (i < 0) continue;  // empty slot: no gradient
      if (i >= lo && i < hi) ++ptr[i + 1];
      if (j >= lo && j < hi) ++ptr[j + 1];
      if (diag) {
        const acc_t gv = g[p] * v[p];
        if (i >= lo && i < hi) diag[i] -= gv;
        if (j >= lo && j < hi) diag[j] -= gv;
      }
    }
  });
  for (int64_t i = 0; i < n; ++i) ptr[i + 1] += ptr[i];
  adj.edges.resize(ptr[n]);
  Edge<acc_t>* edges = adj.edges.data();
  at::parallel_for(0, ranges, 1, [&](int64_t q0, int64_t q1) {
    const int64_t lo = q0 * width, hi = std::min(n, q1 * width);
    std::vector<int64_t> fill(ptr + lo, ptr + hi);
    for (int64_t p = 0; p < used; ++p) {
      const int64_t i = r[p], j = c[p];
      if (i < 0) continue;
      const acc_t w = inv ? g[p] * inv[i] * inv[j] : g[p];
      if (i >= lo && i < hi) edges[fill[i - lo]++] = {static_cast<int32_t>(j), w};
      if (j >= lo && j < hi) edges[fill[j - lo]++] = {static_cast<int32_t>(i), w};
    }
    if (diag)
      for (int64_t i = lo; i < hi; ++i) diag[i] *= inv[i] * inv[i];
  });
  return adj;
}

void check_pairs(const Tensor& grad_values, const Tensor& values, const Tensor& rows, const Tensor& cols) {
  TORCH_CHECK(rows.dim() == 1 && cols.sizes() == rows.sizes() && values.sizes() == rows.sizes() &&
                  grad_values.sizes() == rows.sizes(),
              "gram_topk backward: grad_values, values, rows, cols must all be [k]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong,
              "gram_topk backward: rows and cols must be int64");
}

template <typename scalar_t, typename acc_t>
Tensor dense_backward_impl(const Tensor& grad_values, const Tensor& a, const Tensor& values, const Tensor& rows,
                           const Tensor& cols, bool cosine) {
  const int64_t m = a.size(0), n = a.size(1);
  const auto acc = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  Tensor inv_norms;
  if (cosine) {
    Tensor norms = at::linalg_vector_norm(a, 2, {0}, false, acc);
    inv_norms = at::where(norms > 0, norms.reciprocal(), at::zeros_like(norms)).contiguous();
  }
  const Adjacency<acc_t> adj = build_adjacency<acc_t>(
      grad_values.to(acc).contiguous(), values.to(acc).contiguous(), rows.contiguous(), cols.contiguous(), n,
      cosine ? inv_norms.data_ptr<acc_t>() : nullptr);
  Tensor out = at::empty({m, n}, a.options());
  const scalar_t* x = a.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t* ptr = adj.ptr.data();
  const Edge<acc_t>* edges = adj.edges.data();
  const acc_t* diag = cosine ? adj.diag.data() : nullptr;
  constexpr bool direct = std::is_same<scalar_t, acc_t>::value;  // accumulate in the output row itself
  constexpr int64_t block = 16;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(direct ? 0 : n, acc_t(0));  // fp16/bf16: one fp32 row, kept in cache
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = x + b * n;
      acc_t* buf = direct ? reinterpret_cast<acc_t*>(o + b * n) : buffer.data();
      if (direct) std::fill(buf, buf + n, acc_t(0));
      for (int64_t j0 = 0; j0 < n; j0 += block) {
        const int64_t j1 = std::min(n, j0 + block);
        bool any = false;  // skip all-zero blocks with one vectorisable test
        for (int64_t j = j0; j < j1; ++j) any |= static_cast<acc_t>(row[j]) != acc_t(0);
        if (!any) continue;
        for (int64_t j = j0; j < j1; ++j) {
          const acc_t xj = static_cast<acc_t>(row[j]);
          if (xj == acc_t(0)) continue;
          if (diag) buf[j] += diag[j] * xj;
          for (int64_t e = ptr[j]; e < ptr[j + 1]; ++e) buf[edges[e].nbr] += edges[e].weight * xj;
        }
      }
      if (!direct) {
        scalar_t* orow = o + b * n;
        for (int64_t j = 0; j < n; ++j) {
          orow[j] = static_cast<scalar_t>(buf[j]);
          buf[j] = acc_t(0);
        }
      }
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t>
Tensor sparse_backward_impl(const Tensor& grad_values, const Tensor& indices, const Tensor& vals, const Tensor& values,
                            const Tensor& rows, const Tensor& cols, int64_t n, bool cosine) {
  const int64_t B = indices.size(0), L = indices.size(1);
  const auto acc = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  const int64_t* idx = indices.data_ptr<int64_t>();
  const scalar_t* x = vals.data_ptr<scalar_t>();
  std::vector<acc_t> inv;
  if (cosine) {  // ‖f_i‖ over the given entries: O(B·L)
    inv.assign(n, acc_t(0));
    for (int64_t e = 0; e < B * L; ++e) {
      const acc_t xe = static_cast<acc_t>(x[e]);
      inv[idx[e]] += xe * xe;
    }
    for (auto& s : inv) s = s > 0 ? acc_t(1) / std::sqrt(s) : acc_t(0);
  }
  const Adjacency<acc_t> adj = build_adjacency<acc_t>(
      grad_values.to(acc).contiguous(), values.to(acc).contiguous(), rows.contiguous(), cols.contiguous(), n,
      cosine ? inv.data() : nullptr);
  // The entries of each latent (CSC of the B·L slots, row order kept by a counting sort).
  std::vector<int64_t> occ_ptr(n + 1, 0), occ(B * L);
  for (int64_t e = 0; e < B * L; ++e) ++occ_ptr[idx[e] + 1];
  for (int64_t i = 0; i < n; ++i) occ_ptr[i + 1] += occ_ptr[i];
  {
    std::vector<int64_t> fill(occ_ptr.begin(), occ_ptr.end() - 1);
    for (int64_t e = 0; e < B * L; ++e) occ[fill[idx[e]]++] = e;
  }
  Tensor out = at::empty({B, L}, vals.options());
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t* ptr = adj.ptr.data();
  const Edge<acc_t>* edges = adj.edges.data();
  const acc_t* diag = cosine ? adj.diag.data() : nullptr;
  // Latent by latent: spread i's selected partners into a dense row W_i (n slots, in cache),
  // then each entry (t, s) of i is Σ_q W_i[idx_tq] · x_tq over its row's L entries. Work
  // O(Σ_i deg_i + B·L²), and each output entry belongs to one latent: no write conflicts.
  // Dynamic scheduling: a frequent latent's work is many times the average.
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    std::vector<acc_t> row_w(n, acc_t(0));
    acc_t* W = row_w.data();
#pragma omp for schedule(dynamic, 64)
    for (int64_t i = 0; i < n; ++i) {
      if (occ_ptr[i] == occ_ptr[i + 1]) continue;
      for (int64_t e = ptr[i]; e < ptr[i + 1]; ++e) W[edges[e].nbr] = edges[e].weight;
      const bool partners = ptr[i] < ptr[i + 1];
      for (int64_t u = occ_ptr[i]; u < occ_ptr[i + 1]; ++u) {
        const int64_t e = occ[u], t = e / L;
        acc_t sum = diag ? diag[i] * static_cast<acc_t>(x[e]) : acc_t(0);
        if (partners) {
          const int64_t* it = idx + t * L;
          const scalar_t* xt = x + t * L;
          for (int64_t q = 0; q < L; ++q) sum += W[it[q]] * static_cast<acc_t>(xt[q]);  // W_i[i] = 0
        }
        o[e] = static_cast<scalar_t>(sum);
      }
      for (int64_t e = ptr[i]; e < ptr[i + 1]; ++e) W[edges[e].nbr] = acc_t(0);
    }
  }
  return out;
}

// The gradient at the non-zeros of a only, a given as CSR (row_ptr, cols, vals): what
// reaches the parameters upstream of a ReLU, whose backward zeroes every other entry. Row by
// row: scatter each non-zero into its partners in a thread-local dense row, read the row at
// the row's own non-zeros, clear what was written. Work O(Σ_nnz deg + nnz); no [m, n] tensor.
// Values equal dense_backward_impl's at those entries (same sums in the same order).
template <typename acc_t>
Tensor support_backward_impl(const Tensor& grad_values, const Tensor& row_ptr, const Tensor& cols_a, const Tensor& vals,
                             const Tensor& values, const Tensor& rows, const Tensor& cols, int64_t n, bool cosine) {
  const int64_t m = row_ptr.size(0) - 1;
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* ca = cols_a.data_ptr<int64_t>();
  const acc_t* va = vals.data_ptr<acc_t>();
  const auto acc = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  std::vector<acc_t> inv;
  if (cosine) {
    inv.assign(n, acc_t(0));
    for (int64_t e = 0; e < rp[m]; ++e) inv[ca[e]] += va[e] * va[e];
    for (auto& s : inv) s = s > 0 ? acc_t(1) / std::sqrt(s) : acc_t(0);
  }
  const Adjacency<acc_t> adj = build_adjacency<acc_t>(
      grad_values.to(acc).contiguous(), values.to(acc).contiguous(), rows.contiguous(), cols.contiguous(), n,
      cosine ? inv.data() : nullptr);
  Tensor out = at::empty({rp[m]}, vals.options());
  acc_t* o = out.data_ptr<acc_t>();
  const int64_t* ptr = adj.ptr.data();
  const Edge<acc_t>* edges = adj.edges.data();
  const acc_t* diag = cosine ? adj.diag.data() : nullptr;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(n, acc_t(0));
    acc_t* buf = buffer.data();
    for (int64_t b = begin; b < end; ++b) {
      int64_t written = 0;
      for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
        const int64_t j = ca[e];
        const acc_t xj = va[e];
        if (diag) buf[j] += diag[j] * xj;
        for (int64_t q = ptr[j]; q < ptr[j + 1]; ++q) buf[edges[q].nbr] += edges[q].weight * xj;
        written += ptr[j + 1] - ptr[j];
      }
      for (int64_t e = rp[b]; e < rp[b + 1]; ++e) o[e] = buf[ca[e]];
      if (written > n / 8) {  // clear: one pass over the row, or the entries written
        std::fill(buf, buf + n, acc_t(0));
      } else {
        for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
          const int64_t j = ca[e];
          buf[j] = acc_t(0);
          for (int64_t q = ptr[j]; q < ptr[j + 1]; ++q) buf[edges[q].nbr] = acc_t(0);
        }
      }
    }
  });
  return out;
}

// The backward of coactive_topk on its canonical rows (cols ascending within each row, ids
// compacted to [0, n)): the gradient at every entry, following the rows' own pairs, with no
// transposed adjacency (whose random writes over all pairs cost more than the rest):
//   1. latent by latent (the selection grouped by its smaller id i; coactive_topk lists it that
//      way when it keeps every pair, else a counting sort): spread i's partners j > i into a
//      dense row W, then for each entry (t, s) of latent i write W[col of each later entry q of
//      row t] into the row pair's own slot (t, s, q): every slot is written once;
//   2. row by row: grad[s] += G_sq x_q, grad[q] += G_sq x_s over the row's slots, + the cosine
//      diagonal d_i x_s. Each entry summed in a fixed order: deterministic, no atomics.
// The densest rows (csrc/dense_rows.h's plan, the forward's: BatchTopK's outlier tokens hold
// most of Σ_t L_t²) skip the slots: their gradient is the product A_H · G_U over the latents U
// they touch, G_U [u, u] the selected pairs' gradients inside U × U (symmetric), A_H [h, u]
// those rows: per selected pair when few of U × U are selected, else one GEMM.
// Work O(selected + Σ_{other rows} L_t² + min(h·selected, h·u² + u²)), memory
// O(Σ_{other rows} L_t² + min(h·u, u²) + nnz + threads·u); u ≤ nnz: ids are compact.
// How coactive_backward computes the moved rows' gradient A_H · G_U: by its cost model, or
// forced (tests cover both).
enum class BlockProduct { kAuto, kSparse, kDense };

BlockProduct block_product(const std::string& name) {
  if (name == "auto") return BlockProduct::kAuto;
  if (name == "sparse") return BlockProduct::kSparse;
  TORCH_CHECK(name == "dense", "coactive_backward_cpu: block must be 'auto', 'sparse' or 'dense', got '", name, "'");
  return BlockProduct::kDense;
}

template <typename acc_t>
Tensor coactive_backward_impl(const Tensor& grad_values, const Tensor& row_ptr, const Tensor& cols_a,
                              const Tensor& vals, const Tensor& values, const Tensor& rows, const Tensor& cols,
                              int64_t n, bool cosine, BlockProduct block) {
  const int64_t m = row_ptr.size(0) - 1, nnz = cols_a.size(0), sel = rows.size(0);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* ca = cols_a.data_ptr<int64_t>();
  const acc_t* x = vals.data_ptr<acc_t>();
  const acc_t* g = grad_values.data_ptr<acc_t>();
  const acc_t* v = values.data_ptr<acc_t>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[m] == nnz, "coactive backward: row_ptr must run from 0 to nnz");
  // One parallel pass over the selection (millions of pairs: serial passes were a third of
  // the backward at TopK d_sae 65536): valid pairs, grouped by i or not, the largest id.
  bool valid = true, grouped = true;
  int64_t top = 0;  // the largest id seen: every per-latent array below is sized top + 1, not n
#pragma omp parallel for num_threads(std::max(1, at::get_num_threads())) schedule(static) \
    reduction(&& : valid, grouped) reduction(max : top)
  for (int64_t p = 0; p < sel; ++p) {
    valid = valid && r[p] >= 0 && r[p] < c[p] && c[p] < n;
    grouped = grouped && (p == 0 || r[p - 1] <= r[p]);
    top = std::max(top, c[p]);
  }
  for (int64_t p = 0; p < sel && !valid; ++p)  // only to name the first bad pair
    TORCH_CHECK(r[p] >= 0 && r[p] < c[p] && c[p] < n, "coactive backward: pair (", r[p], ", ", c[p],
                ") is not i < j in [0, ", n, ")");
  for (int64_t t = 0; t < m; ++t) TORCH_CHECK(rp[t] <= rp[t + 1], "coactive backward: row_ptr must not decrease");
  for (int64_t e = 0; e < nnz; ++e) {
    TORCH_CHECK(ca[e] >= 0 && ca[e] < n, "coactive backward: column ", ca[e], " outside [0, ", n, ")");
    top = std::max(top, ca[e]);
  }
  // the caller's n only bounds the ids (coactive_topk passes nnz): a dense row of n slots per
  // thread that is 10x the active latents falls out of L2 (n 131072 vs 13747 at TopK 16384)
  n = top + 1;
  std::vector<acc_t> inv, diag;
  if (cosine) {
    inv.assign(n, acc_t(0));
    for (int64_t e = 0; e < nnz; ++e) inv[ca[e]] += x[e] * x[e];
    for (auto& q : inv) q = q > 0 ? acc_t(1) / std::sqrt(q) : acc_t(0);
    diag.assign(n, acc_t(0));
    for (int64_t p = 0; p < sel; ++p) {
      diag[r[p]] -= g[p] * v[p];
      diag[c[p]] -= g[p] * v[p];
    }
    for (int64_t i = 0; i < n; ++i) diag[i] *= inv[i] * inv[i];
  }
  auto pair_grad = [&](int64_t p) { return cosine ? g[p] * inv[r[p]] * inv[c[p]] : g[p]; };
  // The outlier rows that the product handles (none for TopK-like rows).
  const aosae::DenseRows<acc_t> dense = aosae::plan_dense_rows<acc_t>(rp, ca, x, m, n, aosae::DenseRowCost(), false);
  const uint8_t* moved = dense.moved.data();
  const int64_t width = dense.size();
  // Each latent's entries in the slot rows (row order), each entry's row, each row's first slot.
  std::vector<int64_t> occ_ptr(n + 1, 0), row_of(nnz), slot0(m + 1, 0);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t e = rp[t]; e < rp[t + 1] && !moved[t]; ++e) ++occ_ptr[ca[e] + 1];
  for (int64_t i = 0; i < n; ++i) occ_ptr[i + 1] += occ_ptr[i];
  // The selection grouped by i: ptr over latents, and the order (identity when already grouped);
  // only the pairs whose i has an entry in a slot row (the others go through the product).
  auto in_slots = [&](int64_t i) { return occ_ptr[i + 1] > occ_ptr[i]; };
  std::vector<int64_t> ptr(n + 1, 0), order;
  if (grouped && width == 0) {  // every pair's i has slots: ptr[i] = the first pair with row >= i, in parallel
    at::parallel_for(0, sel, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        for (int64_t i = p == 0 ? 0 : r[p - 1] + 1; i <= r[p]; ++i) ptr[i] = p;
    });
    for (int64_t i = sel == 0 ? 0 : r[sel - 1] + 1; i <= n; ++i) ptr[i] = sel;
  } else {
    for (int64_t p = 0; p < sel; ++p) ptr[r[p] + 1] += in_slots(r[p]);
    for (int64_t i = 0; i < n; ++i) ptr[i + 1] += ptr[i];
    grouped = grouped && ptr[n] == sel;
  }
  if (!grouped) {
    order.resize(ptr[n]);
    std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
    for (int64_t p = 0; p < sel; ++p)
      if (in_slots(r[p])) order[fill[r[p]]++] = p;
  }
  std::vector<int64_t> occ(occ_ptr[n]);
  {
    std::vector<int64_t> fill(occ_ptr.begin(), occ_ptr.end() - 1);
    for (int64_t t = 0; t < m; ++t) {
      const int64_t L = moved[t] ? 0 : rp[t + 1] - rp[t];
      slot0[t + 1] = slot0[t] + L * (L - 1) / 2;
      for (int64_t e = rp[t]; e < rp[t] + L; ++e) {
        occ[fill[ca[e]]++] = e;
        row_of[e] = t;
      }
    }
  }
  // one slot per row pair, each written once below: kept between calls (no zero fill, no faults)
  acc_t* G = aosae::Scratch<acc_t, 2>::get(static_cast<size_t>(slot0[m]));
  if (slot0[m] > 0) {
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
    {
      std::vector<acc_t> row_w(n, acc_t(0));
      acc_t* W = row_w.data();
#pragma omp for schedule(dynamic, 64)
      for (int64_t i = 0; i < n; ++i) {
        if (occ_ptr[i] == occ_ptr[i + 1]) continue;  // no entry of i in a slot row
        for (int64_t q = ptr[i]; q < ptr[i + 1]; ++q) {
          const int64_t p = grouped ? q : order[q];
          W[c[p]] = pair_grad(p);
        }
        for (int64_t u = occ_ptr[i]; u < occ_ptr[i + 1]; ++u) {
          const int64_t e = occ[u], t = row_of[e], s0 = e - rp[t], L = rp[t + 1] - rp[t];
          acc_t* out = G + slot0[t] + s0 * L - s0 * (s0 + 1) / 2;  // slots (s0, s0+1 ..)
          for (int64_t q = e + 1; q < rp[t + 1]; ++q) *out++ = W[ca[q]];  // later entries: ids > i
        }
        for (int64_t q = ptr[i]; q < ptr[i + 1]; ++q) W[c[grouped ? q : order[q]]] = acc_t(0);
      }
    }
  }
  Tensor out = at::empty({nnz}, vals.options());
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = rp[t], e_end = rp[t + 1];
      for (int64_t e = b; e < e_end; ++e) o[e] = cosine ? diag[ca[e]] * x[e] : acc_t(0);
      if (moved[t]) continue;  // the product below
      const acc_t* w = G + slot0[t];
      for (int64_t e = b; e < e_end; ++e) {
        acc_t own = acc_t(0);
        for (int64_t q = e + 1; q < e_end; ++q, ++w) {
          own += *w * x[q];
          o[q] += *w * x[e];
        }
        o[e] += own;
      }
    }
  });
  if (width > 0) {
    const int32_t* position = dense.position.data();
    std::vector<int64_t> moved_rows;
    for (int64_t t = 0; t < m; ++t)
      if (moved[t]) moved_rows.push_back(t);
    const int64_t h = static_cast<int64_t>(moved_rows.size());
    int64_t inside = 0;  // selected pairs inside U × U
#pragma omp parallel for num_threads(std::max(1, at::get_num_threads())) schedule(static) reduction(+ : inside)
    for (int64_t p = 0; p < sel; ++p) inside += position[r[p]] >= 0 && position[c[p]] >= 0;
    // The moved rows' gradient A_H · G_U, G_U [u, u] the selected pairs' gradients inside U × U.
    // Few selected pairs there (BatchTopK at d_sae 16384: ≤ 0.67 M of u²/2 = 19 M): two short
    // axpys over the moved rows per pair; most of U × U selected: one GEMM against G_U built dense.
    // Costs in ns (2-core EPYC, BatchTopK at d_sae 16384 and 65536: 18 vs 100–160 ms and 200 vs
    // 300 ms): a scattered multiply-add 0.35; a multiply-add of the GEMM 0.012 and ≈ 3 per entry
    // of G_U (its fresh pages, the scatter, the mirror).
    const double sparse_cost = 0.35 * 2.0 * h * inside, dense_cost = (0.012 * h + 3.0) * width * width;
    const bool use_dense = block == BlockProduct::kAuto ? dense_cost < sparse_cost : block == BlockProduct::kDense;
    if (!use_dense) {
      // latent-major [u, h] copies of A_H and of the result: a pair reads and adds whole rows
      // of h. Threads split the pairs, each adding into its own copy of the result (u·h, in L2),
      // summed at the end: each pair's ids and gradient are read once (threads splitting the
      // moved rows instead each read all of them, 24 B per pair, for half-length axpys).
      std::vector<acc_t> a_t(width * h, acc_t(0));
      for (int64_t q = 0; q < h; ++q)
        for (int64_t e = rp[moved_rows[q]]; e < rp[moved_rows[q] + 1]; ++e) a_t[position[ca[e]] * h + q] = x[e];
      const int threads = std::max(1, at::get_num_threads());
      std::vector<std::vector<acc_t>> out_t(threads);
#pragma omp parallel num_threads(threads)
      {
        std::vector<acc_t>& mine = out_t[omp_get_thread_num()];
        mine.assign(width * h, acc_t(0));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < sel; ++p) {
          const int64_t pi = position[r[p]], pj = position[c[p]];
          if (pi < 0 || pj < 0) continue;
          const acc_t gp = pair_grad(p);
          acc_t* oi = mine.data() + pi * h;
          acc_t* oj = mine.data() + pj * h;
          const acc_t* ai = a_t.data() + pi * h;
          const acc_t* aj = a_t.data() + pj * h;
#pragma GCC ivdep
          for (int64_t q = 0; q < h; ++q) {  // rows pi != pj of the thread's copy, never a_t
            oi[q] += gp * aj[q];
            oj[q] += gp * ai[q];
          }
        }
      }
      at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q)
          for (int64_t e = rp[moved_rows[q]]; e < rp[moved_rows[q] + 1]; ++e) {
            acc_t sum = acc_t(0);
            for (const auto& part : out_t) sum += part[position[ca[e]] * h + q];
            o[e] += sum;
          }
      });
    } else {
      // G_U's upper triangle: U ascending, so i < j is position[i] < position[j]
      Tensor sym = aosae::zeros_pooled(width, width, vals.scalar_type());
      acc_t* up = sym.data_ptr<acc_t>();
      at::parallel_for(0, sel, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int32_t pi = position[r[p]], pj = position[c[p]];
          if (pi >= 0 && pj >= 0) up[int64_t(pi) * width + pj] = pair_grad(p);
        }
      });
      // mirror the upper triangle into the lower one, tile by tile (one GEMM then reads G_U;
      // a second GEMM against the transposed view cost 1.6× this pass)
      constexpr int64_t kTile = 64;
      const int64_t tiles = (width + kTile - 1) / kTile;
      at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bi = begin; bi < end; ++bi)
          for (int64_t bj = bi; bj < tiles; ++bj)
            for (int64_t i = bi * kTile; i < std::min(width, (bi + 1) * kTile); ++i)
              for (int64_t j = std::max(i + 1, bj * kTile); j < std::min(width, (bj + 1) * kTile); ++j)
                up[j * width + i] = up[i * width + j];
      });
      Tensor a_h = at::zeros({h, width}, vals.options());
      acc_t* ah = a_h.data_ptr<acc_t>();
      for (int64_t q = 0; q < h; ++q)
        for (int64_t e = rp[moved_rows[q]]; e < rp[moved_rows[q] + 1]; ++e) ah[q * width + position[ca[e]]] = x[e];
      const Tensor prod = at::mm(a_h, sym).contiguous();
      const acc_t* pr = prod.data_ptr<acc_t>();
      at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q)
          for (int64_t e = rp[moved_rows[q]]; e < rp[moved_rows[q] + 1]; ++e) o[e] += pr[q * width + position[ca[e]]];
      });
    }
  }
  aosae::Scratch<acc_t, 2>::trim(size_t(64) << 20);  // BatchTopK's long rows: do not keep GBs
  return out;
}

}  // namespace

// grad_values [k], a [m, n] (any float dtype, CPU), values/rows/cols [k] -> grad_a [m, n] in a's dtype.
Tensor gram_topk_backward_cpu(const Tensor& grad_values, const Tensor& a, const Tensor& values, const Tensor& rows,
                              const Tensor& cols, bool cosine) {
  TORCH_CHECK(a.dim() == 2 && a.device().is_cpu() && at::isFloatingType(a.scalar_type()),
              "gram_topk_backward_cpu: a must be a 2-D floating CPU tensor");
  TORCH_CHECK(a.size(1) < (int64_t(1) << 31), "gram_topk_backward_cpu: n must be < 2^31");
  check_pairs(grad_values, values, rows, cols);
  at::NoGradGuard no_grad;
  const Tensor x = a.contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gram_topk_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    out = dense_backward_impl<scalar_t, acc_t>(grad_values, x, values, rows, cols, cosine);
  });
  return out;
}

// grad_values [k], indices [B, L] int64 (distinct per row, in [0, n)), vals [B, L] (any float
// dtype, CPU), values/rows/cols [k] -> grad_vals [B, L] in vals' dtype.
Tensor gram_topk_sparse_backward_cpu(const Tensor& grad_values, const Tensor& indices, const Tensor& vals,
                                     const Tensor& values, const Tensor& rows, const Tensor& cols, int64_t n,
                                     bool cosine) {
  TORCH_CHECK(indices.dim() == 2 && indices.sizes() == vals.sizes() && indices.scalar_type() == at::kLong,
              "gram_topk_sparse_backward_cpu: indices must be int64 [B, L], the shape of vals");
  TORCH_CHECK(vals.device().is_cpu() && indices.device().is_cpu() && at::isFloatingType(vals.scalar_type()),
              "gram_topk_sparse_backward_cpu: vals must be a floating CPU tensor");
  TORCH_CHECK(n >= 2 && n < (int64_t(1) << 31), "gram_topk_sparse_backward_cpu: n must be in [2, 2^31)");
  check_pairs(grad_values, values, rows, cols);
  at::NoGradGuard no_grad;
  const Tensor idx = indices.contiguous(), x = vals.contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gram_topk_sparse_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    out = sparse_backward_impl<scalar_t, acc_t>(grad_values, idx, x, values, rows, cols, n, cosine);
  });
  return out;
}

// grad_values [k], a as CSR (row_ptr [m+1] int64, cols [nnz] int64, vals [nnz] float32/float64),
// values/rows/cols [k] -> the gradient at a's non-zeros, [nnz] in vals' dtype.
Tensor gram_topk_support_backward_cpu(const Tensor& grad_values, const Tensor& row_ptr, const Tensor& cols_a,
                                      const Tensor& vals, const Tensor& values, const Tensor& rows, const Tensor& cols,
                                      int64_t n, bool cosine) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kLong &&
                  cols_a.scalar_type() == at::kLong && vals.dim() == 1 && vals.sizes() == cols_a.sizes(),
              "gram_topk_support_backward_cpu: expects CSR row_ptr [m+1] int64, cols [nnz] int64, vals [nnz]");
  TORCH_CHECK(vals.scalar_type() == at::kFloat || vals.scalar_type() == at::kDouble,
              "gram_topk_support_backward_cpu: vals must be float32 or float64");
  TORCH_CHECK(n >= 2 && n < (int64_t(1) << 31), "gram_topk_support_backward_cpu: n must be in [2, 2^31)");
  check_pairs(grad_values, values, rows, cols);
  at::NoGradGuard no_grad;
  const Tensor rp = row_ptr.contiguous(), ca = cols_a.contiguous(), va = vals.contiguous();
  if (va.scalar_type() == at::kDouble)
    return support_backward_impl<double>(grad_values, rp, ca, va, values, rows, cols, n, cosine);
  return support_backward_impl<float>(grad_values, rp, ca, va, values, rows, cols, n, cosine);
}

// coactive_topk's backward: grad_values [s], canonical CSR (row_ptr [m+1] int64, cols [nnz] int64
// ascending within each row, in [0, n), vals [nnz] float32/float64), the selection values/rows/cols
// [s] (compact ids, rows < cols) -> the gradient at every entry, [nnz] in vals' dtype.
Tensor coactive_backward_cpu(const Tensor& grad_values, const Tensor& row_ptr, const Tensor& cols_a,
                             const Tensor& vals, const Tensor& values, const Tensor& rows, const Tensor& cols,
                             int64_t n, bool cosine, const std::string& block) {
  const BlockProduct product = block_product(block);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kLong &&
                  cols_a.scalar_type() == at::kLong && vals.dim() == 1 && vals.sizes() == cols_a.sizes(),
              "coactive_backward_cpu: expects CSR row_ptr [m+1] int64, cols [nnz] int64, vals [nnz]");
  TORCH_CHECK(vals.scalar_type() == at::kFloat || vals.scalar_type() == at::kDouble,
              "coactive_backward_cpu: vals must be float32 or float64");
  TORCH_CHECK(n >= 1 && n < (int64_t(1) << 31), "coactive_backward_cpu: n must be in [1, 2^31)");
  check_pairs(grad_values, values, rows, cols);
  at::NoGradGuard no_grad;
  const auto acc = vals.scalar_type();
  const Tensor rp = row_ptr.contiguous(), ca = cols_a.contiguous(), va = vals.contiguous();
  const Tensor gv = grad_values.to(acc).contiguous(), ov = values.to(acc).contiguous();
  const Tensor r = rows.contiguous(), c = cols.contiguous();
  if (acc == at::kDouble) return coactive_backward_impl<double>(gv, rp, ca, va, ov, r, c, n, cosine, product);
  return coactive_backward_impl<float>(gv, rp, ca, va, ov, r, c, n, cosine, product);
}

void register_backward(pybind11::module& m) {
  m.def("coactive_backward_cpu", &coactive_backward_cpu, pybind11::arg("grad_values"), pybind11::arg("row_ptr"),
        pybind11::arg("cols_a"), pybind11::arg("vals"), pybind11::arg("values"), pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("n"), pybind11::arg("cosine"), pybind11::arg("block") = "auto",
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "coactive_topk's backward on canonical CSR rows: the gradient at every entry, [nnz]; block: how the "
        "outlier rows' product is taken ('auto': cost model, 'sparse': per selected pair, 'dense': one GEMM)");
  namespace py = pybind11;
  m.def("gram_topk_backward_cpu", &gram_topk_backward_cpu, py::arg("grad_values"), py::arg("a"), py::arg("values"),
        py::arg("rows"), py::arg("cols"), py::arg("cosine"), py::call_guard<py::gil_scoped_release>(),
        "Gradient of the selected Gram entries w.r.t. a dense [m, n] input; cost follows its non-zeros");
  m.def("gram_topk_sparse_backward_cpu", &gram_topk_sparse_backward_cpu, py::arg("grad_values"), py::arg("indices"),
        py::arg("vals"), py::arg("values"), py::arg("rows"), py::arg("cols"), py::arg("n"), py::arg("cosine"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradient of the selected Gram entries w.r.t. the values [B, L] of (indices, values) activations");
  m.def("gram_topk_support_backward_cpu", &gram_topk_support_backward_cpu, py::arg("grad_values"),
        py::arg("row_ptr"), py::arg("cols_a"), py::arg("vals"), py::arg("values"), py::arg("rows"), py::arg("cols"),
        py::arg("n"), py::arg("cosine"), py::call_guard<py::gil_scoped_release>(),
        "Gradient of the selected Gram entries at the non-zeros of a CSR input only (what a ReLU passes on)");
}

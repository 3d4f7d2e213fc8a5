// The backward of coactive_topk (aosae/ops/coactive_topk.py) on CPU: the gradient of the
// selected pairs' scores at every entry of the canonical CSR rows, following the rows' own
// pairs (O(selected + Σ_t L_t²)), never a dense [m, n] tensor.
//
// No PYBIND11_MODULE here: csrc/gram_topk_cpu.cpp calls register_coactive_backward(m).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "csr_checks.h"
#include "dense_rows.h"
#include "pair_select.h"
#include "row_slots.h"

namespace {

using torch::Tensor;

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
// O(Σ_{other rows} L_t² + min(threads·h·u, u²) + nnz + threads·u); u ≤ nnz: ids are compact.
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
  const aosae::RowSlots slots = aosae::row_slots(rp, ca, moved, m, n, nnz);
  const std::vector<int64_t>& occ_ptr = slots.occ_ptr;
  const std::vector<int64_t>& occ = slots.occ;
  const std::vector<int64_t>& row_of = slots.row_of;
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
  // one slot per row pair: W holds latent i's kept partners' gradients while its slots are written
  acc_t* G = aosae::fill_slots<acc_t>(slots, n, [&](int64_t i, acc_t* G, acc_t* W) {
    if (occ_ptr[i] == occ_ptr[i + 1]) return;  // no entry of i in a slot row
    for (int64_t q = ptr[i]; q < ptr[i + 1]; ++q) {
      const int64_t p = grouped ? q : order[q];
      W[c[p]] = pair_grad(p);
    }
    for (int64_t u = occ_ptr[i]; u < occ_ptr[i + 1]; ++u) {
      const int64_t e = occ[u], t = row_of[e];
      acc_t* out = G + slots.first(e, t, rp);
      for (int64_t q = e + 1; q < rp[t + 1]; ++q) *out++ = W[ca[q]];  // later entries: ids > i
    }
    for (int64_t q = ptr[i]; q < ptr[i + 1]; ++q) W[c[grouped ? q : order[q]]] = acc_t(0);
  });
  Tensor out = at::empty({nnz}, vals.options());
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, nnz, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) o[e] = cosine ? diag[ca[e]] * x[e] : acc_t(0);
  });
  aosae::add_slot_products(slots, G, rp, x, moved, m, o);  // the moved rows: the product below
  if (width > 0) {
    const int32_t* position = dense.position.data();
    const int64_t h = static_cast<int64_t>(dense.taken.size());
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
      // of h. Threads split the pairs, each adding into its own copy of the result (u·h: 0.9 MB
      // at BatchTopK 65536), summed at the end: each pair's ids and gradient are read once (threads splitting the
      // moved rows instead each read all of them, 24 B per pair, for half-length axpys).
      const Tensor a_t_t = aosae::moved_rows_matrix(dense, rp, ca, x).t().contiguous();
      const acc_t* a_t = a_t_t.data_ptr<acc_t>();
      const int threads = std::max(1, at::get_num_threads());
      // sized here, not in the region: a smaller team than asked for leaves some unused
      std::vector<std::vector<acc_t>> out_t(threads, std::vector<acc_t>(width * h, acc_t(0)));
#pragma omp parallel num_threads(threads)
      {
        std::vector<acc_t>& mine = out_t[omp_get_thread_num()];
#pragma omp for schedule(static)
        for (int64_t p = 0; p < sel; ++p) {
          const int64_t pi = position[r[p]], pj = position[c[p]];
          if (pi < 0 || pj < 0) continue;
          const acc_t gp = pair_grad(p);
          acc_t* oi = mine.data() + pi * h;
          acc_t* oj = mine.data() + pj * h;
          const acc_t* ai = a_t + pi * h;
          const acc_t* aj = a_t + pj * h;
#pragma GCC ivdep
          for (int64_t q = 0; q < h; ++q) {  // rows pi != pj of the thread's copy, never a_t
            oi[q] += gp * aj[q];
            oj[q] += gp * ai[q];
          }
        }
      }
      aosae::add_moved_rows_gradient(out_t, dense.taken, rp, ca, position, o);
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
      aosae::add_moved_rows_product(at::mm(aosae::moved_rows_matrix(dense, rp, ca, x), sym), dense, rp, ca, o);
    }
  }
  aosae::Scratch<acc_t, 2>::trim(size_t(64) << 20);  // BatchTopK's long rows: do not keep GBs
  return out;
}

}  // namespace

// coactive_topk's backward: grad_values [s], canonical CSR (row_ptr [m+1] int64, cols [nnz] int64
// ascending within each row, in [0, n), vals [nnz] float32/float64), the selection values/rows/cols
// [s] (compact ids, rows < cols) -> the gradient at every entry, [nnz] in vals' dtype.
Tensor coactive_backward_cpu(const Tensor& grad_values, const Tensor& row_ptr, const Tensor& cols_a,
                             const Tensor& vals, const Tensor& values, const Tensor& rows, const Tensor& cols,
                             int64_t n, bool cosine, const std::string& block) {
  const BlockProduct product = block_product(block);
  aosae::check_csr_rows("coactive_backward_cpu", row_ptr, cols_a, vals, n, 1);
  TORCH_CHECK(rows.dim() == 1 && cols.sizes() == rows.sizes() && values.sizes() == rows.sizes() &&
                  grad_values.sizes() == rows.sizes() && rows.scalar_type() == at::kLong &&
                  cols.scalar_type() == at::kLong,
              "coactive_backward_cpu: grad_values, values and the int64 rows, cols must all be [s]");
  at::NoGradGuard no_grad;
  const auto acc = vals.scalar_type();
  const Tensor rp = row_ptr.contiguous(), ca = cols_a.contiguous(), va = vals.contiguous();
  const Tensor gv = grad_values.to(acc).contiguous(), ov = values.to(acc).contiguous();
  const Tensor r = rows.contiguous(), c = cols.contiguous();
  if (acc == at::kDouble) return coactive_backward_impl<double>(gv, rp, ca, va, ov, r, c, n, cosine, product);
  return coactive_backward_impl<float>(gv, rp, ca, va, ov, r, c, n, cosine, product);
}

void register_coactive_backward(pybind11::module& m) {
  m.def("coactive_backward_cpu", &coactive_backward_cpu, pybind11::arg("grad_values"), pybind11::arg("row_ptr"),
        pybind11::arg("cols_a"), pybind11::arg("vals"), pybind11::arg("values"), pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("n"), pybind11::arg("cosine"), pybind11::arg("block") = "auto",
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "coactive_topk's backward on canonical CSR rows: the gradient at every entry, [nnz]; block: how the "
        "outlier rows' product is taken ('auto': cost model, 'sparse': per selected pair, 'dense': one GEMM)");
}

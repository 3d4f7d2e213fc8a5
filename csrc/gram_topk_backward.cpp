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
#include <vector>

#include "csr_checks.h"

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
  aosae::check_csr_rows("gram_topk_support_backward_cpu", row_ptr, cols_a, vals, n, 2);
  check_pairs(grad_values, values, rows, cols);
  at::NoGradGuard no_grad;
  const Tensor rp = row_ptr.contiguous(), ca = cols_a.contiguous(), va = vals.contiguous();
  if (va.scalar_type() == at::kDouble)
    return support_backward_impl<double>(grad_values, rp, ca, va, values, rows, cols, n, cosine);
  return support_backward_impl<float>(grad_values, rp, ca, va, values, rows, cols, n, cosine);
}

void register_backward(pybind11::module& m) {
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

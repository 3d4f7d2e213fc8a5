// (indices, values) [B, L] of a TopK SAE -> CSR of its non-zeros, in one pass (CPU); CSR rows in
// any latent order -> canonical rows with compact latent ids (coactive_topk); and a dense [m, n]
// tensor -> CSR of its non-zeros (the sparse backend on dense ReLU latents).
//
// The same result as aosae/ops/gram_topk_sparse.py:to_csr (cols ascending per row, zero
// values dropped, values in float32 / float64 for float64), with the input checks (range,
// distinct latents per row, finite values) done on the way. The torch version takes a dozen
// small ops, each a parallel region; this is one, so a [2048, 64] input costs well under a
// millisecond instead of a few. On bad input it returns ok = false and the caller's torch
// checks produce the message.
//
// No PYBIND11_MODULE here: csrc/gram_topk_cpu.cpp calls register_sparse_input(m).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pair_select.h"

namespace {

using torch::Tensor;

template <typename scalar_t, typename acc_t>
std::tuple<Tensor, Tensor, Tensor, bool> to_csr_impl(const Tensor& indices, const Tensor& values, int64_t n) {
  const int64_t B = indices.size(0), L = indices.size(1);
  const int64_t* idx = indices.data_ptr<int64_t>();
  const scalar_t* val = values.data_ptr<scalar_t>();
  const auto acc = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  std::vector<int64_t> sorted_idx(B * L);
  std::vector<acc_t> sorted_val(B * L);
  Tensor row_ptr = at::empty({B + 1}, indices.options());
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  rp[0] = 0;
  std::atomic<bool> ok{true};
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t* it = idx + t * L;
      const scalar_t* vt = val + t * L;
      std::iota(order.begin(), order.end(), int64_t(0));
      std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return it[x] < it[y]; });
      int64_t count = 0;
      for (int64_t s = 0; s < L; ++s) {
        const int64_t j = it[order[s]];
        const acc_t v = static_cast<acc_t>(vt[order[s]]);
        if (j < 0 || j >= n || !std::isfinite(v) || (s > 0 && j == it[order[s - 1]])) ok = false;
        sorted_idx[t * L + s] = j;
        sorted_val[t * L + s] = v;
        count += v != acc_t(0);
      }
      rp[t + 1] = count;
    }
  });
  if (!ok) return {row_ptr, Tensor(), Tensor(), false};
  for (int64_t t = 0; t < B; ++t) rp[t + 1] += rp[t];
  Tensor cols = at::empty({rp[B]}, indices.options());
  Tensor vals = at::empty({rp[B]}, values.options().dtype(acc));
  int64_t* pc = cols.data_ptr<int64_t>();
  acc_t* pv = vals.data_ptr<acc_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t out = rp[t];
      for (int64_t s = t * L; s < (t + 1) * L; ++s) {
        if (sorted_val[s] == acc_t(0)) continue;
        pc[out] = sorted_idx[s];
        pv[out++] = sorted_val[s];
      }
    }
  });
  return {row_ptr, cols, vals, true};
}

// Dense [m, n] (acc_t, contiguous) -> CSR of its non-zeros, cols ascending per row.
template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> dense_to_csr_impl(const Tensor& x) {
  const int64_t m = x.size(0), n = x.size(1);
  const acc_t* data = x.data_ptr<acc_t>();
  auto row_ptr = torch::empty({m + 1}, torch::kInt64);
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  rp[0] = 0;
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* row = data + t * n;
      int64_t c = 0;
      for (int64_t j = 0; j < n; ++j) c += row[j] != acc_t(0);
      rp[t + 1] = c;
    }
  });
  for (int64_t t = 0; t < m; ++t) rp[t + 1] += rp[t];
  const int64_t nnz = rp[m];
  auto cols = torch::empty({nnz}, torch::kInt64);
  auto vals = torch::empty({nnz}, x.options());
  int64_t* cp = cols.data_ptr<int64_t>();
  acc_t* vp = vals.data_ptr<acc_t>();
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* row = data + t * n;
      int64_t o = rp[t];
      for (int64_t j = 0; j < n; ++j) {
        if (row[j] != acc_t(0)) {
          cp[o] = j;
          vp[o] = row[j];
          ++o;
        }
      }
    }
  });
  return {row_ptr, cols, vals};
}

}  // namespace

// indices [B, L] int64, values [B, L] floating, both CPU -> (row_ptr [B+1], cols [nnz] int64,
// vals [nnz] float32/float64, ok). ok is false when an index is outside [0, n), a row repeats
// a latent, or a value is NaN/Inf (then the other outputs are meaningless).
std::tuple<Tensor, Tensor, Tensor, bool> sparse_topk_to_csr(const Tensor& indices, const Tensor& values, int64_t n) {
  TORCH_CHECK(indices.dim() == 2 && indices.sizes() == values.sizes() && indices.scalar_type() == at::kLong,
              "sparse_topk_to_csr: indices must be int64 [B, L], the shape of values");
  TORCH_CHECK(indices.device().is_cpu() && values.device().is_cpu() && at::isFloatingType(values.scalar_type()),
              "sparse_topk_to_csr: expects CPU tensors, floating values");
  at::NoGradGuard no_grad;
  const Tensor idx = indices.contiguous(), val = values.contiguous();
  std::tuple<Tensor, Tensor, Tensor, bool> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(), "sparse_topk_to_csr", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    out = to_csr_impl<scalar_t, acc_t>(idx, val, n);
  });
  return out;
}

namespace {

// CSR rows with any latent order -> compact ids (ranks among the distinct ids), ascending per
// row. Status codes: 0 ok, 1 bad offsets, 2 index out of [0, n), 3 NaN/Inf value, 4 a row
// repeats a latent, 5 an unsorted row of 2^32 entries or more, or 2^32 distinct ids (the caller's
// torch path then produces the message, or the rows).
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, int64_t> canonical_impl(const Tensor& offsets, const Tensor& indices,
                                                                   const Tensor& values, int64_t n) {
  const int64_t B = offsets.size(0) - 1, nnz = indices.size(0);
  const int64_t* rp = offsets.data_ptr<int64_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const scalar_t* val = values.data_ptr<scalar_t>();
  auto fail = [&](int64_t status) { return std::make_tuple(Tensor(), Tensor(), Tensor(), Tensor(), status); };
  if (rp[0] != 0 || rp[B] != nnz) return fail(1);
  for (int64_t t = 0; t < B; ++t)
    if (rp[t + 1] < rp[t]) return fail(1);
  // The distinct ids, ascending. n within a small multiple of nnz (every SAE width at B·L =
  // 131 k up to 2²¹): ranks from an n-sized table, O(n + nnz), instead of a binary search per
  // entry (15 ms for 131 k TopK ids at n 16384). Wider (n = 2²⁴ with a few thousand entries): a
  // radix sort of the nnz ids, nothing n-sized.
  const bool table = n <= 16 * std::max<int64_t>(nnz, 4096);
  std::atomic<int64_t> status{0};
  std::vector<uint64_t> sorted(table ? 0 : nnz);
  at::parallel_for(0, nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      if (idx[e] < 0 || idx[e] >= n) status = 2;
      else if (!std::isfinite(static_cast<double>(val[e]))) status = 3;
      if (!table) sorted[e] = static_cast<uint64_t>(idx[e]);
    }
  });
  if (status) return fail(status);
  std::vector<int32_t> rank_of;
  if (table) {
    rank_of.assign(n, 0);
    for (int64_t e = 0; e < nnz; ++e) rank_of[idx[e]] = 1;
    for (int64_t j = 0; j < n; ++j)
      if (rank_of[j]) {
        rank_of[j] = static_cast<int32_t>(sorted.size());
        sorted.push_back(static_cast<uint64_t>(j));
      }
  } else {
    aosae::radix_sort(sorted);
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  }
  const int64_t U = static_cast<int64_t>(sorted.size());
  if (U >= (int64_t(1) << 32)) return fail(5);  // (the rows' sort packs a compact id in 32 bits)
  Tensor uniq = at::empty({U}, indices.options());
  std::copy(sorted.begin(), sorted.end(), reinterpret_cast<uint64_t*>(uniq.data_ptr<int64_t>()));
  auto compact = [&](int64_t id) -> int64_t {
    if (table) return rank_of[id];
    return std::lower_bound(sorted.begin(), sorted.end(), static_cast<uint64_t>(id)) - sorted.begin();
  };
  // Compact ids in input order; rows that are not strictly ascending are sorted (with the
  // permutation kept), a repeat inside a row is an error. A row sorts packed keys (compact id,
  // place in the row): one integer compare each (pairs of int64 took a third of this call).
  Tensor cols = at::empty({nnz}, indices.options());
  int64_t* cp = cols.data_ptr<int64_t>();
  Tensor perm_t = at::empty({nnz}, indices.options());
  int64_t* perm = perm_t.data_ptr<int64_t>();
  std::atomic<bool> permuted{false};
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> row;
    for (int64_t t = begin; t < end; ++t) {
      bool ascending = true;
      for (int64_t e = rp[t]; e < rp[t + 1]; ++e) {
        cp[e] = compact(idx[e]);
        perm[e] = e;
        ascending = ascending && (e == rp[t] || cp[e] > cp[e - 1]);
      }
      if (ascending) continue;
      permuted = true;
      const int64_t len = rp[t + 1] - rp[t];
      if (len >= (int64_t(1) << 32)) {  // (a row of 2^32 entries: no room for its places in a key)
        status = 5;
        continue;
      }
      row.resize(len);
      for (int64_t q = 0; q < len; ++q) row[q] = (static_cast<uint64_t>(cp[rp[t] + q]) << 32) | static_cast<uint64_t>(q);
      std::sort(row.begin(), row.end());
      for (int64_t q = 0; q < len; ++q) {
        const int64_t id = static_cast<int64_t>(row[q] >> 32);
        if (q > 0 && id == cp[rp[t] + q - 1]) status = 4;
        cp[rp[t] + q] = id;
        perm[rp[t] + q] = rp[t] + static_cast<int64_t>(row[q] & 0xFFFFFFFFu);
      }
    }
  });
  if (status) return fail(status);
  if (!permuted) return std::make_tuple(cols, values, Tensor(), uniq, int64_t(0));
  Tensor vals = at::empty({nnz}, values.options());
  scalar_t* vp = vals.data_ptr<scalar_t>();
  at::parallel_for(0, nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) vp[e] = val[perm[e]];
  });
  return std::make_tuple(cols, vals, perm_t, uniq, int64_t(0));
}

}  // namespace

// CSR rows (offsets [B+1] int64, indices [nnz] int64 distinct per row in any order, values [nnz]
// floating, CPU) -> (cols [nnz] compact ids ascending per row, vals [nnz] in that order,
// perm [nnz] (canonical entry e is input entry perm[e]; undefined when the order is unchanged),
// uniq [U] the distinct ids ascending, status: 0 ok, else what is wrong, see canonical_impl).
std::tuple<Tensor, Tensor, Tensor, Tensor, int64_t> sparse_canonical_csr(const Tensor& offsets, const Tensor& indices,
                                                                         const Tensor& values, int64_t n) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong &&
                  indices.dim() == 1 && indices.scalar_type() == at::kLong && values.dim() == 1 &&
                  values.size(0) == indices.size(0),
              "sparse_canonical_csr: offsets [B+1] int64, indices [nnz] int64, values [nnz]");
  TORCH_CHECK(offsets.device().is_cpu() && indices.device().is_cpu() && values.device().is_cpu() &&
                  at::isFloatingType(values.scalar_type()),
              "sparse_canonical_csr: CPU tensors, floating values");
  at::NoGradGuard no_grad;
  const Tensor off = offsets.contiguous(), idx = indices.contiguous(), val = values.contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor, int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(), "sparse_canonical_csr", [&] {
    out = canonical_impl<scalar_t>(off, idx, val, n);
  });
  return out;
}

// Dense a [m, n] (any float dtype, CPU) -> CSR (row_ptr [m+1] int64, cols [nnz] int64,
// vals [nnz] float32/float64) of its non-zeros, cols ascending in each row.
std::tuple<Tensor, Tensor, Tensor> sparse_dense_to_csr(const Tensor& a) {
  TORCH_CHECK(a.dim() == 2 && a.device().is_cpu(), "sparse_dense_to_csr: expects a 2-D CPU tensor");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "sparse_dense_to_csr: expects a floating tensor");
  const Tensor x = a.to(a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  if (x.scalar_type() == at::kDouble) return dense_to_csr_impl<double>(x);
  return dense_to_csr_impl<float>(x);
}

void register_sparse_input(pybind11::module& m) {
  m.def("sparse_canonical_csr", &sparse_canonical_csr, pybind11::arg("offsets"), pybind11::arg("indices"),
        pybind11::arg("values"), pybind11::arg("n"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "CSR rows -> (compact cols ascending per row, vals, perm or None, distinct ids, status)");
  namespace py = pybind11;
  m.def("sparse_topk_to_csr", &sparse_topk_to_csr, py::arg("indices"), py::arg("values"), py::arg("n"),
        py::call_guard<py::gil_scoped_release>(),
        "(indices, values) [B, L] -> (row_ptr, cols, vals, ok): CSR of the non-zeros, checked");
  m.def("sparse_dense_to_csr", &sparse_dense_to_csr, py::arg("a"), py::call_guard<py::gil_scoped_release>(),
        "Non-zeros of a dense [m, n] CPU tensor as CSR (row_ptr, cols, vals in float32/float64)");
}

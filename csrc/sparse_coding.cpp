// Grouping the entries of sparse SAE latents by latent (CPU), for the gradients of W_enc and
// W_dec (aosae/ops/sparse_coding.py:group_by).
//
// A counting sort: count per key, exclusive scan, then one stable pass that places each entry
// after the earlier ones of its key. O(nnz + n_groups), one thread. torch.argsort(stable=True)
// gives the same order but as a parallel merge sort of int64 keys: 1.8 ms single-threaded for
// 131 k entries, and 25–450 ms with 2 threads on a shared, loaded 2-core machine (its barriers
// wait for descheduled threads), measured in benchmarks/NOTES.md ("Sparse SAE step").
//
// No PYBIND11_MODULE here: csrc/gram_topk_cpu.cpp calls register_sparse_coding(m).

#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using torch::Tensor;

// keys [nnz] int64 in [0, n_groups) -> (order [nnz]: entry ids grouped by key, ascending key,
// entries of one key in their original order; offsets [n_groups + 1]). Keys out of range:
// ok = false (the caller raises).
std::tuple<Tensor, Tensor, bool> group_by_key(const Tensor& keys_in, int64_t n_groups) {
  TORCH_CHECK(keys_in.dim() == 1 && keys_in.scalar_type() == at::kLong && keys_in.device().is_cpu(),
              "group_by_key: keys must be a 1-D int64 CPU tensor");
  TORCH_CHECK(n_groups >= 0, "group_by_key: n_groups must be >= 0");
  const Tensor keys = keys_in.contiguous();
  const int64_t nnz = keys.numel();
  const int64_t* k = keys.data_ptr<int64_t>();
  Tensor offsets = at::zeros({n_groups + 1}, keys.options());
  Tensor order = at::empty({nnz}, keys.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* out = order.data_ptr<int64_t>();
  for (int64_t e = 0; e < nnz; ++e) {
    if (k[e] < 0 || k[e] >= n_groups) return {order, offsets, false};
    ++off[k[e] + 1];
  }
  for (int64_t g = 0; g < n_groups; ++g) off[g + 1] += off[g];
  std::vector<int64_t> cursor(off, off + n_groups);
  for (int64_t e = 0; e < nnz; ++e) out[cursor[k[e]]++] = e;
  return {order, offsets, true};
}

}  // namespace

void register_sparse_coding(pybind11::module& m) {
  m.def("group_by_key", &group_by_key, "entries grouped by key (stable counting sort): (order, offsets, ok)",
        pybind11::arg("keys"), pybind11::arg("n_groups"));
}

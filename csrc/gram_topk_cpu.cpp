// Fused top-k of the Gram matrix C = aᵀa on CPU, without materialising C.
//
// The upper triangle of C is cut into tiles of TILE_ROWS rows × TILE_COLS columns
// (a row block [i0, i1) against the columns [i0, n), chunk by chunk). Each tile is
// one BLAS GEMM (at::mm_out, MKL/OpenBLAS with all threads) into a reused buffer;
// the scan that follows runs in parallel over the tile's rows and keeps only the
// entries that beat the current k-th best key. When the candidates exceed a bound
// they are cut back to the best k and the threshold rises. Memory is
// O(TILE_ROWS · TILE_COLS + k), never O(n²); FLOPs are half of the full GEMM plus
// the small triangles inside the diagonal tiles.
//
// Order (the op's contract): |value| descending, then (row, col) ascending. It is
// a total order, so the result is exact and deterministic whatever the tile order.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr int64_t TILE_ROWS = 256;
constexpr int64_t TILE_COLS = 4096;

template <typename acc_t>
struct Candidate {
  acc_t score;  // |C_ij| (or |cos|)
  acc_t value;  // signed C_ij
  int64_t row;
  int64_t col;
};

// true when x comes strictly before y in the contract's order
template <typename acc_t>
inline bool better(const Candidate<acc_t>& x, const Candidate<acc_t>& y) {
  if (x.score != y.score) return x.score > y.score;
  if (x.row != y.row) return x.row < y.row;
  return x.col < y.col;
}

// The bar an entry must clear: its key must be strictly better than `bar`.
// Before k candidates are known the bar is (floor, +inf, +inf): any score >= floor passes.
template <typename acc_t>
struct Bar {
  acc_t score;
  int64_t row;
  int64_t col;
};

template <typename acc_t>
inline bool clears(acc_t score, int64_t row, int64_t col, const Bar<acc_t>& bar) {
  if (score != bar.score) return score > bar.score;
  if (row != bar.row) return row < bar.row;
  return col < bar.col;
}

template <typename acc_t>
void keep_best(std::vector<Candidate<acc_t>>& pool, int64_t k) {
  if (static_cast<int64_t>(pool.size()) <= k) return;
  std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), better<acc_t>);
  pool.resize(k);
}

template <typename acc_t>
std::vector<Candidate<acc_t>> select_pass(const at::Tensor& x, int64_t k, acc_t floor) {
  const int64_t n = x.size(1);
  const int num_threads = at::get_num_threads();
  std::vector<std::vector<Candidate<acc_t>>> local(num_threads);
  std::vector<Candidate<acc_t>> pool;
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max();
  Bar<acc_t> bar{floor, kInf, kInf};
  // cut back once the candidates are several times k (amortises nth_element)
  const int64_t bound = std::max<int64_t>(4 * k, TILE_ROWS * TILE_COLS);
  int64_t pending = 0;
  const int64_t cols_max = std::min<int64_t>(TILE_COLS, n);
  at::Tensor buffer = at::empty({std::min<int64_t>(TILE_ROWS, n), cols_max}, x.options());

  auto compact = [&]() {
    for (auto& v : local) {
      pool.insert(pool.end(), v.begin(), v.end());
      v.clear();
    }
    pending = 0;
    if (static_cast<int64_t>(pool.size()) >= k) {
      keep_best(pool, k);
      const auto worst = *std::max_element(pool.begin(), pool.end(), better<acc_t>);
      bar = {worst.score, worst.row, worst.col};
    }
  };

  for (int64_t i0 = 0; i0 < n - 1; i0 += TILE_ROWS) {
    const int64_t i1 = std::min(i0 + TILE_ROWS, n);
    const at::Tensor rows_t = x.narrow(1, i0, i1 - i0).t();  // [rows, m]
    for (int64_t j0 = i0; j0 < n; j0 += TILE_COLS) {
      const int64_t j1 = std::min(j0 + TILE_COLS, n);
      if (j1 <= i0 + 1) continue;  // no j > i in this tile
      at::Tensor tile = buffer.narrow(0, 0, i1 - i0).narrow(1, 0, j1 - j0);
      at::mm_out(tile, rows_t, x.narrow(1, j0, j1 - j0));
      const acc_t* data = tile.data_ptr<acc_t>();
      const int64_t ld = tile.stride(0);
      const Bar<acc_t> snapshot = bar;
      at::parallel_for(i0, i1, 16, [&](int64_t begin, int64_t end) {
        auto& out = local[at::get_thread_num()];
        for (int64_t i = begin; i < end; ++i) {
          const acc_t* row = data + (i - i0) * ld;
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
            const acc_t v = row[j - j0];
            const acc_t s = std::abs(v);
            if (s < snapshot.score || s == acc_t(0)) continue;  // the common case: rejected
            if (clears(s, i, j, snapshot)) out.push_back({s, v, i, j});
          }
        }
      });
      for (const auto& v : local) pending += static_cast<int64_t>(v.size());
      if (pending + static_cast<int64_t>(pool.size()) > bound) compact();
    }
  }
  compact();
  return pool;
}

// Cold-start floor: the Gram matrix of an evenly spaced sample of columns estimates
// the score distribution; its quantile at 4× the kept fraction, lowered by 20%, is
// (with a large margin) below the true k-th score. Without it the bar would start at 0
// and the first tiles would flood the candidate pool.
template <typename acc_t>
acc_t sampled_floor(const at::Tensor& x, int64_t k) {
  const int64_t n = x.size(1);
  const int64_t s = std::min<int64_t>(n, 512);
  if (s < 64) return acc_t(0);
  const double fraction = static_cast<double>(k) / (static_cast<double>(n) * (n - 1) / 2);
  const int64_t sample_pairs = s * (s - 1) / 2;
  const int64_t rank = static_cast<int64_t>(std::ceil(4.0 * fraction * sample_pairs));
  if (rank >= sample_pairs / 2) return acc_t(0);  // dense selection: nothing to prune
  at::Tensor idx = at::linspace(0, n - 1, s, x.options().dtype(at::kDouble)).to(at::kLong);
  at::Tensor xs = x.index_select(1, idx);
  at::Tensor g = at::mm(xs.t(), xs).contiguous();
  const acc_t* pg = g.data_ptr<acc_t>();
  std::vector<acc_t> scores;
  scores.reserve(sample_pairs);
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = i + 1; j < s; ++j) scores.push_back(std::abs(pg[i * s + j]));
  std::nth_element(scores.begin(), scores.begin() + rank, scores.end(), std::greater<acc_t>());
  return static_cast<acc_t>(0.8 * scores[rank]);
}

template <typename acc_t>
std::vector<at::Tensor> gram_topk_impl(const at::Tensor& a, int64_t k, bool cosine, double hint) {
  const auto dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = a.to(dtype).contiguous();
  if (cosine) {
    // scale every column to unit norm; a zero column stays zero (cosine 0 with everything)
    at::Tensor norms = at::linalg_vector_norm(x, 2, {0}, false, c10::nullopt);
    norms = at::where(norms > 0, norms, at::ones_like(norms));
    x = x / norms;
  }
  // A floor only prunes: with >= k candidates at or above it the result is exact;
  // with fewer it was too high (the input changed) and a second pass runs without it.
  const acc_t floor = hint > 0 ? static_cast<acc_t>(hint * 0.9) : sampled_floor<acc_t>(x, k);
  std::vector<Candidate<acc_t>> pool = select_pass<acc_t>(x, k, floor);
  if (floor > 0 && static_cast<int64_t>(pool.size()) < k) pool = select_pass<acc_t>(x, k, acc_t(0));
  std::sort(pool.begin(), pool.end(), better<acc_t>);

  auto values = at::zeros({k}, a.options().dtype(dtype).device(at::kCPU));
  auto rows = at::full({k}, -1, a.options().dtype(at::kLong).device(at::kCPU));
  auto cols = at::full({k}, -1, a.options().dtype(at::kLong).device(at::kCPU));
  acc_t* pv = values.data_ptr<acc_t>();
  int64_t* pr = rows.data_ptr<int64_t>();
  int64_t* pc = cols.data_ptr<int64_t>();
  const int64_t filled = std::min<int64_t>(k, static_cast<int64_t>(pool.size()));
  for (int64_t p = 0; p < filled; ++p) {
    pv[p] = pool[p].value;
    pr[p] = pool[p].row;
    pc[p] = pool[p].col;
  }
  return {values, rows, cols};
}

std::vector<at::Tensor> gram_topk_cpu(const at::Tensor& a, int64_t k, bool cosine, double hint) {
  TORCH_CHECK(a.device().is_cpu(), "aosae gram_topk_cpu: expected a CPU tensor, got ", a.device());
  TORCH_CHECK(a.dim() == 2, "aosae gram_topk_cpu: expected a 2-D tensor [m, n], got ", a.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()),
              "aosae gram_topk_cpu: expected a floating tensor, got ", a.scalar_type());
  const int64_t n = a.size(1);
  TORCH_CHECK(n >= 2 && k >= 1 && k <= n * (n - 1) / 2,
              "aosae gram_topk_cpu: k must be in [1, n(n-1)/2], got k = ", k, " for n = ", n);
  at::NoGradGuard no_grad;
  if (a.scalar_type() == at::kDouble) return gram_topk_impl<double>(a, k, cosine, hint);
  return gram_topk_impl<float>(a, k, cosine, hint);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aosae C++ CPU kernels";
  m.def("gram_topk_cpu", &gram_topk_cpu, "fused top-k of the upper-triangular Gram matrix (CPU)",
        pybind11::arg("a"), pybind11::arg("k"), pybind11::arg("cosine"), pybind11::arg("hint"));
}

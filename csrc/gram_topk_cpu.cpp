// Fused top-k of the Gram matrix C = aᵀa on CPU, without materialising C.
//
// The upper triangle of C is cut into tiles of TILE_ROWS rows × TILE_COLS columns
// (a row block [i0, i1) against the columns [i0, n), chunk by chunk). OpenMP threads
// take whole tiles: each tile is one single-threaded BLAS GEMM (at::mm_out inside a
// parallel region) into the thread's own buffer, then a scan that keeps only the
// entries beating the current k-th best key. When a thread's candidates exceed a
// bound they are cut back to its best k and the shared threshold rises. Memory is
// O(TILE_ROWS · TILE_COLS · threads + k), never O(n²); FLOPs are half of the full
// GEMM plus the small triangles inside the diagonal tiles.
//
// Order (the op's contract): |value| descending, then (row, col) ascending. It is
// a total order, so the result is exact and deterministic whatever the tile order.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
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

// true when bar x rejects at least everything bar y rejects
template <typename acc_t>
inline bool stricter(const Bar<acc_t>& x, const Bar<acc_t>& y) {
  return clears(x.score, x.row, x.col, y);
}

struct Tile {
  int64_t i0, i1, j0, j1;
};

// All tiles of the upper triangle: row block [i0, i1) against columns [i0, n) in
// chunks, largest first so that the threads finish together.
std::vector<Tile> upper_tiles(int64_t n, int64_t tile_rows) {
  std::vector<Tile> tiles;
  for (int64_t i0 = 0; i0 < n - 1; i0 += tile_rows) {
    const int64_t i1 = std::min(i0 + tile_rows, n);
    for (int64_t j0 = i0; j0 < n; j0 += TILE_COLS) tiles.push_back({i0, i1, j0, std::min(j0 + TILE_COLS, n)});
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) {
    return (a.i1 - a.i0) * (a.j1 - a.j0) > (b.i1 - b.i0) * (b.j1 - b.j0);
  });
  return tiles;
}

// One pass over the upper triangle. Threads take whole tiles (each a single-threaded
// GEMM into the thread's own buffer: no synchronisation inside a tile) and keep
// their own candidates. A thread's k-th best key is a valid bar for everyone (it
// alone holds k better pairs), so the strictest one is shared through `shared`.
template <typename acc_t>
std::vector<Candidate<acc_t>> select_pass(const at::Tensor& x, const acc_t* inv, int64_t k, acc_t floor) {
  const int64_t n = x.size(1);
  // small n: thinner row blocks, so that there are enough tiles to keep every thread busy
  const int64_t tile_rows = std::clamp<int64_t>(n / 16, 32, TILE_ROWS);
  const std::vector<Tile> tiles = upper_tiles(n, tile_rows);
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tiles.size()))));
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max();
  const int64_t bound = std::max<int64_t>(2 * k, TILE_ROWS * TILE_COLS);  // cut back beyond this
  const int64_t buffer_size = std::min<int64_t>(tile_rows, n) * std::min<int64_t>(TILE_COLS, n);
  std::vector<std::vector<Candidate<acc_t>>> local(threads);
  Bar<acc_t> shared{floor, kInf, kInf};
  std::mutex mutex;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;

#pragma omp parallel num_threads(threads)
  {
    at::NoGradGuard no_grad;  // grad mode is thread-local: the worker threads need their own guard
    auto& out = local[omp_get_thread_num()];
    try {
      at::Tensor buffer = at::empty({buffer_size}, x.options());
      for (int64_t t = next++; t < static_cast<int64_t>(tiles.size()); t = next++) {
        const Tile& tile = tiles[t];
        const int64_t rows = tile.i1 - tile.i0, cols = tile.j1 - tile.j0;
        // a contiguous view, so BLAS writes it directly (a strided `out` costs a copy)
        at::Tensor c = buffer.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(c, x.narrow(1, tile.i0, rows).t(), x.narrow(1, tile.j0, cols));
        Bar<acc_t> bar;
        {
          std::lock_guard<std::mutex> lock(mutex);
          bar = shared;
        }
        const acc_t* data = c.data_ptr<acc_t>();
        for (int64_t i = tile.i0; i < tile.i1; ++i) {
          const acc_t* row = data + (i - tile.i0) * cols - tile.j0;
          const acc_t inv_i = inv ? inv[i] : acc_t(1);
          for (int64_t j = std::max(tile.j0, i + 1); j < tile.j1; ++j) {
            // cosine scales after the GEMM, so an exactly orthogonal pair stays exactly 0
            const acc_t v = inv ? row[j] * inv_i * inv[j] : row[j];
            const acc_t s = std::abs(v);
            if (s < bar.score || s == acc_t(0)) continue;  // the common case: rejected
            if (clears(s, i, j, bar)) out.push_back({s, v, i, j});
          }
        }
        if (static_cast<int64_t>(out.size()) > bound) {
          keep_best(out, k);
          const auto worst = *std::max_element(out.begin(), out.end(), better<acc_t>);
          const Bar<acc_t> mine{worst.score, worst.row, worst.col};
          std::lock_guard<std::mutex> lock(mutex);
          if (stricter(mine, shared)) shared = mine;
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
      next = static_cast<int64_t>(tiles.size());  // stop the other threads
    }
  }
  if (error) std::rethrow_exception(error);

  std::vector<Candidate<acc_t>> pool;
  for (auto& v : local) {
    pool.insert(pool.end(), v.begin(), v.end());
    std::vector<Candidate<acc_t>>().swap(v);
  }
  keep_best(pool, k);
  return pool;
}

// Cold-start floor: the Gram matrix of an evenly spaced sample of columns estimates
// the score distribution; its quantile at 2× the kept fraction, lowered by 10%, is
// (with a margin) below the true k-th score. Without it the bar would start at 0
// and the first tiles would flood the candidate pool.
template <typename acc_t>
acc_t sampled_floor(const at::Tensor& x, const acc_t* inv, int64_t k) {
  const int64_t n = x.size(1);
  const int64_t s = std::min<int64_t>(n / 8, 512);  // its GEMM costs ≤ 1/64 of the full one
  if (s < 64) return acc_t(0);
  const double fraction = static_cast<double>(k) / (static_cast<double>(n) * (n - 1) / 2);
  const int64_t sample_pairs = s * (s - 1) / 2;
  const int64_t rank = static_cast<int64_t>(std::ceil(2.0 * fraction * sample_pairs));
  if (rank >= sample_pairs / 2) return acc_t(0);  // dense selection: nothing to prune
  at::Tensor idx = at::linspace(0, n - 1, s, x.options().dtype(at::kDouble)).to(at::kLong);
  at::Tensor xs = x.index_select(1, idx);
  at::Tensor g = at::mm(xs.t(), xs).contiguous();
  const acc_t* pg = g.data_ptr<acc_t>();
  const int64_t* pidx = idx.data_ptr<int64_t>();
  std::vector<acc_t> scores;
  scores.reserve(sample_pairs);
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = i + 1; j < s; ++j) {
      const acc_t v = pg[i * s + j];
      scores.push_back(std::abs(inv ? v * inv[pidx[i]] * inv[pidx[j]] : v));
    }
  std::nth_element(scores.begin(), scores.begin() + rank, scores.end(), std::greater<acc_t>());
  return static_cast<acc_t>(0.9 * scores[rank]);
}

template <typename acc_t>
std::vector<at::Tensor> gram_topk_impl(const at::Tensor& a, int64_t k, bool cosine, double hint) {
  const auto dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = a.detach().to(dtype).contiguous();
  // cosine: 1/‖x_j‖ per column (1 for a zero column, whose cosines are then 0)
  at::Tensor inv_norms;
  if (cosine) {
    at::Tensor norms = at::linalg_vector_norm(x, 2, {0}, false, c10::nullopt);
    inv_norms = at::where(norms > 0, norms.reciprocal(), at::ones_like(norms)).contiguous();
  }
  const acc_t* inv = cosine ? inv_norms.data_ptr<acc_t>() : nullptr;
  // A floor only prunes: with >= k candidates at or above it the result is exact;
  // with fewer it was too high (the input changed) and a second pass runs without it.
  const acc_t floor = hint > 0 ? static_cast<acc_t>(hint * 0.9) : sampled_floor<acc_t>(x, inv, k);
  std::vector<Candidate<acc_t>> pool = select_pass<acc_t>(x, inv, k, floor);
  if (floor > 0 && static_cast<int64_t>(pool.size()) < k) pool = select_pass<acc_t>(x, inv, k, acc_t(0));
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

void register_sparse(pybind11::module& m);    // csrc/gram_topk_sparse.cpp
void register_backward(pybind11::module& m);  // csrc/gram_topk_backward.cpp
void register_coactive_backward(pybind11::module& m);  // csrc/coactive_backward.cpp
void register_topk_sum_backward(pybind11::module& m);  // csrc/topk_sum_backward.cpp
void register_sparse_input(pybind11::module& m);  // csrc/sparse_input.cpp
void register_sparse_coding(pybind11::module& m);  // csrc/sparse_coding.cpp
void register_row_topk(pybind11::module& m);  // csrc/row_topk.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aosae C++ CPU kernels";
  m.def("gram_topk_cpu", &gram_topk_cpu, "fused top-k of the upper-triangular Gram matrix (CPU)",
        pybind11::arg("a"), pybind11::arg("k"), pybind11::arg("cosine"), pybind11::arg("hint"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  register_sparse(m);
  register_backward(m);
  register_coactive_backward(m);
  register_topk_sum_backward(m);
  register_sparse_input(m);
  register_sparse_coding(m);
  register_row_topk(m);
}

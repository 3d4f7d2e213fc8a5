// The k largest of each row of (pre + bias), in ascending column order (CPU, float32): a TopK SAE's
// selection from the encoder's product (aosae/ops/latent_selection.py:tiled_topk), the bias added
// as the row is read, so the product is written once, without addmm's broadcast copy of the bias.
//
// Per row, two reads of its n values (the second from L2):
//   1. the maxima of 16·⌊n/1024⌋ groups of 64 values (a column's lane in 64 vectors); the largest t
//      with k of them >= t is a lower bound of the k-th largest, since k values reach it;
//   2. every value not below t is a candidate (≈ k·1.2 on random rows, in column order); the
//      k best of them are kept in column order.
// (Step 1 runs where 16·⌊n/1024⌋ >= 4k; elsewhere t starts at −inf.)
// Ties go to the smaller column, NaN ranks above everything (as torch.topk ranks it), so a NaN
// pre-activation is kept and the step's finiteness check sees it. If the bound lets too many
// through (many ties), the candidates are cut to the k best whenever they reach max(4k, 256), and from then
// on only values above the k-th best so far enter (a later tie loses to the earlier column).
//
// torch.topk over [2048, 16384] took 44–54 ms on 2 cores, this 9–15 ms (AMD EPYC Zen 4;
// benchmarks/NOTES.md, thirty-first pass). No PYBIND11_MODULE here: csrc/gram_topk_cpu.cpp calls
// register_row_topk(m).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include "simd512.h"

namespace {

using torch::Tensor;

struct Candidate {
  float v;
  int64_t col;
};

// a ranks before b: NaN first, then larger values, then the smaller column
bool ranks_before(const Candidate& a, const Candidate& b) {
  const bool na = std::isnan(a.v), nb = std::isnan(b.v);
  if (na != nb) return na;
  if (!na && a.v != b.v) return a.v > b.v;
  return a.col < b.col;
}

// order-preserving unsigned keys of floats (NaN excluded by the caller)
uint32_t key_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
float float_of(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The largest t with at least k of the m values >= t (NaN not counted; needs m >= k non-NaN, else
// the lowest float), by bisection over the keys: 32 counts of m.
float kth_lower_bound(const std::vector<float>& maxima, int64_t k, std::vector<uint32_t>& keys) {
  const int64_t m = static_cast<int64_t>(maxima.size());
  keys.resize(m);
  for (int64_t a = 0; a < m; ++a) keys[a] = std::isnan(maxima[a]) ? 0u : key_of(maxima[a]);
  uint32_t lo = 0, hi = 0xffffffffu;  // count(keys >= lo) >= k holds at 0 (every key)
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2 + 1;
    int64_t count = 0;
    for (int64_t a = 0; a < m; ++a) count += keys[a] >= mid;
    if (count >= k) lo = mid; else hi = mid - 1;
  }
  return lo == 0 ? -std::numeric_limits<float>::infinity() : float_of(lo);
}

// The k best of the candidates c (in column order) written to v, col in column order.
void keep_best(const std::vector<Candidate>& c, int64_t k, std::vector<float>& scratch, float* v, int64_t* col) {
  const int64_t m = static_cast<int64_t>(c.size());
  TORCH_CHECK(m >= k, "row_topk: ", m, " candidates for k = ", k, " (an internal error: please report it)");
  bool nan = false;
  for (const Candidate& x : c) nan |= std::isnan(x.v);
  if (nan) {  // rare (the step then reports non-finite latents): the full order
    std::vector<Candidate> d(c);
    std::nth_element(d.begin(), d.begin() + (k - 1), d.end(), ranks_before);
    d.resize(k);
    std::sort(d.begin(), d.end(), [](const Candidate& a, const Candidate& b) { return a.col < b.col; });
    for (int64_t s = 0; s < k; ++s) v[s] = d[s].v, col[s] = d[s].col;
    return;
  }
  scratch.resize(m);
  for (int64_t a = 0; a < m; ++a) scratch[a] = c[a].v;
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  const float kth = scratch[k - 1];
  int64_t above = 0;
  for (const Candidate& x : c) above += x.v > kth;
  int64_t ties = k - above, s = 0;  // of the values equal to kth, the first `ties` columns
  for (const Candidate& x : c)
    if (x.v > kth || (x.v == kth && ties-- > 0)) v[s] = x.v, col[s] = x.col, ++s;
}

// One row's candidates into c, in column order. Below `bound` nothing can be among the k best
// (k values reach it); a value equal to it can, so step 2 keeps values not below it. After a cut
// to the k best, only values above the k-th best so far can enter.
struct RowScan {
  int64_t n, k, cap;
  std::vector<Candidate> c;
  std::vector<float> maxima, scratch, best_v;
  std::vector<int64_t> best_col;
  std::vector<uint32_t> keys;
  float bound = -std::numeric_limits<float>::infinity();
  bool strict = false;  // after a cut: a value must be above bound

  RowScan(int64_t n_, int64_t k_) : n(n_), k(k_), cap(std::max<int64_t>(4 * k_, 256)), best_v(k_), best_col(k_) {
    c.reserve(cap + 16);
  }

  bool passes(float v) const { return strict ? !(v <= bound) : !(v < bound); }  // NaN passes

  void push(float v, int64_t j) {
    c.push_back({v, j});
    if (static_cast<int64_t>(c.size()) >= cap) cut();
  }

  void cut() {  // the k best so far, still in column order; the k-th best becomes the bar
    keep_best(c, k, scratch, best_v.data(), best_col.data());
    c.clear();
    float lowest = std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < k; ++s) {
      c.push_back({best_v[s], best_col[s]});
      if (!std::isnan(best_v[s])) lowest = std::min(lowest, best_v[s]);
    }
    bound = lowest;  // (all NaN: +inf, only NaN enters)
    strict = true;
  }

  // a new row: no candidates, no bound yet; whether it has enough groups for the maxima's bound
  bool start() {
    c.clear();
    strict = false;
    bound = -std::numeric_limits<float>::infinity();
    maxima.resize((n / 1024) * 16);
    return static_cast<int64_t>(maxima.size()) >= 4 * k;
  }

  // columns [from, n) one at a time (the portable path; the vector path's last n mod 16)
  void scan(const float* p, const float* bias, int64_t from) {
    for (int64_t j = from; j < n; ++j) {
      const float v = bias ? p[j] + bias[j] : p[j];  // (no + 0.f: -0.0 stays -0.0, as in the vector loop)
      if (passes(v)) push(v, j);
    }
  }

  void scalar(const float* p, const float* bias) {
    if (start()) {
      std::fill(maxima.begin(), maxima.end(), -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < static_cast<int64_t>(maxima.size()) * 64; ++j) {
        const float v = bias ? p[j] + bias[j] : p[j];
        float& m = maxima[(j / 1024) * 16 + (j & 15)];
        m = std::max(m, v);  // (NaN dropped: the bound only gets lower)
      }
      bound = kth_lower_bound(maxima, k, keys);
    }
    scan(p, bias, 0);
  }

#if defined(__x86_64__) || defined(__i386__)
  __attribute__((target("avx512f"))) void avx512(const float* p, const float* bias) {
    if (start()) {
      for (int64_t g = 0; g < static_cast<int64_t>(maxima.size()) / 16; ++g) {
        const float* q = p + g * 1024;
        const float* bq = bias ? bias + g * 1024 : nullptr;
        __m512 m[4];
        for (int u = 0; u < 4; ++u) m[u] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < 1024; j += 64)
          for (int u = 0; u < 4; ++u) {
            __m512 v = _mm512_loadu_ps(q + j + 16 * u);
            if (bq) v = _mm512_add_ps(v, _mm512_loadu_ps(bq + j + 16 * u));
            m[u] = _mm512_max_ps(v, m[u]);  // (a NaN v yields m[u]: dropped, the bound only gets lower)
          }
        _mm512_storeu_ps(maxima.data() + 16 * g, _mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
      }
      bound = kth_lower_bound(maxima, k, keys);
    }
    alignas(64) float lanes[16];
    __m512 vbound = _mm512_set1_ps(bound);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      __m512 v = _mm512_loadu_ps(p + j);
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
      __mmask16 in = strict ? _mm512_cmp_ps_mask(v, vbound, _CMP_NLE_UQ) : _mm512_cmp_ps_mask(v, vbound, _CMP_NLT_UQ);
      if (!in) continue;
      _mm512_store_ps(lanes, v);
      for (; in; in &= in - 1) {
        const int l = __builtin_ctz(in);
        if (passes(lanes[l])) push(lanes[l], j + l);  // (a cut inside the vector raises the bar)
      }
      vbound = _mm512_set1_ps(bound);
    }
    scan(p, bias, j);
  }
#endif
};

// pre [B, n] float32 (columns contiguous, rows at any stride), bias [n] float32 or None, 1 <= k <= n
// -> (values [B, k], columns [B, k] int64), each row's columns ascending. scalar: the portable path
// even where AVX-512 runs (tests).
std::tuple<Tensor, Tensor> row_topk(const Tensor& pre, const c10::optional<Tensor>& bias_in, int64_t k, bool scalar) {
  TORCH_CHECK(pre.dim() == 2 && pre.scalar_type() == at::kFloat && pre.device().is_cpu(),
              "row_topk: pre must be a 2-D float32 CPU tensor, got ", pre.sizes(), " ", pre.scalar_type(), " on ",
              pre.device());
  TORCH_CHECK(pre.size(1) <= 1 || pre.stride(1) == 1, "row_topk: pre's columns must be contiguous");
  const int64_t rows = pre.size(0), n = pre.size(1), stride = pre.stride(0);
  TORCH_CHECK(k >= 1 && k <= n, "row_topk: k must be in [1, n = ", n, "], got ", k);
  Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == n && bias.scalar_type() == at::kFloat && bias.device().is_cpu(),
                "row_topk: bias must be a float32 CPU tensor [n = ", n, "], got ", bias.sizes(), " ",
                bias.scalar_type());
  }
  Tensor values = at::empty({rows, k}, pre.options());
  Tensor cols = at::empty({rows, k}, pre.options().dtype(at::kLong));
  const float* p = pre.data_ptr<float>();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* v = values.data_ptr<float>();
  int64_t* c = cols.data_ptr<int64_t>();
  const bool vector = !scalar && aosae::has_avx512();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    RowScan scan(n, k);
    for (int64_t r = r0; r < r1; ++r) {
#if defined(__x86_64__) || defined(__i386__)
      if (vector) scan.avx512(p + r * stride, b);
      else scan.scalar(p + r * stride, b);
#else
      scan.scalar(p + r * stride, b);
#endif
      keep_best(scan.c, k, scan.scratch, v + r * k, c + r * k);
    }
  });
  return {values, cols};
}

}  // namespace

void register_row_topk(pybind11::module& m) {
  m.def("row_topk_vectorized", &aosae::has_avx512, "whether row_topk runs its AVX-512 path on this CPU");
  m.def("row_topk", &row_topk,
        "the k largest of each row of pre + bias (float32, CPU): (values, columns) [B, k], columns ascending, "
        "ties to the smaller column, NaN first",
        pybind11::arg("pre"), pybind11::arg("bias"), pybind11::arg("k"), pybind11::arg("scalar") = false,
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

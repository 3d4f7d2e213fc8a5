// The GEMM block's scores (csrc/dense_rows.h) recomputed row by row where they are read, never
// stored: the sum of the k best pairs (csrc/topk_sum.h) and its backward
// (csrc/topk_sum_backward.cpp).
//
// A block score is the moved rows' part Σ_r a_rp·a_rq (csrc/block_product.h) plus the other rows'
// pairs that fall inside U × U ("corrections"), added one by one in the order the stored block
// gets them (csrc/coactive_pairs.h: row latent i's entries in row order, then its partners
// ascending), so a recomputed score has the stored one's bits. BatchTopK puts nearly every pair
// of a batch inside the block (d_sae 262144 mid-training: 2.6·10⁸ scores, 1 GB, against 598
// corrections), and the moved rows are few (h ≈ 15–30): recomputing a row from A_H costs at most
// h fused multiply-adds per score (fewer where a tile leaves out the moved rows holding none of
// its latents), in cache, where storing it cost a write, a page fault per 4 KiB and two more
// passes over memory.

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "block_product.h"
#include "dense_rows.h"

namespace aosae {

// order[x] = the place of the x-th of col[0 .. len) by value, ties in place order: one counting
// pass per byte of the values (a byte every value shares is skipped). tmp: scratch.
inline void stable_order_by_value(const int32_t* col, int64_t len, std::vector<uint32_t>& order,
                                  std::vector<uint32_t>& tmp) {
  order.resize(len);
  tmp.resize(len);
  uint32_t any = 0, all = ~uint32_t(0);
  for (int64_t x = 0; x < len; ++x) {
    order[x] = static_cast<uint32_t>(x);
    any |= static_cast<uint32_t>(col[x]);
    all &= static_cast<uint32_t>(col[x]);
  }
  for (int shift = 0; shift < 32; shift += 8) {
    if (((any ^ all) >> shift & 0xFFu) == 0) continue;  // (every value has this byte)
    int64_t start[257] = {0};
    for (int64_t x = 0; x < len; ++x) ++start[(static_cast<uint32_t>(col[order[x]]) >> shift & 0xFFu) + 1];
    for (int d = 0; d < 256; ++d) start[d + 1] += start[d];
    for (int64_t x = 0; x < len; ++x) tmp[start[static_cast<uint32_t>(col[order[x]]) >> shift & 0xFFu]++] = order[x];
    order.swap(tmp);
  }
}

template <typename acc_t>
class RecomputedBlock {
 public:
  RecomputedBlock() = default;

  // plan: the moved rows and U; rp/cp/vp: the rows the plan was made from (cols ascending per row).
  RecomputedBlock(const DenseRows<acc_t>& plan, const int64_t* rp, const int64_t* cp, const acc_t* vp, int64_t m)
      : width_(plan.size()), h_(static_cast<int64_t>(plan.taken.size())) {
    if (width_ == 0) return;
    a_ = aosae::moved_rows_matrix(plan, rp, cp, vp);
    coefs_ = block_coefficients(a_.data_ptr<acc_t>(), h_, width_);
    // A_H's coefficients are the moved rows' values (a row's latents distinct), 0 elsewhere: the
    // flags from those values, not from the h × width coefficients
    skip_zeros_ = entries_nonzero_ = true;
    for (const int64_t t : plan.taken)
      for (int64_t e = rp[t]; e < rp[t + 1]; ++e) {
        skip_zeros_ &= !(vp[e] < acc_t(0));
        entries_nonzero_ &= vp[e] != acc_t(0);
      }
    const int32_t* position = plan.position.data();
    // corrections: the other rows' pairs (s < q) with both latents in U, listed under row
    // position[cp[s]] in row order. The rows are split into contiguous chunks, counted and then
    // filled in parallel, each chunk's entries placed after the earlier chunks' (the same list
    // whatever the split; with them serial the block took 6.3 ms to build at BatchTopK d_sae
    // 16384's initialisation, 2.7–3.6 ms now).
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({m, 2 * at::get_num_threads(), 32}));
    std::vector<std::vector<int64_t>> at_chunk(chunks, std::vector<int64_t>(width_, 0));
    auto each_pair = [&](int64_t c, std::vector<int64_t>& inside, auto&& take) {
      for (int64_t t = m * c / chunks; t < m * (c + 1) / chunks; ++t) {
        if (plan.moved[t]) continue;
        inside.clear();  // the row's entries in U
        for (int64_t e = rp[t]; e < rp[t + 1]; ++e)
          if (position[cp[e]] >= 0) inside.push_back(e);
        for (size_t a = 0; a < inside.size(); ++a)
          for (size_t b = a + 1; b < inside.size(); ++b)
            take(position[cp[inside[a]]], position[cp[inside[b]]], vp[inside[a]] * vp[inside[b]]);
      }
    };
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<int64_t> inside;
      for (int64_t c = c0; c < c1; ++c) each_pair(c, inside, [&](int32_t p, int32_t, acc_t) { ++at_chunk[c][p]; });
    });
    corr_start_.assign(width_ + 1, 0);
    for (int64_t p = 0; p < width_; ++p) {  // chunk c's first slot in row p: after row p's earlier chunks
      int64_t next = corr_start_[p];
      for (int64_t c = 0; c < chunks; ++c) std::swap(next, at_chunk[c][p]), next += at_chunk[c][p];
      corr_start_[p + 1] = next;
    }
    corr_col_.resize(corr_start_[width_]);
    corr_val_.resize(corr_start_[width_]);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<int64_t> inside;
      for (int64_t c = c0; c < c1; ++c)
        each_pair(c, inside, [&](int32_t p, int32_t col, acc_t v) {
          const int64_t slot = at_chunk[c][p]++;
          corr_col_[slot] = col;
          corr_val_[slot] = v;
        });
    });
    // each row's corrections by column, stably (a column's own keep their order), for tile(). Rows
    // apart in parallel (dealt dynamically: their lists differ in length), each by counting passes
    // on the columns' bytes (std::sort of (column, place) keys took 5 ms of BatchTopK d_sae 16384's
    // step 14, 5·10⁵ corrections in lists of up to 2500; pair_select.h's radix_sort of such keys
    // would also pass over the places' bytes). Then each column's whole score (the moved rows'
    // part, then its corrections in order) goes back to its corrections' places in the listing
    // order, which is the order in which the summing loop of csrc/coactive_pairs.h meets them: it
    // reads them one after the other (a lookup per row pair, bisecting the row's list, was a tenth
    // of the forward at BatchTopK d_sae 16384's step 14; benchmarks/NOTES.md, fourteenth pass).
    for (int64_t p = 0; p < width_; ++p)  // (checked outside the parallel region: nothing may throw in it)
      TORCH_CHECK(corr_start_[p + 1] - corr_start_[p] < (int64_t(1) << 32),
                  "RecomputedBlock: more than 2^32 corrections in one row");
    const auto negative = [](acc_t v) { return v < acc_t(0); };
    nonnegative_ = skip_zeros_ && std::none_of(corr_val_.begin(), corr_val_.end(), negative);
    corr_score_.resize(corr_start_[width_]);
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
    {
      std::vector<uint32_t> order, tmp;
      std::vector<int32_t> col;
      std::vector<acc_t> val, entry;
      std::vector<int32_t> columns;
#pragma omp for schedule(dynamic, 16)
      for (int64_t p = 0; p < width_; ++p) {
        const int64_t b = corr_start_[p], e = corr_start_[p + 1];
        const bool listed_by_column = std::is_sorted(corr_col_.begin() + b, corr_col_.begin() + e);
        if (!listed_by_column) {
          stable_order_by_value(corr_col_.data() + b, e - b, order, tmp);
          col.resize(e - b);
          val.resize(e - b);
          for (int64_t x = 0; x < e - b; ++x) {
            col[x] = corr_col_[b + order[x]];
            val[x] = corr_val_[b + order[x]];
          }
          std::copy(col.begin(), col.end(), corr_col_.begin() + b);
          std::copy(val.begin(), val.end(), corr_val_.begin() + b);
        }
        columns.clear();
        for (int64_t x = b; x < e; ++x)
          if (x == b || corr_col_[x] != corr_col_[x - 1]) columns.push_back(corr_col_[x]);
        entry.resize(columns.size());
        block_entries(coefs_.data(), h_, p, columns.data(), static_cast<int64_t>(columns.size()), entry.data());
        for (int64_t x = b, c = 0; x < e; ++c) {
          acc_t v = entry[c];
          int64_t y = x;
          for (; y < e && corr_col_[y] == columns[c]; ++y) v = v + corr_val_[y];
          for (; x < y; ++x) corr_score_[b + (listed_by_column ? x - b : order[x - b])] = v;
        }
      }
    }
  }

  int64_t width() const { return width_; }
  // whether every coefficient and correction is >= 0, so every score and every term of it is (the
  // backward's products skip their zero coefficients, csrc/block_gradient.h)
  bool nonnegative() const { return nonnegative_; }
  // whether every entry of the moved rows has a non-zero value (A_H[r, p] != 0 exactly where row r
  // has latent p)
  bool entries_nonzero() const { return entries_nonzero_; }
  const acc_t* coefficients() const { return coefs_.data(); }  // [width, h]: A_H's columns
  int64_t moved_rows() const { return h_; }
  const torch::Tensor& moved_rows_matrix() const { return a_; }  // A_H [h, width]

  // out[q - q0] = the moved rows' part of score (p, q), q in [q0, q1)
  void product_row(int64_t p, int64_t q0, int64_t q1, acc_t* out) const {
    block_row(a_.data_ptr<acc_t>(), coefs_.data(), h_, width_, p, q0, q1, out, skip_zeros_);
  }

  // out[(p - p0)·ld + q - q0] = score (p, q), p in [p0, p1), q in [q0, q1)
  void tile(int64_t p0, int64_t p1, int64_t q0, int64_t q1, acc_t* out, int64_t ld) const {
    block_tile(a_.data_ptr<acc_t>(), coefs_.data(), h_, width_, p0, p1, q0, q1, out, ld, skip_zeros_);
    for (int64_t p = p0; p < p1; ++p) {  // a row's corrections are by column: only those in [q0, q1)
      const auto last = corr_col_.begin() + corr_start_[p + 1];
      for (auto e = std::lower_bound(corr_col_.begin() + corr_start_[p], last, static_cast<int32_t>(q0));
           e != last && *e < q1; ++e) {
        acc_t& v = out[(p - p0) * ld + *e - q0];
        v = v + corr_val_[e - corr_col_.begin()];
      }
    }
  }

  // out[q - q0] = score (p, q), q in [q0, q1)
  void row(int64_t p, int64_t q0, int64_t q1, acc_t* out) const { tile(p, p + 1, q0, q1, out, q1 - q0); }

  // the scores of row p's corrections (p, q), in the order they were listed: the other rows in
  // order, each row's pairs (s, q) in U × U with s's latent at p, q ascending
  const acc_t* listed_scores(int64_t p) const { return corr_score_.data() + corr_start_[p]; }

 private:
  int64_t width_ = 0, h_ = 0;
  bool skip_zeros_ = false;  // no coefficient negative: the tiles skip the moved rows with zero coefficients
  bool nonnegative_ = false, entries_nonzero_ = false;
  torch::Tensor a_;
  std::vector<acc_t> coefs_;
  std::vector<int64_t> corr_start_;  // [width + 1]: row p's corrections, by column (each column's in order)
  std::vector<int32_t> corr_col_;
  std::vector<acc_t> corr_val_;
  std::vector<acc_t> corr_score_;  // [corrections]: each one's whole score, in the listing order
};

}  // namespace aosae

// Σ |C_ij| over the k best co-active pairs in one pass over the pairs, without writing them:
// the path of sparse_csr_topk_sum (csrc/gram_topk_sparse.cpp) for rows with no negative value and
// no GEMM block (TopK and BatchTopK once no token holds thousands of latents), float32 on a CPU
// with AVX-512 BW/VL. The full path (csrc/coactive_pairs.h, csrc/topk_sum.h) lists every
// distinct pair in its latent's bucket, counts it in a |C| histogram, and then reads the buckets
// again to sum those above the k-th score; and it writes every row pair's score for the backward.
// Those passes were a third of the forward at TopK d_sae 16384 (benchmarks/NOTES.md, seventeenth
// pass).
//
// Here a sample of the latents (every 16th) is summed first, and its |C| histogram, scaled
// by the row pairs, brackets the k-th score: [lo, hi) where the pairs counted from the top reach
// k·(1 ∓ slack). Then every latent is summed once (Gustavson, as the full path does, the same
// sums): the pairs >= hi are added (float64, per latent) and counted, those inside the bracket
// collected, and each row pair's kept bit written (>= hi: kept; inside: settled once the k-th
// score is known). When the count above hi is below k and the count with the bracket reaches it,
// the k-th score lies inside, and kth_cut_between over the collected pairs gives it and the tie
// cut: the same kept set as the full path's. Otherwise (the sample misled) the caller runs the
// full path.
//
// The total: each latent's kept pairs summed in float64 in a fixed order, the latents then added
// in order, so its bits depend neither on the thread count nor on the schedule (they may differ
// from the full path's, which sums in other groups, in the last bits).

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "buffer_pool.h"
#include "gustavson_avx512.h"
#include "occurrences.h"
#include "pair_select.h"
#include "topk_sum.h"  // SumResult, Bracket, bracket_of

namespace aosae {

// The bracketed sum's values: none negative, none NaN or infinite (TopK's may hold zeros: rows with
// fewer than k positive pre-activations)
inline bool none_negative(const float* vp, int64_t nnz) {
  for (int64_t e = 0; e < nnz; ++e)
    if (!(vp[e] >= 0.0f && std::isfinite(vp[e]))) return false;
  return true;
}

// Every 16th latent sampled; the bracket's slack, in pairs as a share of k (the sample's count at
// the k-th score read 0.95–1.05 k on the sweep's batches; benchmarks/NOTES.md, seventeenth pass)
constexpr int64_t kSampleStride = 16;
constexpr double kBracketSlack = 0.10;

// What the backward reads instead of every row pair's score: one kept bit per row pair, entry e's
// pairs with its row's later entries from bit pair_runs[e] on (-1: none)
struct KeptBits {
  torch::Tensor bits;       // int64 words (one spare word at the end: the backward reads 4 bytes at a time)
  torch::Tensor pair_runs;  // [nnz] int64
};

#if defined(__x86_64__) || defined(__i386__)
namespace bracketed_detail {

using gustavson::TaggedList;

// Lists filled to about the same sizes every call, lent by the calling thread and given back
// with their room (up to kKeepBytes in all): grown afresh, their first-touch pages cost the
// forward more than filling them
struct KeptLists {
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  static std::vector<TaggedList> lend(int parts) {
    std::vector<TaggedList> lists(parts);
    auto& kept = pool();
    for (int p = 0; p < parts && p < static_cast<int>(kept.size()); ++p) std::swap(lists[p], kept[p]);
    for (auto& list : lists) list.clear();
    return lists;
  }
  static void give_back(std::vector<TaggedList>& lists) {
    auto& kept = pool();
    if (kept.size() < lists.size()) kept.resize(lists.size());
    size_t bytes = 0;
    for (size_t p = 0; p < lists.size(); ++p) {
      bytes += lists[p].value.size() * (sizeof(float) + sizeof(int64_t));
      if (bytes <= kKeepBytes) std::swap(kept[p], lists[p]);
    }
  }

 private:
  static std::vector<TaggedList>& pool() {
    thread_local std::vector<TaggedList> lists;
    return lists;
  }
};

// A team thread's accumulator of n zeros and its listing room, kept between calls (each latent's
// listing leaves the accumulator zeroed again)
struct LatentScratch {
  std::vector<float> acc;
  std::vector<int32_t> pj;
  static LatentScratch& of_this_thread(int64_t n, int64_t room) {
    thread_local LatentScratch s;
    if (static_cast<int64_t>(s.acc.size()) < n) s.acc.assign(n, 0.0f);
    if (static_cast<int64_t>(s.pj.size()) < room) s.pj.resize(room);
    return s;
  }
};

// A team thread's byte per latent, kept between calls: whether latent i's pair with each partner
// inside the bracket is kept (each written before it is read; the others are never read)
inline uint8_t* partner_bytes(int64_t n) {
  thread_local std::vector<uint8_t> bytes;
  if (static_cast<int64_t>(bytes.size()) < n) bytes.resize(n);
  return bytes.data();
}

}  // namespace bracketed_detail

// rp, cp (int64), cols (the same latents, narrower), vp >= 0 (float) of rows that the full path
// would sum without a block. bits: asked for (the backward follows). nullopt: the sample's
// bracket did not hold the k-th score (or no bracket could be drawn).
template <typename col_t>
std::optional<SumResult> bracketed_sum(const int64_t* rp, const int64_t* cp, const col_t* cols, const float* vp,
                                       int64_t m, int64_t n, int64_t nnz, int64_t k, int threads, KeptBits* bits,
                                       double slack = kBracketSlack) {
  using bracketed_detail::KeptLists;
  using bracketed_detail::LatentScratch;
  using gustavson::TaggedList;
  int64_t all_pairs = 0;  // the row pairs: at most k of them leave no choice to make (the full path sums them all)
  for (int64_t t = 0; t < m; ++t) all_pairs += (rp[t + 1] - rp[t]) * (rp[t + 1] - rp[t] - 1) / 2;
  if (all_pairs <= k) return std::nullopt;
  const std::vector<uint8_t> none(m, 0);
  KeptOccurrences kept_occ;
  fill_occurrences(kept_occ.lists, rp, cp, none.data(), m, n, nnz, threads, 64);
  const Occurrences& occ = kept_occ.lists;
  int64_t widest = 0;  // the most row pairs of one latent: the listing's room
  for (int64_t i = 0; i < n; ++i) widest = std::max(widest, occ.pairs_start[i + 1] - occ.pairs_start[i]);

  // latent i's row pairs into acc, its distinct partners listed in pj[0 .. touched) (those with a
  // non-zero product: a zero value's pairs are no pairs); `returned`: a sum came back to exactly 0
  // after a non-zero product, so a partner may be listed twice. With no value negative a sum only
  // grows, so it never does: the pass below leaves such rows to the full path rather than list
  // them otherwise.
  auto add_latent = [&](int64_t i, float* acc, int32_t* pj, bool& returned) {
    return gustavson::add_runs<col_t, true>(acc, cols, vp, occ.entry.data(), occ.end.data(), occ.ptr[i], occ.ptr[i + 1],
                                            pj, returned);
  };

  // The sample: every kSampleStride-th latent summed, its non-zero |C| histogrammed, acc cleared.
  std::vector<std::vector<int64_t>>& hists = ZeroedCounts<int64_t, 1>::lend(threads, kMagnitudeBins);
  int64_t sampled_pairs = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sampled_pairs)
  {
    LatentScratch& own = LatentScratch::of_this_thread(n, widest + 16);
    float* acc = own.acc.data();
    int32_t* pj = own.pj.data();
    int64_t* hist = hists[selection_thread()].data();
#pragma omp for schedule(dynamic, 8)
    for (int64_t i = kSampleStride / 2; i < n; i += kSampleStride) {
      bool returned = false;
      const int64_t touched = add_latent(i, acc, pj, returned);
      for (int64_t u = occ.ptr[i]; u < occ.ptr[i + 1]; ++u) sampled_pairs += occ.end[u] - occ.entry[u] - 1;
      for (int64_t x = 0; x < touched; ++x) {  // (a partner listed twice reads 0 the second time)
        const float v = acc[pj[x]];
        acc[pj[x]] = 0.0f;
        hist[magnitude_bin(v)] += v != 0.0f;
      }
    }
  }
  std::vector<double> est(kMagnitudeBins, 0.0);
  const double scale = sampled_pairs > 0 ? static_cast<double>(all_pairs) / static_cast<double>(sampled_pairs) : 0.0;
  ZeroedCounts<int64_t, 1>::drain(hists, 0, kMagnitudeBins,
                                  [&](int64_t b, int64_t c) { est[b] += scale * static_cast<double>(c); });
  ZeroedCounts<int64_t, 1>::give_back();
  if (sampled_pairs == 0) return std::nullopt;
  const Bracket<float> br = bracket_of<float>(est, k, slack);
  if (!(br.lo > 0.0f)) return std::nullopt;  // (the sample has fewer than about k pairs)

  // Every latent: its kept pairs' sum, the pairs inside the bracket (value, key), its row pairs'
  // kept bits, and a bit for each of them inside the bracket.
  const int64_t words = occ.pairs_start[n] / 64 + 1;
  uint64_t* word = nullptr;
  int64_t* runs = nullptr;
  if (bits) {
    bits->bits = empty_pooled(words, at::kLong);
    bits->pair_runs = empty_pooled(nnz, at::kLong);
    word = reinterpret_cast<uint64_t*>(bits->bits.data_ptr<int64_t>());
    word[words - 1] = 0;
    runs = bits->pair_runs.data_ptr<int64_t>();  // (every entry is an occurrence: each run's start is written)
  }
  double* latent_total = Scratch<double, 3>::get(n);  // (slot 3: no other user)
  std::fill(latent_total, latent_total + n, 0.0);
  std::vector<TaggedList> inside = KeptLists::lend(threads);
  // the row pairs inside the bracket, a bit each (as word: each latent's from a word boundary; slot 0:
  // no other user). Every partner inside is among its latent's listed pairs: the same acc[j], lo > 0
  // (a partner with only zero products is below it), none listed twice (else `returned`).
  uint64_t* inside_word = word ? Scratch<uint64_t, 0>::get(words) : nullptr;
  int64_t above = 0, below = 0;  // the non-zero pairs above the bracket, and below it
  bool returned = false;
#pragma omp parallel num_threads(threads) reduction(+ : above, below) reduction(|| : returned)
  {
    LatentScratch& own = LatentScratch::of_this_thread(n, widest + 16);
    float* acc = own.acc.data();
    int32_t* pj = own.pj.data();
    TaggedList& mine = inside[selection_thread()];
#pragma omp for schedule(dynamic, 64)
    for (int64_t i = 0; i < n; ++i) {
      if (occ.ptr[i] == occ.ptr[i + 1]) continue;
      const int64_t touched = add_latent(i, acc, pj, returned);
      if (word)
        gustavson::mark_runs(acc, cols, occ.entry.data(), occ.end.data(), occ.ptr[i], occ.ptr[i + 1], br.lo, br.hi,
                             word + occ.pairs_start[i] / 64, inside_word + occ.pairs_start[i] / 64,
                             occ.pairs_start[i], runs);
      double total = 0;
      gustavson::tally_list(acc, pj, touched, br.lo, br.hi, i, n, total, above, below, mine);
      latent_total[i] = total;
    }
  }
  auto give_back = [&] { KeptLists::give_back(inside); };
  int64_t collected = 0;
  for (const auto& list : inside) collected += list.size;
  // (every pair within k: the full path keeps them all, with its own kth and tie cut for that case)
  if (returned || !(above < k && k <= above + collected) || above + collected + below <= k) {
    give_back();
    return std::nullopt;
  }

  const int parts = static_cast<int>(inside.size());
  const KthCut<float> cut = kth_cut_between<float>(
      parts,
      [&](int p, auto&& take) {
        for (int64_t x = 0; x < inside[p].size; ++x) take(Candidate<float>{inside[p].value[x], inside[p].tag[x]});
      },
      k - above, br.lo, br.hi, threads);
  // Each list's kept pairs added to their latents' sums (a latent's pairs lie together in one
  // list, in the order they were listed: the sums' order is fixed), and the kept bits of each
  // latent's row pairs inside the bracket set from its listed pairs' keeps (a latent's words are
  // written only by the thread of its list): the keeps by partner, then the latent's inside bits
  // read back to their partners.
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    const TaggedList& list = inside[p];
    uint8_t* kept_partner = bracketed_detail::partner_bytes(n);
    for (int64_t x = 0; x < list.size;) {
      const int64_t i = list.tag[x] / n, first = i * n, past = first + n;
      // (no branch on kept: about half the pairs inside the bracket are, in no pattern, and the
      // mispredicted branches were most of this loop; adding 0.0 leaves a sum's bits as they are)
      for (; x < list.size && list.tag[x] >= first && list.tag[x] < past; ++x) {
        const float v = list.value[x];
        const bool keep = cut.keeps(v, list.tag[x]);
        latent_total[i] += keep ? static_cast<double>(v) : 0.0;
        kept_partner[list.tag[x] - first] = keep;  // (read below only for this latent's partners inside)
      }
      if (!word) continue;
      int64_t u = occ.ptr[i], at = occ.pairs_start[i];  // the occurrence whose run holds positions [at, at + len)
      int64_t s = occ.entry[u], len = occ.end[u] - s - 1;
      for (int64_t w = occ.pairs_start[i] / 64; w < occ.pairs_start[i + 1] / 64; ++w)
        for (uint64_t b = inside_word[w]; b != 0; b &= b - 1) {
          const int64_t pos = w * 64 + __builtin_ctzll(b);
          while (pos >= at + len) {
            at += len;
            s = occ.entry[++u];
            len = occ.end[u] - s - 1;
          }
          word[w] |= static_cast<uint64_t>(kept_partner[cols[s + 1 + (pos - at)]]) << (pos % 64);
        }
    }
  }
  SumResult r;
  for (int64_t i = 0; i < n; ++i) r.total += latent_total[i];
  r.kth = static_cast<double>(cut.kth);
  r.tie_cut = cut.tie_cut;
  r.kept = k;
  give_back();
  return r;
}
#endif

}  // namespace aosae

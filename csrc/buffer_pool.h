// Large CPU buffers kept between calls (the sparse backend's outputs and blocks).
//
// A training step asks for the same large buffers every step: the selection's outputs (36 B per
// kept pair: 77 MB at TopK d_sae 65536, 386 MB in BatchTopK's first steps there), the long
// rows' u × u block. torch's CPU allocator maps fresh pages for each, and a fresh page costs a
// fault and a zero fill (a fresh 320 MiB block at u 8960: ≈ 80 k faults, 0.14–0.22 s).
// A freed buffer therefore goes back to a pool, and the next request that fits takes it:
// its pages are mapped already. A step's buffers are freed before the step after next asks
// for them again (the loss keeps the last selection for logging), a dozen requests later, so
// the pool unmaps a buffer that kPoolMaxAge later returns have not taken (one the selection
// has outgrown as training moves its pair count), and keeps at most kPoolKeepBytes.

#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include <sys/mman.h>

namespace aosae {

// smaller ones: torch's allocator (malloc's heap reuses them; between 1 and 8 MiB it did not
// reliably inside a training process, whose gigabyte tensors come and go every step)
constexpr size_t kPoolMinBytes = size_t(1) << 20;
constexpr size_t kPoolKeepBytes = size_t(1) << 30;  // free bytes kept at most
constexpr size_t kMapGranule = size_t(2) << 20;  // mappings are rounded up to this
constexpr uint64_t kPoolMaxAge = 32;  // returns to the pool (a step makes about ten)
constexpr size_t kPoolSlackDivisor = 4;  // a new mapping is a quarter larger than asked

class BufferPool {
 public:
  struct Mapping {
    void* data = nullptr;
    size_t length = 0;
    uint64_t returned = 0;  // the pool's clock when it was given back
  };

  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may be freed at exit
    return *pool;
  }

  // A mapping of at least `bytes`: the smallest free one that is not more than twice too large,
  // else a new one, rounded up with 1/kPoolSlackDivisor slack so that the next steps' slightly larger
  // requests fit it (pages never touched cost no memory). A miss means the sizes moved on (the
  // pair count grows early in training): the largest free buffer smaller than the request grows
  // into the new one, so the pool does not hold an outgrown buffer next to its replacement; and
  // when the system refuses a mapping (a memory cap), every free buffer is unmapped. fresh: it
  // is all zeros.
  Mapping take(size_t bytes, bool* fresh) {
    Mapping outgrown;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t q = 0; q < free_.size(); ++q) {
        const size_t len = free_[q].length;
        if (len >= bytes && len <= 2 * bytes + kMapGranule && (best == free_.size() || len < free_[best].length))
          best = q;
      }
      if (best < free_.size()) {
        ++counts_.reused;
        const Mapping m = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        free_bytes_ -= m.length;
        *fresh = false;
        return m;
      }
      // the largest outgrown buffer grows into the new one: its pages stay mapped and only the
      // rest is faulted in (the block's kept bits grow by a few MiB a step early in BatchTopK
      // training at d_sae 262144; a fresh mapping faulted all 30–70 MiB of them, at 10–20 µs a
      // page inside the training process; benchmarks/NOTES.md, twenty-first pass)
      size_t largest = free_.size();
      for (size_t q = 0; q < free_.size(); ++q)
        if (free_[q].length < bytes && (largest == free_.size() || free_[q].length > free_[largest].length))
          largest = q;
      if (largest < free_.size()) {
        outgrown = free_[largest];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(largest));
        free_bytes_ -= outgrown.length;
      }
    }
    const size_t length = (bytes + bytes / kPoolSlackDivisor + kMapGranule - 1) / kMapGranule * kMapGranule;
    if (outgrown.data != nullptr) {
#if defined(__linux__)  // (mremap is Linux's; elsewhere the outgrown buffer is unmapped)
      void* grown = mremap(outgrown.data, outgrown.length, length, MREMAP_MAYMOVE);
      if (grown != MAP_FAILED) {
        std::lock_guard<std::mutex> lock(mutex_);
        ++counts_.grown;
        *fresh = false;
        return {grown, length};
      }
#endif
      munmap(outgrown.data, outgrown.length);
    }
    // 4 KiB pages, no MADV_HUGEPAGE: with the kernel's THP defrag set to "madvise" (the
    // default) a fault in such a region compacts memory synchronously, and inside a training
    // process whose own large tensors fragment memory, the forward at TopK d_sae 65536 took
    // 112–622 ms per step instead of 18–46 ms. Reuse makes the faults rare anyway.
    void* p = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED && release() > 0)
      p = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return {};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++counts_.mapped;
    }
    *fresh = true;
    return {p, length};
  }

  void give(Mapping m) {
    std::vector<Mapping> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      m.returned = ++clock_;
      free_.push_back(m);
      free_bytes_ += m.length;
      // oldest first: past kPoolMaxAge returns, or while over kPoolKeepBytes
      while (!free_.empty() && (clock_ - free_.front().returned > kPoolMaxAge || free_bytes_ > kPoolKeepBytes)) {
        drop.push_back(free_.front());
        free_bytes_ -= free_.front().length;
        free_.erase(free_.begin());
      }
    }
    for (const Mapping& d : drop) munmap(d.data, d.length);
  }

  // Unmaps every free buffer; returns the bytes given back to the system.
  size_t release() {
    std::vector<Mapping> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      free_bytes_ = 0;
    }
    size_t bytes = 0;
    for (const Mapping& d : drop) {
      bytes += d.length;
      munmap(d.data, d.length);
    }
    return bytes;
  }

  size_t free_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return free_bytes_;
  }

  // How the requests were met so far: from a free buffer, by growing an outgrown one, by a new mapping.
  struct Counts {
    int64_t reused = 0, grown = 0, mapped = 0;
  };
  Counts counts() {
    std::lock_guard<std::mutex> lock(mutex_);
    return counts_;
  }

 private:
  BufferPool() = default;
  std::mutex mutex_;
  std::vector<Mapping> free_;  // oldest first
  size_t free_bytes_ = 0;
  uint64_t clock_ = 0;  // returns so far
  Counts counts_;
};

// A 1-D tensor of `count` elements from the pool (undefined below kPoolMinBytes or if mmap
// fails: the caller takes torch's allocator). zero: zero-filled (a reused buffer is cleared).
inline torch::Tensor pooled_tensor(int64_t count, at::ScalarType dtype, bool zero) {
  const size_t bytes = static_cast<size_t>(count) * c10::elementSize(dtype);
  if (count <= 0 || bytes < kPoolMinBytes) return torch::Tensor();
  bool fresh = false;
  const BufferPool::Mapping m = BufferPool::instance().take(bytes, &fresh);
  if (m.data == nullptr) return torch::Tensor();
  if (zero && !fresh) std::memset(m.data, 0, bytes);
  return torch::from_blob(m.data, {count}, [m](void*) { BufferPool::instance().give(m); },
                          at::TensorOptions().dtype(dtype));
}

// An uninitialised 1-D tensor, pooled when large.
inline torch::Tensor empty_pooled(int64_t count, at::ScalarType dtype) {
  torch::Tensor t = pooled_tensor(count, dtype, false);
  return t.defined() ? t : at::empty({count}, at::TensorOptions().dtype(dtype));
}

// A zero-filled [rows, cols] tensor, pooled when large.
inline torch::Tensor zeros_pooled(int64_t rows, int64_t cols, at::ScalarType dtype) {
  torch::Tensor t = pooled_tensor(rows * cols, dtype, true);
  return t.defined() ? t.view({rows, cols}) : at::zeros({rows, cols}, at::TensorOptions().dtype(dtype));
}

}  // namespace aosae

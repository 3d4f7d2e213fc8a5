// A list that grows a fixed chunk at a time from chunks kept between calls: the pairs a pass
// collects inside its bracket (csrc/topk_sum.h).
//
// A training step collects about as many such pairs every step, but spread differently over the
// pass's parts. Kept as one std::vector per part, a part that outgrew its capacity doubled it: a
// fresh mapping, a copy, and pages the system must fault in and zero. Inside a training process
// at d_sae 262144 a page cost 10–24 µs (the step's own tensors churn gigabytes of memory per
// step), and the lists took about two thirds of the forward's faults (benchmarks/NOTES.md,
// twenty-first pass). A chunk is never copied, and a chunk given back is kept for the next list,
// whichever part it goes to: a step whose lists are no longer than the longest seen so far (up
// to the 256 MiB kept) faults no page in them.

#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

namespace aosae {

class ChunkStore {
 public:
  // 256 KiB: a pass has 8 parts per thread, each holding at least one chunk while it lists pairs
  static constexpr size_t kChunkBytes = size_t(256) << 10;
  static constexpr size_t kKeptChunks = 1024;  // at most this many kept free (256 MiB, as the lists kept before per thread)

  static ChunkStore& instance() {
    static ChunkStore* store = new ChunkStore();  // never destroyed: lists may outlive statics at exit
    return *store;
  }

  // throws std::bad_alloc: call it where an exception may leave (not inside an omp parallel region)
  void* take() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        void* chunk = free_.back();
        free_.pop_back();
        return chunk;
      }
    }
    // mapped apart from malloc's heap, whose reuse of the scratch around it they would disturb
    void* chunk = mmap(nullptr, kChunkBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (chunk == MAP_FAILED) throw std::bad_alloc();
    return chunk;
  }

  void give(void* chunk) noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kKeptChunks) {
        free_.push_back(chunk);  // (room reserved: never throws)
        return;
      }
    }
    munmap(chunk, kChunkBytes);
  }

  // Unmaps every free chunk; returns their bytes.
  size_t release() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      free_.reserve(kKeptChunks);
    }
    for (void* chunk : drop) munmap(chunk, kChunkBytes);
    return drop.size() * kChunkBytes;
  }

 private:
  ChunkStore() { free_.reserve(kKeptChunks); }
  std::mutex mutex_;
  std::vector<void*> free_;
};

template <typename T>
class ChunkedList {
  static_assert(std::is_trivially_copyable<T>::value, "ChunkedList holds plain values");
  static_assert(sizeof(T) <= ChunkStore::kChunkBytes, "a value larger than a chunk");

 public:
  static constexpr size_t kPerChunk = ChunkStore::kChunkBytes / sizeof(T);

  ChunkedList() = default;
  ChunkedList(const ChunkedList&) = delete;
  ChunkedList& operator=(const ChunkedList&) = delete;
  ChunkedList(ChunkedList&& other) noexcept : chunks_(std::move(other.chunks_)), size_(other.size_) {
    other.chunks_.clear();
    other.size_ = 0;
  }
  ChunkedList& operator=(ChunkedList&& other) noexcept {
    if (this != &other) {
      clear();
      chunks_.swap(other.chunks_);
      size_ = other.size_;
      other.size_ = 0;
    }
    return *this;
  }
  ~ChunkedList() { clear(); }

  // (may throw std::bad_alloc: call it under at::parallel_for, which rethrows, not inside an omp
  // parallel region)
  void push_back(const T& value) {
    const size_t chunk = size_ / kPerChunk;
    if (chunk == chunks_.size()) {
      chunks_.reserve(chunks_.size() + 1);  // (before the chunk is taken: it cannot leak)
      chunks_.push_back(static_cast<T*>(ChunkStore::instance().take()));
    }
    chunks_[chunk][size_ % kPerChunk] = value;
    ++size_;
  }

  size_t size() const { return size_; }

  // every chunk back to the store
  void clear() {
    for (T* chunk : chunks_) ChunkStore::instance().give(chunk);
    chunks_.clear();
    size_ = 0;
  }

  class const_iterator {
   public:
    const_iterator(const ChunkedList* list, size_t at) : list_(list), at_(at) {}
    const T& operator*() const { return list_->chunks_[at_ / kPerChunk][at_ % kPerChunk]; }
    const_iterator& operator++() {
      ++at_;
      return *this;
    }
    bool operator!=(const const_iterator& other) const { return at_ != other.at_; }

   private:
    const ChunkedList* list_;
    size_t at_;
  };
  const_iterator begin() const { return {this, 0}; }
  const_iterator end() const { return {this, size_}; }

 private:
  std::vector<T*> chunks_;
  size_t size_ = 0;
};

}  // namespace aosae

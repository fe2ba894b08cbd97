// The CPU ops' output cache: see output_cache.h.
#include "output_cache.h"

#include "scratch.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace cnn_ext::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kPage = 4096;
constexpr size_t kDefaultBudget = size_t(1024) << 20;

// Blocks are whole pages, page-aligned (2 MiB-aligned from 2 MiB on); a freed output's block goes back to free_ (in
// the order freed), and the next output of exactly its size takes the newest such block.
class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (std::max<size_t>(nbytes, 1) + kPage - 1) / kPage * kPage;
    void* p = take(bytes);
    if (p == nullptr) {
      // From one huge page's size on, 2 MiB-aligned and advised onto huge pages (scratch.h; the block's tail past
      // its last whole huge page stays on 4 KiB pages, so nothing is rounded up), as torch's own CPU allocator
      // does under THP_MEM_ALLOC_ENABLE=1. The next op reads an output across many pages at once (a convolution
      // reads rows of every input channel's plane, a batch norm a plane per channel): alternating runs on the
      // Intel Xeon, DeepMNIST's training step 70.5-72.5 -> 67.1-68.0 ms (ratio to torch's 0.62-0.63 -> 0.60-0.61).
      const size_t align = bytes >= kHugePageBytes ? kHugePageBytes : kPage;
      if (posix_memalign(&p, align, bytes) != 0) p = nullptr;  // (aligned_alloc wants whole alignments)
      TORCH_CHECK(p != nullptr, "cnn_ext: out of memory allocating ", bytes, " bytes for a CPU output");
      if (align == kHugePageBytes) advise_huge_pages(p, bytes);
    }
    return {p, new Block{p, bytes, this}, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }
  size_t budget() {
    std::lock_guard<std::mutex> lock(mutex_);
    return budget_;
  }

  // A new budget; blocks beyond it are freed now (the oldest first).
  void set_budget(size_t budget) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      budget_ = budget;
      evict_locked(evicted);
    }
    for (void* p : evicted) std::free(p);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
    OutputCache* cache;
  };
  struct Free {
    void* ptr;
    size_t bytes;
  };

  // The most recently freed block of exactly `bytes` (its pages the likeliest to be in cache), or null.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = free_.size(); i-- > 0;) {
      if (free_[i].bytes == bytes) {
        void* p = free_[i].ptr;
        free_.erase(free_.begin() + i);
        cached_ -= bytes;
        return p;
      }
    }
    return nullptr;
  }

  // The oldest blocks leave (into `evicted`, to be freed outside the lock) while the cache holds more than its
  // budget. free_ is in the order the blocks were freed.
  void evict_locked(std::vector<void*>& evicted) {
    size_t oldest = 0;
    while (cached_ > budget_) {
      evicted.push_back(free_[oldest].ptr);
      cached_ -= free_[oldest].bytes;
      ++oldest;
    }
    free_.erase(free_.begin(), free_.begin() + oldest);
  }

  // A freed output's block joins the cache.
  static void give_back(void* context) {
    Block* block = static_cast<Block*>(context);
    OutputCache* cache = block->cache;
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache->mutex_);
      cache->free_.push_back({block->ptr, block->bytes});
      cache->cached_ += block->bytes;
      cache->evict_locked(evicted);
    }
    delete block;
    for (void* p : evicted) std::free(p);
  }

  size_t budget_ = kDefaultBudget;
  std::mutex mutex_;
  std::vector<Free> free_;
  size_t cached_ = 0;
};

// Never destroyed: outputs may be freed after static destructors have run (Python frees tensors at exit).
OutputCache& cache() {
  static OutputCache* instance = new OutputCache();
  return *instance;
}

}  // namespace

at::Tensor empty_output(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "cnn_ext: the output cache serves CPU tensors only");
  const size_t itemsize = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  size_t numel = 1;
  for (const int64_t s : sizes) numel *= size_t(s);
  if (numel * itemsize < kMinBytes || cache().budget() == 0) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

size_t output_cache_bytes() { return cache().bytes(); }
size_t output_cache_budget() { return cache().budget(); }
void set_output_cache_budget(size_t bytes) { cache().set_budget(bytes); }

}  // namespace cnn_ext::cpu

// Scratch memory for the CPU kernels, kept from call to call per calling thread. Allocating megabytes on every call
// costs a page fault per 4 KiB page touched, every time: a batch-1 Winograd forward of 128 channels on 28x28
// measured 1.6-2.1 ms with fresh buffers and 0.75 ms with these (~200 faults per call).
//
// A kernel call takes its buffers through a CallScratch, each from the next of the calling thread's slots (so the
// buffers that one call holds at once never share one; at most kSlots); each slot keeps the largest buffer asked of
// it so far. Contents are what earlier calls left (zeros at first): whatever must be zero is zeroed by its user.
// Buffers are made before a parallel region (an exception, such as a failed allocation, cannot leave an OpenMP
// region), by the thread that calls the kernel: the OpenMP threads of that call use its slices (PerThread). A
// kernel whose helper takes buffers too hands it its CallScratch; kernels called one after another by the same
// thread reuse the slots. CallScratch objects nest: one made while another is alive on the same thread (an op that
// keeps a copy of its input for the kernel it then calls) takes the slots after the ones the outer has taken.
#pragma once

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>

namespace cnn_ext::cpu {

struct FreeScratch {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Scratch = std::unique_ptr<T[], FreeScratch>;

// Buffers of this size or more are made of whole 2 MiB pages where the OS has them (Linux's transparent huge pages,
// asked for by madvise: the default "madvise" mode gives them to no one else). A GEMM reading Winograd's V and U in
// place touches a page per 1-4 rows of each, more than the first-level TLB holds; on huge pages, side by side on
// the Intel Xeon: batch 1 256@14 weight gradient 0.82-0.89 -> 0.71-0.80 ms, batch 8 128@28 3.8-3.9 -> 3.3-3.5,
// batch 8 256@14 4.8-5.0 -> 4.4-4.8; the benchmark's batch-1 ResNet rows 0-9% faster, DeepMNIST's step ~1%.
constexpr size_t kHugePageBytes = size_t(2) << 20;
constexpr size_t kHugeFromBytes = size_t(1) << 20;

// Asks for [p, p + bytes) on huge pages (those 2 MiB pages of it that lie wholly inside); advice only, nothing to do
// where the OS refuses or has none.
inline void advise_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// n elements, 64-byte aligned (a vector never straddles two cache lines), uninitialised; from kHugeFromBytes on,
// whole huge pages (2 MiB-aligned, rounded up to 2 MiB).
template <typename T>
Scratch<T> scratch(int64_t n) {
  const size_t wanted = std::max<size_t>(n * sizeof(T), 1);
  const size_t align = wanted >= kHugeFromBytes ? kHugePageBytes : 64;
  const size_t bytes = (wanted + align - 1) / align * align;  // aligned_alloc: whole alignments
  T* p = static_cast<T*>(std::aligned_alloc(align, bytes));
  if (p == nullptr) throw std::bad_alloc();
  if (align == kHugePageBytes) advise_huge_pages(p, bytes);
  return Scratch<T>(p);
}

constexpr int kSlots = 8;

namespace detail {

// The calling thread's buffer in `slot`, at least `bytes` long.
inline char* slot_buffer(int slot, size_t bytes) {
  thread_local std::array<Scratch<char>, kSlots> buffers;
  thread_local std::array<size_t, kSlots> sizes{};
  if (sizes[slot] < bytes) {
    buffers[slot].reset();
    buffers[slot] = scratch<char>(bytes);
    // Zeroed once: what a kernel reads but never writes (padding columns that feed only discarded results) then
    // holds zeros or values that kernels computed, never arbitrary bits: as floats those are often denormals, whose
    // every multiplication costs a microcode assist (a Winograd forward ran 4x slower on them).
    std::memset(buffers[slot].get(), 0, bytes);
    sizes[slot] = bytes;
  }
  return buffers[slot].get();
}

// n elements of slot `slot`, 64-byte aligned.
template <typename T>
T* slot_scratch(int slot, int64_t n) {
  return reinterpret_cast<T*>(slot_buffer(slot, static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T)));
}

}  // namespace detail

class CallScratch;

// n elements for each of `threads` threads, each slice 64-byte aligned (CallScratch::per_thread). get() is the
// calling OpenMP thread's slice, slice(t) slice t.
template <typename T>
class PerThread {
 public:
  T* get() const { return slice(omp_get_thread_num()); }
  T* slice(int64_t t) const { return data_ + t * n_; }
  int64_t size() const { return n_; }

 private:
  friend class CallScratch;
  PerThread(int slot, int64_t threads, int64_t n)
      : n_((std::max<int64_t>(n, 1) + 63) / 64 * 64), data_(detail::slot_scratch<T>(slot, threads * n_)) {}
  int64_t n_;
  T* data_;
};

// The scratch buffers of one kernel call, each in the next slot in the order asked: the same requests in the same
// order get the same slots on every call, and so the buffers sized by earlier calls.
class CallScratch {
 public:
  CallScratch() : first_(held()), next_(first_) {}
  ~CallScratch() { held() = first_; }
  CallScratch(const CallScratch&) = delete;
  CallScratch& operator=(const CallScratch&) = delete;

  // n elements for the whole call, 64-byte aligned.
  template <typename T>
  T* whole(int64_t n) {
    return detail::slot_scratch<T>(next(), n);
  }
  // n elements for each of `threads` threads.
  template <typename T>
  PerThread<T> per_thread(int64_t threads, int64_t n) {
    return PerThread<T>(next(), threads, n);
  }

 private:
  // The slots taken by the calling thread's live CallScratch objects: the next one made starts after them.
  static int& held() {
    thread_local int slots = 0;
    return slots;
  }
  int next() {
    if (next_ == kSlots) throw std::logic_error("cnn_ext: a CPU kernel call asked for more scratch buffers than kSlots");
    // Only the innermost live CallScratch takes slots: an outer one asking while an inner one holds the next slots
    // would share them.
    if (held() != next_) throw std::logic_error("cnn_ext: scratch asked of a CallScratch that is not the innermost");
    held() = next_ + 1;
    return next_++;
  }
  int first_;
  int next_;
};

}  // namespace cnn_ext::cpu

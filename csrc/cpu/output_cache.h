// The CPU ops' large outputs come from a cache of the blocks that earlier outputs freed.
//
// torch's CPU allocator hands every tensor to malloc, and glibc returns large freed blocks to the system (munmap,
// or trimming the heap's top), so the next output of the same size is fresh memory that page-faults once per 4 KiB
// page it touches: ~3,100 faults, 2-3 ms, for one 12.8 MB activation of DeepMNIST's 32-channel 28x28 layers, and a
// training step ran ~10,000 of them (both backends; torch's own guide suggests jemalloc or tcmalloc for this). A
// training loop asks for the same sizes step after step, so a freed block is kept (up to a budget of free bytes,
// the oldest let go first) and given to the next output of its size: no faults, and its pages are often still in
// cache.
//
// Only outputs of 1 MiB or more come from here (malloc serves small ones well); those of 2 MiB and more are 2 MiB-
// aligned and advised onto transparent huge pages (output_cache.cpp). The tensors are ordinary CPU tensors
// (resizable; the cache is only their allocator). The budget is 1 GiB until set (cnn_ext sets it at import from
// CNN_EXT_OUTPUT_CACHE_MB; 0 keeps nothing).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace cnn_ext::cpu {

// An uninitialised contiguous CPU tensor, as at::empty(sizes, options).
at::Tensor empty_output(c10::IntArrayRef sizes, const at::TensorOptions& options);

// The bytes of the free blocks the cache holds, and its budget.
size_t output_cache_bytes();
size_t output_cache_budget();
// Sets the budget, freeing the oldest blocks beyond it now (0 frees them all; live outputs are not touched: their
// blocks come back when they are freed, and are kept if the budget allows).
void set_output_cache_budget(size_t bytes);

}  // namespace cnn_ext::cpu

// Settings of the CUDA emulator, set from Python (cnn_ext.cuda_emulation) between launches.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cnn_ext::emu {

// The order in which a block's threads run between two barriers.
enum class Order { kForward, kReverse, kRandom };

struct Options {
  Order order = Order::kForward;
  uint64_t seed = 0;                // for Order::kRandom: each (block, phase) gets its own permutation
  int multiprocessor_count = 132;   // an H100/H200, so launch configurations match the GPU the project targets
  bool force_int64_indices = false;
  // Fault injection, for testing the emulator itself: __syncthreads() returns at once, as if the kernel had no
  // barriers, so that tests can show that a missing barrier is caught.
  bool drop_barriers = false;
  bool record_launches = false;  // keep (kernel, grid, block) of every launch, for launch_record()
};

Options& options();

struct LaunchRecord {
  std::string kernel;
  unsigned grid[3], block[3];
};

// The launches recorded since the last call (while Options::record_launches was set), oldest first.
std::vector<LaunchRecord> take_launch_record();

}  // namespace cnn_ext::emu

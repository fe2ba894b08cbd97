// The CUDA execution model on the CPU (see cuda_emulator.h): a grid's blocks are spread over torch's CPU threads;
// within a block every CUDA thread is a fiber (its own stack, switched to and from cooperatively), scheduled by a
// loop that runs each runnable thread until it waits at a barrier or a warp operation, or returns.
#include "cuda_emulator.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "emulator_options.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace cnn_ext::emu {

Options& options() {
  static Options instance;
  return instance;
}

int multiprocessor_count() { return options().multiprocessor_count; }
bool force_int64_indices() { return options().force_int64_indices; }

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Fibers: a stack and a saved context. On x86-64 the switch saves the callee-saved registers and the SSE/x87
// control words and swaps stack pointers (a few nanoseconds); elsewhere it is ucontext's swapcontext.
// ---------------------------------------------------------------------------------------------------------------

constexpr size_t kStackBytes = 256 * 1024;

struct Stack {
  char* base = nullptr;  // lowest usable byte; a guard page lies below it
  size_t size = 0;
};

// Stacks are reused from block to block: a thread that returns without waiting hands its stack to the next one,
// so kernels without barriers run on a single stack.
class StackPool {
 public:
  StackPool() = default;
  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;
  ~StackPool() {
    for (const Stack& s : all_) munmap(s.base - page(), s.size + page());
  }

  Stack take() {
    if (!free_.empty()) {
      Stack s = free_.back();
      free_.pop_back();
      return s;
    }
    void* mem = mmap(nullptr, kStackBytes + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "CUDA emulator: could not map a ", kStackBytes, "-byte thread stack");
    mprotect(mem, page(), PROT_NONE);  // an overflowing thread faults instead of corrupting its neighbour
    Stack s{static_cast<char*>(mem) + page(), kStackBytes};
    all_.push_back(s);
    return s;
  }
  void give(Stack s) { free_.push_back(s); }

 private:
  static size_t page() {
    static const size_t bytes = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return bytes;
  }
  std::vector<Stack> all_, free_;
};

struct Thread;
void fiber_main(Thread* thread);

#if defined(__x86_64__)

extern "C" void cnn_ext_emu_switch(void** save_sp, void* load_sp);
extern "C" void cnn_ext_emu_fiber_entry();

// cnn_ext_emu_switch(&from, to): pushes the callee-saved registers and control words on the current stack, stores
// the stack pointer in *from, loads `to` and pops the same from there. A new fiber's stack is prepared so that the
// first switch to it "returns" into cnn_ext_emu_fiber_entry, which calls fiber_main(r12) from r13.
asm(R"(
    .text
    .p2align 4
    .globl cnn_ext_emu_switch
    .hidden cnn_ext_emu_switch
    .type cnn_ext_emu_switch, @function
cnn_ext_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cnn_ext_emu_switch, .-cnn_ext_emu_switch

    .p2align 4
    .globl cnn_ext_emu_fiber_entry
    .hidden cnn_ext_emu_fiber_entry
    .type cnn_ext_emu_fiber_entry, @function
cnn_ext_emu_fiber_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size cnn_ext_emu_fiber_entry, .-cnn_ext_emu_fiber_entry
)");

struct Context {
  void* sp = nullptr;
};

void start_context(Context& context, const Stack& stack, Thread* thread) {
  // Frame popped by the first switch, lowest address first: control words, r15, r14, r13, r12, rbx, rbp, return
  // address. The entry's call must see a 16-byte aligned stack, so the frame starts 16-byte aligned.
  auto top = reinterpret_cast<uintptr_t>(stack.base + stack.size) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 64 - 16);
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  frame[0] = mxcsr | (static_cast<uint64_t>(fcw) << 32);
  frame[1] = 0;                                                   // r15
  frame[2] = 0;                                                   // r14
  frame[3] = reinterpret_cast<uint64_t>(&fiber_main);             // r13
  frame[4] = reinterpret_cast<uint64_t>(thread);                  // r12
  frame[5] = 0;                                                   // rbx
  frame[6] = 0;                                                   // rbp
  frame[7] = reinterpret_cast<uint64_t>(&cnn_ext_emu_fiber_entry);  // return address
  context.sp = frame;
}

void switch_context(Context& from, Context& to) { cnn_ext_emu_switch(&from.sp, to.sp); }

#else

struct Context {
  ucontext_t uc;
};

void fiber_main_ucontext(unsigned int high, unsigned int low) {
  fiber_main(reinterpret_cast<Thread*>((static_cast<uintptr_t>(high) << 32) | low));
}

void start_context(Context& context, const Stack& stack, Thread* thread) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack.base;
  context.uc.uc_stack.ss_size = stack.size;
  context.uc.uc_link = nullptr;
  const auto bits = reinterpret_cast<uintptr_t>(thread);
  makecontext(&context.uc, reinterpret_cast<void (*)()>(&fiber_main_ucontext), 2,
              static_cast<unsigned int>(bits >> 32), static_cast<unsigned int>(bits));
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

// ---------------------------------------------------------------------------------------------------------------
// One block at a time per OS thread.
// ---------------------------------------------------------------------------------------------------------------

enum class State : uint8_t { kNotStarted, kRunnable, kAtBarrier, kAtWarpOp, kFinished, kFailed };

struct Thread {
  State state = State::kNotStarted;
  uint3 idx{0, 0, 0};
  unsigned linear = 0;
  Context context;
  Stack stack;
  bool has_stack = false;
  BarrierOp barrier_op = BarrierOp::kSync;
  bool predicate = false;
};

struct Warp {
  unsigned arrived = 0;  // lanes waiting in the current operation
  unsigned mask = 0;
  WarpOp op = WarpOp::kSync;
  int width = warpSize;
  uint64_t value[32] = {};
  int arg[32] = {};
  uint64_t result[32] = {};
};

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

std::string format(const uint3& v) {
  std::ostringstream s;
  s << "(" << v.x << ", " << v.y << ", " << v.z << ")";
  return s.str();
}

class BlockRunner {
 public:
  void configure(dim3 grid, dim3 block, void (*body)(void*), void* body_context) {
    body_ = body;
    body_context_ = body_context;
    gridDim = grid;
    blockDim = block;
    const unsigned count = block.x * block.y * block.z;
    threads_.assign(count, Thread{});
    for (unsigned t = 0; t < count; ++t) {
      threads_[t].linear = t;
      threads_[t].idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    }
    warps_.assign((count + warpSize - 1) / warpSize, Warp{});
    order_.resize(count);
  }

  // Runs every thread of block `index` (linear `linear`); returns an error message, empty when none.
  std::string run(uint3 index, uint64_t linear) {
    blockIdx = index;
    for (Thread& t : threads_) t.state = State::kNotStarted;
    for (Warp& w : warps_) w.arrived = 0;
    error_.clear();
    const auto count = static_cast<unsigned>(threads_.size());
    for (uint64_t phase = 0;; ++phase) {
      arrange(linear, phase);
      for (bool progress = true; progress && error_.empty();) {
        progress = false;
        for (unsigned t : order_) {
          Thread& thread = threads_[t];
          if (thread.state == State::kNotStarted) {
            thread.stack = pool_.take();
            thread.has_stack = true;
            start_context(thread.context, thread.stack, &thread);
            thread.state = State::kRunnable;
          }
          if (thread.state != State::kRunnable) continue;
          resume(thread);
          progress = true;
          if (!error_.empty()) break;
          if (thread.state == State::kFinished) release_stack(thread);
        }
      }
      if (!error_.empty()) break;
      unsigned finished = 0, at_barrier = 0, at_warp = 0;
      for (const Thread& t : threads_) {
        finished += t.state == State::kFinished;
        at_barrier += t.state == State::kAtBarrier;
        at_warp += t.state == State::kAtWarpOp;
      }
      if (finished == count) break;
      if (at_warp > 0) {
        report_stuck_warp();
        break;
      }
      if (finished > 0) {
        std::ostringstream s;
        s << "__syncthreads() in block " << format(index) << " was reached by " << at_barrier << " of its " << count
          << " threads while " << finished << " had returned (e.g. thread " << format(first_in(State::kFinished))
          << "): a barrier must be reached by every thread of the block";
        error_ = s.str();
        break;
      }
      release_barrier();
    }
    for (Thread& t : threads_) release_stack(t);
    return error_;
  }

  Thread& current() {
    TORCH_INTERNAL_ASSERT(current_ != nullptr, "CUDA emulator: a device intrinsic was called outside a kernel");
    return *current_;
  }

  // Called on a fiber: leave it for the scheduler, and come back when it resumes this thread.
  void yield(Thread& thread) { switch_context(thread.context, scheduler_); }

  // Called on a fiber: report misuse and leave the fiber for good.
  [[noreturn]] void fail(Thread& thread, const std::string& message) {
    std::ostringstream s;
    s << message << " (block " << format(blockIdx) << ", thread " << format(thread.idx) << ")";
    error_ = s.str();
    thread.state = State::kFailed;
    yield(thread);
    __builtin_unreachable();
  }

  void run_body() { body_(body_context_); }

  int barrier_count() const { return barrier_count_; }
  unsigned threads_in_block() const { return static_cast<unsigned>(threads_.size()); }
  Warp& warp_of(const Thread& thread) { return warps_[thread.linear / warpSize]; }
  unsigned lanes_in_warp(const Thread& thread) const {
    const unsigned first = thread.linear / warpSize * warpSize;
    return std::min<unsigned>(warpSize, threads_in_block() - first);
  }
  Thread& lane(const Thread& thread, unsigned lane_index) {
    return threads_[thread.linear / warpSize * warpSize + lane_index];
  }

 private:
  void resume(Thread& thread) {
    threadIdx = thread.idx;
    current_ = &thread;
    switch_context(scheduler_, thread.context);
    current_ = nullptr;
  }

  void release_stack(Thread& thread) {
    if (thread.has_stack) {
      pool_.give(thread.stack);
      thread.has_stack = false;
    }
  }

  // The order in which threads run until their next wait, during one phase (between two barriers).
  void arrange(uint64_t block_linear, uint64_t phase) {
    std::iota(order_.begin(), order_.end(), 0u);
    switch (options().order) {
      case Order::kForward:
        break;
      case Order::kReverse:
        std::reverse(order_.begin(), order_.end());
        break;
      case Order::kRandom: {
        std::seed_seq seed{static_cast<uint64_t>(options().seed), block_linear, phase};
        std::mt19937_64 rng(seed);
        std::shuffle(order_.begin(), order_.end(), rng);
        break;
      }
    }
  }

  void release_barrier() {
    barrier_count_ = 0;
    const BarrierOp op = first_waiting().barrier_op;
    for (Thread& t : threads_) {
      if (t.barrier_op != op) {
        std::ostringstream s;
        s << "threads of block " << format(blockIdx) << " wait at different kinds of __syncthreads (thread "
          << format(first_waiting().idx) << " and thread " << format(t.idx) << ")";
        error_ = s.str();
      }
      barrier_count_ += t.predicate;
      t.state = State::kRunnable;
    }
  }

  const Thread& first_waiting() const { return first_with(State::kAtBarrier); }
  uint3 first_in(State state) const { return first_with(state).idx; }
  const Thread& first_with(State state) const {
    for (const Thread& t : threads_) {
      if (t.state == state) return t;
    }
    TORCH_INTERNAL_ASSERT(false, "CUDA emulator: no thread in the expected state");
  }

  void report_stuck_warp() {
    const Thread& waiting = first_with(State::kAtWarpOp);
    const Warp& w = warps_[waiting.linear / warpSize];
    std::ostringstream s;
    s << warp_op_name(w.op) << " with mask 0x" << std::hex << w.mask << std::dec << " in block " << format(blockIdx)
      << ", warp " << waiting.linear / warpSize << ": lanes";
    for (unsigned l = 0; l < warpSize; ++l) {
      if ((w.mask >> l & 1u) && !(w.arrived >> l & 1u)) s << " " << l;
    }
    s << " never arrived (they returned or wait elsewhere)";
    error_ = s.str();
  }

  void (*body_)(void*) = nullptr;
  void* body_context_ = nullptr;
  std::vector<Thread> threads_;
  std::vector<Warp> warps_;
  std::vector<unsigned> order_;
  StackPool pool_;
  Context scheduler_;
  Thread* current_ = nullptr;
  int barrier_count_ = 0;
  std::string error_;
};

thread_local BlockRunner t_runner;

// The lane a shuffle reads for `lane`, as CUDA documents it: within the lane's width-wide segment; a source past the
// segment (up/down) or in a later segment (xor) leaves the lane with its own value.
unsigned shuffle_source(WarpOp op, unsigned lane, int arg, unsigned width) {
  const unsigned segment = lane / width * width;
  const auto offset = static_cast<unsigned>(arg);
  switch (op) {
    case WarpOp::kShfl: return segment + offset % width;
    case WarpOp::kShflUp: return lane - segment >= offset ? lane - offset : lane;
    case WarpOp::kShflDown: return lane - segment + offset < width ? lane + offset : lane;
    case WarpOp::kShflXor: return (lane ^ offset) < segment + width ? lane ^ offset : lane;
    default: return lane;
  }
}

bool is_shuffle(WarpOp op) {
  return op == WarpOp::kShfl || op == WarpOp::kShflUp || op == WarpOp::kShflDown || op == WarpOp::kShflXor;
}

// A warp operation's result for one lane, once every lane of the mask has contributed.
uint64_t warp_result(const Warp& w, unsigned lane) {
  if (is_shuffle(w.op)) return w.value[shuffle_source(w.op, lane, w.arg[lane], static_cast<unsigned>(w.width))];
  unsigned ballot = 0;
  for (unsigned l = 0; l < warpSize; ++l) {
    if ((w.mask >> l & 1u) && w.value[l] != 0) ballot |= 1u << l;
  }
  switch (w.op) {
    case WarpOp::kBallot: return ballot;
    case WarpOp::kAny: return ballot != 0;
    case WarpOp::kAll: return ballot == w.mask;
    default: return 0;
  }
}

void fiber_main(Thread* thread) {
  BlockRunner& runner = t_runner;
  try {
    runner.run_body();
  } catch (const std::exception& e) {  // unwinding must not leave the fiber's stack
    runner.fail(*thread, std::string("the kernel threw: ") + e.what());
  }
  thread->state = State::kFinished;
  runner.yield(*thread);
  __builtin_unreachable();
}

}  // namespace

int block_barrier(BarrierOp op, int predicate) {
  BlockRunner& runner = t_runner;
  Thread& thread = runner.current();
  if (options().drop_barriers) return predicate != 0;
  thread.barrier_op = op;
  thread.predicate = predicate != 0;
  thread.state = State::kAtBarrier;
  runner.yield(thread);
  const int count = runner.barrier_count();
  switch (op) {
    case BarrierOp::kAnd: return count == static_cast<int>(runner.threads_in_block());
    case BarrierOp::kOr: return count > 0;
    default: return count;
  }
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  BlockRunner& runner = t_runner;
  Thread& thread = runner.current();
  const unsigned lane = thread.linear % warpSize;
  const std::string name = warp_op_name(op);
  if (!(mask >> lane & 1u)) {
    std::ostringstream s;
    s << name << ": the calling lane " << lane << " is not in the mask 0x" << std::hex << mask;
    runner.fail(thread, s.str());
  }
  const unsigned lanes = runner.lanes_in_warp(thread);
  if (lanes < warpSize && (mask >> lanes) != 0) {
    std::ostringstream s;
    s << name << ": mask 0x" << std::hex << mask << std::dec << " names lanes beyond the block's last thread (this warp has "
      << lanes << " lanes)";
    runner.fail(thread, s.str());
  }
  if (width < 1 || width > warpSize || (width & (width - 1)) != 0) {
    runner.fail(thread, name + ": width must be a power of two from 1 to 32, got " + std::to_string(width));
  }
  Warp& w = runner.warp_of(thread);
  if (w.arrived == 0) {
    w.op = op, w.mask = mask, w.width = width;
  } else if (w.op != op || w.mask != mask || w.width != width) {
    std::ostringstream s;
    s << name << " with mask 0x" << std::hex << mask << std::dec << " met " << warp_op_name(w.op) << " with mask 0x"
      << std::hex << w.mask << std::dec << " in the same warp: the lanes of a mask must make the same call";
    runner.fail(thread, s.str());
  }
  w.value[lane] = value;
  w.arg[lane] = arg;
  w.arrived |= 1u << lane;
  if (w.arrived == mask) {
    for (unsigned l = 0; l < warpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      // A shuffle that reads a lane outside the mask gets an undefined value on a GPU: refused here.
      const unsigned source = shuffle_source(op, l, w.arg[l], static_cast<unsigned>(width));
      if (is_shuffle(op) && !(mask >> source & 1u)) {
        std::ostringstream s;
        s << name << ": lane " << l << " reads lane " << source << ", which is not in the mask 0x" << std::hex
          << mask;
        runner.fail(thread, s.str());
      }
      w.result[l] = warp_result(w, l);
      if (l != lane) runner.lane(thread, l).state = State::kRunnable;
    }
    w.arrived = 0;
  } else {
    thread.state = State::kAtWarpOp;
    runner.yield(thread);
  }
  return w.result[lane];
}

namespace {

std::mutex record_mutex;
std::vector<LaunchRecord> record;

}  // namespace

std::vector<LaunchRecord> take_launch_record() {
  std::lock_guard<std::mutex> lock(record_mutex);
  return std::exchange(record, {});
}

std::string tidy_kernel_name(const char* pretty_function) {
  // GCC: "const char* cnn_ext::emu::kernel_name() [with auto kernel = NAME]".
  std::string name = pretty_function;
  const std::string marker = "kernel = ";
  const auto begin = name.find(marker);
  if (begin != std::string::npos) name = name.substr(begin + marker.size());
  if (!name.empty() && name.back() == ']') name.pop_back();
  for (const std::string prefix : {"cnn_ext::gpu::", "cnn_ext::emu::", "{anonymous}::"}) {
    for (auto at = name.find(prefix); at != std::string::npos; at = name.find(prefix)) name.erase(at, prefix.size());
  }
  return name;
}

void run_grid(const char* kernel, dim3 grid, dim3 block, const char* file, int line, void (*thread_body)(void*),
              void* context) {
  if (options().record_launches) {
    std::lock_guard<std::mutex> lock(record_mutex);
    record.push_back({kernel, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}});
  }
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  // The limits of every GPU since compute capability 3.0; a real launch fails with "invalid configuration".
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && block.x >= 1 && block.y >= 1 && block.z >= 1,
              "CUDA emulator: launch of ", kernel, " at ", file, ":", line, " has an empty grid or block");
  TORCH_CHECK(threads <= 1024 && block.z <= 64, "CUDA emulator: launch of ", kernel, " at ", file, ":", line,
              " asks for a block of ",
              block.x, "x", block.y, "x", block.z, " threads (at most 1024, and z at most 64)");
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535, "CUDA emulator: launch of ", kernel,
              " at ", file, ":", line, " asks for a grid of ", grid.x, "x", grid.y, "x", grid.z,
              " blocks (x at most 2^31 - 1, y and z at most 65535)");
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::mutex mutex;
  uint64_t failed_block = UINT64_MAX;
  std::string failure;
  std::atomic<bool> stop{false};
  at::parallel_for(0, static_cast<int64_t>(blocks), 1, [&](int64_t first, int64_t last) {
    BlockRunner& runner = t_runner;
    runner.configure(grid, block, thread_body, context);
    for (int64_t b = first; b < last && !stop.load(std::memory_order_relaxed); ++b) {
      const auto linear = static_cast<uint64_t>(b);
      const uint3 index{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                        static_cast<unsigned>(linear / (uint64_t(grid.x) * grid.y))};
      std::string error = runner.run(index, linear);
      if (!error.empty()) {
        std::lock_guard<std::mutex> lock(mutex);
        if (linear < failed_block) failed_block = linear, failure = std::move(error);
        stop = true;
      }
    }
  });
  TORCH_CHECK(failure.empty(), "CUDA emulator: ", kernel, " launched at ", file, ":", line, ": ", failure);
}

}  // namespace cnn_ext::emu

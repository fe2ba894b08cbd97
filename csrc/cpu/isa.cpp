#include "isa.h"

#include <ATen/Version.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

namespace cnn_ext::cpu {
namespace {

Isa cpu_supports() {
#if CNN_EXT_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa torch_allows() {
  const std::string capability = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512" (or other platforms')
  if (capability == "AVX512") return Isa::kAvx512;
  if (capability == "AVX2") return Isa::kAvx2;
  return Isa::kDefault;
}

std::atomic<int> limit{static_cast<int>(Isa::kAvx512)};

}  // namespace

Isa machine_isa() {
  static const Isa isa = std::min(cpu_supports(), torch_allows());
  return isa;
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return int64_t(reported);
#endif
    return int64_t(1) << 20;
  }();
  return bytes;
}

Isa isa() { return static_cast<Isa>(std::min(static_cast<int>(machine_isa()), limit.load(std::memory_order_relaxed))); }

Isa set_isa_limit(Isa new_limit) { return static_cast<Isa>(limit.exchange(static_cast<int>(new_limit))); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cnn_ext::cpu

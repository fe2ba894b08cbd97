// The instruction set the CPU kernels use, decided in one place.
//
// Kernels with ISA variants are written once (GCC vector extensions or intrinsics) and compiled per ISA with the
// CNN_EXT_TARGET_* attributes below; at run time by_isa() picks the variant for isa(): the best of AVX-512,
// AVX2+FMA and the portable baseline that both this CPU and torch's own knob allow. torch reads
// ATEN_CPU_CAPABILITY=default|avx2|avx512 once (torch.backends.cpu.get_cpu_capability() reports it), so
// `ATEN_CPU_CAPABILITY=avx2` runs torch's kernels and ours on AVX2, as on an AVX2-only machine. Tests lower it
// further within one process (cnn_ext.cpu_dispatch). CNN_EXT_X86 is the one x86 guard of the CPU code; elsewhere the
// per-ISA variants compile as portable code and isa() is kDefault.
#pragma once

#include <cstdint>

#if defined(__x86_64__)
#define CNN_EXT_X86 1
// AVX-512 here means F, VL, BW and DQ (what torch's AVX512 capability requires), with FMA.
#define CNN_EXT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))
#define CNN_EXT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define CNN_EXT_X86 0
#define CNN_EXT_TARGET_AVX512
#define CNN_EXT_TARGET_AVX2
#endif

namespace cnn_ext::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// What this CPU supports and torch's capability (ATEN_CPU_CAPABILITY) allows; read once.
Isa machine_isa();
// What the kernels use now: machine_isa(), or less while a test has lowered it (set_isa_limit).
Isa isa();
// Lowers (or, with kAvx512, restores) the ISA the kernels use, never above machine_isa(); returns the previous limit.
Isa set_isa_limit(Isa limit);
// "avx512", "avx2" or "default", as torch spells its capabilities (in lower case).
const char* isa_name(Isa isa);
// One core's L2 cache in bytes as the OS reports it (sysconf), 1 MiB where it does not; read once.
int64_t l2_cache_bytes();

// The variant of a kernel compiled for the ISA in use.
template <typename Fn>
Fn by_isa(Fn avx512, Fn avx2, Fn portable) {
  switch (isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return portable;
  }
}

// The widest vectors the ISA in use has, in bytes: 64 (AVX-512), 32 (AVX2) or 16 (the portable build's).
inline int vector_bytes() { return by_isa(64, 32, 16); }

// A kernel body written once and compiled for every ISA: PerIsa<&body>::pick() is the variant for the ISA in use.
// The body must be __attribute__((always_inline)), so that it is compiled inside each variant with its target.
template <auto Body>
struct PerIsa;

template <typename R, typename... Args, R (*Body)(Args...)>
struct PerIsa<Body> {
  using Fn = R (*)(Args...);
  CNN_EXT_TARGET_AVX512 static R avx512(Args... args) { return Body(args...); }
  CNN_EXT_TARGET_AVX2 static R avx2(Args... args) { return Body(args...); }
  static R portable(Args... args) { return Body(args...); }
  static Fn pick() { return by_isa<Fn>(&avx512, &avx2, &portable); }
};

}  // namespace cnn_ext::cpu

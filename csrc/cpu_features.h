// Runtime ISA detection (CPUID + XCR0), so one build runs on any x86-64.
#pragma once

namespace xqk {

struct CpuFeatures {
  bool avx2 = false;  // AVX2 + FMA + F16C with OS-enabled YMM state
  bool avx512_core = false;  // AVX-512 F, BW, VL, DQ with OS-enabled ZMM state
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool avx512_vbmi = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;  // reported, not used
};

const CpuFeatures& cpu_features();

// The kernel set in use: "avx512" (needs avx512_core + bf16 + vnni + vbmi:
// Sapphire Rapids and later, Zen 4 and later), else "avx2" (Haswell and
// later, Zen 1-3), else "generic". XLA_QOPS_CPU_ISA=generic or =avx2 forces
// a set below the best (avx2 only where the CPU has it), for tests.
const char* active_isa();

}  // namespace xqk

// Runtime ISA detection (CPUID + XCR0), so one build runs on any x86-64.
#pragma once

namespace xqk {

struct CpuFeatures {
  bool avx2 = false;  // AVX2 + FMA + F16C with OS-enabled YMM state
  bool avx512_core = false;  // AVX-512 F, BW, VL, DQ with OS-enabled ZMM state
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool avx512_vbmi = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;  // CPUID only (see amx_in_use)
  bool amx_os = false;  // XCR0: the OS saves the tile configuration and data
  bool intel = false;  // CPUID vendor "GenuineIntel"
};

const CpuFeatures& cpu_features();

// The kernel set in use: "avx512" (needs avx512_core + bf16 + vnni + vbmi:
// Sapphire Rapids and later, Zen 4 and later), else "avx2" (Haswell and
// later, Zen 1-3), else "generic". XLA_QOPS_CPU_ISA=generic or =avx2 forces
// a set below the best (avx2 only where the CPU has it), for tests.
const char* active_isa();

// Whether the AVX-512 decode streams prefetch the weights they read next into
// L1 (PREFETCHT0) rather than non-temporally (PREFETCHNTA). Measured on the
// decode shapes, weights from DRAM, two threads: on an Intel Xeon with
// AVX-512 and AMX, T0 runs the streams 1.2-4.9x faster than NTA
// (docs/cpu_kernels.md); on Zen 4 NTA was the faster (T1 measured 1.4x
// slower at M=1). So: T0 on Intel, NTA elsewhere. XLA_QOPS_PREFETCH=t0 or
// =nta overrides it (read once, as XLA_QOPS_CPU_ISA is; other values leave
// the default).
bool stream_prefetch_into_l1();

// Whether the panel path (prefill: 16 rows of x or more) multiplies on AMX
// (kernels_amx.cc): the AVX-512 set is active, the CPU has AMX-TILE, -BF16
// and -INT8, the OS enables their state and grants this process the tile
// data (arch_prctl ARCH_REQ_XCOMP_PERM, asked once), and XLA_QOPS_AMX is not
// "0" (read once). On an Intel Xeon with AMX a 4096x4096 prefill of 256 rows
// runs several times faster than on the AVX-512 microkernels
// (docs/cpu_kernels.md).
bool amx_in_use();

}  // namespace xqk

#include "cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace xqk {
namespace {

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    char vendor[13] = {};
    std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
    f.intel = std::strcmp(vendor, "GenuineIntel") == 0;
  }
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  if (!osxsave) return f;
  const bool fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;  // XMM and YMM state
  // XMM, YMM, opmask, ZMM_Hi256, Hi16_ZMM state enabled by the OS.
  const bool zmm_os = (xcr0 & 0xE6) == 0xE6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm_os && avx && fma && f16c && (b & (1u << 5));
  const bool f_ = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  f.avx512_core = zmm_os && f_ && dq && bw && vl;
  f.avx512_vnni = f.avx512_core && (c & (1u << 11));
  f.avx512_vbmi = f.avx512_core && (c & (1u << 1));
  f.amx_bf16 = d & (1u << 22);
  f.amx_tile = d & (1u << 24);
  f.amx_int8 = d & (1u << 25);
  f.amx_os = (xcr0 & 0x60000) == 0x60000;  // XTILECFG (17) and XTILEDATA (18)
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx512_bf16 = f.avx512_core && (a1 & (1u << 5));
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* active_isa() {
  static const char* isa = [] {
    const char* env = std::getenv("XLA_QOPS_CPU_ISA");
    const CpuFeatures& f = cpu_features();
    if (env && std::strcmp(env, "generic") == 0) return "generic";
    if (env && std::strcmp(env, "avx2") == 0) return f.avx2 ? "avx2" : "generic";
    if (f.avx512_core && f.avx512_bf16 && f.avx512_vnni && f.avx512_vbmi) return "avx512";
    return f.avx2 ? "avx2" : "generic";
  }();
  return isa;
}

bool stream_prefetch_into_l1() {
  static const bool into_l1 = [] {
    const char* env = std::getenv("XLA_QOPS_PREFETCH");
    if (env && std::strcmp(env, "t0") == 0) return true;
    if (env && std::strcmp(env, "nta") == 0) return false;
    return cpu_features().intel;
  }();
  return into_l1;
}

bool amx_in_use() {
  static const bool use = [] {
    const char* env = std::getenv("XLA_QOPS_AMX");
    if (env && std::strcmp(env, "0") == 0) return false;
#ifdef XQK_NO_AMX
    return false;  // built by a compiler without AMX
#else
    const CpuFeatures& f = cpu_features();
    if (std::strcmp(active_isa(), "avx512") != 0) return false;
    if (!(f.amx_tile && f.amx_bf16 && f.amx_int8 && f.amx_os)) return false;
    // Linux (5.16+) hands the tile data state to processes that ask for it.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#endif
  }();
  return use;
}

}  // namespace xqk

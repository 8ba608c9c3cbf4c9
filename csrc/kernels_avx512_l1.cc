// The AVX-512 kernel set with the decode streams' prefetches into L1 (T0),
// for Intel CPUs: see kernels_avx512.cc's head and stream_prefetch_into_l1.
#define XQK_PREFETCH_INTO_L1 1
#include "kernels_avx512.cc"

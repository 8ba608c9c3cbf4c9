// The AVX-512 kernel set for Intel CPUs: the decode streams' prefetches into
// L1 (T0) and the int8 W8A16 decode's products by FMA (see kernels_avx512.cc's
// head, kInt8ByFma and stream_prefetch_into_l1).
#define XQK_PREFETCH_INTO_L1 1
#define XQK_INT8_DOT_BY_FMA 1
#include "kernels_avx512.cc"

/* cpu_features.h - x86 features the portable build picks kernels by, read
 * with cpuid (header-only: the library and the model code both use it).
 * __builtin_cpu_supports covers most names, but not "f16c" in every
 * compiler we build with (clang 14 rejects it), so F16C is read here. */
#ifndef OSCAR_CPU_FEATURES_H
#define OSCAR_CPU_FEATURES_H

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* AVX and F16C, with the OS saving the YMM registers (OSXSAVE, XCR0 bits 1-2). */
static inline int oscar_x86_has_avx_f16c(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
    if ((c & (osxsave | avx | f16c)) != (osxsave | avx | f16c)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 6u) == 6u;
}
#else
static inline int oscar_x86_has_avx_f16c(void) { return 0; }
#endif

#endif

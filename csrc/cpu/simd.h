// Function multi-versioning for the bandwidth-bound CPU loops: an AVX2+FMA clone (x86-64-v3)
// chosen at load time where the CPU has it, and the portable baseline elsewhere. Wheels stay
// portable (no -march=native) while the hot loops still vectorise 4 doubles / 8 floats wide.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define PFK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PFK_SIMD_CLONES
#endif

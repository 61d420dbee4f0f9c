// The one SIMD policy of the CPU kernels: function multi-versioning of the hot loops. Each
// PFK_SIMD_CLONES function gets an AVX-512F clone, an AVX2 clone and the portable baseline; the
// loader picks the widest the CPU has. Wheels stay portable (no -march=native) while the loops
// still run 8 doubles / 16 floats wide where the hardware allows.
//
// The FMA rule, one for every clone: no contraction. CMakeLists.txt compiles the C++ sources with
// -ffp-contract=off, so a clone never fuses a * b + c into an FMA: every product is rounded before
// it is added, as in the baseline. A clone's vector width changes the order of a sum only where a
// loop says so (the `omp simd reduction`s of the Lanczos dot products, which sum in float64).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define PFK_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PFK_SIMD_CLONES
#endif

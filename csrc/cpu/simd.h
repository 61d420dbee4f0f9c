// The one SIMD policy of the CPU kernels: function multi-versioning of the hot loops. Each
// PFK_SIMD_CLONES function gets an x86-64-v4 clone (AVX-512), an x86-64-v3 clone (AVX2 + FMA)
// and the portable baseline; the loader picks the best the CPU has. Wheels stay portable (no
// -march=native) while the loops still run 4-8 doubles wide where the hardware allows.
//
// The FMA rule, one for every clone: the compiler may contract a * b + c into an FMA (GCC's
// default, -ffp-contract=fast); both clones have FMA, the baseline has none. A clone's result can
// therefore differ from the baseline's in the last bits, and a machine always runs the same
// clone. (With contraction off, bench_multi_tensor.py's float32 multi_tensor_dot ran about 1.6x
// slower, A/B against the FMA clones on a shared 2-core x86 machine, December 2026.)
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define PFK_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PFK_SIMD_CLONES
#endif

// ce_hessian family, CPU: the softmax cross-entropy loss-Hessian product (common/ce_hessian.h), one
// row per OpenMP iteration.
//
// Pass 1 walks the row in tiles of kTile elements: the tile's max M (one read), then the tile's
// Σ e^{z−M} and Σ e^{z−M} u (a second read, from L1), summed in the arithmetic dtype, and merged
// into the row's online state in float64 (rescaled to the larger max). Pass 2 writes the output.
// Rows are independent, so the result does not depend on the number of threads. The tile sums'
// order follows the SIMD clone's vector width (and its FMA contraction, cpu/simd.h), so the last
// bits can differ between machines, never between runs.
#include <algorithm>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/ce_hessian.h"
#include "common/lanczos.h"
#include "common/macros.h"
#include "cpu/cpu_kernels.h"
#include "cpu/simd.h"

namespace pfk::cpu {
namespace {

// Two tiles of logits and tangent stay in L1 between the max and the sums.
constexpr int64_t kTile = 512;
// Below this many elements one thread does the work: waking a team costs more than it saves.
constexpr int64_t kParallelWork = int64_t(1) << 16;

template <typename S>
PFK_SIMD_CLONES void ce_row(const S* z, const S* u, int64_t V, double weight, S* out) {
  using T = LanczosTypes<S>;
  using A = typename T::Arith;
  if (weight == 0.0) {  // an ignored row (or every row ignored): zeros, whatever its logits
    const S zero = T::store(A(0));
    std::fill(out, out + V, zero);
    return;
  }
  ce::RowState<A> state = ce::empty_row_state<A>();
  for (int64_t b = 0; b < V; b += kTile) {
    const int64_t len = std::min(kTile, V - b);
    const S* zt = z + b;
    const S* ut = u + b;
    A tile_max = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < len; ++j) tile_max = std::max(tile_max, T::load(zt[j]));
    A s = 0, t = 0;
#pragma omp simd reduction(+ : s, t)
    for (int64_t j = 0; j < len; ++j) {
      const A e = ce::shifted_exp(T::load(zt[j]), tile_max);
      s += e;
      t += e * T::load(ut[j]);
    }
    // The tile's state, relative to its own max, joins the row's through the merge the GPU's
    // block reduction uses, so the CPU tests exercise it too.
    state = ce::merge(state, ce::RowState<A>{tile_max, static_cast<double>(s),
                                             static_cast<double>(t)});
  }
  const ce::RowCoefficients<A> c = ce::row_coefficients(state, weight);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j)
    out[j] = T::store(ce::hessian_entry(c, T::load(z[j]), T::load(u[j])));
}

template <typename S>
void ce_hessian_impl(const void* logits, const void* tangent, const int64_t* target, int64_t N,
                     int64_t V, int64_t ignore_index, bool mean, void* out) {
  const S* z = static_cast<const S*>(logits);
  const S* u = static_cast<const S*>(tangent);
  S* o = static_cast<S*>(out);
  int64_t counted = 0;
  for (int64_t i = 0; i < N; ++i) counted += ce::row_counts(target, i, ignore_index) ? 1 : 0;
  const double weight = ce::reduction_weight(counted, mean);
  const bool parallel = N > 1 && N * V >= kParallelWork;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < N; ++i)
    ce_row(z + i * V, u + i * V, V, ce::row_counts(target, i, ignore_index) ? weight : 0.0,
           o + i * V);
}

}  // namespace

void ce_hessian(const void* logits, const void* tangent, const int64_t* target, int64_t N,
                int64_t V, int64_t ignore_index, bool mean, int dtype, void* out) {
  PFK_DISPATCH_FLOAT_BF16(dtype, "logits", BF16, [&] {
    ce_hessian_impl<scalar_t>(logits, tangent, target, N, V, ignore_index, mean, out);
  });
}

}  // namespace pfk::cpu

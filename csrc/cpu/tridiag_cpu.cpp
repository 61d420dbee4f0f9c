// tridiag family, CPU: csrc/common/tridiag.h driven over the batch by OpenMP threads.
//
// A QL sweep is a chain of rotations, each waiting on the previous one's sqrt and division, so
// one problem at a time leaves the core mostly idle. Each thread therefore keeps kLanes problems
// in flight and advances them in lockstep, one rotation of each per round: the chains are
// independent and the out-of-order core overlaps them. A lane whose problem finishes takes the
// next one from a shared counter. Every problem still runs exactly the sequence of operations of
// tridiag::solve_one, so results do not depend on the thread or lane count.
#include <algorithm>
#include <atomic>
#include <climits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/tridiag.h"
#include "cpu/cpu_kernels.h"
#include "cpu/simd.h"

namespace pfk::cpu {
namespace {

// With full vectors the time goes into rotating pairs of z rows, a streaming loop that AVX2
// runs twice as wide; this view type routes tridiag::rotate_rows to the overload below, which
// picks the instruction set at load time (cpu/simd.h, whose FMA rule applies here too).
struct RowsView {
  double* p;
  double& operator[](int64_t i) const { return p[i]; }
};

PFK_SIMD_CLONES void rotate_rows(RowsView z, int64_t a, int64_t b, int n, double c,
                                    double s) {
  double* __restrict x = z.p + a;
  double* __restrict y = z.p + b;
  for (int k = 0; k < n; ++k) {
    const double xi = x[k], yi = y[k];
    y[k] = s * xi + c * yi;
    x[k] = c * xi - s * yi;
  }
}

// Problems in flight per thread. Without vectors, or with the last row only, a rotation is a
// short dependent chain and more lanes hide more of its latency (measured at n = 64: 2 lanes
// 1.6x, 4 lanes 2.3x the throughput of one, more add little). With all vectors the time goes
// into streaming rows of z, which hides the chain by itself: lanes gain only a few percent.
template <int kMode>
constexpr int kLanes = kMode == tridiag::kAll ? 2 : 4;
// Row-major storage for the rotation of full vectors; plain pointers otherwise.
template <int kMode>
using View = std::conditional_t<kMode == tridiag::kAll, RowsView, double*>;

template <int kMode>
struct Lane {
  tridiag::QLState q;
  int64_t problem;  // -1: idle, the batch is exhausted
  View<kMode> d;
  View<kMode> e;
  View<kMode> z;
};

template <int kMode>
void eigh_lanes(const double* alpha, const double* beta, int64_t batch, int64_t n64,
                double* evals, double* vecs, int32_t* status) {
  const int n = static_cast<int>(n64);
  const int64_t nvec = tridiag::z_words(n64, kMode);
  const int64_t lane_words = 2 * n64 + std::max<int64_t>(nvec, 1);
  std::atomic<int64_t> next_problem{0};
  // Threads only for batches worth waking them for: a Lanczos convergence check solves a few
  // small problems, and on a loaded machine waiting for a second thread to be scheduled can
  // cost milliseconds. Work is counted in element rotations (about n^2 per problem, n^3/16
  // more with all vectors); 2^20 of them take a few milliseconds.
  const int64_t work = batch * n64 * n64 * (kMode == tridiag::kAll ? 1 + n64 / 16 : 1);
#pragma omp parallel if (work >= (int64_t{1} << 20))
  {
    constexpr int kL = kLanes<kMode>;
    std::vector<double> buffer(kL * lane_words);
    Lane<kMode> lanes[kL];

    auto finish = [&](Lane<kMode>& lane, int result) {
      const int64_t p = lane.problem;
      tridiag::write_result<kMode>(n, result, lane.d, lane.z, evals + p * n64, vecs + p * nvec);
      status[p] = result;
    };
    // Moves a lane on until it has a sweep to run or the batch is exhausted.
    auto advance = [&](Lane<kMode>& lane) {
      for (;;) {
        if (lane.problem >= 0) {
          const int plan = tridiag::ql_plan_sweep(lane.q, lane.d, lane.e);
          if (plan == tridiag::kSweep) return;
          if (plan == tridiag::kDone) {
            tridiag::ql_end(lane.q, lane.d);
            finish(lane, tridiag::kOk);
          } else {
            finish(lane, tridiag::kNoConvergence);
          }
        }
        lane.problem = next_problem.fetch_add(1, std::memory_order_relaxed);
        if (lane.problem >= batch) {
          lane.problem = -1;
          lane.q.sweeping = false;
          return;
        }
        const int64_t p = lane.problem;
        tridiag::load_problem(n, alpha + p * n64, beta + p * (n64 - 1), lane.d, lane.e);
        const int begun = tridiag::ql_begin<kMode>(lane.q, n, lane.d, lane.e, lane.z);
        if (begun != tridiag::kOk) {
          finish(lane, begun);
          lane.problem = -1;  // nothing to plan; take the next problem
        }
      }
    };

    for (int k = 0; k < kL; ++k) {
      double* base = buffer.data() + k * lane_words;
      lanes[k].d = View<kMode>{base};
      lanes[k].e = View<kMode>{base + n64};
      lanes[k].z = View<kMode>{base + 2 * n64};
      lanes[k].problem = -1;
      advance(lanes[k]);
    }
    for (;;) {
      // Every busy lane can take this many rotations before its sweep ends.
      int rounds = INT_MAX;
      for (const Lane<kMode>& lane : lanes)
        if (lane.problem >= 0) rounds = std::min(rounds, lane.q.i - lane.q.l + 1);
      if (rounds == INT_MAX) break;
      for (int r = 0; r < rounds; ++r)
        for (Lane<kMode>& lane : lanes)
          if (lane.q.sweeping) tridiag::ql_step<kMode>(lane.q, lane.d, lane.e, lane.z);
      for (Lane<kMode>& lane : lanes)
        if (lane.problem >= 0 && !lane.q.sweeping) advance(lane);
    }
  }
}

}  // namespace

void tridiag_eigh(const double* alpha, const double* beta, int64_t batch, int64_t n, int mode,
                  double* evals, double* vecs, int32_t* status) {
  switch (mode) {
    case tridiag::kNone:
      return eigh_lanes<tridiag::kNone>(alpha, beta, batch, n, evals, vecs, status);
    case tridiag::kLastRow:
      return eigh_lanes<tridiag::kLastRow>(alpha, beta, batch, n, evals, vecs, status);
    case tridiag::kAll:
      return eigh_lanes<tridiag::kAll>(alpha, beta, batch, n, evals, vecs, status);
    default: PFK_CHECK_ARG(false, "vectors", "unknown mode " + std::to_string(mode));
  }
}

}  // namespace pfk::cpu

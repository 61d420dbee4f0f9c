// Symmetric tridiagonal eigensolver shared by the CPU and CUDA backends: implicit QL with
// Wilkinson shifts (the tql2/imtql2 family), float64 throughout.
//
// One problem is T = tridiag(beta, alpha, beta) of order n. The solver works on three arrays
// reached through an index view V (a raw pointer on the CPU; a strided view on CUDA, where one
// thread owns one problem and the batch is the fastest axis so that a warp's loads coalesce):
//   d[0..n)  diagonal, overwritten with the eigenvalues;
//   e[0..n)  off-diagonal, e[i] = T[i, i+1]; e[n-1] is scratch;
//   z        the rows of the eigenvector matrix Z that the mode accumulates:
//              kAll:     z[i*n + k] = Z[k, i] (eigenvector i is the contiguous row i of z, so a
//                        Givens rotation of columns i, i+1 of Z streams two rows of z);
//              kLastRow: z[i] = Z[n-1, i] (each rotation costs O(1) instead of O(n));
//              kNone:    untouched.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace pfk::tridiag {

// Shared with pfkernels/ops/tridiag.py (_TRIDIAG_VECTORS).
enum Vectors : int { kNone = 0, kLastRow = 1, kAll = 2 };
// Per-problem status written by the backends; shared with pfkernels/ops/tridiag.py
// (_TRIDIAG_OK, ...).
enum Status : int { kOk = 0, kNoConvergence = 1, kNonFiniteAlpha = 2, kNonFiniteBeta = 3 };

// LAPACK's dsteqr budget: QL sweeps per problem, in units of n.
constexpr int kMaxSweepsPerEigenvalue = 30;

// The CUDA backend's layout: element i of one problem's array lives at p[i * stride].
struct StridedView {
  double* p;
  int64_t stride;
  PFK_HD double& operator[](int64_t i) const { return p[i * stride]; }
};

// Doubles of z storage one problem needs in the given mode.
PFK_HD int64_t z_words(int64_t n, int mode) {
  return mode == kAll ? n * n : (mode == kLastRow ? n : 0);
}

// Rows a and b of z (columns of Z) turn by the Givens rotation (c, s). Generic over the view; a
// backend may overload rotate_rows for its own view type (found by argument-dependent lookup),
// as the CPU one does to choose a vector instruction set at run time.
template <typename V>
PFK_HD void rotate_rows(V z, int64_t a, int64_t b, int n, double c, double s) {
  for (int k = 0; k < n; ++k) {
    const double zi = z[a + k], zj = z[b + k];
    z[b + k] = s * zi + c * zj;
    z[a + k] = c * zi - s * zj;
  }
}

// Columns i and i+1 of Z turn by the Givens rotation (c, s) the QL sweep just applied to T.
template <int kMode, typename V>
PFK_HD void rotate_z(V z, int n, int i, double c, double s) {
  if constexpr (kMode == kAll) {
    const int64_t a = static_cast<int64_t>(i) * n;
    rotate_rows(z, a, a + n, n, c, s);
  } else if constexpr (kMode == kLastRow) {
    const double zi = z[i], zj = z[i + 1];
    z[i + 1] = s * zi + c * zj;
    z[i] = c * zi - s * zj;
  }
}

// r = sqrt(f^2 + g^2) and 1/r for a Givens rotation. 1/r is formed as sqrt(x) * (1/x) so that
// the square root and the division run side by side instead of one after the other: they sit
// on the critical path of the QL sweep. T is scaled to entries below 1, so the squares cannot
// overflow; when they underflow, the careful libm hypot takes over.
PFK_HD void pythag_and_inverse(double f, double g, double& r, double& inv_r) {
  const double x = f * f + g * g;
  r = sqrt(x);
  inv_r = r * (1.0 / x);
  if (r < 1e-150) {
    r = hypot(f, g);
    inv_r = 1.0 / r;
  }
}

// The state of one problem's QL iteration between rotations. The iteration is exposed in
// pieces (begin / plan_sweep / step / end) so that a driver may interleave several problems:
// each rotation depends on the previous one through a chain of sqrt and division latencies,
// and independent problems fill those stalls (see csrc/cpu/tridiag_cpu.cpp).
struct QLState {
  int n;
  int l;            // d[0..l) are converged eigenvalues
  int m;            // the current unreduced block is [l, m]
  int i;            // the next rotation acts on rows/columns i, i+1
  int sweeps_left;  // LAPACK dsteqr's budget: kMaxSweepsPerEigenvalue * n
  int exponent;     // T was scaled by 2^-exponent
  bool sweeping;
  double s, c, p, g;
};

enum Plan : int { kSweep, kDone, kOutOfSweeps };

// Starts a problem already loaded into d and e: initialises z, scales T by a power of two (exact)
// so that its largest entry is in [0.5, 1) (no overflow in the rotations, the same iteration for
// T and 2^k T). Returns a Status.
template <int kMode, typename V>
PFK_HD int ql_begin(QLState& q, int n, V d, V e, V z) {
  if constexpr (kMode == kAll) {
    for (int64_t k = 0; k < static_cast<int64_t>(n) * n; ++k) z[k] = 0.0;
    for (int i = 0; i < n; ++i) z[static_cast<int64_t>(i) * n + i] = 1.0;
  } else if constexpr (kMode == kLastRow) {
    for (int i = 0; i < n; ++i) z[i] = i == n - 1 ? 1.0 : 0.0;
  }
  e[n - 1] = 0.0;
  // x * 0 is NaN exactly when x is infinite or NaN (fmax would silently drop a NaN), so these
  // sums flag non-finite input on the host and the device alike.
  double dmax = 0.0, emax = 0.0, dbad = 0.0, ebad = 0.0;
  for (int i = 0; i < n; ++i) {
    dmax = fmax(dmax, fabs(d[i]));
    emax = fmax(emax, fabs(e[i]));
    dbad += d[i] * 0.0;
    ebad += e[i] * 0.0;
  }
  q.n = n;
  q.l = 0;
  q.sweeps_left = kMaxSweepsPerEigenvalue * n;
  q.exponent = 0;
  q.sweeping = false;
  if (dbad != 0.0) return kNonFiniteAlpha;
  if (ebad != 0.0) return kNonFiniteBeta;
  const double amax = fmax(dmax, emax);
  if (amax > 0.0) {
    frexp(amax, &q.exponent);
    for (int i = 0; i < n; ++i) {
      d[i] = ldexp(d[i], -q.exponent);
      e[i] = ldexp(e[i], -q.exponent);
    }
  }
  return kOk;
}

// Deflates converged eigenvalues at the top and sets up the next QL sweep (kSweep), or reports
// that all eigenvalues converged (kDone) or that the sweep budget is spent (kOutOfSweeps).
template <typename V>
PFK_HD int ql_plan_sweep(QLState& q, V d, V e) {
  const int n = q.n;
  for (; q.l < n; ++q.l) {
    // The unreduced block starting at l ends at the first negligible off-diagonal, judged
    // relative to its two diagonal neighbours.
    int m = q.l;
    for (; m < n - 1; ++m) {
      const double em = fabs(e[m]);
      if (em <= DBL_EPSILON * (fabs(d[m]) + fabs(d[m + 1])) || em < DBL_MIN) break;
    }
    if (m == q.l) continue;  // d[l] is an eigenvalue
    if (q.sweeps_left-- == 0) return kOutOfSweeps;
    const int l = q.l;
    // Wilkinson shift: the eigenvalue of the leading 2x2 block nearer d[l]; g starts as
    // d[m] - shift, which with e[m-1] defines the first rotation of the implicit QL step.
    const double t = (d[l + 1] - d[l]) / (2.0 * e[l]);
    const double r = hypot(t, 1.0);
    q.g = d[m] - d[l] + e[l] / (t + copysign(r, t));
    q.m = m;
    q.i = m - 1;
    q.s = 1.0;
    q.c = 1.0;
    q.p = 0.0;
    q.sweeping = true;
    return kSweep;
  }
  return kDone;
}

// One Givens rotation of the current sweep (chasing the bulge up from the bottom of the block),
// applied to T and to the accumulated rows of Z. Clears q.sweeping when the sweep is over.
template <int kMode, typename V>
PFK_HD void ql_step(QLState& q, V d, V e, V z) {
  const int i = q.i;
  const double f = q.s * e[i];
  const double b = q.c * e[i];
  double r, inv_r;
  pythag_and_inverse(f, q.g, r, inv_r);
  e[i + 1] = r;
  if (r == 0.0) {
    // Both rotation inputs vanished: T splits at i+1. Undo the partial shift; the next plan
    // finds the split.
    d[i + 1] -= q.p;
    e[q.m] = 0.0;
    q.sweeping = false;
    return;
  }
  const double s = f * inv_r;
  const double c = q.g * inv_r;
  const double g = d[i + 1] - q.p;
  r = (d[i] - g) * s + 2.0 * c * b;
  q.p = s * r;
  d[i + 1] = g + q.p;
  q.g = c * r - b;
  q.s = s;
  q.c = c;
  rotate_z<kMode>(z, q.n, i, c, s);
  if (--q.i < q.l) {
    d[q.l] -= q.p;
    e[q.l] = q.g;
    e[q.m] = 0.0;
    q.sweeping = false;
  }
}

// Undoes the scaling of the (converged) eigenvalues.
template <typename V>
PFK_HD void ql_end(const QLState& q, V d) {
  if (q.exponent != 0)
    for (int i = 0; i < q.n; ++i) d[i] = ldexp(d[i], q.exponent);
}

// Eigenvalues (unsorted, in d) and the requested rows of Z for a T loaded into d and e.
// Returns a Status.
template <int kMode, typename V>
PFK_HD int ql_implicit(int n, V d, V e, V z) {
  QLState q;
  const int status = ql_begin<kMode>(q, n, d, e, z);
  if (status != kOk) return status;
  int plan;
  while ((plan = ql_plan_sweep(q, d, e)) == kSweep)
    while (q.sweeping) ql_step<kMode>(q, d, e, z);
  if (plan == kOutOfSweeps) return kNoConvergence;
  ql_end(q, d);
  return kOk;
}

// Sorts eigenvalues ascending (moving the z rows along) and fixes each eigenvector's sign so
// that its last component, Z[n-1, i], is >= 0. That convention is what makes the kLastRow
// result equal to the last row of the kAll one.
template <int kMode, typename V>
PFK_HD void sort_and_fix_signs(int n, V d, V z) {
  for (int i = 0; i + 1 < n; ++i) {
    int j = i;
    for (int k = i + 1; k < n; ++k)
      if (d[k] < d[j]) j = k;
    if (j == i) continue;
    const double t = d[i];
    d[i] = d[j];
    d[j] = t;
    if constexpr (kMode == kAll) {
      const int64_t a = static_cast<int64_t>(i) * n, b = static_cast<int64_t>(j) * n;
      for (int k = 0; k < n; ++k) {
        const double zt = z[a + k];
        z[a + k] = z[b + k];
        z[b + k] = zt;
      }
    } else if constexpr (kMode == kLastRow) {
      const double zt = z[i];
      z[i] = z[j];
      z[j] = zt;
    }
  }
  if constexpr (kMode == kAll) {
    for (int i = 0; i < n; ++i) {
      const int64_t a = static_cast<int64_t>(i) * n;
      if (z[a + n - 1] < 0.0)
        for (int k = 0; k < n; ++k) z[a + k] = -z[a + k];
    }
  } else if constexpr (kMode == kLastRow) {
    for (int i = 0; i < n; ++i) z[i] = fabs(z[i]);
  }
}

// Loads one problem: alpha [n] and beta [n-1] are contiguous rows of the batched inputs.
template <typename V>
PFK_HD void load_problem(int n, const double* alpha, const double* beta, V d, V e) {
  for (int i = 0; i < n; ++i) d[i] = alpha[i];
  for (int i = 0; i + 1 < n; ++i) e[i] = beta[i];
}

// Writes one problem's results to contiguous output rows: eigenvalues [n] ascending and vecs
// (kAll: [n, n] with eigenvectors as columns; kLastRow: [n]); NaN everywhere if it failed.
template <int kMode, typename V>
PFK_HD void write_result(int n, int status, V d, V z, double* evals, double* vecs) {
  if (status != kOk) {
    const int64_t nvec = z_words(n, kMode);
    for (int i = 0; i < n; ++i) evals[i] = NAN;
    for (int64_t k = 0; k < nvec; ++k) vecs[k] = NAN;
    return;
  }
  sort_and_fix_signs<kMode>(n, d, z);
  for (int i = 0; i < n; ++i) evals[i] = d[i];
  if constexpr (kMode == kAll) {
    for (int k = 0; k < n; ++k)
      for (int i = 0; i < n; ++i)
        vecs[static_cast<int64_t>(k) * n + i] = z[static_cast<int64_t>(i) * n + k];
  } else if constexpr (kMode == kLastRow) {
    for (int i = 0; i < n; ++i) vecs[i] = z[i];
  }
}

// One whole problem, start to finish. Returns its Status.
template <int kMode, typename V>
PFK_HD int solve_one(int n, const double* alpha, const double* beta, V d, V e, V z,
                     double* evals, double* vecs) {
  load_problem(n, alpha, beta, d, e);
  const int status = ql_implicit<kMode>(n, d, e, z);
  write_result<kMode>(n, status, d, z, evals, vecs);
  return status;
}

}  // namespace pfk::tridiag

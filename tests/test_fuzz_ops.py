"""Hypothesis fuzz of every op: awkward sizes, every dtype, lists and buffers that do not match.

Each example calls an op, through its public wrapper or directly as ``torch.ops.pfkernels.*``
(both run the checks in the op's body), on arguments drawn valid or corrupted in one way: a
list one tensor short, a tensor one element short or reshaped, another dtype, a written tensor
that is strided or shares memory with another, a scalar of the wrong size, an index out of
range. The op either returns what its pure-torch ref returns (for in-place ops: leaves the
tensors as the ref leaves copies of them), or raises a ValueError that names an argument and
leaves every tensor it was given untouched, bit for bit. Corruptions known to be invalid must be
refused and valid draws accepted.

In CI's sanitizer leg (``.ci/sanitize``: the CPU kernels built with AddressSanitizer and
UndefinedBehaviorSanitizer) this module runs with ``PFK_FUZZ_EXAMPLES`` raised: any read or write
outside a buffer, or undefined behaviour, aborts the run.
"""

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfkernels import ops

EXAMPLES = int(os.environ.get("PFK_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# 0, 1, odd, around the CPU kernels' vector widths, and past one CPU chunk (32768 elements).
SIZES = [0, 1, 2, 3, 7, 8, 9, 31, 33, 257, 40_000]
# float32/float64 (the kernels' dtypes) drawn most often; the others must be refused.
DTYPES = [torch.float32, torch.float64] * 3 + [torch.bfloat16, torch.float16, torch.int64,
                                               torch.complex64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-11),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

pytestmark = pytest.mark.usefixtures("one_thread")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as raw bytes (NaN-safe, dtype-exact)."""
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
    return flat.copy_(t.detach().reshape(-1)).view(torch.uint8)


def _randn(shape, dtype, gen):
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return torch.randint(-5, 5, shape, generator=gen, dtype=dtype)


def _outcome(call, ref, tensors, valid, compare):
    """Runs ``call``; on ValueError checks the message and that ``tensors`` are untouched; on
    success runs ``ref`` on a deep copy (aliasing preserved) and ``compare``s the two."""
    before = [_bits(t) for t in tensors]
    mirror = copy.deepcopy(tensors)
    try:
        got = call()
    except ValueError as exc:
        assert valid is not True, f"a valid call was refused: {exc}"
        assert str(exc).startswith("argument '"), str(exc)
        for t, b in zip(tensors, before):
            assert torch.equal(_bits(t), b), f"an input changed before the error: {exc}"
        return
    assert valid is not False, "an invalid call was accepted"
    compare(got, ref(mirror), tensors, mirror)


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, **TOL.get(dtype, TOL[torch.float64]), equal_nan=True)


# --- multi_tensor: dot, axpy, momentum update ----------------------------------------------------

CORRUPTIONS = ["none", "none", "none", "drop", "resize", "reshape", "dtype", "strided_read",
               "strided_write", "alias_write", "alias_read_same", "alias_read_other",
               "overlap_write", "expanded_write", "empty_first", "scalar_shape",
               "scalar_dtype", "scalar_alias", "nan_momentum"]


@st.composite
def _multi_case(draw, op):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.sampled_from(SIZES), min_size=0, max_size=4))
    names = {"dot": ["a", "b"], "axpy": ["x", "y"], "update": ["params", "grads", "bufs"]}[op]
    written = {"dot": (), "axpy": (0,), "update": (0, 2)}[op]
    if op == "update" and draw(st.booleans()):
        names, written = names[:2], (0,)  # plain descent, no momentum buffers
    lists = [[_randn((n,), dtype, gen) for n in sizes] for _ in names]
    scalar = _randn((1,) if draw(st.booleans()) else (), dtype if dtype.is_floating_point else
                    torch.float32, gen) * 0.1
    momentum = 0.9
    valid = dtype in (torch.float32, torch.float64) or not sizes
    corruption = draw(st.sampled_from(CORRUPTIONS))
    reads = [i for i in range(len(names)) if i not in written]
    nonempty = [j for j, n in enumerate(sizes) if n > 0]
    if corruption == "drop" and len(names) > 1 and sizes:
        i = draw(st.integers(1, len(names) - 1))
        lists[i].pop()
        # bufs dropped to [] is plain descent, a valid update
        valid = valid if (op == "update" and i == 2 and not lists[i]) else False
    elif corruption == "resize" and len(names) > 1 and sizes:
        i, j = draw(st.integers(1, len(names) - 1)), draw(st.integers(0, len(sizes) - 1))
        lists[i][j] = _randn((sizes[j] + draw(st.sampled_from([-1, 1])),), dtype, gen) \
            if sizes[j] > 0 else _randn((1,), dtype, gen)
        valid = False
    elif corruption == "reshape" and len(names) > 1 and sizes:
        i, j = draw(st.integers(1, len(names) - 1)), draw(st.integers(0, len(sizes) - 1))
        lists[i][j] = lists[i][j].reshape(1, -1)
        valid = False
    elif corruption == "dtype" and sizes:
        i, j = draw(st.integers(0, len(names) - 1)), draw(st.integers(0, len(sizes) - 1))
        other = draw(st.sampled_from([d for d in set(DTYPES) if d != dtype]))
        lists[i][j] = _randn(lists[i][j].shape, other, gen)
        valid = False
    elif corruption == "strided_read" and reads and nonempty:
        i, j = draw(st.sampled_from(reads)), draw(st.sampled_from(nonempty))
        lists[i][j] = _randn((sizes[j], 2), dtype, gen)[:, 0]
    elif corruption == "strided_write" and written and [j for j in nonempty if sizes[j] > 1]:
        i = draw(st.sampled_from(written))
        j = draw(st.sampled_from([j for j in nonempty if sizes[j] > 1]))
        lists[i][j] = _randn((sizes[j], 2), dtype, gen)[:, 0]
        valid = False
    elif corruption == "alias_write" and written and nonempty:
        i, j = draw(st.sampled_from(written)), draw(st.sampled_from(nonempty))
        k = draw(st.sampled_from(written))
        others = [m for m in nonempty if (k, m) != (i, j) and sizes[m] == sizes[j]]
        if others:
            lists[k][draw(st.sampled_from(others))] = lists[i][j]
            valid = False
    elif corruption == "alias_read_same" and written and reads and nonempty:
        j = draw(st.sampled_from(nonempty))
        lists[draw(st.sampled_from(reads))][j] = lists[draw(st.sampled_from(written))][j]
    elif corruption == "alias_read_other" and written and reads and nonempty:
        j = draw(st.sampled_from(nonempty))
        others = [m for m in nonempty if m != j and sizes[m] == sizes[j]]
        if others:
            lists[draw(st.sampled_from(reads))][draw(st.sampled_from(others))] = \
                lists[draw(st.sampled_from(written))][j]
            valid = False
    elif corruption == "overlap_write" and written and len(nonempty) >= 2:
        j, k = draw(st.permutations(nonempty))[:2]
        store = _randn((sizes[j] + sizes[k] - 1,), dtype, gen)
        i = draw(st.sampled_from(written))
        lists[i][j], lists[i][k] = store[: sizes[j]], store[sizes[j] - 1:]
        valid = False
    elif corruption == "expanded_write" and written and nonempty:
        i, j = draw(st.sampled_from(written)), draw(st.sampled_from(nonempty))
        lists[i][j] = _randn((1,), dtype, gen).expand(sizes[j])
        valid = valid and sizes[j] == 1
    elif corruption == "empty_first" and sizes:
        lists[0] = []
        valid = False
    elif corruption == "scalar_shape" and op != "dot":
        scalar = _randn((2,), torch.float32, gen)
        valid = False
    elif corruption == "scalar_dtype" and op != "dot":
        scalar = torch.tensor(1, dtype=draw(st.sampled_from([torch.int64, torch.complex64])))
        valid = False if sizes else None  # the wrappers take empty lists without a launch
    elif corruption == "scalar_alias" and op != "dot" and written and nonempty:
        i, j = draw(st.sampled_from(written)), draw(st.sampled_from(nonempty))
        scalar = lists[i][j][:1]
        valid = False
    elif corruption == "nan_momentum" and op == "update":
        momentum = math.nan
        valid = False
    direct = draw(st.booleans())
    needed = lists[:2] if op == "update" else lists  # bufs may be [] (plain descent)
    if direct and not all(needed):
        valid = False  # the ops themselves need non-empty lists
    return dict(op=op, lists=lists, scalar=scalar, momentum=momentum, valid=valid,
                direct=direct, dtype=dtype)


def _run_multi(case):
    op, lists, scalar, direct = case["op"], case["lists"], case["scalar"], case["direct"]
    momentum = case["momentum"]
    tensors = [t for lst in lists for t in lst] + [scalar]

    def call():
        if op == "dot":
            fn = torch.ops.pfkernels.multi_tensor_dot if direct else ops.multi_tensor_dot
            return fn(*lists)
        if op == "axpy":
            fn = torch.ops.pfkernels.multi_tensor_axpy if direct else ops.multi_tensor_axpy
            return fn(*lists, scalar)
        bufs = lists[2] if len(lists) == 3 else []
        fn = (torch.ops.pfkernels.multi_tensor_momentum_update if direct
              else ops.multi_tensor_momentum_update)
        return fn(lists[0], lists[1], bufs, scalar, momentum)

    def ref(mirror):
        m_lists, pos = [], 0
        for lst in lists:
            m_lists.append(mirror[pos:pos + len(lst)])
            pos += len(lst)
        m_scalar = mirror[-1]
        if op == "dot":
            return ops.multi_tensor_dot_ref(*m_lists)
        if op == "axpy":
            return ops.multi_tensor_axpy_ref(*m_lists, m_scalar)
        bufs = m_lists[2] if len(m_lists) == 3 else []
        return ops.multi_tensor_momentum_update_ref(m_lists[0], m_lists[1], bufs, m_scalar,
                                                    momentum)

    def compare(got, want, tensors, mirror):
        dtype = case["dtype"]
        if op == "dot":
            _close(got, want.to(got.dtype), dtype)
        for t, m in zip(tensors, mirror):
            _close(t, m, dtype)

    _outcome(call, ref, tensors, case["valid"], compare)


@FUZZ
@given(case=_multi_case("dot"))
def test_fuzz_multi_tensor_dot(case):
    _run_multi(case)


@FUZZ
@given(case=_multi_case("axpy"))
def test_fuzz_multi_tensor_axpy(case):
    _run_multi(case)


@FUZZ
@given(case=_multi_case("update"))
def test_fuzz_multi_tensor_momentum_update(case):
    _run_multi(case)


# --- flow_field ---------------------------------------------------------------------------------


@st.composite
def _flow_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.sampled_from([*SIZES[:-1], 3000]))
    k = draw(st.integers(0, min(n, 6)))
    grad = _randn((n,), dtype, gen)
    lam = _randn((k,), dtype, gen).abs() if dtype.is_floating_point else _randn((k,), dtype, gen)
    layout = draw(st.sampled_from(["row", "column", "strided"]))
    if layout == "row":
        vecs = _randn((n, k), dtype, gen)
    elif layout == "column":
        vecs = _randn((k, n), dtype, gen).t()
    else:
        vecs = _randn((n, 2 * k), dtype, gen)[:, ::2]
    h = draw(st.sampled_from([0.5, 1e-3, 2.0]))
    valid = dtype in (torch.float32, torch.float64)
    corruption = draw(st.sampled_from(["none", "none", "short_eigenvalues", "long_eigenvalues",
                                       "rows", "grad_2d", "dtype", "bad_h"]))
    if corruption == "short_eigenvalues" and k > 0:
        lam, valid = lam[:-1], False
    elif corruption == "long_eigenvalues":
        lam, valid = torch.cat([lam, lam[:1] if k else _randn((1,), dtype, gen)]), False
    elif corruption == "rows":
        vecs, valid = _randn((n + 1, k), dtype, gen), False
    elif corruption == "grad_2d":
        grad, valid = grad.reshape(1, n), False
    elif corruption == "dtype":
        other = draw(st.sampled_from([d for d in set(DTYPES) if d != dtype]))
        which = draw(st.sampled_from(["lam", "vecs"]))
        if which == "lam":
            lam = _randn(lam.shape, other, gen)
        else:
            vecs = _randn(vecs.shape, other, gen)
        valid = False
    elif corruption == "bad_h":
        h, valid = draw(st.sampled_from([0.0, -1.0, math.nan, math.inf])), False
    return dict(grad=grad, lam=lam, vecs=vecs, h=h, valid=valid, dtype=dtype,
                direct=draw(st.booleans()))


@FUZZ
@given(case=_flow_case())
def test_fuzz_flow_field(case):
    grad, lam, vecs, h = case["grad"], case["lam"], case["vecs"], case["h"]

    def call():
        if case["direct"]:
            return torch.ops.pfkernels.flow_field(grad, lam, vecs, h)
        return ops.flow_field(grad, lam, vecs, h)

    def compare(got, want, tensors, mirror):
        field, proj = got
        dtype = case["dtype"]
        _close(proj, want[1], dtype)
        scale = max(1.0, float(want[0].abs().max())) if want[0].numel() else 1.0
        torch.testing.assert_close(field / scale, want[0] / scale, equal_nan=True,
                                   **TOL.get(dtype, TOL[torch.float64]))
        for t, m in zip(tensors, mirror):
            assert torch.equal(_bits(t), _bits(m))

    _outcome(call, lambda m: ops.flow_field_ref(*m, h), [grad, lam, vecs], case["valid"], compare)


# --- tridiag_eigh -------------------------------------------------------------------------------


@st.composite
def _tridiag_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([0, 1, 3]))
    m = draw(st.sampled_from([0, 1, 2, 5, 33]))
    alpha = _randn((batch, m), dtype, gen)
    beta = _randn((batch, max(m - 1, 0)), dtype, gen)
    vectors = draw(st.sampled_from(["all", "last_row", "none"]))
    direct = draw(st.booleans())
    # The op itself takes float64 [B, m] / [B, m-1]; the wrapper also float32 and unbatched.
    valid = dtype == torch.float64 or (not direct and dtype == torch.float32)
    corruption = draw(st.sampled_from(["none", "none", "short_beta", "long_beta", "batch",
                                       "vectors", "strided", "dtype_mix"]))
    if corruption == "short_beta" and m > 1:
        beta, valid = beta[:, :-1], False
    elif corruption == "long_beta" and m > 0:
        beta, valid = _randn((batch, m), dtype, gen), False
    elif corruption == "batch":
        beta, valid = _randn((batch + 1, max(m - 1, 0)), dtype, gen), False
    elif corruption == "vectors":
        vectors, valid = draw(st.sampled_from(["ALL", "first_row", ""])), False
    elif corruption == "strided":
        alpha = _randn((batch, 2 * m), dtype, gen)[:, ::2]
    elif corruption == "dtype_mix" and dtype == torch.float64:
        beta = beta.to(torch.float32)
        valid = False if direct else True
    return dict(alpha=alpha, beta=beta, vectors=vectors, valid=valid, direct=direct)


@FUZZ
@given(case=_tridiag_case())
def test_fuzz_tridiag_eigh(case):
    alpha, beta, vectors = case["alpha"], case["beta"], case["vectors"]

    def call():
        if case["direct"]:
            return torch.ops.pfkernels.tridiag_eigh(alpha, beta, vectors)
        return ops.tridiag_eigh(alpha, beta, vectors)

    def ref(mirror):
        return ops.tridiag_eigh_ref(*mirror, vectors)

    def compare(got, want, tensors, mirror):
        evals = got[0]
        torch.testing.assert_close(evals, want[0], rtol=1e-9, atol=1e-9)
        if case["direct"]:
            assert torch.equal(got[2], torch.zeros_like(got[2]))  # finite input: status OK
        elif vectors == "none":
            assert got[1] is None
        for t, m in zip(tensors, mirror):
            assert torch.equal(_bits(t), _bits(m))

    _outcome(call, ref, [alpha, beta], case["valid"], compare)


# --- dal_rate -----------------------------------------------------------------------------------


@st.composite
def _dal_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(3,), (3,), (3,), (2,), (4,), (1, 3), ()]))
    sums = _randn(shape, dtype, gen).abs() if dtype.is_floating_point else _randn(shape, dtype, gen)
    p = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, math.nan]))
    lr_max = draw(st.sampled_from([5.0, 1e-3, 0.0, math.inf]))
    lr = draw(st.sampled_from([0.1, 0.0, math.nan]))
    valid = (dtype in (torch.float32, torch.float64) and shape == (3,) and p >= 0
             and 0 < lr_max < math.inf and math.isfinite(lr))
    return dict(sums=sums, p=p, lr_max=lr_max, lr=lr, in_window=draw(st.booleans()),
                valid=valid, direct=draw(st.booleans()), dtype=dtype)


@FUZZ
@given(case=_dal_case())
def test_fuzz_dal_rate(case):
    args = (case["p"], case["lr_max"], case["lr"], case["in_window"])

    def call():
        fn = torch.ops.pfkernels.dal_rate if case["direct"] else ops.dal_rate
        return fn(case["sums"], *args)

    def compare(got, want, tensors, mirror):
        _close(got, want, case["dtype"])

    _outcome(call, lambda m: ops.dal_rate_ref(m[0], *args), [case["sums"]], case["valid"], compare)


# --- lanczos_step and lanczos_ritz --------------------------------------------------------------

ARITH = {torch.float32: torch.float32, torch.float64: torch.float64,
         torch.bfloat16: torch.float32}


@st.composite
def _lanczos_step_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    storage = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    B = draw(st.sampled_from([0, 1, 2, 3]))
    n = draw(st.sampled_from([0, 1, 2, 7, 33, 1000]))
    rows = draw(st.integers(2, 6))
    j = draw(st.integers(0, rows - 2))
    V = torch.zeros(B, rows, n, dtype=storage)
    if n:
        q, _ = torch.linalg.qr(torch.randn(n, min(n, j + 1), generator=gen, dtype=torch.float64))
        V[:, : q.shape[1]] = q.T.to(storage)
    w = _randn((B, n), ARITH[storage], gen)
    cols = draw(st.integers(j + 1, rows))
    coef = [torch.zeros(B, cols, dtype=torch.float64) for _ in range(3)]
    valid = True
    corruption = draw(st.sampled_from(["none", "none", "j", "w_shape", "w_dtype", "coef_short",
                                       "coef_dtype", "batch_stride", "alias", "coef_alias",
                                       "wide_batch"]))
    if corruption == "j":
        j, valid = draw(st.sampled_from([rows - 1, rows, -1, 10**6])), False
    elif corruption == "w_shape":
        w, valid = _randn((B, n + 1), ARITH[storage], gen), False
    elif corruption == "w_dtype":
        w, valid = w.to(torch.float64 if ARITH[storage] == torch.float32 else torch.float32), False
    elif corruption == "coef_short":
        coef[draw(st.integers(0, 2))] = torch.zeros(B, j, dtype=torch.float64)
        valid = False
    elif corruption == "coef_dtype":
        coef[draw(st.integers(0, 2))] = torch.zeros(B, cols, dtype=torch.float32)
        valid = False
    elif corruption == "batch_stride" and B > 1 and n > 0:
        store = torch.zeros(rows * n + n * (B - 1), dtype=storage)  # problems overlap
        V = store.as_strided((B, rows, n), (n, n, 1))
        valid = False
    elif corruption == "alias" and B > 0 and n > 0:
        w, valid = V[:, j + 1], False  # w is V's row j+1: written twice
    elif corruption == "coef_alias" and B > 0:
        coef[1] = coef[0]
        valid = False
    elif corruption == "wide_batch" and B > 1:
        V = torch.zeros(B, rows + 2, n, dtype=storage)[:, :rows]  # a slice: larger batch stride
    return dict(w=w, V=V, j=j, coef=coef, valid=valid, direct=draw(st.booleans()),
                arith=ARITH[storage])


@FUZZ
@given(case=_lanczos_step_case())
def test_fuzz_lanczos_step(case):
    w, V, j, (alpha, beta, wnorm) = case["w"], case["V"], case["j"], case["coef"]

    def call():
        fn = torch.ops.pfkernels.lanczos_step if case["direct"] else ops.lanczos_step
        return fn(w, V, j, alpha, beta, wnorm)

    def ref(mirror):
        ops.lanczos_step_ref(mirror[0], mirror[1], j, *mirror[2:])

    def compare(got, want, tensors, mirror):
        tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}[V.dtype]
        # At a breakdown (w in the span of V's rows, always when n <= j + 1) v_{j+1} = w/beta
        # is rounding noise on both paths: compare it only where beta is not tiny.
        broke = mirror[3][:, j] <= 1e-3 * mirror[4][:, j]
        for t in (tensors[1], mirror[1]):
            t[broke, j + 1] = 0
        for t, m in zip(tensors, mirror):
            torch.testing.assert_close(t.to(torch.float64), m.to(torch.float64), rtol=tol, atol=tol)

    _outcome(call, ref, [w, V, alpha, beta, wnorm], case["valid"], compare)


@st.composite
def _lanczos_ritz_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    storage = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    B = draw(st.sampled_from([0, 1, 3]))
    n = draw(st.sampled_from([0, 1, 7, 33, 1000]))
    vrows = draw(st.integers(0, 6))
    rows = draw(st.integers(0, vrows + 1))
    k = draw(st.integers(0, 4))
    S = torch.randn(B, rows, k, generator=gen, dtype=torch.float64)
    V = _randn((B, vrows, n), storage, gen)
    valid = storage != torch.float16 and rows <= vrows
    corruption = draw(st.sampled_from(["none", "none", "S_dtype", "S_batch", "V_strided"]))
    if corruption == "S_dtype":
        S, valid = S.to(torch.float32), False
    elif corruption == "S_batch":
        S, valid = torch.randn(B + 1, rows, k, generator=gen, dtype=torch.float64), False
    elif corruption == "V_strided" and n > 1 and vrows > 0:
        V = _randn((B, vrows, 2 * n), storage, gen)[:, :, ::2]
        valid = valid and B == 0  # no problem, nothing read
    return dict(S=S, V=V, valid=valid, direct=draw(st.booleans()))


@FUZZ
@given(case=_lanczos_ritz_case())
def test_fuzz_lanczos_ritz(case):
    S, V = case["S"], case["V"]

    def call():
        fn = torch.ops.pfkernels.lanczos_ritz if case["direct"] else ops.lanczos_ritz
        return fn(S, V)

    def compare(got, want, tensors, mirror):
        tol = dict(rtol=1e-9, atol=1e-9) if V.dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got, want, **tol)

    _outcome(call, lambda m: ops.lanczos_ritz_ref(*m), [S, V], case["valid"], compare)


# --- ce_hessian ---------------------------------------------------------------------------------

CE_DTYPES = [torch.float32, torch.float64, torch.bfloat16] * 2 + [torch.float16, torch.int64]


@st.composite
def _ce_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(CE_DTYPES))
    N = draw(st.sampled_from([0, 1, 2, 3, 7, 33]))
    V = draw(st.sampled_from([0, 1, 2, 7, 8, 9, 31, 257, 513, 5000]))
    logits = _randn((N, V), dtype, gen) * (3 if dtype.is_floating_point else 1)
    tangent = _randn((N, V), dtype, gen)
    ignore_index = draw(st.sampled_from([-100, 0, 2]))
    target = None
    if draw(st.booleans()):
        target = torch.randint(-1, max(V, 1), (N,), generator=gen)
        if N:
            target[torch.rand(N, generator=gen) < 0.3] = ignore_index
    reduction = "mean" if draw(st.booleans()) else "sum"
    valid = dtype in (torch.float32, torch.float64, torch.bfloat16)
    corruption = draw(st.sampled_from(["none", "none", "none", "transposed", "tangent_shape",
                                       "tangent_dtype", "target_shape", "target_dtype",
                                       "logits_1d", "reduction", "ignore_bool"]))
    if corruption == "transposed" and N and V:
        logits = _randn((V, N), dtype, gen).t()  # valid: copied to contiguous
    elif corruption == "tangent_shape":
        tangent, valid = _randn((N, V + 1), dtype, gen), False
    elif corruption == "tangent_dtype":
        other = draw(st.sampled_from([d for d in set(CE_DTYPES) if d != dtype]))
        tangent, valid = _randn((N, V), other, gen), False
    elif corruption == "target_shape":
        target, valid = torch.zeros(N + 1, dtype=torch.int64), False
    elif corruption == "target_dtype":
        bad = draw(st.sampled_from([torch.int32, torch.float32]))
        target, valid = torch.zeros(N, dtype=bad), False
    elif corruption == "logits_1d":
        logits, tangent, valid = logits.reshape(-1), tangent.reshape(-1), False
    elif corruption == "reduction":
        reduction, valid = draw(st.sampled_from(["none", "batchmean", "MEAN"])), False
    direct = draw(st.booleans())
    if corruption == "ignore_bool":
        # The wrapper refuses a bool; the dispatcher may hand a direct call the int it stands for.
        ignore_index = True
        valid = None if direct else False
    return dict(logits=logits, tangent=tangent, target=target, ignore_index=ignore_index,
                reduction=reduction, valid=valid, dtype=dtype, direct=direct)


@FUZZ
@given(case=_ce_case())
def test_fuzz_ce_hessian(case):
    tensors = [t for t in (case["logits"], case["tangent"], case["target"]) if t is not None]
    opts = (case["ignore_index"], case["reduction"])

    def call():
        if case["direct"]:
            return torch.ops.pfkernels.ce_hessian(case["logits"], case["tangent"], case["target"],
                                                  *opts)
        return ops.ce_hessian(case["logits"], case["tangent"], case["target"],
                              ignore_index=opts[0], reduction=opts[1])

    def ref(mirror):
        target = mirror[2] if case["target"] is not None else None
        return ops.ce_hessian_ref(mirror[0], mirror[1], target, ignore_index=int(opts[0]),
                                  reduction=opts[1])

    def compare(got, want, tensors, mirror):
        # Relative to the largest term p_j |u_j| (entries cancel where one class dominates).
        z, u = case["logits"].double(), case["tangent"].double()
        size = float((torch.softmax(z, -1) * u.abs()).max()) if z.numel() else 1.0
        scale = max(size, 1e-30)
        torch.testing.assert_close(got.double() / scale, want.double() / scale, equal_nan=True,
                                   **TOL[case["dtype"]])
        for t, m in zip(tensors, mirror):
            assert torch.equal(_bits(t), _bits(m))

    _outcome(call, ref, tensors, case["valid"], compare)

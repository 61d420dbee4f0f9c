"""pfkernels under torch.distributed data parallelism: 2 gloo ranks on the CPU, spawned here.

Each spawn costs a few seconds (two interpreters importing torch), so one spawn runs all the
agreement checks and writes what each rank computed to a file; the tests compare the files.
Every spawn is joined with a deadline, and the process group has a short timeout, so a broken
collective fails the test instead of hanging it.
"""

import copy
import datetime
import importlib
import json
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pfkernels
from pfkernels import distributed as pfd
from pfkernels.data import digits, mlp, mse_loss
from pfkernels.optim import DAL, DALScaler

WORLD = 2
SHARDS = (110, 190)  # uneven on purpose: the global mean weights examples, not ranks
DAL_SHARDS = (150, 150)  # DAL averages ranks with equal weights, as DDP does
DEADLINE_S = 150  # per spawn, on a loaded 2-core machine; a healthy spawn takes ~5-15 s
PG_TIMEOUT_S = 20


def _init(rank, init_file, timeout_s=PG_TIMEOUT_S):
    torch.set_num_threads(1)
    # fresh processes start torch's global generator from the same constant; a real job's ranks
    # need not, and the unseeded solves must agree anyway
    torch.manual_seed(1000 + rank)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _problem():
    """Digits (300 examples) and a small float64 tanh MLP, the same on every rank."""
    x, y = digits(n_train=sum(SHARDS), n_test=0, dtype=torch.float64).train
    model = mlp(width=12, depth=2, seed=3).double()
    return x, y, model


def _shard(x, y, rank, sizes):
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]


def _dal_run(opt_factory, model, x, y, steps=5):
    opt = opt_factory(model)
    lrs = []
    for _ in range(steps):
        opt.step(lambda: mse_loss(model(x), y))
        lrs.append(opt.last_lr.clone())
    return torch.stack(lrs), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class _CountCollectives:
    """Counts all_reduce calls (the patched name is what pfkernels.distributed calls)."""

    def __enter__(self):
        self.calls, self._real = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._real


def _collective_counts(model, xs, ys, block):
    op = pfkernels.HessianOperator(model, mse_loss, [(xs[:50], ys[:50]), (xs[50:], ys[50:])],
                                   cache_graph=True)
    counts = {}
    for name, call in {
        "block_matvec": lambda: op @ block,
        "block_matvec_cached_again": lambda: op @ block,
        "gradient": op.gradient,
        "loss": op.loss,
    }.items():
        with _CountCollectives() as c:
            call()
        counts[name] = c.calls
    m = copy.deepcopy(model)
    opt = DAL(m.parameters())
    with _CountCollectives() as c:
        opt.step(lambda: mse_loss(m(xs), ys))
    counts["dal_step"] = c.calls
    return counts


def _helpers_with_group(rank):
    t32 = torch.full((2, 3), float(rank + 1))
    t64 = torch.arange(4, dtype=torch.float64) * (rank + 1)
    s32, s64 = pfd.all_reduce_sum([t32, t64])
    return {"sum32": s32, "sum64": s64, "mean": pfd.all_reduce_mean(t64),
            "seed": pfd.broadcast_seed(None), "seed_given": pfd.broadcast_seed(100 + rank),
            "bcast": pfd.broadcast_tensor(torch.tensor([rank + 5.0])),
            "rank": pfd.rank(), "zero": pfd.is_rank_zero(), "world": pfd.world_size(),
            "ranges": [pfd.shard_range(n) for n in (0, 1, 6, 7)],
            "gathered": pfd.all_gather_shards(torch.arange(7.0).reshape(1, 7)[:, slice(
                *pfd.shard_range(7))], 7)}


class _LowRank:
    """A replicated rank-4 operator that names the group (so eigsh may shard the basis)."""

    def __init__(self, n, group):
        gen = torch.Generator().manual_seed(2)
        self.q = torch.linalg.qr(torch.randn(n, 4, generator=gen, dtype=torch.float64))[0]
        self.d = torch.tensor([5.0, 3.0, 2.0, -1.0], dtype=torch.float64)
        self.shape, self.dtype, self.device = (n, n), torch.float64, torch.device("cpu")
        self.process_group = group

    def matvec(self, v):
        return self.q @ (self.d * (self.q.T @ v))


def _sharded_solves(xs, ys):
    """Sharded against replicated basis, on an odd n (967) so the slices differ in length."""
    lanczos = importlib.import_module("pfkernels.lanczos")
    widths, breakdowns = [], []
    real_run, real_broken = lanczos._ShardedLanczos.run, lanczos._ShardedLanczos._replace_broken

    def run(self):
        widths.append(self.V.shape[-1])
        breakdowns.append(0)
        real_run(self)

    def replace_broken(self, j, broke):
        breakdowns[-1] += 1
        real_broken(self, j, broke)

    model = mlp(width=11, depth=2, seed=3).double()
    op = pfkernels.HessianOperator(model, mse_loss, (xs, ys))
    lanczos._ShardedLanczos.run = run
    lanczos._ShardedLanczos._replace_broken = replace_broken
    try:
        sharded = pfkernels.eigsh(op, k=3, tol=1e-10, seed=5, shard_basis=True)
        checked = pfkernels.eigsh(op, k=2, tol=1e-8, seed=6, shard_basis=True,
                                  check_residuals=True)
        low = _LowRank(41, op.process_group)
        # v0 in a 2-dimensional invariant subspace: breakdown at the second step
        v0 = low.q[:, :2].sum(1)
        low_sharded = pfkernels.eigsh(low, k=3, tol=1e-10, seed=1, v0=v0, shard_basis=True)
    finally:
        lanczos._ShardedLanczos.run = real_run
        lanczos._ShardedLanczos._replace_broken = real_broken
    replicated = pfkernels.eigsh(op, k=3, tol=1e-10, seed=5)
    U = sharded.eigenvectors
    return {"n": op.shape[0], "widths": widths, "range": pfd.shard_range(op.shape[0]),
            "vals": sharded.eigenvalues, "vecs": U, "matvecs": sharded.num_matvecs,
            "ref_vals": replicated.eigenvalues, "ref_vecs": replicated.eigenvectors,
            "residual": (op @ U.T).T - U * sharded.eigenvalues, "checked": checked.residuals,
            "low": low_sharded.eigenvalues, "breakdowns": breakdowns,
            "low_ref": pfkernels.eigsh(low, k=3, tol=1e-10, seed=1, v0=v0).eigenvalues}


def _agreement_worker(rank, init_file, out_dir):
    _init(rank, init_file)
    x, y, model = _problem()
    xs, ys = _shard(x, y, rank, SHARDS)
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    block = torch.randn(3, n, generator=gen, dtype=torch.float64)
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    out = {}
    ref = pfkernels.HessianOperator(model, mse_loss, (x, y), process_group=None)
    out["ref"] = {"hv": ref @ v, "block": ref @ block, "grad": ref.gradient(),
                  "loss": ref.loss(), "third": ref.third_derivative(u, v)}
    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    # rank 1 splits its shard into two batches: per-batch weighting must survive the reduction
    data1 = [(xs[:70], ys[:70]), (xs[70:], ys[70:])] if rank == 1 else (xs, ys)
    configs = {
        "float32": dict(model=model, data=(xs, ys), dtype=torch.float32),
        "cached": dict(model=model, data=(xs, ys)),
        "batches": dict(model=model, data=data1, cache_graph=False),
        "ddp_for": dict(model=ddp, data=data1, method="forward-over-reverse"),
    }
    for name, kw in configs.items():
        op = pfkernels.HessianOperator(kw.pop("model"), mse_loss, kw.pop("data"), **kw)
        v_, block_, u_ = (t.to(op.dtype) for t in (v, block, u))
        out[name] = {"hv": op @ v_, "block": op @ block_, "grad": op.gradient(),
                     "loss": op.loss(), "third": op.third_derivative(u_, v_),
                     "world": pfd.world_size(op.process_group)}
    for name, cls in [("ggn", pfkernels.GGNOperator),
                      ("empirical_fisher", pfkernels.EmpiricalFisherOperator)]:
        ref_op = cls(model, mse_loss, (x, y), process_group=None)
        op = cls(model, mse_loss, data1)
        with op.reuse_graph():  # the kept forward graphs, then the reduction
            kept = op @ block
        out[name] = {"hv": op @ v, "block": op @ block, "kept": kept, "ref_hv": ref_op @ v,
                     "ref_block": ref_op @ block, "world": pfd.world_size(op.process_group)}
    op = pfkernels.HessianOperator(model, mse_loss, (xs, ys))
    res = pfkernels.eigsh(op, k=3, tol=1e-10)  # no seed: rank 0's is broadcast
    out["eigsh"] = {"vals": res.eigenvalues, "vecs": res.eigenvectors}
    ref_res = pfkernels.eigsh(ref, k=3, tol=1e-10, seed=5)
    out["eigsh_ref"] = {"vals": ref_res.eigenvalues, "vecs": ref_res.eigenvectors}
    out["trace"] = {"unseeded": pfkernels.hutchinson_trace(op, 6).trace,
                    "seeded": pfkernels.hutchinson_trace(op, 6, seed=3).trace,
                    "ref": pfkernels.hutchinson_trace(ref, 6, seed=3).trace,
                    "density": pfkernels.spectral_density(op, 2, 10, grid=5).density}

    xd, yd = _shard(x, y, rank, DAL_SHARDS)
    plain = copy.deepcopy
    for name, factory, wrap in [
        ("dal", lambda m, **kw: DAL(m.parameters(), momentum=0.5, **kw), plain),
        ("dal_fd", lambda m, **kw: DAL(m.parameters(), hvp="finite-difference", **kw), plain),
        ("scaler", lambda m, **kw: DALScaler(torch.optim.Adam(m.parameters(), lr=1e-3), **kw),
         plain),
        # the closure runs the model through DDP's forward; DAL's autograd.grad never fires
        # DDP's hooks, and the next forward must not complain about an unfinished reduction
        ("dal_ddp", lambda m, **kw: DAL(m.parameters(), **kw),
         lambda m: torch.nn.parallel.DistributedDataParallel(copy.deepcopy(m))),
    ]:
        local = _dal_run(factory, wrap(model), xd, yd)
        full = _dal_run(lambda m, f=factory: f(m, process_group=None), copy.deepcopy(model), x, y)
        out[name] = {"lrs": local[0], "params": local[1]}
        out[name + "_ref"] = {"lrs": full[0], "params": full[1]}
    logged = []
    tracker = pfkernels.SharpnessTracker(model, mse_loss, (xs, ys), every=1, k=2,
                                         sinks=[logged.append])
    tracker.step(0)
    out["tracker"] = {"history": tracker.history[0]["eigenvalues"], "logged": len(logged)}
    out["counts"] = _collective_counts(model, xs, ys, block)
    out["shard"] = _sharded_solves(xs, ys)
    out["helpers"] = _helpers_with_group(rank)
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # no rank tears its connections down while a peer still uses them
    dist.destroy_process_group()


def _failure_worker(rank, init_file, out_dir):
    """Rank 1 passes a vector of the wrong size, reports the ValueError and stays alive without
    joining the collective; rank 0 must come out of its all-reduce through the group timeout."""
    _init(rank, init_file, timeout_s=3)
    x, y, model = _problem()
    xs, ys = _shard(x, y, rank, SHARDS)
    op = pfkernels.HessianOperator(model, mse_loss, (xs, ys))
    n = op.shape[0]
    try:
        op @ torch.ones(n + rank, dtype=torch.float64)
    except ValueError as exc:
        with open(f"{out_dir}/rank{rank}.err", "w") as f:
            f.write(str(exc))
        time.sleep(30)
        raise
    raise AssertionError("rank 0's all-reduce returned although rank 1 never joined it")


def _spawn(fn, tmp_path, *, retry_teardown_abort: bool = True):
    """Run ``fn(rank, init_file, out_dir)`` on WORLD spawned ranks. A rank killed by SIGABRT is
    the known gloo teardown abort (docs/distributed.md, TEARDOWN_ABORT below: about 1 run in 15
    under load, after every rank has written its results): the job runs once more, which must
    pass, as the torchrun CLI test does."""
    ctx = mp.start_processes(fn, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-rank job did not finish within {DEADLINE_S} s (hang)")
    except mp.ProcessExitedException as exc:
        if not (retry_teardown_abort and exc.signal_name == "SIGABRT"):
            raise
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        (tmp_path / "init").unlink(missing_ok=True)  # the file:// rendezvous starts afresh
        _spawn(fn, tmp_path, retry_teardown_abort=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _spawn(_agreement_worker, tmp)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("config", ["float32", "cached", "batches", "ddp_for"])
@pytest.mark.parametrize("quantity", ["hv", "block", "grad", "loss", "third"])
def test_operator_equals_single_process_on_the_union(results, config, quantity):
    # float64: the reduction only reorders sums (1e-12 relative to the largest entry); float32
    # operators work and reduce in float32 against the float64 reference (1e-5).
    tol = 1e-5 if config == "float32" else 1e-12
    for rank in range(WORLD):
        got, want = results[rank][config][quantity], results[rank]["ref"][quantity]
        assert results[rank][config]["world"] == WORLD
        assert got.dtype == (torch.float32 if config == "float32" else torch.float64)
        scale = want.abs().max()
        assert float((got.double() - want).abs().max()) <= tol * float(scale), (rank, config)
        # the reduced result is the same bits on every rank
        assert torch.equal(got, results[0][config][quantity])


@pytest.mark.parametrize("name", ["ggn", "empirical_fisher"])
def test_output_operators_equal_single_process_on_the_union(results, name):
    for rank in range(WORLD):
        got = results[rank][name]
        assert got["world"] == WORLD
        for quantity, want in [("hv", "ref_hv"), ("block", "ref_block"), ("kept", "ref_block")]:
            scale = got[want].abs().max()
            assert float((got[quantity] - got[want]).abs().max()) <= 1e-12 * float(scale)
            assert torch.equal(got[quantity], results[0][name][quantity])


def test_eigsh_matches_single_process_and_is_identical_across_ranks(results):
    for rank in range(WORLD):
        got, want = results[rank]["eigsh"], results[rank]["eigsh_ref"]
        torch.testing.assert_close(got["vals"], want["vals"], rtol=1e-9, atol=0)
        overlap = (got["vecs"].T @ want["vecs"]).diagonal().abs()
        torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-7)
        assert torch.equal(got["vals"], results[0]["eigsh"]["vals"])
        assert torch.equal(got["vecs"], results[0]["eigsh"]["vecs"])


def test_sharded_basis_matches_the_replicated_solve(results):
    for rank in range(WORLD):
        got = results[rank]["shard"]
        n = got["n"]
        assert n % 2 == 1
        lo, hi = got["range"]
        # this rank stored only its slice of the basis: about half of n, the two slices tiling it
        assert got["widths"] == [hi - lo, hi - lo, 21 - rank] and hi - lo in (n // 2, n // 2 + 1)
        assert (lo, hi) == ((0, n // 2 + 1) if rank == 0 else (n // 2 + 1, n))
        assert got["matvecs"] > 20  # the basis (ncv = 20) was restarted at least once
        torch.testing.assert_close(got["vals"], got["ref_vals"], rtol=1e-10, atol=0)
        overlap = (got["vecs"].T @ got["ref_vecs"]).abs()
        torch.testing.assert_close(overlap, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-7)
        scale = float(got["vals"].abs().max())
        assert float(got["residual"].norm(dim=1).max()) <= 1e-9 * scale
        assert float(got["checked"].max()) <= 1e-7 * scale  # true residuals of full vectors
        # the rank-4 operator breaks down (beta = 0 in T): the random restart vector's slices
        # must be orthonormalised against the basis with reduced dots and norm
        assert got["breakdowns"][:2] == [0, 0] and got["breakdowns"][2] >= 1
        torch.testing.assert_close(got["low"], got["low_ref"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["low"], torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64),
                                   rtol=1e-10, atol=0)
        for key in ("vals", "vecs", "low"):
            assert torch.equal(got[key], results[0]["shard"][key])


def test_shard_basis_needs_an_unbatched_distributed_operator():
    x, y, model = _problem()
    local = pfkernels.HessianOperator(model, mse_loss, (x, y), process_group=None)
    with pytest.raises(ValueError, match="shard_basis"):
        pfkernels.eigsh(local, k=2, shard_basis=True)
    with pytest.raises(ValueError, match="shard_basis"):
        pfkernels.eigsh(torch.eye(30, dtype=torch.float64).expand(2, 30, 30), shard_basis=True)
    with pytest.raises(ValueError, match="shard_basis"):
        pfkernels.eigsh(local, k=2, batch=2, shard_basis=True)
    with pytest.raises(TypeError, match="shard_basis"):
        pfkernels.eigsh(local, k=2, shard_basis="yes")


def test_stochastic_estimators_draw_the_same_probes_on_every_rank(results):
    for rank in range(WORLD):
        got = results[rank]["trace"]
        assert got["unseeded"] == results[0]["trace"]["unseeded"]
        assert torch.equal(got["density"], results[0]["trace"]["density"])
        assert got["seeded"] == pytest.approx(got["ref"], rel=1e-10)


@pytest.mark.parametrize("name", ["dal", "dal_fd", "scaler", "dal_ddp"])
def test_dal_steps_equal_single_process_on_the_full_data(results, name):
    # Bit-identical across ranks. Against one process on the full data the only difference is the
    # order of the floating-point sums (two shard means averaged vs one mean), a few ulps per step
    # in float64, which 5 steps amplify to well below 1e-10.
    for rank in range(WORLD):
        got, want = results[rank][name], results[rank][name + "_ref"]
        assert torch.equal(got["lrs"], results[0][name]["lrs"])
        assert torch.equal(got["params"], results[0][name]["params"])
        torch.testing.assert_close(got["lrs"], want["lrs"], rtol=1e-10, atol=0)
        torch.testing.assert_close(got["params"], want["params"], rtol=1e-10, atol=1e-12)


def test_one_collective_per_product_and_two_per_dal_step(results):
    want = {"block_matvec": 1, "block_matvec_cached_again": 1, "gradient": 1, "loss": 1,
            "dal_step": 2}
    for rank in range(WORLD):
        assert results[rank]["counts"] == want


def test_helpers_with_a_group(results):
    for rank in range(WORLD):
        h = results[rank]["helpers"]
        assert h["rank"] == rank and h["zero"] == (rank == 0) and h["world"] == WORLD
        assert torch.equal(h["sum32"], torch.full((2, 3), 3.0))
        assert torch.equal(h["sum64"], torch.arange(4, dtype=torch.float64) * 3)
        assert torch.equal(h["mean"], torch.arange(4, dtype=torch.float64) * 1.5)
        assert h["seed"] == results[0]["helpers"]["seed"]
        assert h["seed_given"] == 100
        assert torch.equal(h["bcast"], torch.tensor([5.0]))
        want = [(0, 0), (0, 1), (0, 3), (0, 4)] if rank == 0 else [(0, 0), (1, 1), (3, 6), (4, 7)]
        assert h["ranges"] == want
        assert torch.equal(h["gathered"], torch.arange(7.0).reshape(1, 7))


def test_tracker_measures_on_every_rank_and_logs_on_rank_zero(results):
    for rank in range(WORLD):
        got = results[rank]["tracker"]
        assert got["history"] == results[0]["tracker"]["history"]
        assert got["logged"] == (1 if rank == 0 else 0)


TEARDOWN_ABORT = "terminate called without an active exception"


def _eos_cli(out, ranks):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [sys.executable, "-P", *(launcher if ranks > 1 else []), "-m", "pfkernels", "eos",
           "--steps", "12", "--every", "5", "--n-train", "101", "--width", "16",
           "--dtype", "float64", "--quiet", "--out", str(out)]
    done = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=DEADLINE_S)
    if done.returncode != 0 and ranks > 1 and TEARDOWN_ABORT in done.stderr:
        # Known, rare (about 1 run in 15 under load, none in 12 quiet runs): a rank aborts in
        # gloo's teardown after the barrier and destroy_process_group, when every file has
        # been written; documented in docs/distributed.md. One more run, which must pass.
        done = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True,
                              timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


def test_torchrun_eos_cli_equals_one_process(tmp_path):
    # 101 examples: shards of 51 and 50, so the per-rank loss weights matter
    one, one_summary = _eos_cli(tmp_path / "one", 1)
    two, two_summary = _eos_cli(tmp_path / "two", 2)
    assert len(two) == 12  # only rank 0 wrote (rank 1 wrote to os.devnull)
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "accuracy", "sharpness", "threshold"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-9), (a["step"], key)
    assert two_summary["steps_run"] == one_summary["steps_run"] == 12


def test_a_rank_that_raises_brings_the_job_down(tmp_path):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as info:
        _spawn(_failure_worker, tmp_path)
    message = str(info.value)
    # rank 0 left its all-reduce through the process group's timeout instead of hanging
    assert "Process 0 terminated" in message and "Timed out" in message
    assert "argument 'v'" in (tmp_path / "rank1.err").read_text()
    assert time.monotonic() - start < 60


def _abort_once_worker(rank, init_file, out_dir):
    """Rank 1 aborts (SIGABRT, as the gloo teardown abort does) on the job's first run only."""
    import os
    from pathlib import Path

    marker = Path(out_dir) / "aborted"
    if rank == 1 and not marker.exists():
        marker.write_text("1")
        os.abort()
    (Path(out_dir) / f"ok{rank}").write_text(init_file)


def test_spawn_runs_a_job_again_after_a_teardown_abort_only_once(tmp_path):
    _spawn(_abort_once_worker, tmp_path)
    assert (tmp_path / "aborted").exists()
    assert all((tmp_path / f"ok{r}").exists() for r in range(WORLD))
    # without the retry (as on the retried run itself) an abort fails the job
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        _spawn(_abort_once_worker, again, retry_teardown_abort=False)


def test_helpers_without_a_group():
    t = torch.arange(4.0)
    assert not pfd.is_distributed()
    assert pfd.world_size() == 1 and pfd.rank() == 0 and pfd.is_rank_zero()
    assert torch.equal(pfd.all_reduce_sum(t), t)
    a, b = pfd.all_reduce_mean([t, t.double()])
    assert torch.equal(a, t) and b.dtype == torch.float64
    assert pfd.broadcast_seed(7) == 7
    assert torch.equal(pfd.weighted_mean(t * 3, 3), t)
    assert pfd.operator_seed(object(), None) is None
    assert pfd.shard_range(5) == (0, 5)
    assert torch.equal(pfd.all_gather_shards(t, 4), t)
    with pytest.raises(ValueError, match="local"):
        pfd.all_gather_shards(t, 5)
    with pytest.raises(ValueError, match="'n'"):
        pfd.shard_range(-1)


@pytest.mark.parametrize("bad, exc", [("world", ValueError), (3, TypeError)])
def test_bad_process_group_names_the_argument(bad, exc):
    x, y, model = _problem()
    with pytest.raises(exc, match="process_group"):
        pfkernels.HessianOperator(model, mse_loss, (x, y), process_group=bad)
    with pytest.raises(exc, match="process_group"):
        DAL(model.parameters(), process_group=bad)

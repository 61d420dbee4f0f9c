"""The `pfkernels` command: `eos` end to end on a few steps, `sharpness` on a user module (bad
options, for every command, are in tests/test_bad_input.py)."""

import json
import textwrap

import pytest
import torch

from pfkernels import cli, report

# Tiny problems: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--steps", "7", "--every", "3", "--n-train", "48", "--width", "12", "--quiet"]
ROW_KEYS = {"step", "loss", "accuracy", "lr"}
MEASURED_KEYS = ROW_KEYS | {"sharpness", "preconditioned_sharpness", "threshold", "ratio",
                            "eigenvalues", "num_matvecs"}
SUMMARY_KEYS = {"command", "config", "threshold", "steps_run", "diverged", "final_loss",
                "final_accuracy", "test_accuracy", "wall_time", "tracking_time", "eos", "files",
                "stability_report"}
EOS_KEYS = {"measurements", "initial_sharpness", "final_sharpness", "max_ratio", "final_ratio",
            "progressive_sharpening", "sharpening_ratio", "eos_reached", "eos_onset_step",
            "within_band_share", "median_ratio_after_onset", "loss_increase_share_before_onset",
            "loss_increase_share_after_onset", "total_matvecs", "mean_matvecs", "tracking_time"}


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    code = cli.main(["eos", *SMALL, "--out", str(out), *extra])
    return code, out


def _check_outputs(out, steps=7, adaptive=False):
    rows = report.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps))
    for r in rows:
        measured = r["step"] % 3 == 0
        assert set(r) == (MEASURED_KEYS if measured else ROW_KEYS)
        assert r["loss"] > 0 and 0 <= r["accuracy"] <= 1 and r["lr"] > 0
        if measured:
            # adaptive runs measure the preconditioned sharpness alone once it exists
            assert r["sharpness"] is None or r["sharpness"] == r["eigenvalues"][0]
            assert (r["sharpness"] is None) == (adaptive and r["step"] > 0)
            assert r["num_matvecs"] > 0
            assert r["threshold"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert set(summary["eos"]) == EOS_KEYS
    assert summary["steps_run"] == steps and summary["diverged"] is False
    # An adaptive optimizer's step-0 measurement (no preconditioner yet) is not counted.
    assert summary["eos"]["measurements"] == len(range(0, steps, 3)) - adaptive
    assert summary["files"] == ["metrics.jsonl", "summary.json", "report.png"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows, summary


def test_eos_gd_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    code, out = _run(tmp_path, "--lr", "0.2")
    assert code == 0 and torch.get_num_threads() == threads
    rows, summary = _check_outputs(out)
    assert rows[0]["threshold"] == pytest.approx(10.0)
    assert rows[0]["preconditioned_sharpness"] is None
    assert rows[0]["ratio"] == pytest.approx(rows[0]["sharpness"] / 10.0)
    assert summary["threshold"]["value"] == pytest.approx(10.0)
    assert summary["threshold"]["units"] == "raw"
    assert summary["config"]["lr"] == 0.2 and summary["config"]["optimizer"] == "gd"
    pf = summary["stability_report"]  # the principal flow's view of the final point
    assert pf["lr"] == 0.2 and len(pf["eigenvalues"]) == 2
    assert pf["eigenvalues"][0] == pytest.approx(rows[-1]["sharpness"], rel=0.2)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "optimizer", ["momentum", "nesterov", "adam", "rmsprop", "dal", "ngd", "sqrt-loss"]
)
def test_eos_every_optimizer(tmp_path, optimizer):
    code, out = _run(tmp_path, "--optimizer", optimizer)
    assert code == 0
    adaptive = optimizer in ("adam", "rmsprop")
    rows, summary = _check_outputs(out, adaptive=adaptive)
    measured = [r for r in rows if "sharpness" in r]
    # Adam/RMSprop have no preconditioner before their first step: step 0 is not measured then.
    assert all((r["preconditioned_sharpness"] is not None) == adaptive for r in measured[1:])
    assert summary["threshold"]["units"] == ("preconditioned" if adaptive else "raw")
    assert (summary["stability_report"] is not None) == (optimizer == "sqrt-loss")
    if optimizer == "adam":
        assert measured[-1]["threshold"] == pytest.approx(38 / 1e-3)
    if optimizer == "dal":
        assert len({r["lr"] for r in rows}) > 1  # the rate adapts every step


def test_eos_cnn_and_synthetic(tmp_path):
    code, out = _run(tmp_path, "--model", "cnn")
    assert code == 0
    _check_outputs(out)
    code = cli.main(["eos", *SMALL, "--dataset", "synthetic", "--out", str(tmp_path / "syn")])
    assert code == 0
    rows = report.read_jsonl(tmp_path / "syn" / "metrics.jsonl")
    assert all(r["accuracy"] is None for r in rows)


def test_eos_divergence_is_reported(tmp_path):
    code, out = _run(tmp_path, "--lr", "1e4")
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1 and summary["diverged"] is True and summary["steps_run"] < 7


def test_eos_n_train_beyond_the_default_test_split(tmp_path):
    """--n-train 1500 used to fail naming n_test: the test split now takes what is left."""
    code, out = _run(tmp_path, "--n-train", "1500", "--steps", "2", "--every", "5")
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and 0 <= summary["test_accuracy"] <= 1
    code, out = _run(tmp_path, "--n-train", "1797", "--steps", "2", "--every", "5")
    assert code == 0 and json.loads((out / "summary.json").read_text())["test_accuracy"] is None


def test_sharpness_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_problem.py").write_text(textwrap.dedent("""
        import torch

        def problem():
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
            )
            x, y = torch.randn(40, 3), torch.randn(40, 2)
            loss_fn = lambda out, target: 0.5 * ((out - target) ** 2).sum(1).mean()
            return model, loss_fn, (x, y)
    """))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sharpness", "--model", "my_problem:problem", "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    import my_problem

    from pfkernels import HessianOperator

    model, loss_fn, batch = my_problem.problem()
    op = HessianOperator(model, loss_fn, batch)
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.shape[0])])
    want = torch.linalg.eigvalsh(dense.double()).flip(0)[:3]
    assert out["num_parameters"] == 50
    assert out["eigenvalues"] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-5)
    assert all(out["converged"])
    assert cli.main(["sharpness", "--model", "my_problem:problem", "--k", "2"]) == 0
    assert "λ1" in capsys.readouterr().out

    # --density: the SLQ density over the whole spectrum, saved with a figure.
    args = ["sharpness", "--model", "my_problem:problem", "--k", "1", "--density", "--probes",
            "4", "--steps", "30", "--out", str(tmp_path / "spec")]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "spec" / "sharpness.json").read_text())
    assert (tmp_path / "spec" / "density.png").stat().st_size > 0
    grid, density = torch.tensor(saved["density"]["grid"]), torch.tensor(saved["density"]["density"])
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-2)
    all_eigs = torch.linalg.eigvalsh(dense.double())
    lo, hi = saved["density"]["support"]
    # 30 Lanczos steps on a 50-dimensional operator reach both ends of its spectrum.
    assert lo == pytest.approx(float(all_eigs[0]), abs=1e-4)
    assert hi == pytest.approx(float(all_eigs[-1]), rel=1e-4)
    assert saved["density"]["num_matvecs"] == 4 * 30


def test_sharpness_curvature_and_threads(tmp_path, monkeypatch, capsys):
    (tmp_path / "ggn_problem.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F

        def problem():
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)
            ).double()
            x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 4, (40,))
            return model, F.cross_entropy, (x, y)

        def user_loss():
            model, _, batch = problem()
            return model, lambda out, t: F.cross_entropy(out, t), batch
    """))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    assert cli.main(["sharpness", "--model", "ggn_problem:problem", "--k", "2", "--json",
                     "--curvature", "ggn", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert torch.get_num_threads() == threads and out["threads"] == 1
    import ggn_problem

    from pfkernels import GGNOperator

    op = GGNOperator(*ggn_problem.problem())
    dense = op @ torch.eye(op.shape[0], dtype=torch.float64)
    want = torch.linalg.eigvalsh(dense).flip(0)[:2]
    assert out["curvature"] == "ggn"
    assert out["eigenvalues"] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
    assert cli.main(["sharpness", "--model", "ggn_problem:problem", "--k", "1", "--json",
                     "--curvature", "fisher"]) == 0
    fisher = json.loads(capsys.readouterr().out)
    assert fisher["curvature"] == "fisher" and fisher["eigenvalues"][0] > 0
    for argv, option in [(["--model", "ggn_problem:user_loss", "--curvature", "fisher"],
                           "--curvature"),
                          (["--model", "ggn_problem:problem", "--threads", "0"], "--threads")]:
        with pytest.raises(SystemExit) as exc:
            cli.main(["sharpness", *argv])
        assert exc.value.code == 2 and option in capsys.readouterr().err


def test_sharpness_command_solver_options_and_summary(tmp_path, monkeypatch, capsys):
    (tmp_path / "wide_problem.py").write_text(textwrap.dedent("""
        import torch

        def problem():
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
            ).double()
            x, y = torch.randn(60, 6).double(), torch.randn(60, 2).double()
            loss_fn = lambda out, target: 0.5 * ((out - target) ** 2).sum(1).mean()
            return model, loss_fn, (x, y)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import wide_problem

    from pfkernels import HessianOperator

    op = HessianOperator(*wide_problem.problem())
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.shape[0], dtype=torch.float64)])
    top = float(torch.linalg.eigvalsh(dense).max())
    base = ["sharpness", "--model", "wide_problem:problem", "--k", "1", "--tol", "1e-6"]
    assert cli.main([*base, "--method", "finite-difference", "--ncv", "8", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["method"] == "finite-difference" and out["ncv"] == 8
    assert out["eigenvalues"][0] == pytest.approx(top, rel=1e-8)
    assert out["basis_bytes"] == 9 * op.shape[0] * 8
    assert "HVP" in captured.err  # the progress bar, on by default
    assert cli.main([*base, "--basis-dtype", "float32", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "summary: sharpness" in captured.out and "HVP" not in captured.err
    with pytest.warns(RuntimeWarning, match="max_matvecs=3"):
        assert cli.main([*base, "--max-matvecs", "3", "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_matvecs"] <= 3 + 1 and not all(out["converged"])
    for bad, option in ((["--ncv", "1"], "--ncv"), (["--max-matvecs", "0"], "--max-matvecs")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*base, *bad])
        assert exit_.value.code == 2 and option in capsys.readouterr().err

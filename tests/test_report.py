"""pfkernels.report: JSONL/CSV writers and the run figure."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from pfkernels import report


def test_jsonl_round_trip_and_conversions(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    with report.MetricsWriter(path) as w:
        w.write({"step": 0, "loss": torch.tensor(0.5), "eigenvalues": torch.tensor([3.0, 2.0])})
        w({"step": 1, "loss": np.float64(0.25), "ratio": math.nan, "x": None, "ok": True})
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line) for line in lines] == report.read_jsonl(path)
    rows = report.read_jsonl(path)
    assert rows[0] == {"step": 0, "loss": 0.5, "eigenvalues": [3.0, 2.0]}
    assert rows[1] == {"step": 1, "loss": 0.25, "ratio": None, "x": None, "ok": True}


def test_jsonl_append_and_closed(tmp_path):
    path = tmp_path / "m.jsonl"
    report.MetricsWriter(path).close()
    with report.MetricsWriter(path, append=True) as w:
        w.write({"a": 1})
    with report.MetricsWriter(path, append=True) as w:
        w.write({"a": 2})
    assert [r["a"] for r in report.read_jsonl(path)] == [1, 2]
    with pytest.raises(ValueError, match="closed"):
        w.write({"a": 3})


def test_to_jsonable_rejects_objects():
    with pytest.raises(TypeError, match="object"):
        report.to_jsonable({"bad": object()})


def test_csv_union_of_columns(tmp_path):
    path = tmp_path / "m.csv"
    rows = [{"step": 0, "loss": 1.0}, {"step": 1, "sharpness": 2.5, "eigenvalues": [1, 2]}]
    report.write_csv(rows, path)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "sharpness", "eigenvalues"]
    assert rows[0]["sharpness"] == "" and rows[1]["loss"] == ""
    assert json.loads(rows[1]["eigenvalues"]) == [1, 2]


@pytest.mark.parametrize("kind", ["raw", "preconditioned", "varying-lr"])
def test_plot_eos_report_writes_png(tmp_path, kind):
    rows = []
    for step in range(60):
        row = {"step": step, "loss": 1.0 / (step + 1), "accuracy": step / 60, "lr": 0.1}
        if kind == "varying-lr":
            row["lr"] = 0.1 + 0.01 * (step % 3)
        if step % 5 == 0:
            row["sharpness"] = min(20.0, 5 + step)
            row["threshold"] = 20.0
            if kind == "preconditioned":
                row["preconditioned_sharpness"] = 30 * step
                row["threshold"] = 380.0
        rows.append(row)
    path = report.plot_eos_report(rows, tmp_path / "r.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

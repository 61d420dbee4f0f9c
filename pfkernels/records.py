"""Metrics records: JSONL and CSV writers and readers, and values made plain JSON.

Matplotlib-free, so the science layer (``eos.SharpnessTracker``'s file sink) and the CLI write
records without importing figures; :mod:`pfkernels.report` draws from the same rows.

Rows are flat dicts of JSON scalars (numbers, strings, booleans, None) or lists of numbers;
tensors and numpy scalars are converted on write, and non-finite floats are written as ``null``
so every line is strict JSON.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON: tensors and numpy values to numbers or lists, NaN/inf to None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"row: cannot write a value of type {type(value).__name__} as JSON")


class MetricsWriter:
    """Appends one JSON object per line to a file, flushing each line (safe to ``tail -f``).

    Args:
        path: file to write; its folder is created. An existing file is truncated unless
            ``append=True``.
    """

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        if self._file.closed:
            raise ValueError(f"MetricsWriter: {self.path} is closed")
        line = json.dumps(to_jsonable(row), allow_nan=False) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:  # a full disk, a vanished mount: say which file
            # The unwritten line would fail again at close (and at garbage collection, where
            # nobody sees it): close now; the writer is done.
            with contextlib.suppress(OSError):
                self._file.close()
            raise OSError(exc.errno, f"MetricsWriter: cannot write to {self.path}: "
                          f"{exc.strerror or exc}") from exc

    __call__ = write

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            raise OSError(exc.errno, f"MetricsWriter: cannot write to {self.path}: "
                          f"{exc.strerror or exc}") from exc

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Writes ``rows`` as CSV; columns are the union of keys in first-seen order, lists as JSON."""
    columns: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"argument 'rows': row {i} is a {type(row).__name__}, not a mapping")
        columns.extend(k for k in row if k not in columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            plain = to_jsonable(row)
            writer.writerow(
                {
                    k: json.dumps(v) if isinstance(v, list) else ("" if v is None else v)
                    for k, v in plain.items()
                }
            )


def central_flow_record(comparison) -> dict[str, Any]:
    """A :class:`pfkernels.flows.CentralFlowComparison` as plain JSON: its ``summary()`` plus
    the per-step series (losses, distances, sharpness, tr Σ, oscillation variances)."""
    central, stable = comparison.central, comparison.stable
    series = {
        "times": comparison.times,
        "real_loss": comparison.real_loss,
        "real_loss_smoothed": comparison.real_loss_smoothed,
        "central_loss": central.loss,
        "central_predicted_loss": central.predicted_loss,
        "stable_loss": stable.loss,
        "distance_central": comparison.distance_central,
        "distance_stable": comparison.distance_stable,
        "central_sharpness": central.sharpness,
        "stable_sharpness": stable.sharpness,
        "central_num_critical": central.num_critical,
        "sigma_trace": central.sigma_trace,
        "predicted_variance": comparison.predicted_variance,
        "measured_variance": comparison.measured_variance,
        "measured_total_variance": comparison.measured_total_variance,
        "eos": comparison.eos,
    }
    return to_jsonable({"summary": comparison.summary(), "series": series})

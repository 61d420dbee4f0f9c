"""Edge-of-stability reproductions on the digits MLP with `pfkernels eos`.

Runs the command in-process for each configuration below, copies each run's figure to
``bench/results/eos_<name>.png`` and collects the summaries (threshold, EoS onset, share of
measurements within ±10% of the threshold after it, median ratio, HVPs per measurement, times)
in ``bench/results/eos_reproductions_cpu.json``. The claims (REFERENCES.md §3, §4):

- GD at two rates: sharpness rises to 2/η and hovers there (Cohen et al. 2021);
- Adam (β1 = 0.9): preconditioned sharpness settles near 38/η (Cohen et al. 2022);
- heavy-ball momentum (β = 0.9): sharpness reaches (2 + 2β)/η.

Not part of the test run; several minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from pfkernels import cli

CONFIGS = {
    "gd_lr0.1": ["--optimizer", "gd", "--lr", "0.1", "--steps", "3000"],
    "gd_lr0.2": ["--optimizer", "gd", "--lr", "0.2", "--steps", "1500"],
    "adam_lr0.001": ["--optimizer", "adam", "--lr", "0.001", "--steps", "1500"],
    "momentum_lr0.2": ["--optimizer", "momentum", "--lr", "0.2", "--momentum", "0.9",
                       "--steps", "1500"],
}
# Every reproduction measures every 10 steps with the default guard pair and tolerance.
MEASUREMENT = ["--every", "10", "--guard", "1", "--tol", "1e-3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--runs", default="runs/reproductions", help="folder for the run outputs")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "eos_reproductions_cpu.json"
    collected = json.loads(path.read_text()) if path.exists() else {}
    for name in args.only or CONFIGS:
        out = Path(args.runs) / name
        start = time.perf_counter()
        code = cli.main(["eos", *CONFIGS[name], *MEASUREMENT, "--out", str(out), "--quiet"])
        summary = json.loads((out / "summary.json").read_text())
        shutil.copyfile(out / "report.png", results / f"eos_{name}.png")
        eos = summary["eos"]
        collected[name] = {
            "arguments": CONFIGS[name],
            "exit_code": code,
            "threshold": summary["threshold"],
            "eos_onset_step": eos["eos_onset_step"],
            "within_band_share": eos["within_band_share"],
            "median_ratio_after_onset": eos["median_ratio_after_onset"],
            "max_ratio": eos["max_ratio"],
            "progressive_sharpening": eos["progressive_sharpening"],
            "initial_sharpness": eos["initial_sharpness"],
            "final_sharpness": eos["final_sharpness"],
            "loss_increase_share_before_onset": eos["loss_increase_share_before_onset"],
            "loss_increase_share_after_onset": eos["loss_increase_share_after_onset"],
            "mean_hvps_per_measurement": eos["mean_matvecs"],
            "final_loss": summary["final_loss"],
            "test_accuracy": summary["test_accuracy"],
            "wall_time": time.perf_counter() - start,
            "tracking_time": summary["tracking_time"],
            "figure": f"eos_{name}.png",
        }
        print(name, json.dumps(collected[name]), flush=True)
        path.write_text(json.dumps(collected, indent=2) + "\n")


if __name__ == "__main__":
    main()

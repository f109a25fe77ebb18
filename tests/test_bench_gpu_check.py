"""python -m densenet.bench gpu --device cpu --quick: every part of the GPU check runs on the CPU at toy
size (model rows with the batch search, the compiled row with its graph count, the loader from JPEG
files, the real training loop), and the table and JSON say what was and was not measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_cpu_run_exercises_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "densenet.bench", "gpu", "--device", "cpu", "--quick",
                           "--archs", "densenet121", "--impls", "ours", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["part"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    for mode in ("fp32-nchw", "bf16-cl", "bf16-cl-compile"):
        row = rows["model", mode]
        assert row["batch"] == 2 and row["images_per_s"] > 0 and row["max_mem_bytes"] > 0, row
    compiled = rows["model", "bf16-cl-compile"]
    assert compiled["graphs"] >= 1 and compiled["recompiles"] == 0
    assert rows["loader", "cpu-decode"]["images_per_s"] > 0 and rows["loader", "cpu-decode"]["workers"] == 2
    # the device-decode mode runs with the CPU as its device; every image is decoded once, somewhere
    device = rows["loader", "device-decode"]
    assert device["images_per_s"] > 0 and sum(device["decoded"].values()) >= device["images"]
    assert rows["trainer", "fp32-nchw"]["images_per_s"] > 0 and rows["trainer", "fp32-nchw"]["batch"] == 2
    assert "densenet121 bf16-cl / fp32-nchw" in proc.stdout and "device-decode loader / model" in proc.stdout


def test_bad_arguments_are_refused_before_anything_runs():
    for args, words in ((["--archs", "densenet169"], "start with densenet121"),
                        (["--impls", "timm"], "--impls"),
                        (["--min-batch", "8", "--max-batch", "4"], "--min-batch")):
        proc = subprocess.run([sys.executable, "-m", "densenet.bench", "gpu", "--device", "cpu", "--quick", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and words in proc.stderr, (args, proc.stderr)

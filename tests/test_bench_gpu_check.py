"""python -m densenet.bench gpu --device cpu --quick: every part of the GPU check runs on the CPU at toy
size (the correctness checks, the real training loop on pre-made batches and on both loaders, model
rows with the batch search, the compiled row with its graph count), and the table and JSON say what
was and was not measured."""
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
    report = json.loads(out.read_text())
    rows = {(r["part"], r["mode"]): r for r in report["rows"]}
    assert report["meta"]["skipped"] == []
    # the checks come first and every one passes (what needs CUDA says it was left out)
    assert [r["mode"] for r in report["rows"][:5]] == ["decode_accum", "decode_ordering", "fused_resume", "sync_bn",
                                                       "host_syncs"]
    for name in ("decode_accum", "decode_ordering", "fused_resume", "sync_bn", "host_syncs"):
        assert rows["check", name]["ok"] is True, rows["check", name]
    assert rows["check", "decode_accum"]["flips_agree"] and rows["check", "decode_ordering"]["equal_to_idle"] == 6
    for mode in ("fp32-nchw", "bf16-nchw", "bf16-cl", "bf16-cl-compile"):
        row = rows["model", mode]
        assert row["batch"] == 2 and row["images_per_s"] > 0 and row["max_mem_bytes"] > 0, row
    compiled = rows["model", "bf16-cl-compile"]
    assert compiled["graphs"] >= 1 and compiled["recompiles"] == 0
    # the real training loop, fed pre-made batches and both loaders from JPEG files (the device-decode
    # loader with the CPU as its device: every image decoded once, somewhere)
    for feed in ("premade", "cpu", "device"):
        row = rows["trainer", f"fp32-nchw, {feed}"]
        assert row["images_per_s"] > 0 and row["batch"] == 4, row
    device = rows["trainer", "fp32-nchw, device"]
    assert sum(device["decoded"].values()) >= 4 * device["timed_steps"] and device["workers"] == 2
    assert "densenet121 bf16-cl / fp32-nchw" in proc.stdout and "trainer, device decode / pre-made" in proc.stdout
    assert "checks failed: none" in proc.stdout


def test_bad_arguments_are_refused_before_anything_runs():
    for args, words in ((["--archs", "densenet169"], "start with densenet121"),
                        (["--impls", "timm"], "--impls"),
                        (["--checks", "decode_accum,nothing"], "--checks"),
                        (["--min-batch", "8", "--max-batch", "4"], "--min-batch")):
        proc = subprocess.run([sys.executable, "-m", "densenet.bench", "gpu", "--device", "cpu", "--quick", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and words in proc.stderr, (args, proc.stderr)

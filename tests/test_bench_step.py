"""The model-step benchmark runs every configuration in its own process, and each host-memory
setting really reaches that process. (No speed is asserted: figures belong in its output.)"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(*args):
    return subprocess.run([sys.executable, "-m", "densenet.bench", "step", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_step_benchmark_compares_implementations_modes_and_allocators(tmp_path):
    out = tmp_path / "step.json"
    run = bench("--arch", "densenet_tiny", "--batch-size", 2, "--image-size", 32, "--impl", "ours",
                "--memory-efficient", "off,on", "--allocator", "system,thp,keep", "--warmup", 1, "--steps", 1,
                "--repeats", 2, "--device", "cpu", "--json", out)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["memory_efficient"], r["allocator"]) for r in rows] == [
        (False, "system"), (False, "thp"), (False, "keep"), (True, "system"), (True, "thp"), (True, "keep")]
    # glibc accepts the keep setting here; another C library would report False.
    assert all(r["allocator_applied"] for r in rows)
    assert rows[0]["speed_ratio"] == 1.0 and rows[0]["mem_ratio"] == 1.0
    assert all(r["images_per_s"] > 0 and r["peak_mem_bytes"] > 0 and r["repeats"] == 2 for r in rows)
    # Repeats are rotated: the second repeat starts with the second configuration.
    progress = [line for line in run.stdout.splitlines() if line.lstrip().startswith("repeat")]
    assert "repeat 1/2  ours nchw off plain no system" in progress[0]
    assert "repeat 2/2  ours nchw off plain no thp" in progress[6]


def test_step_benchmark_rejects_an_unknown_allocator():
    run = bench("--allocator", "tcmalloc", "--device", "cpu")
    assert run.returncode != 0 and "system, thp, keep" in run.stderr

"""The loader benchmark runs end to end on real photos: a tree built from a flat folder of samples,
the torchvision reference row and both of our decode modes. (No speed is asserted: figures depend
on the machine and belong in the benchmark's output.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from _data_util import sample_files

REPO = Path(__file__).resolve().parents[1]


def bench(*args):
    return subprocess.run([sys.executable, "-m", "densenet.bench", "loader", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_loader_benchmark_measures_the_reference_and_both_decode_modes(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    for path in sample_files()[::10]:
        shutil.copyfile(path, samples / path.name)
    tree, out = tmp_path / "tree", tmp_path / "loader.json"
    run = bench("--root", samples, "--make-tree", tree, "--workers", 1, "--batch-size", 4, "--image-size", 32,
                "--warmup", 1, "--batches", 2, "--repeats", 1, "--decode", "cpu,device", "--device", "cpu",
                "--json", out)
    assert run.returncode == 0, run.stderr
    assert "vs torchvision" in run.stdout and "load average" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["torchvision", "ours (cpu decode)", "ours (device decode)"]
    # CPU time is read in clock ticks: a few tiny batches can round to zero, never below it.
    assert all(r["images_per_s"] > 0 and r["total_cpu_ms_per_image"] >= 0 for r in rows)
    assert rows[0]["speed_ratio"] == 1.0 and sum(rows[2]["decoded_last_run"].values()) == 3 * 4
    assert len(list((tree / "train").iterdir())) == 10  # --make-tree keeps the tree: 10 classes


def test_loader_benchmark_refuses_a_missing_root(tmp_path):
    run = bench("--root", tmp_path / "nowhere", "--repeats", 1)
    assert run.returncode != 0 and "is not a folder" in run.stderr

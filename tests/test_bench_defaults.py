"""The loader and e2e benchmarks run without any folder given: their default data is 100 synthetic
ImageNet-sized JPEGs written for the run, nothing outside the repository."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densenet.bench", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_help_names_no_folder_outside_the_repository():
    for name in ("loader", "e2e"):
        run = bench(name, "--help")
        assert run.returncode == 0 and "/shared/" not in run.stdout and "100 synthetic" in run.stdout


def test_e2e_tree_from_the_default_samples(tmp_path):
    run = bench("e2e", "--make-tree", tmp_path / "tree", "--copies", 2)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote 200 train / 16 val images to {tmp_path / 'tree'}"
    assert len(list((tmp_path / "tree" / "train").iterdir())) == 100


def test_loader_measures_on_the_default_samples(tmp_path):
    run = bench("loader", "--make-tree", tmp_path / "tree", "--copies", 1, "--workers", 0, "--batch-size", 4,
                "--image-size", 32, "--warmup", 1, "--batches", 2, "--repeats", 1, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith(
        f"data {tmp_path / 'tree'} (100 samples from synthetic JPEGs x 1 links (kept)): 100 train images")
    assert "vs torchvision" in run.stdout
    assert len(list((tmp_path / "tree" / "train").iterdir())) == 100

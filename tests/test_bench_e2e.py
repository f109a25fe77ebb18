"""python -m densenet.bench e2e at toy size: the real trainer and the reference loop both run on a tree
built from JPEG files, and the table and JSON carry what they measured. Speed is not checked here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from densenet.bench import jpeg_tree

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densenet.bench", "e2e", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    return jpeg_tree.write_synthetic_samples(tmp_path_factory.mktemp("samples"), count=8)


def test_tree_layout_and_too_short_epochs_are_refused(samples, tmp_path):
    made = bench("--make-tree", str(tmp_path / "tree"), "--samples", str(samples), "--copies", "3")
    assert made.returncode == 0, made.stderr
    assert "wrote 24 train / 8 val images" in made.stdout
    classes = sorted(p.name for p in (tmp_path / "tree" / "train").iterdir())
    assert len(classes) == 8 and all(len(list((tmp_path / "tree" / "train" / c).iterdir())) == 3 for c in classes)
    again = bench("--make-tree", str(tmp_path / "tree"), "--samples", str(samples))
    assert again.returncode != 0 and "not empty" in again.stderr
    # 2 + 8 steps of 4 images need 40 images in one epoch; the tree has 24
    short = bench("--root", str(tmp_path / "tree"), "--image-size", "32", "--batch-size", "4", "--warmup", "2",
                  "--steps", "8")
    assert short.returncode != 0 and "need 40 training images" in short.stderr and "has 24" in short.stderr
    missing = bench("--samples", str(tmp_path / "nowhere"), "--image-size", "32")
    assert missing.returncode != 0 and "nowhere" in missing.stderr


@pytest.mark.slow
def test_ours_and_the_reference_both_measured(samples, tmp_path):
    out = tmp_path / "e2e.json"
    proc = bench("--samples", str(samples), "--copies", "2", "--image-size", "32", "--batch-size", "4",
                 "--workers", "1", "--warmup", "1", "--steps", "2", "--repeats", "1", "--device", "cpu",
                 "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "load average" in proc.stdout and "ours/ref" in proc.stdout
    result = json.loads(out.read_text())
    ours, ref = result["rows"]
    assert (ours["impl"], ref["impl"]) == ("ours", "reference")
    for row in (ours, ref):
        assert row["image_size"] == 32 and row["batch_size"] == 4 and row["workers"] == 1 and row["repeats"] == 1
        assert row["images_per_s"] > 0 and 0 <= row["data_wait"] <= 1 and row["peak_rss_bytes"] > 2**20
        assert len(row["runs"]) == 1
    assert ref["ratio_to_reference"] == 1.0
    assert ours["ratio_to_reference"] == pytest.approx(ours["images_per_s"] / ref["images_per_s"])
    assert len(result["meta"]["load_average_before"]) == 3 and result["meta"]["train_images"] == 16

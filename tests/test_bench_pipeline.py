"""The benchmark CLI runs end to end on real photos and reports its three pipelines. (No speed is
asserted here: figures depend on the machine; they belong in the benchmark's output.)"""

import json
import subprocess
import sys
from pathlib import Path

from _data_util import SAMPLE_DIR, sample_files, small_jpeg, write_truncated, write_zero_byte

REPO = Path(__file__).resolve().parents[1]


def test_bench_reports_ours_torchvision_and_the_decode_floor(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "densenet.bench", "pipeline", "--root", str(SAMPLE_DIR),
                          "--limit", "12", "--rounds", "1", "--image-size", "64", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name in ("ours", "torchvision", "floor"):
        assert name in run.stdout
    figures = json.loads(out.read_text())
    assert figures["images"] == 12 and set(figures["images_per_cpu_second"]) == {"ours", "torchvision", "floor"}
    assert all(rate > 0 for rate in figures["images_per_cpu_second"].values())


def test_bench_skips_and_counts_unreadable_files(tmp_path):
    tree = tmp_path / "tree"
    for i, photo in enumerate(sample_files()[:4]):
        small_jpeg(photo, tree / "n0" / f"good{i}.JPEG")
    write_zero_byte(tree / "n0" / "empty.JPEG")
    write_truncated(tree / "n1" / "truncated.JPEG")
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "densenet.bench", "pipeline", "--root", str(tree), "--rounds", "1",
                          "--image-size", "32", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"4 images from {tree} (2 unreadable, skipped: e.g. {tree / 'n0' / 'empty.JPEG'}: ")
    figures = json.loads(out.read_text())
    assert figures["images"] == 4 and figures["unreadable"] == 2


def test_bench_refuses_a_folder_without_images(tmp_path):
    run = subprocess.run([sys.executable, "-m", "densenet.bench", "pipeline", "--root", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no *.JPEG/*.jpg/*.png files" in run.stderr

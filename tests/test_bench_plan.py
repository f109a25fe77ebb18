"""python -m densenet.bench plan: a recipe's schedule from the trainer's own config code, and its cost
multiplied out from a throughput (given, or read from a GPU-check JSON)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _train_util import REPO, env
from densenet.bench.plan import IMAGENET_TRAIN, plan, throughput_from_json


def test_paper_recipe_on_eight_gpus_is_the_papers_schedule():
    row = plan(["--arch", "densenet121"], gpus=8)
    assert row["global_batch"] == 256 and row["peak_lr"] == pytest.approx(0.1)
    assert row["steps_per_epoch"] == IMAGENET_TRAIN // 256 and row["steps"] == 90 * (IMAGENET_TRAIN // 256)
    assert row["pixels_vs_paper"] == pytest.approx(1.0) and row["train_sizes"] == "224 px x 90"


def test_fast_recipe_on_64_gpus_trains_on_fewer_pixels_and_costs_them_out():
    row = plan(["--arch", "densenet121", "--recipe", "fast"], gpus=64, throughput=1000.0)
    assert row["global_batch"] == 2048 and row["peak_lr"] == pytest.approx(3.2)  # linear: 0.4 x 2048 / 256
    assert row["epochs"] == 40 and row["steps"] == 40 * (IMAGENET_TRAIN // 2048)
    assert row["train_sizes"] == "160 px x 31, 192 px x 3, 224 px x 6"
    per_epoch = IMAGENET_TRAIN // 2048 * 2048
    pixels = per_epoch * (31 * 160 ** 2 + 3 * 192 ** 2 + 6 * 224 ** 2)
    assert row["image_pixels"] == pixels and row["pixels_vs_paper"] == pytest.approx(pixels / (90 * 224 ** 2 * per_epoch))
    # every image costs (S / 224)^2 of a 224 px one at 1000 images/s per GPU
    gpu_seconds = per_epoch * (31 * (160 / 224) ** 2 + 3 * (192 / 224) ** 2 + 6) / 1000.0
    assert row["gpu_hours"] == pytest.approx(gpu_seconds / 3600) and row["wall_hours"] == pytest.approx(
        gpu_seconds / 3600 / 64)


def test_large_batch_recipe_scales_lamb_by_the_square_root():
    row = plan(["--arch", "densenet169", "--recipe", "large-batch", "--batch-size", "64"], gpus=512)
    assert row["global_batch"] == 32768 and row["optimizer"] == "lamb" and row["lr_rule"] == "sqrt"
    assert row["peak_lr"] == pytest.approx(8e-3 * (32768 / 2048) ** 0.5)


def test_throughput_is_read_from_a_gpu_check_json(tmp_path):
    path = tmp_path / "gpu.json"
    rows = [{"part": "model", "impl": "ours", "arch": "densenet121", "mode": m, "images_per_s": v}
            for m, v in (("fp32-nchw", 500.0), ("bf16-cl", 1200.0))]
    rows.append({"part": "model", "impl": "torchvision", "arch": "densenet121", "mode": "bf16-cl", "images_per_s": 9e9})
    path.write_text(json.dumps({"meta": {"image_size": 224}, "rows": rows}))
    assert throughput_from_json(str(path), "densenet121") == 1200.0
    with pytest.raises(SystemExit, match="no training-step row of ours for densenet161"):
        throughput_from_json(str(path), "densenet161")


def test_the_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "densenet.bench", "plan", "--arch", "densenet121", "--gpus", "64",
                          "--recipe", "fast", "--throughput", "1000"], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2,048" in out.stdout and "160 px x 31" in out.stdout and "GPU-hours" in out.stdout


def test_recipes_benchmark_runs_what_it_names():
    """python -m densenet.bench recipes: the flags of each run give the schedule its row is named for."""
    import argparse

    from densenet.bench.recipes import ONLY, _runs

    args = argparse.Namespace(batch_size=8, size_multiple=8, lars_lr=[0.075, 1.0])
    runs = {r["name"]: plan(["--arch", "densenet_tiny", "--image-size", "64", *r["flags"]], gpus=1, train_images=500)
            for r in _runs(args)}
    assert list(runs) == ["paper", "fast", "fast full size", "lars 8x batch, lr 0.075", "lars 8x batch, lr 1"]
    assert [r["key"] for r in _runs(args)] == ["paper", *ONLY, "lars"]  # each --only choice names its runs
    assert runs["fast"]["train_sizes"] == "48 px x 31, 56 px x 3, 64 px x 6"
    assert runs["fast full size"]["train_sizes"] == "64 px x 40" and runs["fast full size"]["epochs"] == 40
    assert runs["fast full size"]["peak_lr"] == runs["fast"]["peak_lr"] == pytest.approx(0.4 * 8 / 256)
    for lr in (0.075, 1.0):
        lars = runs[f"lars 8x batch, lr {lr:g}"]
        assert (lars["optimizer"], lars["global_batch"], lars["epochs"]) == ("lars", 64, 90)
        assert lars["peak_lr"] == pytest.approx(lr)
    default = _runs(argparse.Namespace(batch_size=8, size_multiple=8, lars_lr=None))[-1]
    assert default["name"] == "lars 8x batch" and "--lr" not in default["flags"]

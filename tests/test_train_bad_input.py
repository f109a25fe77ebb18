"""Bad input to the real train_dist.py: one line on stderr that names the problem and the fix,
exit 2, printed once however many processes there are, and before anything is written: no run
folder is created and no file of an earlier run changes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import densenet
from _data_util import build_imagefolder
from _train_util import REPO, TINY, command, demo_root, env, run
from data import imagenet_wnids

pytestmark = pytest.mark.slow

ARGS = TINY + ["--batch-size", "16", "--max-steps", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_root(tmp_path_factory.mktemp("data"))


def run_split(args, nproc=1, timeout=240):
    """stdout and stderr apart, so that the first line of stderr can be checked."""
    return subprocess.run(command(args, nproc), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(proc, *needles, torchrun=False):
    """Exit 2 and one error line, first on stderr, holding every needle; no traceback anywhere.

    Under torchrun the launcher prints its banner first, then its own failure report (a traceback of
    torchrun's code, not ours) and exits 1 whatever the workers' status was: that part is torchrun's."""
    lines = proc.stderr.splitlines()
    if torchrun:
        assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr, proc.stdout + proc.stderr
        lines = [line for line in lines if line.strip() and not set(line) <= {"*"} and "OMP_NUM_THREADS" not in line]
        assert 'train_dist.py", line' not in proc.stderr and "Connection reset" not in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
    assert lines and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert sum(line.startswith("error") for line in proc.stderr.splitlines()) == 1, proc.stderr
    return lines[0]


def test_command_line_mistakes_are_answered_without_importing_torch(tmp_path):
    # -X importtime lists every module the interpreter imported, on stderr
    helped = subprocess.run([sys.executable, "-X", "importtime", "train_dist.py", "--help"], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    assert "densenet_tiny" in helped.stdout and "--model ARCH" in helped.stdout
    assert " torch\n" not in helped.stderr and "| torch" not in helped.stderr
    typo = run_split(["--data", "demo", "--outptu-dir", str(tmp_path / "x")])
    assert refused(typo) == "error: unknown flag --outptu-dir; did you mean --output-dir?"
    assert len(typo.stderr.splitlines()) == 1  # no usage block in front of it
    arch = run_split(["--data", "demo", "--arch", "densenet12", "--output-dir", str(tmp_path / "x")])
    refused(arch, "unknown model 'densenet12'", "did you mean densenet121", "densenet_tiny")
    small = run_split(["--data", "demo", "--arch", "densenet_tiny", "--image-size", "16"])
    refused(small, "image_size: 16 px is too small for densenet_tiny", "at least 29 px")
    device_aa = run_split(["--data", "demo", "--decode", "device", "--auto-augment", "rand-m9-mstd0.5"])
    refused(device_aa, "auto_augment", "--decode cpu")
    assert not (tmp_path / "x").exists()


def test_an_output_dir_that_is_a_file_is_refused_once_under_torchrun(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file\n")
    proc = run_split(ARGS + ["--data", str(data), "--output-dir", str(blocker)], nproc=2)
    refused(proc, f"{blocker} is a file", torchrun=True)
    below = run_split(ARGS + ["--data", str(data), "--output-dir", str(blocker / "run")])
    refused(below, "cannot be created", f"{blocker} is a file")
    assert blocker.read_text() == "a file\n"


def test_data_errors_are_printed_once_and_create_no_run_folder(data, tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    proc = run_split(ARGS + ["--data", str(empty), "--output-dir", str(out)], nproc=2)
    refused(proc, str(empty), torchrun=True)
    too_big = run_split(ARGS + ["--batch-size", "600", "--data", str(data), "--output-dir", str(out)])
    refused(too_big, "500 training images are fewer than one global batch", "lower the batch size")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x00" * 64)
    bad_weights = run_split(ARGS + ["--data", str(data), "--output-dir", str(out), "--weights", str(weights)])
    refused(bad_weights, str(weights))
    assert not out.exists()


def test_sixteen_unreadable_images_in_a_row_stop_with_one_line(data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    for jpeg in (broken / "train").rglob("*.JPEG"):
        jpeg.write_bytes(b"not a jpeg")
    proc = run_split(ARGS + ["--data", str(broken), "--output-dir", str(tmp_path / "run"), "--workers", "1"])
    refused(proc, "16 unreadable images in a row", "dataset looks broken")


def test_a_complete_run_says_so_before_building_anything(data, tmp_path):
    out = tmp_path / "run"
    args = ARGS + ["--data", str(data), "--output-dir", str(out)]
    assert run(args).returncode == 0
    before = snapshot(out)
    again = run_split(args + ["--wandb", "offline"])  # W&B on: it must not open a run to do nothing
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing to do: ") and "raise --epochs" in again.stdout
    assert "last.pt" in again.stdout and "-1.00" not in again.stdout
    assert snapshot(out) == before and not (out / "wandb").exists()


def test_the_spellings_of_torchvision_and_timm_train_and_evaluate(data, tmp_path):
    out = tmp_path / "run"
    proc = run_split(["--model", "densenet_tiny", "--data-path", str(data), "-b", "128", "-j", "0", "--print-freq", "1",
                      "--output", str(out), "--img-size", "40", "--epochs", "2",
                      "--wandb", "disabled"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "0 loader workers per process" in next(line for line in lines if line.startswith("batch "))
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert lines[-1].startswith("finished in ") and str(out / "best.pt") in lines[-1]
    # --test-only of our own checkpoint: the arch and the 40 px come from it, not the 224 px default
    evaluated = run_split(["--test-only", "--weights", str(out / "best.pt"), "--data-dir", str(data), "-j", "0",
                           "--output", str(tmp_path / "eval")])
    assert evaluated.returncode == 0, evaluated.stderr
    assert "densenet_tiny, 40 px" in evaluated.stdout
    results = json.loads((tmp_path / "eval" / "eval_best.json").read_text())
    assert results["image_size"] == 40 and results["count"] == 100 and results["arch"] == "densenet_tiny"
    before = snapshot(out)
    other = run_split(["--evaluate", "--weights", str(out / "best.pt"), "--data", str(data), "--arch", "densenet121",
                       "--output-dir", str(out)])
    refused(other, "holds a densenet_tiny, not a densenet121", "drop --arch")
    assert snapshot(out) == before


def test_a_resume_on_another_world_size_keeps_the_peak_lr_and_says_so(data, tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--batch-size", "16", "--epochs", "2", "--data", str(data), "--output-dir", str(out)]
    assert run(args + ["--max-steps", "2"]).returncode == 0  # 1 process x 16: peak lr 0.1 * 16 / 256
    # --log-every and --wandb come later on the command line, so they win over TINY's
    resumed = run_split(args + ["--max-steps", "4", "--log-every", "7", "--wandb", "offline"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    warning = next(line for line in resumed.stdout.splitlines() if "global batch is now 32" in line)
    assert "keeping its peak lr 0.00625 instead of the 0.0125" in warning and "--lr 0.0125" in warning
    changed = [line for line in resumed.stdout.splitlines() if line.startswith("config changed")]
    assert changed == ["config changed since the checkpoint: max_steps: 2 -> 4"]  # not --log-every, --wandb
    assert "lr: 0.00625" in (out / "config.yaml").read_text()


def test_unreadable_images_are_left_out_of_evaluation_and_listed_once(data, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(data, damaged)
    bad_val = sorted((damaged / "val").rglob("*.JPEG"))[0]
    bad_train = sorted((damaged / "train").rglob("*.JPEG"))[0]
    for f in (bad_val, bad_train):
        f.write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    proc = run_split(TINY + ["--batch-size", "128", "--epochs", "2", "--data", str(damaged), "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ") and " done " in line]
    assert len(epochs) == 2 and all("on 99 images (1 unreadable, left out)" in line for line in epochs)
    assert (proc.stdout + proc.stderr).count(str(bad_val)) == 2  # one console line, naming it and its reason
    listed = (out / "unreadable.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted([str(bad_val), str(bad_train)])
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].split(",")[-2:] == ["val_count", "val_unreadable"] and rows[-1].endswith(",99,1")
    evaluated = run_split(["--evaluate", "--weights", str(out / "best.pt"), "--data", str(damaged), "-j", "0",
                           "--output-dir", str(out)])
    assert evaluated.returncode == 0, evaluated.stderr
    assert "images 99 (1 unreadable, left out)" in evaluated.stdout
    assert json.loads((out / "eval_best.json").read_text())["unreadable"] == 1


def test_a_validation_subset_of_wnids_is_scored_in_the_1000_class_order(tmp_path):
    subset = tmp_path / "subset"  # val/<wnid>/ of 4 ImageNet classes, no train/
    wnids = build_imagefolder(subset, num_classes=4, per_class=0, val_per_class=2)
    model = densenet.create_model("densenet_tiny", num_classes=1000)
    with torch.no_grad():  # scores rank the 4 classes (by their 1000-class index) above the other 996
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        for rank, wnid in enumerate(wnids):
            model.classifier.bias[imagenet_wnids().index(wnid)] = 1.0 + rank
    weights = tmp_path / "densenet_tiny_in1k.pth"
    torch.save(model.state_dict(), weights)
    args = TINY + ["--evaluate", "--weights", str(weights), "--output-dir", str(tmp_path / "eval")]
    proc = run_split(args + ["--data", str(subset)])
    assert proc.returncode == 0, proc.stderr
    assert "top1 25.000  top5 100.000" in proc.stdout and "images 8" in proc.stdout  # not 0 and 25
    # with a train/ of the 4 wnids the data has its own 4 classes: 1000-class weights do not fit it
    build_imagefolder(tmp_path / "trained", num_classes=4, per_class=1, val_per_class=1)
    before = snapshot(tmp_path / "eval")
    refused(run_split(args + ["--data", str(tmp_path / "trained")]),
            f"{weights} has 1000 classes but {tmp_path / 'trained'} has 4", "give --data the classes")
    assert snapshot(tmp_path / "eval") == before
    # a checkpoint of ours trained on those 4 wnids names them: the val-only subset is scored in its order
    trained = run_split(TINY + ["--data", str(tmp_path / "trained"), "--epochs", "1", "--batch-size", "2",
                                "--output-dir", str(tmp_path / "four")])
    assert trained.returncode == 0, trained.stderr
    own = run_split(TINY + ["--evaluate", "--weights", str(tmp_path / "four" / "best.pt"), "--data", str(subset),
                            "--output-dir", str(tmp_path / "eval4")])
    assert own.returncode == 0, own.stderr
    assert json.loads((tmp_path / "eval4" / "eval_best.json").read_text())["count"] == 8

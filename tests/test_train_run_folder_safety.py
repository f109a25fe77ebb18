"""A run folder's checkpoints are never written over by a run that does not continue them: the real
train_dist.py on the demo JPEGs refuses (exit 2, one line naming the files and the way out) when
none of them loads, when --no-resume points into the folder, and when the folder holds another
architecture; no file of the earlier run changes."""
from __future__ import annotations

import pytest

from _train_util import TINY, demo_root, run

pytestmark = pytest.mark.slow

ARGS = TINY + ["--batch-size", "16", "--max-steps", "4", "--ckpt-every", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_root(tmp_path_factory.mktemp("data"))


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def first_error_line(output):
    return next(line for line in output.splitlines() if line.startswith("error"))


def test_a_folder_whose_checkpoints_none_loads_is_refused_and_kept(data, tmp_path):
    out = tmp_path / "run"
    first = run(ARGS + ["--data", str(data), "--output-dir", str(out)])
    assert first.returncode == 0, first.stdout
    checkpoints = sorted(p.name for p in out.glob("*.pt"))
    assert "last.pt" in checkpoints and "best.pt" in checkpoints
    last = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(last[: len(last) // 3])  # cut short, as by a full disk
    for name in checkpoints:
        if name != "last.pt":
            (out / name).write_bytes(b"not a checkpoint")
    before = snapshot(out)
    again = run(ARGS + ["--data", str(data), "--output-dir", str(out), "--max-steps", "8"])
    assert again.returncode == 2, again.stdout
    line = first_error_line(again.stdout)
    assert "none of the checkpoints" in line and "last.pt" in line and "best.pt" in line
    assert "--resume FILE" in line and "--no-resume" in line
    assert snapshot(out) == before


def test_no_resume_into_a_used_folder_is_refused_and_kept(data, tmp_path):
    out = tmp_path / "run"
    assert run(ARGS + ["--data", str(data), "--output-dir", str(out)]).returncode == 0
    before = snapshot(out)
    fresh = run(ARGS + ["--data", str(data), "--output-dir", str(out), "--no-resume"])
    assert fresh.returncode == 2, fresh.stdout
    line = first_error_line(fresh.stdout)
    assert "earlier run" in line and "best.pt" in line and "--output-dir" in line
    assert snapshot(out) == before
    # a new folder is what it asks for, and works
    assert run(ARGS + ["--data", str(data), "--output-dir", str(tmp_path / "new"), "--no-resume"]).returncode == 0


def test_a_folder_of_another_architecture_is_named_in_one_line(data, tmp_path):
    out = tmp_path / "run"
    assert run(ARGS + ["--data", str(data), "--output-dir", str(out)]).returncode == 0
    before = snapshot(out)
    other = [a if a != "densenet_tiny" else "densenet_bc_100" for a in ARGS]
    proc = run(other + ["--data", str(data), "--output-dir", str(out), "--max-steps", "8"])
    assert proc.returncode == 2, proc.stdout
    line = first_error_line(proc.stdout)
    assert "holds a densenet_tiny with 10 classes" in line and "densenet_bc_100" in line
    assert "--arch densenet_tiny" in line
    assert "size mismatch" not in proc.stdout and "Traceback" not in proc.stdout
    assert snapshot(out) == before

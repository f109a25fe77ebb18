"""`python -m densenet.weights export` as a user runs it, and `read_weights`, the reader behind
train_dist.py's --weights / --evaluate and densenet.reuse: our checkpoints (model and EMA weights),
our exports and torchvision's files in; one WeightsError with a one-line message for every bad file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import densenet
from densenet.weights import WeightsError, WeightsNotFoundError, infer_arch, read_weights

REPO = Path(__file__).resolve().parents[1]


def export(*args, umask: int = 0o022) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densenet.weights", "export", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(umask))


def trainer_checkpoint(path: Path, arch: str = "densenet_tiny", num_classes: int = 4, image_size: int = 64,
                       with_ema: bool = True) -> tuple:
    """A checkpoint laid out as train_dist.py writes it (Trainer.state_dict: "model", and "ema" as the
    timm EMA module's state_dict or None), with EMA weights that differ from the model's."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = densenet.create_model(arch, num_classes=num_classes)
    ema = ModelEmaV3(model, decay=0.5)  # a copy of the weights as they are now ...
    with torch.no_grad():
        for p in model.parameters():  # ... which the model's then leave behind
            p.add_(0.1)
    state = {"format": 1, "arch": arch, "config": {"arch": arch, "image_size": image_size, "ema": with_ema},
             "model": model.state_dict(), "ema": ema.module.state_dict() if with_ema else None,
             "optimizer": {}, "scaler": None, "progress": {"epoch": 1}, "rng": [], "classes": [],
             "wandb_run_id": None}
    torch.save(state, path)
    return model, ema.module


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def test_export_writes_a_torchvision_file_with_mode_0644_and_no_warning(tmp_path):
    model, _ = trainer_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "export" / "tiny.pth"
    run = export(tmp_path / "best.pt", out)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no runpy RuntimeWarning about densenet.weights being imported twice
    assert run.stdout.strip() == f"wrote {out} (densenet_tiny, 4 classes)"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["tiny.pth"]  # no temp file left behind

    # torchvision's own loader takes it as it is (the metadata rides in _metadata, not as keys) ...
    tv = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=4)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model.eval(), tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))
    # ... and our reader knows what it is.
    found = read_weights(out)
    assert (found.arch, found.image_size, found.num_classes, found.source, found.ema) == \
        ("densenet_tiny", 64, 4, "export", False)


def test_export_respects_the_umask(tmp_path):
    trainer_checkpoint(tmp_path / "best.pt")
    run = export(tmp_path / "best.pt", tmp_path / "tiny.pth", umask=0o027)
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE((tmp_path / "tiny.pth").stat().st_mode) == 0o640


def test_export_of_the_ema_weights(tmp_path):
    model, ema = trainer_checkpoint(tmp_path / "last.pt")
    out = tmp_path / "ema.pth"
    run = export(tmp_path / "last.pt", out, "--ema")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.strip() == f"wrote {out} (densenet_tiny, 4 classes, EMA weights)"
    saved = torch.load(out, weights_only=True)
    expected = ema.state_dict()
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert not torch.equal(saved["features.conv0.weight"], model.state_dict()["features.conv0.weight"])
    found = read_weights(out)
    assert found.ema and found.source == "export" and found.arch == "densenet_tiny"
    # Asking an export for EMA weights works only when it holds them.
    assert read_weights(out, ema=True).ema
    run = export(tmp_path / "last.pt", tmp_path / "model.pth")
    with pytest.raises(WeightsError, match="not of its EMA weights"):
        read_weights(tmp_path / "model.pth", ema=True)


def test_export_ema_of_a_run_without_ema_is_a_one_line_error(tmp_path):
    trainer_checkpoint(tmp_path / "last.pt", with_ema=False)
    run = export(tmp_path / "last.pt", tmp_path / "ema.pth", "--ema")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"error: {tmp_path / 'last.pt'} has no EMA weights (its run was trained "
                                       "without --ema); leave out --ema to use the model weights"]
    assert not (tmp_path / "ema.pth").exists() and run.stdout == ""


def test_export_of_a_missing_or_foreign_file_is_a_one_line_error(tmp_path):
    run = export(tmp_path / "missing.pt", tmp_path / "x.pth")
    assert run.returncode == 2 and run.stderr.splitlines() == [f"error: weights file not found: {tmp_path / 'missing.pt'}"]
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet.pth")
    run = export(tmp_path / "resnet.pth", tmp_path / "x.pth")
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1
    assert first_line(run.stderr).startswith(f"error: {tmp_path / 'resnet.pth'} is not a DenseNet checkpoint")
    assert not (tmp_path / "x.pth").exists()


def test_reader_on_our_checkpoint_and_torchvision_files(tmp_path):
    model, ema = trainer_checkpoint(tmp_path / "best.pt", image_size=96)
    found = read_weights(tmp_path / "best.pt")
    assert (found.path, found.arch, found.image_size, found.num_classes, found.source, found.ema) == \
        (str(tmp_path / "best.pt"), "densenet_tiny", 96, 4, "checkpoint", False)
    assert all(torch.equal(found.state_dict[k], v) for k, v in model.state_dict().items())
    with_ema = read_weights(tmp_path / "best.pt", ema=True)
    assert with_ema.ema and all(torch.equal(with_ema.state_dict[k], v) for k, v in ema.state_dict().items())

    # torchvision's files: a bare state_dict; the architecture is the named model its layers match.
    torch.save(torchvision.models.densenet169(num_classes=5).state_dict(), tmp_path / "tv169.pth")
    tv = read_weights(tmp_path / "tv169.pth")
    assert (tv.arch, tv.image_size, tv.num_classes, tv.source, tv.ema) == ("densenet169", None, 5, "state_dict", False)
    densenet.create_model("densenet169", num_classes=5).load_state_dict(tv.state_dict, strict=True)
    with pytest.raises(WeightsError, match="no EMA weights"):
        read_weights(tmp_path / "tv169.pth", ema=True)
    # Another trainer's wrapper, with DDP prefixes.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "timm.pth.tar")
    other = read_weights(tmp_path / "timm.pth.tar")
    assert (other.arch, other.source, other.num_classes) == ("densenet_tiny", "wrapped", 4)
    # The old entry point still returns the bare state_dict.
    assert sorted(densenet.load_state_dict_file(tmp_path / "best.pt")) == sorted(model.state_dict())


@pytest.mark.parametrize("name", densenet.list_models())
def test_the_architecture_is_recognised_from_the_layers_alone(name):
    with torch.device("meta"):
        model = densenet.create_model(name, num_classes=3)
    assert infer_arch(model.state_dict()) == name
    assert infer_arch({k: v for k, v in model.state_dict().items() if "transition1" not in k}) is None


def test_reader_errors_are_one_weights_error_naming_the_file(tmp_path):
    cases = {}
    cases["not found"] = tmp_path / "missing.pt"
    (tmp_path / "folder.pt").mkdir()
    cases["is not a file"] = tmp_path / "folder.pt"
    (tmp_path / "notes.pt").write_text("not a torch file\n")
    cases["could not be read"] = tmp_path / "notes.pt"
    torch.save({"model": densenet.densenet_tiny().state_dict(), "arch": "densenet_tiny"}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:300])
    cases["could not be read "] = tmp_path / "cut.pt"
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    cases["is not a DenseNet checkpoint"] = tmp_path / "list.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet.pth")
    cases["is not a DenseNet checkpoint "] = tmp_path / "resnet.pth"
    for what, path in cases.items():
        with pytest.raises(WeightsError) as info:
            read_weights(path)
        message = str(info.value)
        assert str(path) in message and what.strip() in message and "\n" not in message, message
    with pytest.raises(WeightsNotFoundError):
        read_weights(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):  # as load_state_dict_file always raised
        densenet.load_state_dict_file(tmp_path / "missing.pt")

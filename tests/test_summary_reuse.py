"""`python -m densenet.summary` figures and the feature-reuse heat map of `python -m densenet.reuse`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import densenet
from densenet import reuse, summary

# torchvision's published GFLOPS (multiply-accumulates, in billions) at 224x224.
PUBLISHED_GMACS = {"densenet121": 2.834, "densenet169": 3.36, "densenet201": 4.291, "densenet161": 7.728}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_macs_agree_with_torchvision_published_figures(name):
    s = summary.summarize(name)
    assert s.input_size == 224 and s.num_classes == 1000
    assert abs(s.macs / 1e9 - PUBLISHED_GMACS[name]) / PUBLISHED_GMACS[name] < 0.01


def test_summary_prints_every_named_model(capsys):
    assert summary.main([]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert sorted(rows) == densenet.list_models()
    assert rows["densenet_bc_100"][1] == "32"  # CIFAR input size
    assert rows["densenet121"][3] == "7,978,856" and rows["densenet121"][4] == "2.834"


# Odd sizes too, where the stem's and the transitions' rounding matters.
@pytest.mark.parametrize("name,size", [("densenet_tiny", 32), ("densenet_tiny", 45), ("densenet_tiny", 64),
                                       ("densenet121", 32), ("densenet121", 47), ("densenet_bc_100", 17)])
def test_analytic_macs_equal_the_measured_count(name, size):
    model = densenet.create_model(name, num_classes=7).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert summary.summarize(name, size, 7).macs == counter.get_total_flops() // 2  # 2 FLOPs per MAC


@pytest.mark.parametrize("name", densenet.list_models())
def test_analytic_parameter_count_equals_the_model(name):
    with torch.device("meta"):
        model = densenet.create_model(name, num_classes=13)
    assert summary.summarize(name, num_classes=13).params == sum(p.numel() for p in model.parameters())


def test_summary_cli_is_immediate_and_does_not_import_torch():
    code = ("import sys, densenet.summary as s; s.main([]); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 10  # about 0.15 s here; it was 18-60 s with model forwards
    assert proc.stderr == "" and proc.stdout.splitlines()[1].split()[-1] == "2.834"
    small = subprocess.run([sys.executable, "-m", "densenet.summary", "densenet121", "--image-size", "3"],
                           capture_output=True, text=True, timeout=120)
    assert small.returncode == 2 and small.stderr.splitlines() == [
        "error: 3 px is too small: transition 1 pools the map below one pixel"]


def test_summary_cli_rejects_an_unknown_model():
    proc = subprocess.run([sys.executable, "-m", "densenet.summary", "densenet122"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown model 'densenet122'" in proc.stderr


def _checkpoint_like_the_trainer(tmp_path, model, arch):
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "arch": arch, "config": {"arch": arch}, "epoch": 3}, path)
    return path


def test_reuse_heat_map_from_a_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = densenet.create_model("densenet_tiny", num_classes=4)
    ckpt = _checkpoint_like_the_trainer(tmp_path, model, "densenet_tiny")
    out = tmp_path / "maps" / "reuse.png"
    assert reuse.main([str(ckpt), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    data = json.loads(out.with_suffix(".json").read_text())
    blocks = data["blocks"]
    assert [b["num_layers"] for b in blocks] == [2, 2, 2, 2]
    assert [b["last_column"] for b in blocks] == ["transition"] * 3 + ["classifier"]

    # Recompute cells by hand: block 2, layer 2 reads [block input | layer 1 output].
    b2 = blocks[1]
    c0, k = b2["input_channels"], b2["growth_rate"]
    w = model.features.denseblock2.denselayer2.conv1.weight.detach().abs()
    assert math.isclose(b2["matrix"][0][1], w[:, :c0].mean().item(), rel_tol=1e-6)
    assert math.isclose(b2["matrix"][1][1], w[:, c0:c0 + k].mean().item(), rel_tol=1e-6)
    assert b2["matrix"][2][1] is None  # layer 2 cannot read its own output
    t = model.features.transition2.conv.weight.detach().abs()
    assert math.isclose(b2["matrix"][2][2], t[:, c0 + k:c0 + 2 * k].mean().item(), rel_tol=1e-6)
    cls = model.classifier.weight.detach().abs()
    b4 = blocks[3]
    assert math.isclose(b4["matrix"][0][2], cls[:, :b4["input_channels"]].mean().item(), rel_tol=1e-6)


def test_reuse_reads_a_torchvision_weight_file(tmp_path):
    path = tmp_path / "tv121.pth"
    torch.save(torchvision.models.densenet121(num_classes=3).state_dict(), path)
    blocks = reuse.feature_reuse(densenet.load_state_dict_file(path))
    assert [b.num_layers for b in blocks] == [6, 12, 24, 16]
    assert [b.growth_rate for b in blocks] == [32] * 4
    assert all(len(b.matrix) == b.num_layers + 1 for b in blocks)


def test_reuse_fails_clearly_on_a_file_that_is_not_a_densenet(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    proc = subprocess.run([sys.executable, "-m", "densenet.reuse", str(path), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "is not a DenseNet checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def run_reuse(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densenet.reuse", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_reuse_takes_arch_and_image_size_from_our_checkpoint(tmp_path):
    model = densenet.create_model("densenet_tiny", num_classes=4)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "arch": "densenet_tiny", "ema": None,
                "config": {"arch": "densenet_tiny", "image_size": 96}}, ckpt)
    out = tmp_path / "reuse.png"
    run = run_reuse(ckpt, "--out", out)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote {out} and {out.with_suffix('.json')} (densenet_tiny, 96 px, 4 dense blocks)"
    data = json.loads(out.with_suffix(".json").read_text())
    assert (data["arch"], data["image_size"]) == ("densenet_tiny", 96)
    # An explicit image size wins; the same arch is accepted.
    run = run_reuse(ckpt, "--out", out, "--arch", "densenet_tiny", "--image-size", "128")
    assert run.returncode == 0, run.stderr
    assert json.loads(out.with_suffix(".json").read_text())["image_size"] == 128
    # Another arch than the checkpoint's is a one-line error, and nothing is written.
    out.unlink()
    run = run_reuse(ckpt, "--out", out, "--arch", "densenet121")
    assert run.returncode == 2 and not out.exists()
    assert run.stderr.splitlines() == [f"error: --arch densenet121 does not fit {ckpt}, which was trained as a "
                                       "densenet_tiny; drop --arch or pass --arch densenet_tiny"]


def test_reuse_names_a_torchvision_file_by_its_layers(tmp_path):
    path = tmp_path / "tv121.pth"
    torch.save(torchvision.models.densenet121(num_classes=3).state_dict(), path)
    out = tmp_path / "tv.png"
    run = run_reuse(path, "--out", out)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert (data["arch"], data["image_size"]) == ("densenet121", 224)  # the model's own input size
    run = run_reuse(path, "--out", out, "--arch", "densenet169")
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1
    assert "has the layers of a densenet121" in run.stderr

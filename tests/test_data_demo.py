"""The demo dataset: real JPEGs in the ImageNet layout, identical on every build, safe to build
from several ranks at once, and learnable by densenet_tiny in seconds."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from data import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, build_eval_loader, build_train_loader,
                  resolve_data_root)
from data.demo import CLASSES, MARKER, make_image

REPO = Path(__file__).resolve().parents[1]


def test_cli_writes_an_imagenet_layout_tree_of_jpegs(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "data.demo", str(out)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "10 classes" in run.stdout
    for split, per_class in (("train", 50), ("val", 10)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == sorted(CLASSES)
        for folder in folders:
            files = sorted((out / split / folder).glob("*.JPEG"))
            assert len(files) == per_class
    with Image.open(next((out / "val" / "discs").glob("*.JPEG"))) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and 64 <= min(image.size) <= max(image.size) <= 96
    assert json.loads((out / MARKER).read_text())["classes"] == list(CLASSES)
    again = subprocess.run([sys.executable, "-m", "data.demo", str(out)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0  # idempotent
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("...")
    refused = subprocess.run([sys.executable, "-m", "data.demo", str(foreign)], cwd=REPO, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "is not a demo dataset" in refused.stderr
    assert (foreign / "thesis.tex").exists()


def test_images_are_a_pure_function_of_class_split_and_number():
    a = make_image("rings", "train", 3).tobytes()
    assert a == make_image("rings", "train", 3).tobytes()
    assert a != make_image("rings", "train", 4).tobytes()


def test_concurrent_builds_from_several_ranks_agree(tmp_path):
    code = "import sys; from data import resolve_data_root; print(resolve_data_root('demo', cache_dir=sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    roots = {out.strip() for out, _ in outputs}
    assert len(roots) == 1
    root = Path(roots.pop())
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]  # no temporary folders left
    assert len(list((root / "train").glob("*/*.JPEG"))) == 500
    assert resolve_data_root("demo", cache_dir=tmp_path) == root


def test_densenet_tiny_learns_the_demo_classes(tmp_path):
    """The point of the demo: accuracy climbs well above chance (10%) in a few seconds of CPU."""
    import densenet
    root = resolve_data_root("demo", cache_dir=tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = densenet.create_model("densenet_tiny", num_classes=10)
        train = build_train_loader(root, TrainTransform(32), batch_size=32, workers=0, seed=0)
        val = build_eval_loader(root, EvalTransform(32, 36), batch_size=50, workers=0)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        step = 0
        for epoch in range(20):
            train.set_epoch(epoch)
            for images, targets, _ in train:
                loss = torch.nn.functional.cross_entropy(model((images.float() - mean) / std), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
            if step >= 150:
                break
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, targets, _ in val:
                correct += int((model((images.float() - mean) / std).argmax(1) == targets).sum())
                total += len(targets)
    finally:
        torch.set_num_threads(threads)
    assert total == 100
    assert correct / total >= 0.3, f"accuracy {correct / total:.2f} after {step} steps"

"""Device decoding ahead of training (data.device_decode.DecodeAhead), on the CPU device and on CUDA
where present: the next batch is decoded while the consumer still works on this one, the real
trainer with gradient accumulation sees the CPU pipeline's crops, flips and pixel statistics, an
epoch left early stops its thread, errors reach the training thread, progressive JPEGs go to the
workers, and both JPEG decoders give the CPU path's pixels. Real JPEG files throughout."""

import gc
import threading
import time

import pytest
import torch
from PIL import Image

from _data_util import build_imagefolder, small_jpeg, sample_files, write_undefined_huffman_table

from data import IMAGENET_MEAN, IMAGENET_STD, build_train_loader
from data.device_decode import DeviceDecoder, EncodedCrop, collate_encoded, device_decodable, is_progressive
from data.rng import key_generator
from data.sample import Sample, TooManyUnreadable
from data.transforms import TrainTransform
from densenet.bench.gpu_correctness import build_trainer
from densenet.training.checkpoint import Progress
from densenet.training.signals import StopRequest

SEED = 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def loader_for(root, decode, device="cpu", workers=0, batch_size=8):
    return build_train_loader(root, TrainTransform(32), batch_size=batch_size, workers=workers, seed=SEED,
                              decode_on=device if decode == "device" else None)


def decode_threads():
    return [t for t in threading.enumerate() if t.name == "device-decode"]


def test_the_next_batch_is_decoded_while_this_one_is_used(photos):
    loader = loader_for(photos, "device")
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    deadline = time.monotonic() + 20
    while loader.decoder.counts["device"] < 16 and time.monotonic() < deadline:
        time.sleep(0.01)  # the consumer "trains" on batch 0 and asks for nothing
    assert loader.decoder.counts["device"] >= 16  # batch 1 (and maybe 2) decoded meanwhile
    assert len(list(batches)) == 3
    assert loader.decoder.counts["device"] == 32


def test_an_epoch_left_early_stops_its_thread_and_the_next_is_unchanged(photos):
    loader = loader_for(photos, "device", workers=2)
    loader.set_epoch(1)
    whole = list(loader)
    loader.set_epoch(1)
    batches = iter(loader)
    next(batches)
    del batches  # as train_epoch does at a signal or --max-steps
    gc.collect()
    assert decode_threads() == []
    loader.set_epoch(1)
    again = list(loader)  # the same persistent workers, reset for a new pass
    assert len(again) == len(whole) == 4
    for a, b in zip(whole, again):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert decode_threads() == []


def test_an_error_in_the_decode_thread_reaches_the_consumer(tmp_path):
    root = tmp_path / "tree"
    wnids = build_imagefolder(root, num_classes=1, per_class=0, val_per_class=1, short_side=48)
    for k in range(2):
        write_undefined_huffman_table(root / "train" / wnids[0] / f"huffman{k}.JPEG")
    loader = loader_for(root, "device", batch_size=2)
    loader.set_epoch(0)
    with pytest.raises(TooManyUnreadable, match="unreadable images in a row"):
        list(loader)
    assert decode_threads() == []


class Captured:
    """The real training loop's view of a loader: every micro-batch's images as the model got them."""

    def __init__(self, device, accum_steps):
        self.trainer = build_trainer(torch.device(device), accum_steps=accum_steps, batch=8, image_size=32, classes=4,
                                     extra={"workers": 0})
        self.inputs = []
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        self.trainer.model.register_forward_pre_hook(
            lambda m, args: self.inputs.append((args[0].detach().cpu() * std + mean)))

    def epoch(self, loader):
        self.trainer.progress = Progress(world_size=1, batch_size=8, accum_steps=self.trainer.cfg.accum_steps)
        self.trainer.train_epoch(loader, StopRequest())
        return torch.cat(self.inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_with_accumulation_the_trainer_sees_the_cpu_pipelines_crops_and_flips(photos, device):
    """Two micro-batches per step: the second is decoded while the first one's backward runs."""
    on_device = Captured(device, accum_steps=2).epoch(loader_for(photos, "device", device=device))
    on_cpu = Captured(device, accum_steps=2).epoch(loader_for(photos, "cpu"))
    assert on_device.shape == on_cpu.shape == (32, 3, 32, 32)
    difference = (on_device - on_cpu).abs()
    if device == "cpu":  # the same libjpeg-turbo decode; only the resize rounds differently
        assert difference.max() <= 1.01
    else:  # nvJPEG's own IDCT and rounding
        assert difference.mean() < 2
    mirrored = (on_device - on_cpu.flip(-1)).abs().mean(dim=(1, 2, 3))
    assert (difference.mean(dim=(1, 2, 3)) < mirrored).all()  # every flip agrees
    assert torch.allclose(on_device.mean(dim=(0, 2, 3)), on_cpu.mean(dim=(0, 2, 3)), atol=0.5)
    assert torch.allclose(on_device.std(dim=(0, 2, 3)), on_cpu.std(dim=(0, 2, 3)), atol=0.5)


def test_progressive_jpegs_are_decoded_by_the_workers(tmp_path):
    root = tmp_path / "tree"
    wnids = build_imagefolder(root, num_classes=2, per_class=3, val_per_class=1, short_side=48)
    progressive = root / "train" / wnids[0] / "progressive.JPEG"
    Image.open(sample_files()[0]).convert("RGB").resize((64, 48)).save(progressive, "JPEG", progressive=True)
    image = Image.open(progressive)
    assert is_progressive(image) and not device_decodable(image.format, image.mode, progressive.read_bytes(),
                                                          is_progressive(image))
    device_loader = loader_for(root, "device", batch_size=7)
    device_loader.set_epoch(0)
    (x_dev, y_dev, _), = list(device_loader)
    cpu_loader = loader_for(root, "cpu", batch_size=7)
    cpu_loader.set_epoch(0)
    (x_cpu, y_cpu, _), = list(cpu_loader)
    assert device_loader.decoder.counts == {"device": 6, "workers": 1, "fallback": 0}
    assert torch.equal(y_dev, y_cpu)
    assert int((x_dev == x_cpu).flatten(1).all(dim=1).sum()) >= 1  # the worker's pixels are the CPU path's


def test_both_jpeg_decoders_give_the_cpu_paths_pixels(tmp_path):
    transform = TrainTransform(32)
    paths = [small_jpeg(sample_files()[i], tmp_path / f"photo{i}.JPEG") for i in range(4)]
    samples = []
    for k, path in enumerate(paths):
        generator = key_generator(11, k)
        crop, flip = transform.crop(*Image.open(path).size, generator)
        samples.append(Sample(EncodedCrop(path.read_bytes(), crop, flip, None, str(path), transform.size), k, ()))
    batch = collate_encoded(samples)
    results = {}
    for backend in ("torchcodec", "torchvision"):
        decoder = DeviceDecoder(transform, torch.device("cpu"), backend=backend)
        assert decoder.backend == backend
        results[backend] = decoder(batch)[0]
    assert torch.equal(results["torchcodec"], results["torchvision"])
    assert DeviceDecoder(transform, torch.device("cpu")).backend == "torchcodec"  # preferred when installed
    with pytest.raises(ValueError, match="not one of"):
        DeviceDecoder(transform, torch.device("cpu"), backend="pillow")

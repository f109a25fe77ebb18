"""The device-decode loader mode, run on the CPU device: the same crops, flips and erasures as the
CPU path for the same keys, pixels within rounding of it, exact resume, and odd or broken files
decoded on the CPU or replaced and flagged without losing the batch. Real JPEG files throughout."""

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from _data_util import (build_imagefolder, jpeg_bytes, sample_files, small_jpeg, write_cmyk, write_greyscale,
                        write_not_an_image, write_png_named_jpeg, write_truncated, write_undefined_huffman_table,
                        write_zero_byte)

from data import build_train_loader
from data.device_decode import (DeviceDecoder, EncodedCrop, EncodedTrainTransform, collate_encoded,
                                device_decodable)
from data.rng import SAMPLE, key_generator
from data.sample import Sample
from data.shards import convert
from data.transforms import EvalTransform, TrainTransform

SEED = 5
# The CPU device is always tested; on a machine with a GPU the same checks run there as well.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory):
    """Real photos at 160 px: at a 32 px output most crops let the CPU path decode at 1/2 or 1/4."""
    root = tmp_path_factory.mktemp("large")
    build_imagefolder(root, num_classes=4, per_class=8, val_per_class=1, short_side=160)
    return root


def epoch(root, decode, *, workers=0, epoch=2, start_batch=0, batch_size=8, device="cpu", **transform):
    """One epoch's batches decoded by the workers (decode "cpu") or on ``device`` (decode "device")."""
    loader = build_train_loader(root, TrainTransform(32, **transform), batch_size=batch_size, workers=workers,
                                seed=SEED, decode_on=device if decode == "device" else None)
    loader.set_epoch(epoch, start_batch)
    return loader, list(loader)


def stacked(batches):
    return (torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches]),
            torch.cat([b for _, _, b in batches]))


def test_contract_and_pixels_match_the_cpu_path(photos):
    threads = torch.get_num_threads()
    loader, device_batches = epoch(photos, "device")
    assert torch.get_num_threads() == threads  # the training step's setting is left as it was
    _, cpu_batches = epoch(photos, "cpu")
    assert len(device_batches) == len(loader) == 4
    images, targets, bad = device_batches[0]
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32) and images.is_contiguous()
    assert images.device == torch.device("cpu") and loader.decoder.device == torch.device("cpu")
    assert targets.dtype == torch.int64 and bad.dtype == torch.bool and not bad.any()
    x_dev, y_dev, _ = stacked(device_batches)
    x_cpu, y_cpu, _ = stacked(cpu_batches)
    assert torch.equal(y_dev, y_cpu)  # the same samples in the same order
    # same crop and flip decoded by the same libjpeg-turbo; only the resize kernel rounds differently
    assert (x_dev.int() - x_cpu.int()).abs().max() <= 1
    assert loader.decoder.counts == {"device": 32, "workers": 0, "fallback": 0}


def test_crop_boxes_and_flips_are_the_cpu_paths_for_the_same_keys(photos):
    loader = build_train_loader(photos, TrainTransform(32), batch_size=8, workers=0, seed=SEED, decode_on="cpu")
    loader.set_epoch(3)
    transform = TrainTransform(32)
    table = loader.dataloader.dataset.table
    keys = [key for batch in loader.sampler for key in batch]
    encoded = [raw[0] for raw in loader.dataloader]  # the workers' half: nothing decoded yet
    crops = [c for e in encoded for c in e.crops]
    flips = [f for e in encoded for f in e.flips]
    assert len(crops) == len(keys) == 32 and all(len(e.pixel_positions) == 0 for e in encoded)
    for (ep, index), crop, flip in zip(keys, crops, flips):
        size = Image.open(table.path(index)).size
        assert (crop, flip) == transform.crop(*size, key_generator(SAMPLE, SEED, ep, index))
    assert 0 < sum(flips) < len(flips)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_match_when_the_cpu_path_decodes_at_reduced_scale(large_photos, device):
    _, device_batches = epoch(large_photos, "device", batch_size=16, device=device)
    _, cpu_batches = epoch(large_photos, "cpu", batch_size=16)
    assert device_batches[0][0].device.type == device
    x_dev, y_dev, _ = stacked(device_batches)
    x_dev = x_dev.cpu()
    x_cpu, y_cpu, _ = stacked(cpu_batches)
    assert torch.equal(y_dev, y_cpu)
    x_dev, x_cpu = x_dev.float(), x_cpu.float()
    # DCT scaling (the CPU path's Image.draft) vs a full decode and antialiased resize: same pictures
    assert (x_dev - x_cpu).abs().mean() < 4.0  # as between draft and full decodes on the CPU path alone
    assert torch.allclose(x_dev.mean(dim=(0, 2, 3)), x_cpu.mean(dim=(0, 2, 3)), atol=0.5)
    assert torch.allclose(x_dev.std(dim=(0, 2, 3)), x_cpu.std(dim=(0, 2, 3)), atol=0.5)
    per_image = (x_dev - x_cpu).abs().mean(dim=(1, 2, 3))
    mirrored = (x_dev - x_cpu.flip(-1)).abs().mean(dim=(1, 2, 3))
    assert (per_image < mirrored).all()  # every flip agrees


def test_random_erasing_erases_the_same_rectangle_with_the_same_noise(photos):
    _, device_batches = epoch(photos, "device", random_erasing=1.0)
    _, cpu_batches = epoch(photos, "cpu", random_erasing=1.0)
    _, plain = epoch(photos, "cpu")
    x_dev, x_cpu, x_plain = stacked(device_batches)[0], stacked(cpu_batches)[0], stacked(plain)[0]
    erased = (x_cpu != x_plain).any(dim=1, keepdim=True).expand_as(x_cpu)
    assert erased.any()
    assert torch.equal(x_dev[erased], x_cpu[erased])
    assert (x_dev.int() - x_cpu.int()).abs().max() <= 1


def test_same_batches_for_any_workers_and_exact_resume(photos):
    _, serial = epoch(photos, "device", workers=0, epoch=4)
    _, parallel = epoch(photos, "device", workers=2, epoch=4)
    _, resumed = epoch(photos, "device", workers=2, epoch=4, start_batch=2)
    for a, b in zip(serial, parallel):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(resumed) == 2
    for a, b in zip(serial[2:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    _, other_epoch = epoch(photos, "device", workers=0, epoch=5)
    assert not torch.equal(stacked(serial)[0], stacked(other_epoch)[0])


def test_no_deprecation_warning_escapes(photos):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _, batches = epoch(photos, "device", batch_size=16)
    assert len(batches) == 2


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    wnids = build_imagefolder(root, num_classes=3, per_class=5, val_per_class=1, short_side=48)
    train = root / "train"
    odd = {"cmyk": write_cmyk(train / wnids[0] / "cmyk.JPEG"),
           "grey": write_greyscale(train / wnids[1] / "grey.JPEG"),
           "png": write_png_named_jpeg(train / wnids[2] / "n02105855_2933.JPEG")}
    broken = {"truncated": write_truncated(train / wnids[0] / "truncated.JPEG"),
              "zero-byte": write_zero_byte(train / wnids[1] / "empty.JPEG"),
              "not-an-image": write_not_an_image(train / wnids[2] / "page.JPEG")}
    return root, odd, broken  # 15 good + 3 odd + 3 broken = 21 training files


@pytest.mark.parametrize("device", DEVICES)
def test_odd_and_broken_files_take_the_cpu_paths_route_in_the_workers(odd_tree, caplog, device):
    root, _, broken = odd_tree
    caplog.set_level(logging.WARNING, logger="data")
    loader, device_batches = epoch(root, "device", workers=2, batch_size=21, device=device)
    _, cpu_batches = epoch(root, "cpu", workers=0, batch_size=21)
    (x_dev, y_dev, bad_dev), = device_batches
    x_dev = x_dev.cpu()
    (x_cpu, y_cpu, bad_cpu), = cpu_batches
    # the same files replaced by the same samples (drawn from the same keys), flagged alike
    assert torch.equal(bad_dev, bad_cpu) and int(bad_dev.sum()) == 3
    assert torch.equal(y_dev, y_cpu)
    # cmyk and png were decoded by the CPU path itself in the workers: bit-identical to it
    assert loader.decoder.counts == {"device": 19, "workers": 2, "fallback": 0}
    assert int((x_dev == x_cpu).flatten(1).all(dim=1).sum()) >= 2
    # libjpeg-turbo on the CPU device, as in PIL; nvjpeg on a GPU rounds its own way
    assert (x_dev.int() - x_cpu.int()).abs().max() <= 1 if device == "cpu" else (
        (x_dev.float() - x_cpu.float()).abs().mean() < 2)
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 6  # each broken file once per loader, with the same complaint
    assert len(set(warned)) == 3 and {m.split(": ", 1)[1].split(" (")[0] for m in warned} == {
        str(p) for p in broken.values()}


def test_the_workers_route_by_header_and_end_marker(odd_tree):
    root, odd, broken = odd_tree
    route = EncodedTrainTransform(TrainTransform(32))
    for name, path in odd.items():
        data = path.read_bytes()
        image = Image.open(path)
        assert device_decodable(image.format, image.mode, data) == (name == "grey")
    good = next((root / "train").rglob("*_train0.JPEG"))
    assert isinstance(route(str(good), str(good), key_generator(1)), EncodedCrop)
    assert isinstance(route(str(odd["cmyk"]), "cmyk", key_generator(1)), np.ndarray)
    image = Image.open(broken["truncated"])
    assert image.format == "JPEG" and not device_decodable(image.format, image.mode, broken["truncated"].read_bytes())


def test_device_refusals_fall_back_per_file_without_losing_the_batch(tmp_path, caplog):
    """Files the device decoder raises on, handed to it directly: a PNG is decoded on the CPU (the
    CPU path's pixels exactly), a truncated JPEG is replaced by a batch-mate and flagged."""
    transform = TrainTransform(32, random_erasing=0.5)
    paths = [small_jpeg(sample_files()[i], tmp_path / f"good{i}.JPEG") for i in range(3)]
    paths += [write_png_named_jpeg(tmp_path / "png.JPEG"), write_truncated(tmp_path / "truncated.JPEG"),
              write_cmyk(tmp_path / "cmyk.JPEG")]
    samples = []
    for k, path in enumerate(paths):
        generator = key_generator(7, k)
        crop, flip = transform.crop(*Image.open(path).size, generator)
        encoded = EncodedCrop(path.read_bytes(), crop, flip, transform.erasure(generator), str(path), transform.size)
        samples.append(Sample(encoded, k, ()))
    batch = collate_encoded(samples)
    assert batch[0].positions == list(range(6))
    caplog.set_level(logging.INFO, logger="data")
    decoder = DeviceDecoder(transform, torch.device("cpu"))
    images, targets, bad, unreadable = decoder(batch)
    assert images.shape == (6, 3, 32, 32) and bad.tolist() == [False] * 4 + [True, False]
    assert [path for path, _ in unreadable] == [str(paths[4])] and "truncated" in unreadable[0][1]
    assert targets.tolist() == [0, 1, 2, 3, 5, 5]  # replaced by the next good sample of the batch
    assert torch.equal(images[4], images[5])
    cpu = {k: torch.from_numpy(transform(str(p), str(p), key_generator(7, k))) for k, p in enumerate(paths) if k != 4}
    assert torch.equal(images[3], cpu[3])  # the PNG went through the CPU path's own code
    for k in (0, 1, 2, 5):  # decoded by the device decoder (the CPU device accepts CMYK)
        assert (images[k].int() - cpu[k].int()).abs().max() <= 1
    assert decoder.counts == {"device": 4, "workers": 0, "fallback": 1}
    assert sum("device decoder refused" in r.getMessage() for r in caplog.records) == 2


def test_a_jpeg_no_decoder_reads_is_replaced_and_flagged_in_the_batch(tmp_path, caplog):
    root = tmp_path / "tree"
    wnids = build_imagefolder(root, num_classes=2, per_class=3, val_per_class=1, short_side=48)
    bad_file = write_undefined_huffman_table(root / "train" / wnids[0] / "huffman.JPEG")
    caplog.set_level(logging.WARNING, logger="data")
    for decode in ("device", "cpu"):
        _, batches = epoch(root, decode, batch_size=7)
        (images, _, bad), = batches
        assert images.shape == (7, 3, 32, 32) and int(bad.sum()) == 1
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 2 and all(str(bad_file) in m for m in warned)


def test_shards_decode_on_the_device_too(photos, tmp_path):
    convert(photos, "train", tmp_path, samples_per_shard=8, show_progress=False)
    _, device_batches = epoch(tmp_path, "device", workers=2)
    _, cpu_batches = epoch(tmp_path, "cpu", workers=2)
    _, resumed = epoch(tmp_path, "device", workers=2, start_batch=1)
    x_dev, y_dev, _ = stacked(device_batches)
    x_cpu, y_cpu, _ = stacked(cpu_batches)
    assert torch.equal(y_dev, y_cpu) and (x_dev.int() - x_cpu.int()).abs().max() <= 1
    assert all(torch.equal(a, b) for batch_a, batch_b in zip(device_batches[1:], resumed)
               for a, b in zip(batch_a, batch_b))


def test_bad_options_are_clear_errors(photos):
    with pytest.raises(ValueError, match="decode_on 'gpu' is neither None .*, 'auto' nor a device"):
        build_train_loader(photos, TrainTransform(32), batch_size=8, workers=0, decode_on="gpu")
    with pytest.raises(ValueError, match="JPEG is decoded on 'cuda' or 'cpu' only"):
        build_train_loader(photos, TrainTransform(32), batch_size=8, workers=0, decode_on="meta")
    with pytest.raises(ValueError, match="auto_augment"):
        build_train_loader(photos, TrainTransform(32, auto_augment="ra"), batch_size=8, workers=0, decode_on="cpu")
    with pytest.raises(TypeError, match="must be a data.transforms.TrainTransform, got EvalTransform"):
        build_train_loader(photos, EvalTransform(32), batch_size=8, workers=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_train_loader(photos, TrainTransform(32), batch_size=8, workers=0, decode_on="cuda")
        # "auto": the current CUDA device, else the CPU
        loader = build_train_loader(photos, TrainTransform(32), batch_size=8, workers=0, decode_on="auto")
        assert loader.decoder.device == torch.device("cpu")
    # decode_on=None: the workers decode and images stay on the CPU
    _, batches = epoch(photos, "cpu", batch_size=16)
    assert batches[0][0].device == torch.device("cpu")


def test_jpeg_bytes_of_any_size_decode(tmp_path):
    """Odd sizes (1 px wide, not a multiple of the 8 or 16 px JPEG blocks) survive crop and resize."""
    transform = TrainTransform(32)
    rng = np.random.default_rng(0)
    samples = []
    for k, (h, w) in enumerate([(1, 50), (33, 17), (200, 3), (32, 32)]):
        data = jpeg_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        generator = key_generator(3, k)
        crop, flip = transform.crop(w, h, generator)
        samples.append(Sample(EncodedCrop(data, crop, flip, None, f"odd{k}", transform.size), k, ()))
    images, _, bad, _ = DeviceDecoder(transform, torch.device("cpu"))(collate_encoded(samples))
    assert images.shape == (4, 3, 32, 32) and not bad.any()

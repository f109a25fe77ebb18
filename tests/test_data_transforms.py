"""Pixel pipelines on real ImageNet photos: eval equals torchvision's reference preset, train crops
follow RandomResizedCrop's rule and are a pure function of the sample's generator."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from _data_util import sample_files

from data.rng import key_generator
from data.transforms import EvalTransform, TrainTransform, random_resized_crop_params


def reference_eval(interpolation: str, resize: int = 256, crop: int = 224):
    mode = T.InterpolationMode(interpolation)
    return T.Compose([T.Resize(resize, interpolation=mode, antialias=True), T.CenterCrop(crop), T.PILToTensor()])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_matches_torchvision_reference_preset_on_real_images(interpolation):
    reference = reference_eval(interpolation)
    ours = EvalTransform(224, 256, interpolation=interpolation)
    for path in sample_files():
        expected = reference(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
        got = ours(str(path), str(path))
        assert got.dtype == np.uint8 and got.shape == (3, 224, 224) and got.flags.c_contiguous
        got = got.transpose(1, 2, 0)
        diff = np.abs(got.astype(np.int16) - expected).max()
        assert diff <= 1, f"{path.name}: differs by {diff}/255"


def test_eval_size_is_configurable():
    path = sample_files()[5]
    got = EvalTransform(160, 182)(str(path), str(path)).transpose(1, 2, 0)
    expected = reference_eval("bilinear", 182, 160)(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
    assert np.abs(got.astype(np.int16) - expected).max() <= 1
    with pytest.raises(ValueError, match="smaller than the crop"):
        EvalTransform(224, 200)


def test_crop_params_follow_random_resized_crop_rules():
    g = torch.Generator().manual_seed(0)
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(500, 375, g)
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        fractions.append(h * w / (500 * 375))
        ratios.append(w / h)
    # rounding to whole pixels moves the bounds by a hair
    assert 0.075 < min(fractions) < 0.12 and max(fractions) <= 1.0
    assert 0.74 <= min(ratios) and max(ratios) <= 1.34
    # same distribution as torchvision's own get_params (which draws from the global generator)
    torch.manual_seed(0)
    image = Image.new("RGB", (500, 375))
    tv = [T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    tv_fractions = [h * w / (500 * 375) for _, _, h, w in tv]
    assert np.mean(fractions) == pytest.approx(np.mean(tv_fractions), abs=0.02)
    assert np.std(fractions) == pytest.approx(np.std(tv_fractions), abs=0.02)
    assert np.mean(ratios) == pytest.approx(np.mean([w / h for _, _, h, w in tv]), abs=0.02)
    # an extreme panorama falls back to a center crop at the widest allowed ratio after 10 tries
    top, left, h, w = random_resized_crop_params(4000, 100, torch.Generator().manual_seed(0), scale=(0.9, 1.0))
    assert (h, top) == (100, 0) and w == round(100 * 4 / 3) and left == (4000 - w) // 2


def test_train_pixels_are_a_pure_function_of_the_generator():
    path = str(sample_files()[7])
    transform = TrainTransform(64)
    a = transform(path, path, key_generator(2, 0, 1, 5))
    b = transform(path, path, key_generator(2, 0, 1, 5))
    c = transform(path, path, key_generator(2, 0, 1, 6))
    assert a.shape == (3, 64, 64) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_train_crop_matches_torchvision_resized_crop(backend):
    """Decoded in full, our crop is torchvision's resized_crop of the same box, up to the rounding
    of the resize kernel (torch's uint8 kernel vs pillow's)."""
    import torchvision.transforms.functional as TF

    path = sample_files()[11]  # 1152x864: large enough that draft would otherwise kick in
    image = Image.open(path).convert("RGB")
    transform = TrainTransform(224, hflip=0.0, backend=backend, draft=False)
    for key in range(5):
        (top, left, h, w), _ = transform.crop(*image.size, key_generator(9, key))
        got = transform(str(path), str(path), key_generator(9, key)).transpose(1, 2, 0)
        expected = np.asarray(TF.resized_crop(image, top, left, h, w, [224, 224], antialias=True))
        assert np.abs(got.astype(np.int16) - expected).max() <= 2


@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_flip_mirrors_the_same_crop(backend):
    path = str(sample_files()[13])
    plain = TrainTransform(48, hflip=0.0, backend=backend)(path, path, key_generator(8))
    flipped = TrainTransform(48, hflip=1.0, backend=backend)(path, path, key_generator(8))
    assert np.array_equal(flipped, plain[:, :, ::-1]) and flipped.flags.c_contiguous


def test_draft_decodes_large_crops_at_reduced_scale_with_little_change(tmp_path):
    # the largest sample photo (1152x864) cropped whole to 64 px allows a 1/8 DCT decode
    big = max(sample_files(), key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    w, h = Image.open(big).size
    assert min(w, h) >= 8 * 64
    fast = TrainTransform(64, scale=(1.0, 1.0), ratio=(w / h, w / h), hflip=0.0)
    full = TrainTransform(64, scale=(1.0, 1.0), ratio=(w / h, w / h), hflip=0.0, draft=False)
    a = fast(str(big), "big", key_generator(1)).astype(np.float32)
    b = full(str(big), "big", key_generator(1)).astype(np.float32)
    assert np.abs(a - b).mean() < 4.0  # DCT scaling vs antialiased resize: same picture


@pytest.mark.parametrize("policy", ["ra", "ta_wide", "rand-m9-mstd0.5-inc1", "augmix-m3-w2-d1"])
def test_auto_augment_is_deterministic_and_leaves_global_rng_alone(policy):
    path = str(sample_files()[3])
    transform = TrainTransform(48, auto_augment=policy)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    outs = [transform(path, path, key_generator(4, k)) for k in (1, 1, 2, 3, 4)]
    assert np.array_equal(outs[0], outs[1])
    assert any(not np.array_equal(outs[0], o) for o in outs[2:])
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_unknown_auto_augment_is_a_clear_error():
    with pytest.raises(ValueError, match="auto_augment 'bogus'"):
        TrainTransform(48, auto_augment="bogus")


def test_random_erasing_fills_a_rectangle_with_noise():
    path = str(sample_files()[9])
    plain = TrainTransform(64, hflip=0.0)
    erased = TrainTransform(64, hflip=0.0, random_erasing=1.0)
    a = plain(path, path, key_generator(5))
    b = erased(path, path, key_generator(5))
    changed = (a != b).any(axis=0)
    rows, cols = changed.nonzero()
    assert changed.sum() > 0
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.mean() > 0.9  # one solid rectangle, not scattered pixels


def test_random_keys_do_not_collide_and_reject_bad_values():
    from data.rng import key_seed

    seeds = {key_seed(1, 2), key_seed(1, 2, 0), key_seed(1, 2, 0, 0), key_seed(2, 1), key_seed(1, 2**32 + 2)}
    assert len(seeds) == 5
    assert key_seed(3, 4) == key_seed(3, 4)
    with pytest.raises(ValueError, match="must hold integers"):
        key_seed(-1)


def test_timm_increasing_posterize_to_zero_bits_does_not_kill_a_worker():
    """The ``inc1`` policies posterize to 0 bits at magnitude 10, which current Pillow refuses. With
    magnitude 10 and 8 ops an image, about one image in four asks for it."""
    files = [str(p) for p in sample_files()[:20]]
    transform = TrainTransform(48, auto_augment="rand-m10-n8-mstd0-inc1")
    for key, path in enumerate(files):
        out = transform(path, path, key_generator(4, key))
        assert out.shape == (3, 48, 48) and out.dtype == np.uint8


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_every_timm_posterize_op_is_replaced(policy):
    import timm.data.auto_augment as timm_aa
    from data.transforms import posterize_any_bits

    augment = TrainTransform(48, auto_augment=policy).augment
    ops = list(getattr(augment, "ops", [])) + [op for sub in getattr(augment, "policy", []) for op in sub]
    names = {op.name for op in ops if op.aug_fn is posterize_any_bits}
    assert names and all(op.aug_fn is not timm_aa.posterize for op in ops)


def test_posterize_any_bits_on_a_real_photo():
    from PIL import ImageOps
    from data.transforms import posterize_any_bits

    image = Image.open(sample_files()[0]).convert("RGB")
    for bits in (-1, 0):
        assert not np.asarray(posterize_any_bits(image, bits)).any()  # every bit dropped: black
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize_any_bits(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert posterize_any_bits(image, 8) is image

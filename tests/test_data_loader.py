"""Train and eval loaders over a real JPEG tree: exact, worker-independent, resumable batches;
every validation image once over all ranks; clear errors for bad roots before any worker starts."""

import random

import numpy as np
import pytest
import torch

from _data_util import build_imagefolder

from data import (IMAGENET_MEAN, IMAGENET_STD, DataLayoutError, EvalTransform, LoaderOptions, TrainTransform,
                  build_eval_loader, build_train_loader, resolve_data_root)
from data.demo import write_demo
from data.samplers import TrainBatchSampler, eval_range


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo") / "tree", train_per_class=6, val_per_class=3)


def train_batches(root, *, workers, epoch=1, start_batch=0, rank=0, world_size=2, **transform):
    loader = build_train_loader(root, TrainTransform(32, **transform), batch_size=4, workers=workers, rank=rank,
                                world_size=world_size, seed=7)
    loader.set_epoch(epoch, start_batch)
    return loader, list(loader)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya, ba), (xb, yb, bb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ba, bb)


def test_batches_have_the_contract_types(demo_root):
    loader, batches = train_batches(demo_root, workers=0)
    assert loader.num_classes == 10 and loader.num_samples == 60
    assert loader.classes == sorted(loader.classes) and loader.class_names[0] == "checkerboard"
    assert len(loader) == 60 // (4 * 2) == len(batches)
    images, targets, bad = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and images.is_contiguous()
    assert targets.dtype == torch.int64 and targets.shape == (4,)
    assert bad.dtype == torch.bool and not bad.any()
    assert len(IMAGENET_MEAN) == len(IMAGENET_STD) == 3 and all(0 < v < 1 for v in IMAGENET_MEAN + IMAGENET_STD)


def test_same_batches_whatever_the_number_of_workers(demo_root):
    _, serial = train_batches(demo_root, workers=0)
    _, parallel = train_batches(demo_root, workers=2)
    assert_same_batches(serial, parallel)


def test_resume_mid_epoch_gives_the_rest_of_the_same_epoch(demo_root):
    _, whole = train_batches(demo_root, workers=0, epoch=3)
    _, resumed = train_batches(demo_root, workers=2, epoch=3, start_batch=4)
    assert len(resumed) == len(whole) - 4
    assert_same_batches(whole[4:], resumed)


def test_epochs_differ_and_set_epoch_repeats_until_changed(demo_root):
    loader = build_train_loader(demo_root, TrainTransform(32), batch_size=4, workers=2, seed=7)
    loader.set_epoch(0)
    first = list(loader)
    again = list(loader)  # no set_epoch: the same epoch again, like DistributedSampler
    loader.set_epoch(1)
    second = list(loader)
    assert_same_batches(first, again)
    assert not torch.equal(torch.cat([y for _, y, _ in first]), torch.cat([y for _, y, _ in second]))
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(2, start_batch=len(loader) + 1)


def test_ranks_get_equal_disjoint_shares_of_each_epoch():
    world, batch, n = 3, 5, 101
    samplers = [TrainBatchSampler(n, batch, rank, world, seed=1) for rank in range(world)]
    per_rank = []
    for sampler in samplers:
        sampler.set_epoch(4)
        per_rank.append([i for b in sampler for _, i in b])
    assert {len(s) for s in samplers} == {n // (world * batch)}
    flat = [i for share in per_rank for i in share]
    assert len(flat) == len(set(flat)) == world * batch * (n // (world * batch))


def test_training_leaves_the_callers_global_rng_untouched(demo_root):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    train_batches(demo_root, workers=0, auto_augment="ra")
    assert torch.equal(torch.get_rng_state(), state[0])
    assert random.getstate() == state[1] and np.array_equal(np.random.get_state()[1], state[2])


@pytest.mark.parametrize("world_size", [1, 2, 4, 7])
def test_eval_visits_every_image_exactly_once(demo_root, world_size):
    reference = build_eval_loader(demo_root, EvalTransform(32, 36), batch_size=4, workers=0)
    ref_images = torch.cat([x for x, _, _ in reference])
    ref_targets = torch.cat([y for _, y, _ in reference])
    assert len(ref_targets) == reference.num_samples == 30
    images, targets, counted = [], [], 0
    for rank in range(world_size):
        loader = build_eval_loader(demo_root, EvalTransform(32, 36), batch_size=4,
                                   workers=2 if rank == 0 else 0, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.num_samples == 30
        counted += loader.rank_num_samples
        images += [x for x, _, _ in batches]
        targets += [y for _, y, _ in batches]
    assert counted == 30
    assert torch.equal(torch.cat(images), ref_images) and torch.equal(torch.cat(targets), ref_targets)


def test_eval_ranges_tile_the_dataset():
    for n in (0, 1, 5, 50000):
        for world in (1, 3, 8):
            ranges = [eval_range(n, r, world) for r in range(world)]
            assert [i for r in ranges for i in r] == list(range(n))


def test_crop_fraction_sets_the_resize(demo_root):
    a = build_eval_loader(demo_root, EvalTransform(32, crop_fraction=0.875), batch_size=8, workers=0)
    b = build_eval_loader(demo_root, EvalTransform(32, 36), batch_size=8, workers=0)
    assert torch.equal(next(iter(a))[0], next(iter(b))[0])  # floor(32 / 0.875) = 36
    assert EvalTransform(32).resize_size == 36 and EvalTransform(224).resize_size == 256  # the default
    assert EvalTransform(32, crop_fraction=0.8).resize_size == 40
    with pytest.raises(ValueError, match="crop_fraction"):
        EvalTransform(32, crop_fraction=1.5)
    with pytest.raises(ValueError, match="give one of them"):
        EvalTransform(32, 36, crop_fraction=0.875)


def test_options_choose_the_split(demo_root):
    train_as_val = build_eval_loader(demo_root, EvalTransform(32), batch_size=8, workers=0,
                                     options=LoaderOptions(split="train"))
    assert train_as_val.num_samples == build_train_loader(demo_root, TrainTransform(32), batch_size=4,
                                                          workers=0).num_samples
    with pytest.raises(TypeError, match="must be a data.transforms.EvalTransform, got TrainTransform"):
        build_eval_loader(demo_root, TrainTransform(32), batch_size=8, workers=0)


def test_pin_memory_request_is_harmless_without_cuda(demo_root):
    loader = build_eval_loader(demo_root, EvalTransform(32, 36), batch_size=8, workers=0, pin_memory=True)
    images, _, _ = next(iter(loader))
    assert images.is_pinned() == torch.cuda.is_available()


def test_bad_roots_fail_early_naming_what_was_found(tmp_path):
    with pytest.raises(DataLayoutError, match="does not exist"):
        resolve_data_root(str(tmp_path / "nowhere"))
    with pytest.raises(DataLayoutError, match="does not exist"):
        build_train_loader(tmp_path / "nowhere", TrainTransform(32), batch_size=2, workers=2, seed=0)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="no images in .*train: found an empty folder"):
        build_train_loader(tmp_path / "empty", TrainTransform(32), batch_size=2, workers=2, seed=0)
    (tmp_path / "odd" / "val").mkdir(parents=True)
    (tmp_path / "odd" / "val" / "readme.txt").write_text("hi")
    with pytest.raises(DataLayoutError, match=r"0 folders and 1 files \(readme.txt\).*expected one of"):
        resolve_data_root(str(tmp_path / "odd"))
    (tmp_path / "nosplit" / "images").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"neither train/ nor val/; found 1 folders and 0 files \(images/\)"):
        resolve_data_root(str(tmp_path / "nosplit"))
    (tmp_path / "emptyclass" / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="n01440764 holds no"):
        resolve_data_root(str(tmp_path / "emptyclass"))


def test_empty_class_folder_among_full_ones_is_refused(tmp_path):
    build_imagefolder(tmp_path, num_classes=3, per_class=2, val_per_class=1)
    (tmp_path / "train" / "n00000001").mkdir()
    with pytest.raises(DataLayoutError, match="class indices would shift"):
        build_train_loader(tmp_path, TrainTransform(32), batch_size=2, workers=0, seed=0)


def test_a_batch_larger_than_the_dataset_is_a_clear_error(demo_root):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_loader(demo_root, TrainTransform(32), batch_size=40, workers=0, world_size=2, seed=0)

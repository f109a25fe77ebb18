"""Repeated augmentation (--aug-repeats): DeiT's and timm's sampling and epoch length with our own
permutation, copies of one image on different ranks with different pixels, exact mid-epoch resume."""

from collections import Counter

import pytest
import torch

from _data_util import build_imagefolder

from data import TrainTransform, build_train_loader
from data.datasets import TrainFolderDataset
from data.demo import write_demo
from data.index import read_source
from data.samplers import RepeatAugBatchSampler, epoch_permutation, repeat_aug_rank_samples
from data.shards import convert

# (images, ranks, repeats, batch): over and under timm's 256-image rounding, ranks that do not
# divide the repeated stream (padding), more repeats than ranks, one rank.
LAYOUTS = [(1000, 4, 3, 16), (600, 8, 3, 8), (257, 3, 2, 5), (100, 3, 3, 4), (50, 2, 3, 4), (70, 1, 3, 8)]


def samplers(num_samples, world_size, repeats, batch_size, seed=5):
    return [RepeatAugBatchSampler(num_samples, batch_size, rank, world_size, seed, repeats)
            for rank in range(world_size)]


def epoch_batches(sampler, epoch, start_batch=0):
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo") / "tree", train_per_class=6, val_per_class=1)


def test_epoch_length_is_deits():
    # floor(N // 256 * 256 / W) per rank, as DeiT's RASampler: 1000 images on 4 ranks -> 768 / 4
    assert repeat_aug_rank_samples(1000, 3, 4) == 192
    assert repeat_aug_rank_samples(1281167, 3, 8) == 1281024 // 8  # ImageNet-1k on 8 GPUs
    assert repeat_aug_rank_samples(600, 3, 7) == 512 // 7
    # fewer than 256 images: ceil(N / W), timm's fallback, so that an epoch is not empty
    assert repeat_aug_rank_samples(100, 3, 3) == 34 and repeat_aug_rank_samples(255, 2, 2) == 128
    assert len(RepeatAugBatchSampler(1000, 16, 0, 4, 0, 3)) == 192 // 16
    with pytest.raises(ValueError, match="fewer than one batch of 40"):
        RepeatAugBatchSampler(100, 40, 0, 3, 0, 3)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        RepeatAugBatchSampler(100, 4, 0, 3, 0, 0)


@pytest.mark.parametrize("num_samples, world_size, repeats, batch_size", LAYOUTS)
def test_same_stream_as_timms_sampler_up_to_the_permutation(num_samples, world_size, repeats, batch_size):
    """timm's RepeatAugSampler with its permutation replaced by ours gives every rank the same
    indices in the same order as ours, cut to our full batches; our copy numbers count the copies."""
    from timm.data.distributed_sampler import RepeatAugSampler

    epoch = 2
    ours = samplers(num_samples, world_size, repeats, batch_size)
    order = epoch_permutation(num_samples, 5, epoch)
    for rank, sampler in enumerate(ours):
        timm_sampler = RepeatAugSampler(range(num_samples), num_replicas=world_size, rank=rank,
                                        num_repeats=repeats)
        timm_sampler.set_epoch(epoch)
        assert sampler.rank_samples == len(timm_sampler)
        timm_order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(epoch))
        to_ours = torch.empty(num_samples, dtype=torch.int64)
        to_ours[timm_order] = order  # where timm has its k-th permuted index, we have our k-th
        expected = to_ours[torch.tensor(list(timm_sampler))].tolist()
        keys = [key for batch in epoch_batches(sampler, epoch) for key in batch]
        assert len(keys) == len(sampler) * batch_size and all(len(b) == batch_size for b in sampler)
        assert [index for _, index, _ in keys] == expected[:len(keys)]
        assert all(e == epoch for e, _, _ in keys)


@pytest.mark.parametrize("num_samples, world_size, repeats, batch_size", LAYOUTS)
def test_every_rank_gets_the_same_number_of_full_batches(num_samples, world_size, repeats, batch_size):
    per_rank = [epoch_batches(s, 1) for s in samplers(num_samples, world_size, repeats, batch_size)]
    expected = repeat_aug_rank_samples(num_samples, repeats, world_size) // batch_size
    assert [len(batches) for batches in per_rank] == [expected] * world_size
    assert all(len(batch) == batch_size for batches in per_rank for batch in batches)


@pytest.mark.parametrize("num_samples, world_size, repeats, batch_size", LAYOUTS)
def test_copies_of_an_index_go_to_different_ranks(num_samples, world_size, repeats, batch_size):
    ranks_of = {}
    for rank, sampler in enumerate(samplers(num_samples, world_size, repeats, batch_size)):
        for batch in epoch_batches(sampler, 3):
            for _, index, copy in batch:
                assert (index, copy) not in ranks_of, "one copy drawn twice"
                ranks_of[index, copy] = rank
    holders = {}
    for (index, _), rank in ranks_of.items():
        holders.setdefault(index, []).append(rank)
    if repeats <= world_size:
        assert all(len(set(ranks)) == len(ranks) for ranks in holders.values())
    # an epoch holds about N / R images, most of them R times
    assert max(len(ranks) for ranks in holders.values()) <= repeats
    assert len(holders) >= len(ranks_of) // repeats


@pytest.mark.parametrize("num_samples, world_size, repeats", [(10, 4, 3), (13, 8, 2), (100, 3, 3), (7, 16, 2)])
def test_the_padded_stream_holds_each_index_repeats_times(num_samples, world_size, repeats):
    """The whole stream the ranks stride over: each index R times in a row, then the wrap-around
    padding to a multiple of W repeats the first ones, each padded copy with a number of its own."""
    sampler = RepeatAugBatchSampler(num_samples, 1, 0, world_size, 9, repeats)
    order = epoch_permutation(num_samples, 9, 4)
    total = -(-num_samples * repeats // world_size) * world_size
    keys = sampler.stream_keys(order, torch.arange(total))
    repeated = num_samples * repeats
    assert [index for index, _ in keys[:repeated]] == order.repeat_interleave(repeats).tolist()
    assert [copy for _, copy in keys[:repeated]] == list(range(repeats)) * num_samples
    counts = Counter(index for index, _ in keys)
    assert set(counts) == set(range(num_samples)) and min(counts.values()) == repeats
    assert sum(counts.values()) - repeated == total - repeated < world_size
    assert [index for index, _ in keys[repeated:]] == [index for index, _ in keys[:total - repeated]]
    assert len(set(keys)) == total  # padded copies are keyed apart from the ones they repeat
    # the ranks' positions r, r+W, ... tile the stream
    per_rank = [RepeatAugBatchSampler(num_samples, 1, r, world_size, 9, repeats) for r in range(world_size)]
    strided = sorted(p for r, s in enumerate(per_rank) for p in range(r, total, world_size))
    assert strided == list(range(total)) and all(s.rank_samples <= total // world_size for s in per_rank)


def test_a_pure_function_of_seed_and_epoch():
    a, b = RepeatAugBatchSampler(1000, 8, 1, 4, 3, 3), RepeatAugBatchSampler(1000, 8, 1, 4, 3, 3)
    assert epoch_batches(a, 6) == epoch_batches(b, 6) == list(a)  # iterating again repeats the epoch
    assert epoch_batches(a, 6) != epoch_batches(a, 7)
    assert epoch_batches(a, 6) != epoch_batches(RepeatAugBatchSampler(1000, 8, 1, 4, 4, 3), 6)


def test_set_epoch_resumes_mid_epoch_exactly():
    sampler = RepeatAugBatchSampler(1000, 8, 2, 4, 3, 3)
    whole = epoch_batches(sampler, 5)
    for start in (1, 7, len(whole) - 1, len(whole)):
        assert epoch_batches(sampler, 5, start) == whole[start:]
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(5, len(whole) + 1)


def test_the_copies_of_an_image_get_different_pixels(demo_root):
    dataset = TrainFolderDataset(read_source(demo_root, "train"), TrainTransform(32), seed=7)
    for index in (0, 17, 59):
        copies = [dataset[(2, index, copy)].pixels for copy in range(3)]
        assert all(not (copies[i] == copies[j]).all() for i in range(3) for j in range(i))
        # copy 0 is the plain sample; another epoch is another augmentation again
        assert (dataset[(2, index)].pixels == copies[0]).all()
        assert not (dataset[(3, index, 1)].pixels == copies[1]).all()


def test_loader_deals_differently_augmented_copies_to_the_ranks_and_resumes(demo_root):
    """Three ranks, three copies: every image of a global batch comes from a different rank with
    its own crop; the batches do not depend on the loader workers and resume mid-epoch exactly."""
    def loader(rank, workers=0):
        return build_train_loader(demo_root, TrainTransform(32), batch_size=4, workers=workers, rank=rank,
                                  world_size=3, seed=7, aug_repeats=3)

    loaders = [loader(rank) for rank in range(3)]
    assert [len(ld) for ld in loaders] == [20 // 4] * 3 and loaders[0].rank_samples == 20  # ceil(60 / 3)
    per_rank = []
    for ld in loaders:
        ld.set_epoch(1)
        per_rank.append(list(ld))
    keys = [[key for batch in epoch_batches(ld.sampler, 1) for key in batch] for ld in loaders]
    pixels = {}
    for rank in range(3):
        images = torch.cat([x for x, _, _ in per_rank[rank]])
        targets = torch.cat([y for _, y, _ in per_rank[rank]])
        for (_, index, copy), image, target in zip(keys[rank], images, targets):
            pixels.setdefault(index, []).append((rank, copy, image, int(target)))
    repeated = [copies for copies in pixels.values() if len(copies) > 1]
    assert len(repeated) >= 15
    for copies in repeated:
        assert len({rank for rank, _, _, _ in copies}) == len(copies)
        assert len({target for _, _, _, target in copies}) == 1
        images = [image for _, _, image, _ in copies]
        assert all(not torch.equal(images[i], images[j]) for i in range(len(images)) for j in range(i))

    resumed = loader(1, workers=2)
    resumed.set_epoch(1, start_batch=2)
    tail = list(resumed)
    assert len(tail) == len(per_rank[1]) - 2
    for (xa, ya, ba), (xb, yb, bb) in zip(per_rank[1][2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ba, bb)


def test_one_repeat_is_the_plain_sampler_and_shards_are_refused(demo_root, tmp_path):
    plain = build_train_loader(demo_root, TrainTransform(32), batch_size=4, workers=0, world_size=2, seed=7)
    once = build_train_loader(demo_root, TrainTransform(32), batch_size=4, workers=0, world_size=2, seed=7,
                              aug_repeats=1)
    assert type(once.sampler) is type(plain.sampler) and len(once) == len(plain) == 60 // 8
    with pytest.raises(ValueError, match="aug_repeats must be an integer >= 1"):
        build_train_loader(demo_root, TrainTransform(32), batch_size=4, workers=0, aug_repeats=0)

    build_imagefolder(tmp_path / "src", num_classes=2, per_class=4, val_per_class=1, short_side=40)
    convert(tmp_path / "src", "train", tmp_path / "shards", samples_per_shard=4, show_progress=False)
    assert len(build_train_loader(tmp_path / "shards", TrainTransform(32), batch_size=2, workers=0)) == 4
    with pytest.raises(ValueError, match=r"aug_repeats: .*tar shards.*--aug-repeats 1"):
        build_train_loader(tmp_path / "shards", TrainTransform(32), batch_size=2, workers=0, aug_repeats=2)

"""The shipped wnid -> name table: sorted-wnid class order and the names torchvision reports."""

import subprocess
import sys
from pathlib import Path

from _data_util import sample_files, sample_wnid

from data import class_name, class_names, imagenet_wnids
from data.classes import is_wnid


def test_table_is_the_sorted_ilsvrc2012_classes():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    assert all(is_wnid(w) for w in wnids)


def test_sample_images_agree_with_index_and_name():
    # The sample holds classes 0, 10, ..., 990 named <wnid>_<name with underscores>.JPEG.
    wnids = imagenet_wnids()
    for i, path in enumerate(sample_files()):
        wnid = sample_wnid(path)
        assert wnids.index(wnid) == 10 * i
        assert class_name(wnid).replace(" ", "_") == path.stem.split("_", 1)[1]
    assert class_name("n01440764") == "tench"


def test_unknown_folder_names_are_their_own_names():
    assert class_names(["discs", "n01443537"]) == ["discs", "goldfish"]


def test_table_matches_what_the_libraries_ship():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "data.make_class_table", "--check"], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

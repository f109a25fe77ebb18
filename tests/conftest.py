"""Fixtures shared by several test files."""

import pytest

from _data_util import build_imagefolder


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Real photos at 48 px, 4 classes x 8 training images (no Image.draft at a 32 px output, so the
    CPU and device decode paths both decode at full size)."""
    root = tmp_path_factory.mktemp("photos")
    build_imagefolder(root, num_classes=4, per_class=8, val_per_class=1, short_side=48)
    return root

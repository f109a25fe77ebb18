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


@pytest.fixture
def make_netns_cluster():
    """make_netns_cluster(hosts=("node1", "node2")) -> NetnsCluster (tests/netns_cluster.py): hosts as
    network namespaces, all torn down after the test, passed or failed. Skips where the machine
    cannot create network namespaces."""
    from netns_cluster import NetnsCluster, NetnsUnavailable, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    clusters = []

    def make(hosts=("node1", "node2"), **kwargs):
        try:
            cluster = NetnsCluster(hosts, **kwargs)
        except NetnsUnavailable as e:
            pytest.skip(str(e))
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in reversed(clusters):
            cluster.close()


@pytest.fixture
def netns_cluster(make_netns_cluster):
    """Two hosts, node1 and node2, as network namespaces; see make_netns_cluster."""
    return make_netns_cluster()

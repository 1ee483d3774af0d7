"""DeviceFeed over the host loader: what lands on the mesh is each step's batch even after
the loader's ring slot has been refilled. One row per device is the case where jax keeps
pointing at the host buffer it was given, so a loader handing out its ring fails here."""

import numpy as np
import pytest

from jaxface.data.loader import HostLoader
from jaxface.data.pack import pack_synthetic
from jaxface.data.sources import open_source
from jaxface.data.training import step_batch
from jaxface.feed import DeviceFeed
from jaxface.mesh import batch_sharding, make_mesh, micro_batch_sharding


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_borrowed_batches_survive_ring_reuse(tmp_path, grad_accum):
    source = open_source(pack_synthetic(tmp_path / "train", 5, 8, seed=0, workers=0).rec)
    mesh = make_mesh(8)
    sharding = batch_sharding(mesh) if grad_accum == 1 else micro_batch_sharding(mesh)
    inline = HostLoader(source, 8, seed=3)
    with HostLoader(source, 8, seed=3, workers=1, prefetch=1) as pooled:
        # Two ring slots, six steps: every slot is refilled while earlier batches are held.
        feed = DeviceFeed(lambda s: step_batch(pooled, s, grad_accum), sharding, 0, 6, depth=3)
        held = list(feed)
        feed.close()
    assert len(held) == 6
    for step, (images, labels) in enumerate(held):
        want = [inline.batch(step * grad_accum + i) for i in range(grad_accum)]
        want_images = np.stack([w[0] for w in want]) if grad_accum > 1 else want[0][0]
        want_labels = np.stack([w[1] for w in want]) if grad_accum > 1 else want[0][1]
        np.testing.assert_array_equal(np.asarray(images), want_images)
        np.testing.assert_array_equal(np.asarray(labels), want_labels)

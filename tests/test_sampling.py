"""Partial FC's negatives are random: different keys draw different negatives, every
negative of a block is drawn equally often, positives always, padding never; on 1 and 8
devices. (A sampler that always took the lowest ids would keep the positives too.)"""

import jax
import numpy as np
import pytest

from jaxface.heads import sample_class_ids
from jaxface.mesh import batch_sharding, make_mesh

NUM_CLASSES = 100  # over 8 devices: blocks of 13, the last holding 9 real classes + 4 padding
DRAWS = 600


def _draws(devices: int, num_sample: int, labels: np.ndarray) -> np.ndarray:
    """[DRAWS, devices, num_sample] global class ids picked with DRAWS different keys."""
    mesh = make_mesh(devices)
    num_local = -(-NUM_CLASSES // devices)
    labels = jax.device_put(labels, batch_sharding(mesh))

    @jax.jit
    def draw(key):
        return sample_class_ids(
            labels, key, num_classes=NUM_CLASSES, num_local=num_local,
            num_sample=num_sample, mesh=mesh,
        )  # fmt: skip

    keys = jax.random.split(jax.random.key(0), DRAWS)
    local = np.stack([np.asarray(draw(k)) for k in keys]).reshape(DRAWS, devices, num_sample)
    return local + (np.arange(devices) * num_local)[None, :, None], num_local


@pytest.mark.parametrize("devices", [1, 8])
def test_negatives_are_drawn_uniformly_and_differ_between_keys(devices):
    num_sample = 60 if devices == 1 else 8
    labels = np.array([3, 3, 17, 42, 42, 55, 90, 99], np.int32)  # 6 positive classes
    picked, num_local = _draws(devices, num_sample, labels)

    # Different keys, different negatives (600 draws: all but a handful distinct).
    distinct = {tuple(p.ravel()) for p in picked}
    assert len(distinct) > 0.95 * DRAWS
    counts = np.zeros(devices * num_local)
    for p in picked:
        assert all(len(set(row)) == num_sample for row in p)  # no row twice
        counts[p.ravel()] += 1
    positives = set(labels.tolist())
    real = np.arange(NUM_CLASSES)
    assert all(counts[c] == DRAWS for c in positives)  # positives always
    assert not counts[NUM_CLASSES:].any()  # padding never (while real classes remain)
    # Each negative of a block is kept with probability (num_sample - positives in the
    # block) / (real negatives in the block): counts are binomial; 5 standard deviations.
    for d in range(devices):
        block = real[(real >= d * num_local) & (real < (d + 1) * num_local)]
        pos = [c for c in block if c in positives]
        neg = [c for c in block if c not in positives]
        p = (num_sample - len(pos)) / len(neg)
        if p >= 1:  # every row kept: nothing random to test in this block
            assert all(counts[c] == DRAWS for c in neg)
            continue
        expected, std = DRAWS * p, np.sqrt(DRAWS * p * (1 - p))
        worst = max(abs(counts[c] - expected) for c in neg)
        assert worst < 5 * std, (d, worst, std)
        # A sampler biased to low ids would show it in the halves of the block.
        low, high = neg[: len(neg) // 2], neg[len(neg) // 2 :]
        assert abs(counts[low].mean() - counts[high].mean()) < 5 * std / np.sqrt(len(low))

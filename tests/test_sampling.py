"""Class-balanced sampling: every occurring class gets the same share of the draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.datasets.sampling import class_balanced_sampler, class_balanced_weights


def class_share(weights: np.ndarray, labels: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Expected share of draws that contain each class."""
    present = np.zeros((len(labels), num_classes))
    for i, sample in enumerate(labels):
        present[i, sample] = 1
    return weights @ present


def test_a_rare_class_is_drawn_as_often_as_a_common_one():
    labels = [np.array([0, 0, 0])] * 98 + [np.array([0, 4]), np.array([4])]  # class 4 is in 2 of 100 samples
    weights = class_balanced_weights(labels, 10)
    assert weights.sum() == pytest.approx(1.0)
    share = class_share(weights, labels, 10)
    uniform = class_share(np.full(100, 0.01), labels, 10)
    assert uniform[4] == pytest.approx(0.02)
    assert share[4] >= 0.5 and share[0] >= 0.5  # each of the two classes is in at least half of the draws


def test_samples_without_boxes_keep_a_small_weight_and_bad_labels_are_ignored():
    labels = [np.array([], dtype=np.int64), np.array([1]), np.array([1, 99, -1])]
    weights = class_balanced_weights(labels, 10)
    assert weights.sum() == pytest.approx(1.0)
    assert 0 < weights[0] < weights[1] == pytest.approx(weights[2])
    assert class_balanced_weights([np.array([], dtype=np.int64)] * 4, 10) == pytest.approx([0.25] * 4)
    assert class_balanced_weights([], 10).shape == (0,)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), max_size=6), min_size=1, max_size=30))
def test_weights_are_a_distribution_with_equal_class_shares_for_single_class_samples(raw):
    labels = [np.array(sorted(set(r)), dtype=np.int64) for r in raw]
    weights = class_balanced_weights(labels, 10)
    assert weights.shape == (len(labels),) and (weights > 0).all()
    assert weights.sum() == pytest.approx(1.0)
    if all(len(sample) == 1 for sample in labels):
        shares = class_share(weights, labels, 10)
        occurring = shares > 0
        assert np.allclose(shares[occurring], shares[occurring][0])


def test_the_sampler_draws_one_epoch_of_indices_reproducibly():
    labels = [np.array([0])] * 9 + [np.array([3])]
    draws = [list(class_balanced_sampler(labels, 10, torch.Generator().manual_seed(0))) for _ in range(2)]
    assert draws[0] == draws[1] and len(draws[0]) == 10
    many = [i for _ in range(200) for i in class_balanced_sampler(labels, 10, torch.Generator().manual_seed(_))]
    assert 0.4 < many.count(9) / len(many) < 0.6  # the rare sample: half of the draws

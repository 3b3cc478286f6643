"""Class-balanced sampling of training keyframes (the idea of CBGS, Zhu et al. 2019, as a sampler).

A driving data set is dominated by cars and pedestrians; trailers, motorcycles or buses appear in a few keyframes.
Drawing keyframes with weights that give every class the same expected share of draws lets the rare classes be
seen as often as the common ones within the same number of steps, without copying the data set.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def class_balanced_weights(labels_per_sample: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Sampling weight of each sample [S] float64, summing to 1.

    labels_per_sample: the class indices (0..num_classes-1) of each sample's ground-truth boxes. Each class that
    occurs anywhere gets an equal share of the probability mass, split evenly over the samples that contain it; a
    sample gets the sum of the shares of the classes it contains. Samples without any box keep a small weight (the
    share of one class spread over all samples), so that empty scenes are still seen.
    """
    count = len(labels_per_sample)
    if count == 0:
        return np.zeros(0)
    present = np.zeros((count, num_classes), dtype=bool)
    for i, labels in enumerate(labels_per_sample):
        labels = np.asarray(labels, dtype=np.int64)
        labels = labels[(labels >= 0) & (labels < num_classes)]
        present[i, labels] = True
    samples_with_class = present.sum(axis=0)
    occurring = samples_with_class > 0
    if not occurring.any():
        return np.full(count, 1.0 / count)
    share = np.where(occurring, 1.0 / max(int(occurring.sum()), 1), 0.0) / np.maximum(samples_with_class, 1)
    weights = present @ share
    weights = np.where(present.any(axis=1), weights, 1.0 / (occurring.sum() * count))
    return weights / weights.sum()


def class_balanced_sampler(labels_per_sample: Sequence[np.ndarray], num_classes: int,
                           generator: torch.Generator | None = None) -> torch.utils.data.WeightedRandomSampler:
    """A sampler drawing len(labels_per_sample) keyframes per epoch, with replacement, by `class_balanced_weights`.
    Under DDP, Lightning wraps it so that each process draws its own part."""
    weights = torch.as_tensor(class_balanced_weights(labels_per_sample, num_classes), dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels_per_sample), replacement=True,
                                                  generator=generator)

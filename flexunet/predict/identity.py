"""Identities from class maps (multi-class bottom-up) and class vectors (multi-class top-down).

Both assign classes one-to-one by the Hungarian algorithm, as sleap-nn does:
per frame and node, the peaks of that node against the classes, on the class
maps' values at each peak; per frame, the crops against the classes, on the
class vectors.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def peak_class_probabilities(class_maps: torch.Tensor, points: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """(n, classes) class-map values at the nearest pixel of each peak (`points` (n, 2) in class-map pixels)."""
    _, _, h, w = class_maps.shape
    rows = torch.round(points[:, 1]).to(torch.int64).clamp(0, h - 1)
    cols = torch.round(points[:, 0]).to(torch.int64).clamp(0, w - 1)
    return class_maps[sample, :, rows, cols]


def group_by_class(probs: torch.Tensor, points: torch.Tensor, values: torch.Tensor, sample: torch.Tensor,
                   channel: torch.Tensor, n_frames: int, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """Group peaks into one instance per class.

    Args:
        probs: (n, classes) class probabilities of the peaks (`peak_class_probabilities`).
        points: (n, 2) peaks; values (n,); sample, channel (n,).
        n_frames, n_nodes: Frames of the batch and nodes per instance.

    Returns:
        `(instances, point_scores, class_scores)`: (N, classes, nodes, 2) in the
        points' pixels, (N, classes, nodes) peak values and class probabilities, NaN
        where a class has no peak of a node. A peak is kept only where its assigned
        class is also its most probable one.
    """
    classes = probs.shape[1]
    picked, assigned = [], []
    probs_np = probs.detach().cpu().numpy()
    key = (sample * n_nodes + channel).cpu().numpy()
    for group in np.unique(key):
        members = np.flatnonzero(key == group)
        r, c = linear_sum_assignment(-probs_np[members])
        picked.append(members[r])
        assigned.append(c)
    instances = torch.full((n_frames, classes, n_nodes, 2), float("nan"))
    point_scores = torch.full((n_frames, classes, n_nodes), float("nan"))
    class_scores = torch.full((n_frames, classes, n_nodes), float("nan"))
    if picked:
        peak = torch.as_tensor(np.concatenate(picked))
        cls = torch.as_tensor(np.concatenate(assigned))
        best = probs[peak, cls] == probs[peak].max(dim=1).values
        peak, cls = peak[best], cls[best]
        s, c = sample[peak], channel[peak]
        instances[s, cls, c] = points[peak]
        point_scores[s, cls, c] = values[peak]
        class_scores[s, cls, c] = probs[peak, cls]
    return instances, point_scores, class_scores


def classify_crops(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes of the crops of one frame from their class vectors (crops, classes).

    Returns:
        `(classes, probabilities)`: (crops,) class index, -1 where there are more
        crops than classes and a crop got none; (crops,) its probability (NaN there).
    """
    rows, cols = linear_sum_assignment(-vectors.detach().cpu().numpy())
    classes = torch.full((len(vectors),), -1, dtype=torch.int64)
    probs = torch.full((len(vectors),), float("nan"))
    rows_t, cols_t = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
    classes[rows_t] = cols_t
    probs[rows_t] = vectors.detach().cpu()[rows_t, cols_t].float()
    return classes, probs


__all__ = ["classify_crops", "group_by_class", "peak_class_probabilities"]

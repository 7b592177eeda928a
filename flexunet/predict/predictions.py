"""`Predictions`: the poses of a run of frames, as arrays, and their sleap-io form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class FramePoses:
    """The instances of one frame (float32 arrays; NaN where a node was not found)."""

    points: np.ndarray  # (I, K, 2)
    point_scores: np.ndarray  # (I, K)
    instance_scores: np.ndarray  # (I,)
    identities: Optional[np.ndarray] = None  # (I,) class index, -1 for none
    identity_scores: Optional[np.ndarray] = None  # (I,)

    @classmethod
    def empty(cls, n_nodes: int, with_identities: bool) -> "FramePoses":
        ident = (np.zeros(0, np.int64), np.zeros(0, np.float32)) if with_identities else (None, None)
        return cls(np.zeros((0, n_nodes, 2), np.float32), np.zeros((0, n_nodes), np.float32),
                   np.zeros(0, np.float32), *ident)

    def keep(self, mask: np.ndarray) -> "FramePoses":
        """The instances where `mask` is true."""
        pick = (lambda a: None if a is None else a[mask])
        return FramePoses(self.points[mask], self.point_scores[mask], self.instance_scores[mask],
                          pick(self.identities), pick(self.identity_scores))


@dataclass
class Predictions:
    """Poses predicted on N frames, padded to the most instances any frame has.

    Attributes:
        points: (N, I, K, 2) float32 x/y in frame pixels, NaN for missing nodes and
            for the empty slots of frames with fewer than I instances.
        point_scores: (N, I, K) confidence of each point (NaN in empty slots).
        instance_scores: (N, I) score of each instance, NaN for empty slots.
        identities: (N, I) class index of each instance (-1: none) for multi-class
            models, else None.
        identity_scores: (N, I) class probability, NaN where there is none.
        node_names: The skeleton's nodes, in the order of axis K.
        edges: The skeleton's edges as node index pairs.
        classes: Class (track) names of multi-class models.
        frame_indices: (N,) index of each frame in its video (0..N-1 for arrays).
    """

    points: np.ndarray
    point_scores: np.ndarray
    instance_scores: np.ndarray
    identities: Optional[np.ndarray]
    identity_scores: Optional[np.ndarray]
    node_names: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]
    classes: tuple[str, ...]
    frame_indices: np.ndarray
    skeleton_name: str = "Skeleton-0"

    @classmethod
    def from_frames(cls, frames: Sequence[FramePoses], node_names, edges, classes, frame_indices,
                    skeleton_name: str = "Skeleton-0") -> "Predictions":
        """Stack per-frame instances, padding every frame to the largest count."""
        n, k = len(frames), len(node_names)
        width = max((len(f.instance_scores) for f in frames), default=0)
        points = np.full((n, width, k, 2), np.nan, np.float32)
        point_scores = np.full((n, width, k), np.nan, np.float32)
        scores = np.full((n, width), np.nan, np.float32)
        multi = bool(classes)
        identities = np.full((n, width), -1, np.int64) if multi else None
        identity_scores = np.full((n, width), np.nan, np.float32) if multi else None
        for i, f in enumerate(frames):
            m = len(f.instance_scores)
            points[i, :m], point_scores[i, :m], scores[i, :m] = f.points, f.point_scores, f.instance_scores
            if multi and f.identities is not None:
                identities[i, :m], identity_scores[i, :m] = f.identities, f.identity_scores
        return cls(points, point_scores, scores, identities, identity_scores, tuple(node_names),
                   tuple(tuple(e) for e in edges), tuple(classes), np.asarray(frame_indices, np.int64),
                   skeleton_name)

    def __len__(self) -> int:
        return len(self.frame_indices)

    @property
    def instance_counts(self) -> np.ndarray:
        """(N,) instances found in each frame."""
        return (~np.isnan(self.instance_scores)).sum(axis=1)

    @property
    def tracks(self) -> np.ndarray:
        """(N, I) class name of each instance ("" where none), as SLEAP names tracks."""
        names = np.full(self.instance_scores.shape, "", dtype=object)
        if self.identities is not None:
            for c, name in enumerate(self.classes):
                names[self.identities == c] = name
        return names

    def to_labels(self, video=None, skeleton=None):
        """These predictions as a `sleap_io.Labels` (one `PredictedInstance` per instance).

        Args:
            video: The `sleap_io.Video` the frames came from (None: a placeholder
                video named "frames").
            skeleton: A `sleap_io.Skeleton` to use (default: built from `node_names`
                and `edges`).
        """
        import sleap_io as sio

        if skeleton is None:
            skeleton = sio.Skeleton(nodes=list(self.node_names), edges=[list(e) for e in self.edges],
                                    name=self.skeleton_name)
        if video is None:
            video = sio.Video(filename="frames")
        tracks = [sio.Track(name=name) for name in self.classes]
        frames = []
        for i, frame_index in enumerate(self.frame_indices):
            instances = []
            for j in np.flatnonzero(~np.isnan(self.instance_scores[i])):
                kwargs = {}
                if self.identities is not None and self.identities[i, j] >= 0:
                    kwargs = dict(track=tracks[self.identities[i, j]],
                                  tracking_score=float(self.identity_scores[i, j]))
                instances.append(sio.PredictedInstance.from_numpy(
                    points_data=self.points[i, j], point_scores=self.point_scores[i, j],
                    score=float(self.instance_scores[i, j]), skeleton=skeleton, **kwargs))
            frames.append(sio.LabeledFrame(video=video, frame_idx=int(frame_index), instances=instances))
        return sio.Labels(labeled_frames=frames, videos=[video], skeletons=[skeleton], tracks=tracks)


__all__ = ["FramePoses", "Predictions"]

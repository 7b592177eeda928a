"""Bottom-up grouping with part affinity fields, as sleap-nn groups.

1. `line_scores`: every pair of peaks of the two nodes of an edge (same frame) is
   a candidate; its score is the mean over `n_points` samples along the segment of
   the PAF vector (nearest pixel) dotted with the segment's direction, plus a
   penalty `min(0, max_edge_length / length - 1) * dist_penalty_weight`.
   Vectorised over all candidates of a batch.
2. `group`: per frame and edge, candidates are matched one-to-one by the
   Hungarian algorithm (`scipy.optimize.linear_sum_assignment`), matches below
   `min_line_scores` dropped, and instances assembled greedily along the skeleton
   in breadth-first order from its root; an instance's score is the sum of its
   connections' scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from flexunet.nn.validation import check_int


@dataclass(frozen=True)
class PAFGrouping:
    """How peaks are grouped into instances (sleap-nn's names and defaults).

    Args:
        edges: (source, destination) channel indices of the skeleton edges; edge `k`
            is read from PAF channels `2k` (x) and `2k + 1` (y).
        n_nodes: Channels of the confidence maps.
        pafs_stride: Output stride of the part affinity fields.
        max_edge_length_ratio: Longest expected edge as a fraction of the PAFs' largest side.
        dist_penalty_weight: Weight of the penalty on longer edges.
        n_points: Samples along each candidate segment.
        min_instance_peaks: Instances with fewer peaks are dropped; a float is a
            fraction of `n_nodes` (as sleap-nn reads any float).
        min_line_scores: Matches scoring below this are dropped.
    """

    edges: tuple[tuple[int, int], ...]
    n_nodes: int
    pafs_stride: int
    max_edge_length_ratio: float = 0.25
    dist_penalty_weight: float = 1.0
    n_points: int = 10
    min_instance_peaks: int | float = 0
    min_line_scores: float = 0.25

    def __post_init__(self):
        check_int("n_points", self.n_points, minimum=2)
        check_int("pafs_stride", self.pafs_stride, minimum=1)
        for name in ("max_edge_length_ratio", "dist_penalty_weight", "min_instance_peaks", "min_line_scores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise TypeError(f"{name} must be a number, got {value!r}.")
        for src, dst in self.edges:
            if not (0 <= src < self.n_nodes and 0 <= dst < self.n_nodes):
                raise ValueError(f"edge ({src}, {dst}) names a node outside the {self.n_nodes} confidence maps.")
        object.__setattr__(self, "edges", tuple((int(s), int(d)) for s, d in self.edges))

    @property
    def edge_order(self) -> tuple[int, ...]:
        """Edges in the order instances are assembled: breadth-first from the skeleton's root."""
        graph = nx.DiGraph(list(self.edges))
        root = next(nx.topological_sort(graph))
        return tuple(self.edges.index(edge) for edge in nx.bfs_edges(graph, root))


@dataclass
class Candidates:
    """Candidate connections of a batch: edge index, source and destination peak (indices into the peaks)."""

    edge: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def candidates(grouping: PAFGrouping, sample: torch.Tensor, channel: torch.Tensor) -> Candidates:
    """All same-frame (source, destination) peak pairs of every edge, edge by edge, row-major."""
    edge, src, dst = [], [], []
    for k, (s, d) in enumerate(grouping.edges):
        src_k = torch.nonzero(channel == s)[:, 0]
        dst_k = torch.nonzero(channel == d)[:, 0]
        rows, cols = torch.nonzero(sample[src_k][:, None] == sample[dst_k][None, :]).unbind(1)
        edge.append(torch.full_like(rows, k))
        src.append(src_k[rows])
        dst.append(dst_k[cols])
    empty = torch.zeros(0, dtype=torch.long, device=sample.device)
    return Candidates(*(torch.cat(t) if t else empty for t in (edge, src, dst)))


def segment_scores(grouping: PAFGrouping, pafs: torch.Tensor, frame: torch.Tensor, edge: torch.Tensor,
                   src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Line scores (m,) of segments `src` -> `dst` (m, 2) in input pixels, read from `pafs[frame]`, edge `edge`.

    The PAF vector is read at the nearest pixel of `n_points` samples along each
    segment and dotted with the segment's direction; the mean gets the length penalty.
    """
    _, channels, h, w = pafs.shape
    t = torch.linspace(0, 1, grouping.n_points, device=src.device)
    # Linear interpolation as sleap-nn's interp1d computes it (slope over 1 + eps).
    slope = (dst - src) / (1 + torch.finfo(torch.float32).eps)
    line = src[:, None, :] + slope[:, None, :] * t[None, :, None]  # (m, P, 2) x/y
    pixels = (line / grouping.pafs_stride).round().int()
    cols = pixels[..., 0].clamp(0, w - 1).long()
    rows = pixels[..., 1].clamp(0, h - 1).long()
    frame, x_channel = frame[:, None], 2 * edge[:, None]
    vectors = torch.stack([pafs[frame, x_channel, rows, cols], pafs[frame, x_channel + 1, rows, cols]], dim=-1)
    delta = dst - src
    length = torch.norm(delta, dim=1, keepdim=True)  # (m, 1)
    along = torch.squeeze(vectors @ (delta / length).unsqueeze(2), dim=-1)  # (m, P)
    max_length = grouping.max_edge_length_ratio * max(h, w, channels) * grouping.pafs_stride
    penalty = torch.clamp(max_length / length - 1, max=0) * grouping.dist_penalty_weight
    return along.mean(dim=1) + penalty[:, 0]


def line_scores(grouping: PAFGrouping, pafs: torch.Tensor, points: torch.Tensor, sample: torch.Tensor,
                found: Candidates) -> torch.Tensor:
    """Scores (m,) of the candidates (see `segment_scores`).

    Args:
        pafs: (N, 2 * edges, H, W) part affinity fields.
        points: (n, 2) peaks in input pixels (confidence-map peaks times their stride).
        sample: (n,) frame of each peak.
    """
    return segment_scores(grouping, pafs, sample[found.src], found.edge, points[found.src], points[found.dst])


def _match(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching; NaN scores (zero-length segments) are never matched."""
    cost = np.where(np.isnan(cost), np.inf, cost)
    try:
        return linear_sum_assignment(cost)
    except ValueError:  # no full matching avoids the forbidden pairs: match them last, then drop them
        rows, cols = linear_sum_assignment(np.where(np.isinf(cost), 1e30, cost))
        keep = np.isfinite(cost[rows, cols])
        return rows[keep], cols[keep]


def _assemble(grouping: PAFGrouping, connections: list[tuple[int, int, int, float]]) -> dict[tuple[int, int], int]:
    """(node, peak) -> instance id from matched connections (edge, src peak, dst peak, score) in assembly order.

    Greedy as sleap-nn assembles: a connection whose ends are both new starts an
    instance; one with a known source extends it; one joining two instances moves
    the destination peak to the source's instance and merges the two if they share
    no node. A connection with only a known destination adds nothing.
    """
    owner: dict[tuple[int, int], int] = {}
    for k, src, dst, _ in connections:
        s, d = grouping.edges[k]
        a, b = owner.get((s, src)), owner.get((d, dst))
        if a is None and b is None:
            new = max(owner.values(), default=-1) + 1
            owner[(s, src)] = owner[(d, dst)] = new
        elif a is not None and b is None:
            owner[(d, dst)] = a
        elif a is not None:
            owner[(d, dst)] = a
            nodes_a = {node for (node, _), i in owner.items() if i == a}
            nodes_b = {node for (node, _), i in owner.items() if i == b}
            if not nodes_a & nodes_b:
                owner = {key: (a if i == b else i) for key, i in owner.items()}
    minimum = grouping.min_instance_peaks
    if minimum > 0:
        if isinstance(minimum, float):
            minimum = int(minimum * grouping.n_nodes)
        ids, counts = np.unique(list(owner.values()), return_counts=True)
        big = {int(i) for i, n in zip(ids, counts) if n >= minimum}
        owner = {key: i for key, i in owner.items() if i in big}
    return owner


def group(grouping: PAFGrouping, points: np.ndarray, values: np.ndarray, channel: np.ndarray,
          found: Candidates, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances of one frame from its peaks and scored candidates.

    Args:
        points: (n, 2) peaks of the frame; values (n,); channel (n,).
        found: The frame's candidates (peak indices into `points`), in `candidates` order.
        scores: (m,) their line scores.

    Returns:
        `(instances, point_scores, instance_scores)`: (I, nodes, 2) with NaN for
        missing nodes, (I, nodes), (I,), float32, in order of instance id.
    """
    node_peaks = [np.flatnonzero(channel == i) for i in range(grouping.n_nodes)]
    rank = np.zeros(len(channel), dtype=np.int64)  # a peak's position among its node's peaks
    for peaks in node_peaks:
        rank[peaks] = np.arange(len(peaks))
    edge, src, dst = (t.cpu().numpy() for t in (found.edge, found.src, found.dst))
    matched: dict[int, list[tuple[int, int, int, float]]] = {}
    for k in range(len(grouping.edges)):
        s, d = grouping.edges[k]
        n_src, n_dst = len(node_peaks[s]), len(node_peaks[d])
        cost = np.full((n_src, n_dst), np.inf, dtype=np.float32)
        here = edge == k
        cost[rank[src[here]], rank[dst[here]]] = -scores[here]
        rows, cols = _match(cost)
        matched[k] = [(k, int(r), int(c), float(-cost[r, c])) for r, c in zip(rows, cols)
                      if -cost[r, c] >= grouping.min_line_scores]
    connections = [c for k in grouping.edge_order for c in matched[k]]
    owner = _assemble(grouping, connections)
    ids = sorted(set(owner.values()))
    slot = {i: j for j, i in enumerate(ids)}
    instance_scores = np.zeros(len(ids), dtype=np.float32)
    for k, src_peak, _, score in connections:
        instance = owner.get((grouping.edges[k][0], src_peak))
        if instance is not None:
            instance_scores[slot[instance]] += np.float32(score)
    instances = np.full((len(ids), grouping.n_nodes, 2), np.nan, dtype=np.float32)
    point_scores = np.full((len(ids), grouping.n_nodes), np.nan, dtype=np.float32)
    for (node, peak), instance in owner.items():
        index = node_peaks[node][peak]
        instances[slot[instance], node] = points[index]
        point_scores[slot[instance], node] = values[index]
    return instances, point_scores, instance_scores


__all__ = ["Candidates", "PAFGrouping", "candidates", "group", "line_scores", "segment_scores"]

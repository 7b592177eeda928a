"""Peaks in confidence maps, found as sleap-nn finds them.

* `global_peaks`: one peak per map (single instance, centered instance): the
  maximum, NaN where it is below the threshold.
* `local_peaks`: every local maximum above the threshold (centroids, bottom-up
  parts). A pixel is a peak if it is greater than its 4 neighbours before it in
  raster order and not less than the 4 after it; a flat top of equal pixels is one
  peak if it fits in a 2x2 block and nothing around it is as high, placed at the
  mean of its pixels.
* Integral refinement: the peak moves by the centre of mass of the map in a
  `patch` x `patch` window around it (zero outside the map).

Everything is vectorised over samples, channels and peaks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

REFINEMENTS = ("integral", None)


def window_origins(centers: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer top-left (x, y) of the `height` x `width` windows centred on `centers` (n, 2).

    As sleap-nn cuts them: the window's corner is `center - size / 2 + 0.5` and the
    pixel grid starts at `trunc(corner + size // 2) - size // 2`.
    """
    size = centers.new_tensor([width, height])
    half = centers.new_tensor([width // 2, height // 2])
    corner = centers - size / 2 + 0.5
    return (corner + half).long() - half.long()


def crop(maps: torch.Tensor, index: torch.Tensor, origins: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Windows of `maps` (M, C, H, W): `index` (n,) picks the map, `origins` (n, 2) the (x, y) corner.

    Returns (n, C, height, width) in the maps' dtype; pixels outside the map are zero.
    """
    _, _, h, w = maps.shape
    ys = origins[:, 1:2] + torch.arange(height, device=maps.device)  # (n, height)
    xs = origins[:, 0:1] + torch.arange(width, device=maps.device)  # (n, width)
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (n, height, width)
    patches = maps[index[:, None, None], :, ys.clamp(0, h - 1)[:, :, None], xs.clamp(0, w - 1)[:, None, :]]
    patches = patches.masked_fill(~inside[..., None], 0)  # (n, height, width, C)
    return patches.permute(0, 3, 1, 2).contiguous()


def integral_offsets(patches: torch.Tensor) -> torch.Tensor:
    """(dx, dy) of the centre of mass of square `patches` (n, 1, p, p) from their centre; (n, 2)."""
    p = patches.shape[-1]
    grid = torch.arange(p, dtype=torch.float32, device=patches.device) - (p - 1) / 2
    mass = patches.sum(dim=(2, 3))
    dx = (grid.view(1, 1, 1, -1) * patches).sum(dim=(2, 3)) / mass
    dy = (grid.view(1, 1, -1, 1) * patches).sum(dim=(2, 3)) / mass
    return torch.cat([dx, dy], dim=1)


def _refine(maps: torch.Tensor, index: torch.Tensor, anchors: torch.Tensor, patch: int) -> torch.Tensor:
    """`anchors` (n, 2) integer (x, y) in maps[index] moved by the integral offsets of their patch."""
    patches = crop(maps, index, window_origins(anchors, patch, patch), patch, patch)
    return anchors + integral_offsets(patches)


def _check(refinement: Optional[str], patch: int) -> None:
    if refinement not in REFINEMENTS:
        raise ValueError(f"integral_refinement must be 'integral' or None, got {refinement!r}.")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"integral_patch_size must be a positive integer, got {patch!r}.")


def global_peaks(maps: torch.Tensor, threshold: float = 0.2, refinement: Optional[str] = "integral",
                 patch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The maximum of every map (fixed shapes, so it exports as it runs).

    Args:
        maps: (N, C, H, W) confidence maps.
        threshold: Peaks below it are NaN, with value 0.
        refinement: "integral" or None.
        patch: Side of the refinement window.

    Returns:
        `(points, values)`: (N, C, 2) x/y in map pixels, (N, C).
    """
    _check(refinement, patch)
    n, c, h, w = maps.shape
    values, x = maps.amax(dim=2).max(dim=2)  # x of the first column holding the maximum
    y = maps.amax(dim=3).argmax(dim=2)  # y of the first row holding it
    points = torch.stack([x, y], dim=-1).to(torch.float32)  # (N, C, 2)
    if refinement == "integral":
        index = torch.arange(n * c, device=maps.device)
        points = _refine(maps.reshape(n * c, 1, h, w), index, points.reshape(n * c, 2), patch).reshape(n, c, 2)
    below = values < threshold
    return points.masked_fill(below[..., None], float("nan")), values.masked_fill(below, 0.0)


def _neighbour_maxima(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maxima of each pixel's 4 neighbours before it in raster order (NW, N, NE, W) and the 4 after."""
    p = F.pad(maps, (1, 1, 1, 1), value=float("-inf"))
    before = torch.maximum(torch.maximum(p[..., :-2, :-2], p[..., :-2, 1:-1]),
                           torch.maximum(p[..., :-2, 2:], p[..., 1:-1, :-2]))
    after = torch.maximum(torch.maximum(p[..., 1:-1, 2:], p[..., 2:, :-2]),
                          torch.maximum(p[..., 2:, 1:-1], p[..., 2:, 2:]))
    return before, after


# In a 5x5 window centred on a candidate: its 4 neighbours after it (E, SW, S, SE) and the flat
# tops that fit a 2x2 block (the candidate with E, S, SE, or with SW, S).
_AFTER = ((2, 3), (3, 1), (3, 2), (3, 3))


def _flat_tops(maps: torch.Tensor, sample: torch.Tensor, channel: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For candidates with an equal neighbour after them: (keep (m,), (x, y) offset to the top's mean)."""
    n, c, h, w = maps.shape
    windows = crop(F.pad(maps, (2, 2, 2, 2), value=float("-inf")).reshape(n * c, 1, h + 4, w + 4),
                   sample * c + channel, torch.stack([x, y], dim=1), 5, 5)[:, 0]  # (m, 5, 5)
    high = windows >= values[:, None, None]
    tied = torch.zeros_like(high)
    for r, col in _AFTER:
        tied[:, r, col] = high[:, r, col]
    east, south_west, south_east = tied[:, 2, 3], tied[:, 3, 1], tied[:, 3, 3]
    fits = ~south_west | (~east & ~south_east)
    top = tied.clone()
    top[:, 2, 2] = True
    near_tied = F.max_pool2d(tied[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    leaks = (near_tied & high & ~top).flatten(1).any(dim=1)
    grid = torch.arange(5, dtype=torch.float32, device=maps.device) - 2
    count = top.flatten(1).sum(dim=1).to(torch.float32)
    dx = (top * grid.view(1, 1, 5)).flatten(1).sum(dim=1) / count
    dy = (top * grid.view(1, 5, 1)).flatten(1).sum(dim=1) / count
    return fits & ~leaks, torch.stack([dx, dy], dim=1)


def local_peaks(maps: torch.Tensor, threshold: float = 0.2, refinement: Optional[str] = "integral",
                patch: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every local maximum above `threshold`, ordered by sample, row, column, channel.

    Args:
        maps: (N, C, H, W) confidence maps.
        threshold: Peaks must be above it.
        refinement: "integral" or None.
        patch: Side of the refinement window.

    Returns:
        `(points, values, sample, channel)`: (n, 2) x/y in map pixels, (n,), and the
        (n,) int64 sample and channel of each peak.
    """
    _check(refinement, patch)
    before, after = _neighbour_maxima(maps)
    peaks = (maps > before) & (maps >= after) & (maps > threshold)
    sample, y, x, channel = torch.nonzero(peaks.permute(0, 2, 3, 1)).unbind(1)
    values = maps[sample, channel, y, x]
    points = torch.stack([x, y], dim=1).to(torch.float32)
    tied = values == after[sample, channel, y, x]
    if bool(tied.any()):
        keep = torch.ones_like(tied)
        which = torch.nonzero(tied)[:, 0]
        keep[which], offsets = _flat_tops(maps, sample[which], channel[which], x[which], y[which], values[which])
        points[which] += offsets
        keep = torch.nonzero(keep)[:, 0]
        points, values, sample, channel = points[keep], values[keep], sample[keep], channel[keep]
    if refinement == "integral" and len(values):
        n, c, h, w = maps.shape
        # A flat top's point can be fractional: refine around the pixel it floors to.
        points = _refine(maps.reshape(n * c, 1, h, w), sample * c + channel, torch.floor(points), patch)
    return points, values, sample, channel


def local_peak_count(maps: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """(N, C) number of peak candidates of each map (flat tops counted before they are checked)."""
    before, after = _neighbour_maxima(maps)
    return ((maps > before) & (maps >= after) & (maps > threshold)).sum(dim=(2, 3))


def top_local_peaks(maps: torch.Tensor, k: int, threshold: float = 0.2, refinement: Optional[str] = "integral",
                    patch: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `k` highest local peaks of every map, in fixed shapes (for exported graphs).

    The peaks `local_peaks` finds, highest first; when a map has more than `k`
    candidates, flat-top candidates that turn out not to be peaks still take
    their slot before being dropped.

    Returns:
        `(points, values, index)`: (N, C, k, 2) x/y in map pixels and (N, C, k), NaN
        where a map has fewer peaks; (N, C, k) raster position `y * W + x` of each
        peak's first pixel (the order `local_peaks` returns peaks in).
    """
    _check(refinement, patch)
    n, c, h, w = maps.shape
    before, after = _neighbour_maxima(maps)
    peaks = (maps > before) & (maps >= after) & (maps > threshold)
    flat = maps.masked_fill(~peaks, float("-inf")).reshape(n, c, h * w)
    if k > h * w:
        flat = torch.nn.functional.pad(flat, (0, k - h * w), value=float("-inf"))
    values, index = torch.topk(flat, k, dim=2)  # (N, C, k)
    index = index.clamp(max=h * w - 1)
    x, y = index % w, torch.div(index, w, rounding_mode="floor")
    found = values > float("-inf")
    sample = torch.arange(n, device=maps.device).view(n, 1, 1).expand(n, c, k).reshape(-1)
    channel = torch.arange(c, device=maps.device).view(1, c, 1).expand(n, c, k).reshape(-1)
    keep, offsets = _flat_tops(maps, sample, channel, x.reshape(-1), y.reshape(-1), values.reshape(-1))
    points = torch.stack([x, y], dim=-1).to(torch.float32).reshape(-1, 2) + offsets
    if refinement == "integral":
        points = _refine(maps.reshape(n * c, 1, h, w), sample * c + channel, torch.floor(points), patch)
    found = found & keep.reshape(n, c, k)
    points = points.reshape(n, c, k, 2).masked_fill(~found[..., None], float("nan"))
    return points, values.masked_fill(~found, float("nan")), index


__all__ = ["REFINEMENTS", "crop", "global_peaks", "integral_offsets", "local_peak_count", "local_peaks",
           "top_local_peaks",
           "window_origins"]

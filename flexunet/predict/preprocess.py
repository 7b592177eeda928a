"""Frames to network inputs, as sleap-nn prepares them, and back to frame coordinates.

In order: channel conversion (`ensure_rgb` / `ensure_grayscale`, on the uint8
frames), size matching to `max_height` x `max_width` (resize keeping the aspect
ratio, then zero padding at the bottom/right), input scaling, zero padding to the
network's maximum stride, and scaling to [0, 1]. Resizing is antialiased bilinear
as torchvision's `transforms.v2.functional.resize` (which sleap-nn calls) computes it
on uint8 images: PyTorch's own uint8 kernel where the CPU has one (AVX2, AVX-512,
ARM), else on float values rounded back to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
import platform
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

# torchvision's `rgb_to_grayscale` weights (ITU-R 601).
LUMA = (0.2989, 0.587, 0.114)


def as_frames(frames, name: str = "frames") -> torch.Tensor:
    """uint8 (N, H, W, C) NumPy or torch frames (or one (H, W, C) frame) as a uint8 (N, C, H, W) tensor."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{name} must be a NumPy array or torch tensor of uint8 (N, H, W, C) frames, "
                        f"got {type(frames).__name__}.")
    if frames.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 video frames (N, H, W, C), got dtype {frames.dtype}.")
    if frames.dim() == 3:
        frames = frames[None]
    if frames.dim() != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, H, W, C) with 1 or 3 channels, got {tuple(frames.shape)}.")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"{name} must be at least 1x1 pixels, got {tuple(frames.shape)}.")
    return frames.permute(0, 3, 1, 2)


def native_uint8_resize() -> bool:
    """Whether torchvision resizes uint8 images with PyTorch's uint8 kernel on this CPU."""
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (N, C, H, W) images resized as torchvision resizes them (antialiased bilinear)."""
    if images.shape[-2:] == (height, width):
        return images
    kwargs = dict(size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    if native_uint8_resize():
        return F.interpolate(images, **kwargs)
    return F.interpolate(images.float(), **kwargs).round().to(torch.uint8)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) to luma (N, 1, H, W), truncated to uint8 as torchvision does."""
    r, g, b = images.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).to(images.dtype)[:, None]


@dataclass(frozen=True)
class Preprocessing:
    """One network's input preparation (sleap-nn's `data_config.preprocessing` fields).

    Args:
        ensure_rgb: Convert grayscale frames to RGB before resizing.
        ensure_grayscale: Convert RGB frames to grayscale before resizing.
        max_height: Size-match frames to this height (None: keep).
        max_width: Size-match frames to this width (None: keep).
        scale: Input scaling after size matching.
        max_stride: Pad to a multiple of this.
    """

    ensure_rgb: bool = False
    ensure_grayscale: bool = False
    max_height: Optional[int] = None
    max_width: Optional[int] = None
    scale: float = 1.0
    max_stride: int = 1

    def __post_init__(self):
        if self.ensure_rgb and self.ensure_grayscale:
            raise ValueError("ensure_rgb and ensure_grayscale cannot both be true.")
        for name in ("max_height", "max_width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 < self.scale < 1e3:
            raise ValueError(f"scale must be a positive number, got {self.scale!r}.")

    def convert(self, frames: torch.Tensor) -> torch.Tensor:
        """Channel conversion of uint8 (N, C, H, W) frames."""
        if self.ensure_rgb and frames.shape[1] == 1:
            return frames.expand(-1, 3, -1, -1)
        if self.ensure_grayscale and frames.shape[1] == 3:
            return to_grayscale(frames)
        return frames

    def size_match(self, frames: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Frames fitted into (max_height, max_width), keeping the aspect ratio, and the scale used."""
        h, w = frames.shape[-2:]
        target_h = self.max_height if self.max_height is not None else h
        target_w = self.max_width if self.max_width is not None else w
        if (h, w) == (target_h, target_w):
            return frames, 1.0
        scale = min(target_h / h, target_w / w)
        resized = resize(frames, int(round(h * scale)), int(round(w * scale)))
        pad_h, pad_w = target_h - resized.shape[-2], target_w - resized.shape[-1]
        return F.pad(resized, (0, pad_w, 0, pad_h)), scale

    def rescale(self, images: torch.Tensor) -> torch.Tensor:
        """Input scaling, still uint8."""
        if self.scale == 1.0:
            return images
        h, w = images.shape[-2:]
        return resize(images, int(h * self.scale), int(w * self.scale))

    def pad(self, images: torch.Tensor) -> torch.Tensor:
        """Zero padding at the bottom/right to a multiple of the maximum stride."""
        h, w = images.shape[-2:]
        pad_h, pad_w = -h % self.max_stride, -w % self.max_stride
        return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images

    def resized(self, frames: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Converted, size-matched and scaled uint8 frames (not padded), and the size-matching scale."""
        sized, eff_scale = self.size_match(self.convert(frames))
        return self.rescale(sized), eff_scale

    def __call__(self, frames: torch.Tensor) -> tuple[torch.Tensor, float]:
        """uint8 (N, C, H, W) frames -> (float network input in [0, 1], size-matching scale)."""
        images, eff_scale = self.resized(frames)
        return self.pad(images).float() / 255.0, eff_scale


__all__ = ["LUMA", "Preprocessing", "as_frames", "resize", "to_grayscale"]

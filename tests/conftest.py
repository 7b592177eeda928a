"""Shared fixtures: the reference data produced by SLEAP's own Keras code, and private directories."""

import json
import os
from pathlib import Path

# The suite runs the native kernels wherever they apply (their parity with TensorFlow's semantics is what
# most tests check), without timing every layer shape of every test; the measured choice, each of its
# candidates and the switch are tested in tests/test_choice.py and tests/test_layers.py, which unset this.
os.environ.setdefault("FLEXUNET_NATIVE", "1")

import numpy as np
import pytest
import torch

REFERENCE = Path(os.environ.get("FLEXUNET_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
BACKBONES = REFERENCE / "backbones"
SLEAP_MODELS = REFERENCE / "sleap_models"
BACKBONE_CASES = ["tiny_reference", "interp_rate15_os4", "stacked3_interp", "stem2_k7"]
SLEAP_FOLDERS = [
    "minimal_robot.UNet.single_instance",
    "minimal_instance.UNet.centroid",
    "minimal_instance.UNet.centered_instance",
    "minimal_instance.UNet.bottomup",
    "min_tracks_2node.UNet.bottomup_multiclass",
    "min_tracks_2node.UNet.topdown_multiclass",
]


def require_reference() -> Path:
    """The reference folder; in CI its absence is a failure, elsewhere a skip."""
    if not REFERENCE.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"reference data missing at {REFERENCE} (CI must have ../shared/reference)")
        pytest.skip(f"reference data not found at {REFERENCE}; set FLEXUNET_REFERENCE or check out ../shared")
    return REFERENCE


@pytest.fixture
def reference() -> Path:
    return require_reference()


def load_backbone_case(name: str):
    """(meta, npz) of one backbone case."""
    require_reference()
    meta = json.loads((BACKBONES / f"{name}.json").read_text())
    return meta, np.load(BACKBONES / f"{name}.npz")


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def relative_error(ours: torch.Tensor, ref: np.ndarray) -> float:
    """max |ours - ref| / max(1, max |ref|), with ours in NCHW (or vectors) and ref in NHWC."""
    ours = ours.detach()
    if ours.dim() == 4:
        ours = ours.permute(0, 2, 3, 1)
    assert tuple(ours.shape) == ref.shape, (tuple(ours.shape), ref.shape)
    return float(np.abs(ours.numpy() - ref).max() / max(1.0, np.abs(ref).max()))


TOLERANCE = 1e-4


@pytest.fixture
def private_dir(tmp_path) -> Path:
    """A fresh directory only the current user can write (what flexunet's kernel cache requires)."""
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    return path

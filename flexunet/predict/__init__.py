"""Poses from SLEAP models, decoded as sleap-nn decodes them.

    >>> from flexunet.sleap import load_predictor
    >>> predictor = load_predictor(["models/centroid", "models/centered_instance"])
    >>> poses = predictor(frames)            # uint8 (N, H, W, C)
    >>> poses.points.shape                   # (N, instances, nodes, 2)

Modules: `preprocess` (frames to network inputs), `peaks` (global and local
peaks, integral refinement), `paf` (bottom-up grouping), `identity` (class maps
and vectors), `predictor` (the model types), `predictions` (the result and its
sleap-io form), `video` (videos in, `.slp` out).
"""

from flexunet.predict.predictions import Predictions
from flexunet.predict.predictor import Predictor, load_predictor

__all__ = ["Predictions", "Predictor", "load_predictor"]

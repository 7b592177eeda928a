"""Exported models that output keypoints: the networks and their decoding in one ONNX graph.

`export_keypoints_onnx(predictor, path, frame_shape)` writes a graph that takes
uint8 frames (N, H, W, C) and returns peaks and scores with fixed shapes:

* single instance: `points` (N, 1, K, 2), `point_scores` (N, 1, K);
* centroid: `points` (N, I, 1, 2), `point_scores` (N, I, 1), `instance_scores` (N, I);
* top-down: `points` (N, I, K, 2), `point_scores` (N, I, K), `instance_scores` (N, I)
  (the centroid scores), and for multi-class top-down `class_vectors` (N, I, classes);
  both also `instance_index` (N, I), each centroid's raster position, and `candidates`
  (N,), how many centroids each frame had, by which the host orders the slots;
* bottom-up: `peaks` (N, K, P, 2) in input pixels, `peak_values` (N, K, P), `peak_index`
  (N, K, P) and `line_scores` (N, E, P, P), every source peak against every destination
  peak of each edge; instances are grouped on the host, as sleap-nn's export does;
* multi-class bottom-up: `peaks`, `peak_values`, `peak_index` and `peak_class_probs`
  (N, K, P, classes); classes are assigned on the host.

I is `max_instances`, P `max_peaks` per part; NaN marks empty slots. Points are in
the pixels of the size-matched frame. Resizing (size matching, input scaling) is
not in the graph: PyTorch's uint8 resize that sleap-nn's preprocessing uses has no
exact ONNX equivalent, so the host does it and passes the frames each network
sees. `load_onnx_predictor(path)` runs such a file in onnxruntime with that host
code and returns `Predictions` like `Predictor`; the settings it needs are stored
in the file's metadata.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from flexunet.nn.validation import check_int
from flexunet.predict import identity, paf
from flexunet.predict.peaks import crop, global_peaks, local_peak_count, top_local_peaks, window_origins
from flexunet.predict.predictions import FramePoses
from flexunet.predict.predictor import (BatchPredictor, Options, Predictor, bottomup_poses, centroid_poses,
                                        multi_class_bottomup_poses, single_instance_poses, topdown_poses)
from flexunet.predict.preprocess import Preprocessing

METADATA_KEY = "flexunet_keypoints"


def _network_input(frames: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (N, H, W, C) frames as the network sees them -> float (N, C, H', W') padded to the stride."""
    return prep.pad(frames.permute(0, 3, 1, 2)).float() / 255.0


class KeypointGraph(nn.Module):
    """A predictor's networks and decoding with fixed output shapes (see the module docstring)."""

    def __init__(self, predictor: Predictor, max_instances: int, max_peaks: int):
        super().__init__()
        self.model_type, self.options = predictor.model_type, predictor.options
        self.max_instances, self.max_peaks = max_instances, max_peaks
        self.stages = predictor.stages
        self.first = predictor.stages[0].model
        self.second = predictor.stages[1].model if len(predictor.stages) == 2 else None
        self.crop_size = getattr(predictor, "crop_size", None)
        self.grouping = getattr(predictor, "grouping", None)

    def _peaks(self, stage: int) -> dict:
        return dict(threshold=self.options.peak_threshold[stage], refinement=self.options.integral_refinement,
                    patch=self.options.integral_patch_size)

    def forward(self, frames: torch.Tensor, scaled: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        stage = self.stages[0]
        prep = stage.preprocessing
        out = self.first(_network_input(frames if scaled is None else scaled, prep))
        if self.model_type == "single_instance":
            head = stage.head("SingleInstanceConfmapsHead")
            points, values = global_peaks(out[head.name], **self._peaks(0))
            return (points * head.output_stride / prep.scale)[:, None], values[:, None]
        if self.model_type in ("centroid", "topdown", "multi_class_topdown"):
            head = stage.head("CentroidConfmapsHead")
            maps = out[head.name]
            centers, values, index = top_local_peaks(maps, self.max_instances, **self._peaks(0))
            centers, values = centers[:, 0] * head.output_stride / prep.scale, values[:, 0]  # (N, I, 2), (N, I)
            # How many centroids there were, and where: the host orders the slots as `Predictor` does.
            order = (index[:, 0], local_peak_count(maps, self.options.peak_threshold[0])[:, 0])
            if self.model_type == "centroid":
                return (centers[:, :, None], values[:, :, None], values) + order
            return self._topdown(frames, centers, values) + order
        head = stage.head("MultiInstanceConfmapsHead")
        peaks, values, index = top_local_peaks(out[head.name], self.max_peaks, **self._peaks(0))  # (N, K, P, 2)
        peaks = peaks * head.output_stride
        if self.model_type == "bottomup":
            return peaks, values, index, self._line_scores(out[stage.head("PartAffinityFieldsHead").name], peaks)
        class_head = stage.head("ClassMapsHead")
        n, k, p, _ = peaks.shape
        in_class_maps = (peaks / class_head.output_stride).reshape(-1, 2)
        frame = torch.arange(n).view(n, 1, 1).expand(n, k, p).reshape(-1)
        probs = identity.peak_class_probabilities(out[class_head.name], torch.nan_to_num(in_class_maps), frame)
        return peaks, values, index, probs.reshape(n, k, p, -1)

    def _topdown(self, frames, centers, values):
        n, i, _ = centers.shape
        size = self.crop_size
        found = ~torch.isnan(values)
        flat = torch.nan_to_num(centers.reshape(n * i, 2))
        sample = torch.arange(n).view(n, 1).expand(n, i).reshape(-1)
        crops = crop(frames.permute(0, 3, 1, 2), sample, window_origins(flat, size, size), size, size)
        second = self.stages[1]
        out = self.second(_network_input(crops.permute(0, 2, 3, 1), second.preprocessing))
        head = second.head("CenteredInstanceConfmapsHead")
        points, point_values = global_peaks(out[head.name], **self._peaks(1))
        corners = flat - size / 2 + 0.5
        points = points * head.output_stride / second.preprocessing.scale + corners[:, None, :]
        k = points.shape[1]
        points = points.reshape(n, i, k, 2).masked_fill(~found[..., None, None], float("nan"))
        point_values = point_values.reshape(n, i, k).masked_fill(~found[..., None], float("nan"))
        result = (points, point_values, values)
        if self.model_type == "multi_class_topdown":
            vectors = out[second.head("ClassVectorsHead").name]
            result += (vectors.reshape(n, i, -1).masked_fill(~found[..., None], float("nan")),)
        return result

    def _line_scores(self, pafs: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
        """(N, E, P, P): every source peak of each edge against every destination peak (NaN for empty slots)."""
        n, _, p, _ = peaks.shape
        scores = []
        for k, (s, d) in enumerate(self.grouping.edges):
            src = peaks[:, s, :, None, :].expand(n, p, p, 2).reshape(-1, 2)
            dst = peaks[:, d, None, :, :].expand(n, p, p, 2).reshape(-1, 2)
            frame = torch.arange(n).view(n, 1, 1).expand(n, p, p).reshape(-1)
            edge = torch.full_like(frame, k)
            score = paf.segment_scores(self.grouping, pafs, frame, edge, torch.nan_to_num(src), torch.nan_to_num(dst))
            missing = torch.isnan(src[:, 0]) | torch.isnan(dst[:, 0])
            scores.append(score.masked_fill(missing, float("nan")).reshape(n, p, p))
        return torch.stack(scores, dim=1)


OUTPUTS = {
    "single_instance": ["points", "point_scores"],
    "centroid": ["points", "point_scores", "instance_scores", "instance_index", "candidates"],
    "topdown": ["points", "point_scores", "instance_scores", "instance_index", "candidates"],
    "multi_class_topdown": ["points", "point_scores", "instance_scores", "class_vectors", "instance_index",
                            "candidates"],
    "bottomup": ["peaks", "peak_values", "peak_index", "line_scores"],
    "multi_class_bottomup": ["peaks", "peak_values", "peak_index", "peak_class_probs"],
}


def _inputs(prep: Preprocessing, two_stage: bool) -> list[str]:
    """Graph inputs. One network: the frames it sees. Top-down: the size-matched frames the crops are cut
    from, and the centroid network's frames where conversion or input scaling makes them differ."""
    if two_stage and (prep.scale != 1.0 or prep.ensure_rgb or prep.ensure_grayscale):
        return ["frames", "scaled_frames"]
    return ["frames"]


def host_inputs(prep: Preprocessing, two_stage: bool, images: torch.Tensor) -> tuple[dict, float]:
    """The graph's inputs for uint8 (N, C, H, W) frames, resized on the host as `Predictor` resizes them."""
    if not two_stage:
        resized, eff = prep.resized(images)
        return {"frames": resized}, eff
    sized, eff = prep.size_match(images)
    feeds = {"frames": sized}
    if "scaled_frames" in _inputs(prep, two_stage):
        feeds["scaled_frames"] = prep.resized(images)[0]
    return feeds, eff


def export_keypoints_onnx(predictor: Predictor, path: str | os.PathLike, frame_shape: Sequence[int],
                          max_instances: Optional[int] = None, max_peaks: int = 128,
                          opset_version: Optional[int] = None) -> str:
    """Write `predictor`'s networks and decoding as one ONNX file (see the module docstring).

    Args:
        predictor: From `flexunet.sleap.load_predictor`.
        path: The `.onnx` file to write.
        frame_shape: (H, W, C) of the video frames (the graph is built for this size).
        max_instances: Instance slots per frame for centroid and top-down models
            (default: the predictor's `max_instances`; required for those types).
        max_peaks: Peak slots per part for bottom-up models.
        opset_version: ONNX opset (None: the exporter's default).

    Returns:
        The path written.
    """
    if not isinstance(predictor, Predictor):
        raise TypeError(f"predictor must be a flexunet Predictor (load_predictor), got {type(predictor).__name__}.")
    if len(frame_shape) != 3:
        raise ValueError(f"frame_shape must be (height, width, channels), got {tuple(frame_shape)!r}.")
    height, width, channels = (check_int(f"frame_shape[{i}]", v, minimum=1) for i, v in enumerate(frame_shape))
    if channels not in (1, 3):
        raise ValueError(f"frame_shape must have 1 or 3 channels, got {channels}.")
    max_instances = max_instances if max_instances is not None else predictor.options.max_instances
    if predictor.model_type in ("centroid", "topdown", "multi_class_topdown"):
        if max_instances is None:
            raise ValueError(f"exporting a {predictor.model_type} model needs max_instances (the graph's fixed "
                             "number of instance slots per frame).")
        check_int("max_instances", max_instances, minimum=1)
    check_int("max_peaks", max_peaks, minimum=1)
    if len(predictor.stages) == 2 and predictor.stages[1].preprocessing.scale != 1.0:
        raise ValueError(f"{predictor.stages[1].info.folder}: centered-instance models with input scaling "
                         f"({predictor.stages[1].preprocessing.scale}) resize their crops, which exported graphs "
                         "cannot do exactly; export needs an input scale of 1.")
    graph = KeypointGraph(predictor, max_instances or 1, max_peaks).eval()
    two_stage = len(predictor.stages) == 2
    prep = predictor.stages[0].preprocessing
    feeds, _ = host_inputs(prep, two_stage, torch.zeros(2, channels, height, width, dtype=torch.uint8))
    names = _inputs(prep, two_stage)
    inputs = tuple(feeds[k].permute(0, 2, 3, 1).contiguous() for k in names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = tuple({0: batch} for _ in inputs)
    with torch.no_grad():
        program = torch.export.export(graph, inputs, dynamic_shapes=dynamic)
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    onnx_program = torch.onnx.export(program, inputs, input_names=names,
                                     output_names=OUTPUTS[predictor.model_type], dynamo=True, verbose=False, **kwargs)
    import onnx

    model = onnx_program.model_proto
    meta = metadata(predictor, (height, width, channels), max_instances or 1, max_peaks)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    path = os.fspath(path)
    onnx.save(model, path)
    return path


def metadata(predictor: Predictor, frame_shape, max_instances: int, max_peaks: int) -> dict:
    """What the host needs to run an exported graph: preprocessing, skeleton, decoding settings."""
    first = predictor.stages[0]
    meta = {
        "format_version": 1, "model_type": predictor.model_type, "frame_shape": list(frame_shape),
        "inputs": _inputs(first.preprocessing, len(predictor.stages) == 2), "outputs": OUTPUTS[predictor.model_type],
        "preprocessing": {k: getattr(first.preprocessing, k) for k in
                          ("ensure_rgb", "ensure_grayscale", "max_height", "max_width", "scale", "max_stride")},
        "node_names": list(predictor.node_names), "edges": [list(e) for e in predictor.edges],
        "classes": list(predictor.classes), "skeleton_name": predictor.skeleton_name,
        "max_instances": max_instances, "max_peaks": max_peaks,
        "options": {"max_instances": predictor.options.max_instances, "batch_size": predictor.options.batch_size},
        "models": [s.info.folder for s in predictor.stages],
    }
    if predictor.model_type == "bottomup":
        g = predictor.grouping
        meta["grouping"] = {"edges": [list(e) for e in g.edges], "n_nodes": g.n_nodes, "pafs_stride": g.pafs_stride,
                            "max_edge_length_ratio": g.max_edge_length_ratio,
                            "dist_penalty_weight": g.dist_penalty_weight, "n_points": g.n_points,
                            "min_instance_peaks": g.min_instance_peaks, "min_line_scores": g.min_line_scores}
    if predictor.model_type == "multi_class_bottomup":
        meta["class_stride"] = first.head("ClassMapsHead").output_stride
    return meta


class OnnxPredictor(BatchPredictor):
    """Runs a file from `export_keypoints_onnx` in onnxruntime; calling it returns `Predictions`
    (see `Predictor.__call__`)."""

    def __init__(self, path: str | os.PathLike, providers: Optional[list[str]] = None):
        import onnxruntime

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX file not found: {path}")
        try:
            self.session = onnxruntime.InferenceSession(path, providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own parse errors
            raise ValueError(f"{path} could not be loaded as an ONNX model: {err}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise ValueError(f"{path} is not a flexunet keypoint export (no {METADATA_KEY!r} metadata); "
                             "write one with flexunet.predict.export.export_keypoints_onnx.")
        self.meta = json.loads(props[METADATA_KEY])
        self.model_type = self.meta["model_type"]
        self.preprocessing = Preprocessing(**self.meta["preprocessing"])
        self.node_names = tuple(self.meta["node_names"])
        self.edges = tuple(tuple(e) for e in self.meta["edges"])
        self.classes = tuple(self.meta["classes"])
        self.skeleton_name = self.meta.get("skeleton_name", "Skeleton-0")
        self.options = Options(batch_size=self.meta["options"]["batch_size"],
                               max_instances=self.meta["options"]["max_instances"])
        grouping = self.meta.get("grouping")
        self.grouping = None if grouping is None else paf.PAFGrouping(
            **{**grouping, "edges": tuple(tuple(e) for e in grouping["edges"])})

    def check_frames(self, images: torch.Tensor) -> None:
        """The graph was built for one frame size."""
        h, w, c = self.meta["frame_shape"]
        if tuple(images.shape[1:]) != (c, h, w):
            raise ValueError(f"this export takes frames of shape (N, {h}, {w}, {c}), got "
                             f"{tuple(images.permute(0, 2, 3, 1).shape)}.")

    def predict_batch(self, images: torch.Tensor, indices=None) -> list[FramePoses]:
        """Per-frame poses of uint8 (n, C, H, W) frames: host preprocessing, the graph, host decoding."""
        prep = self.preprocessing
        feeds, eff = host_inputs(prep, self.model_type in ("topdown", "multi_class_topdown"), images)
        feeds = {k: v.permute(0, 2, 3, 1).contiguous().numpy() for k, v in feeds.items()}
        out = dict(zip(self.meta["outputs"], (torch.from_numpy(a) for a in self.session.run(None, feeds))))
        n = len(images)
        if self.model_type == "single_instance":
            return single_instance_poses(out["points"][:, 0] / eff, out["point_scores"][:, 0])
        if self.model_type in ("centroid", "topdown", "multi_class_topdown"):
            return self._instances(out, eff)
        return self._bottomup(out, n, prep.scale, eff)

    def _instances(self, out: dict, eff: float) -> list[FramePoses]:
        """Centroid and top-down outputs: the found slots of each frame, as `Predictor` orders them."""
        values = out["instance_scores"]
        limit = self.options.max_instances
        keep = []
        for b, v in enumerate(values):
            slots = torch.nonzero(~torch.isnan(v))[:, 0]  # highest first
            if limit is None or int(out["candidates"][b]) <= limit:  # sleap-nn keeps raster order then
                slots = slots[torch.argsort(out["instance_index"][b, slots])]
            keep.append(slots)
        if self.model_type == "centroid":
            return centroid_poses([(out["points"][b, k, 0] / eff, values[b, k]) for b, k in enumerate(keep)])
        points = torch.cat([out["points"][b, k] for b, k in enumerate(keep)]) / eff
        point_scores = torch.cat([out["point_scores"][b, k] for b, k in enumerate(keep)])
        vectors = torch.cat([out["class_vectors"][b, k] for b, k in enumerate(keep)]) if (
            "class_vectors" in out) else None
        return topdown_poses(points, point_scores, [values[b, k] for b, k in enumerate(keep)], vectors)

    def _bottomup(self, out: dict, n: int, scale: float, eff: float) -> list[FramePoses]:
        peaks, values, index = out["peaks"], out["peak_values"], out["peak_index"]
        _, k, p, _ = peaks.shape
        found = ~torch.isnan(values)
        frame, node, slot = torch.nonzero(found).unbind(1)
        # `local_peaks` order: frame, raster position, channel.
        order = np.lexsort((node.numpy(), index[frame, node, slot].numpy(), frame.numpy()))
        frame, node, slot = frame[order], node[order], slot[order]
        points, peak_values = peaks[frame, node, slot], values[frame, node, slot]
        if self.model_type == "multi_class_bottomup":
            stride = self.meta["class_stride"]
            probs = out["peak_class_probs"][frame, node, slot]
            return multi_class_bottomup_poses(probs, points / stride, peak_values, frame, node, n, k, stride, scale,
                                              eff, self.options.max_instances)
        candidates = paf.candidates(self.grouping, frame, node)
        edge_scores = out["line_scores"]
        scores = edge_scores[frame[candidates.src], candidates.edge, slot[candidates.src], slot[candidates.dst]]
        return bottomup_poses(self.grouping, points, peak_values, frame, node, candidates, scores, n, scale * eff,
                              self.options.max_instances)


def load_onnx_predictor(path: str | os.PathLike, providers: Optional[list[str]] = None) -> OnnxPredictor:
    """An `OnnxPredictor` for a file written by `export_keypoints_onnx` (needs onnxruntime)."""
    return OnnxPredictor(path, providers)


__all__ = ["KeypointGraph", "OnnxPredictor", "export_keypoints_onnx", "load_onnx_predictor"]

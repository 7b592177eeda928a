"""`load_predictor`: keypoints out of SLEAP model folders, computed as sleap-nn predicts them.

A `Predictor` holds one network (single instance, centroid, bottom-up,
multi-class bottom-up) or two (centroid + centered instance or multi-class
top-down), each with its folder's preprocessing. Calling it on uint8 frames runs
the networks on flexunet's fast path in batches and decodes their maps:

* single instance: the global peak of each part map;
* centroid: local peaks of the centroid map (at most `max_instances`, the highest);
* top-down: crops of `crop_size` around each centroid, cut from the size-matched
  frame, the centered-instance model on the crops, global peaks shifted back;
* bottom-up: local peaks grouped by part affinity fields (`flexunet.predict.paf`);
* multi-class: identities from class maps or class vectors (`flexunet.predict.identity`).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from flexunet.io.folders import load_model
from flexunet.nn.sleap_model import SleapModel
from flexunet.nn.validation import check_int
from flexunet.predict import identity, paf
from flexunet.predict.model_info import ModelInfo, read_model_info
from flexunet.predict.peaks import REFINEMENTS, crop, global_peaks, local_peaks, window_origins
from flexunet.predict.predictions import FramePoses, Predictions
from flexunet.predict.preprocess import Preprocessing, as_frames

SINGLE_FOLDER_TYPES = ("single_instance", "centroid", "bottomup", "multi_class_bottomup")
SECOND_STAGE_TYPES = ("centered_instance", "multi_class_topdown")


@dataclass
class Stage:
    """One network of a predictor: the model, its folder's settings and input preparation."""

    model: SleapModel
    info: ModelInfo
    preprocessing: Preprocessing
    bf16: bool = False

    def head(self, kind: str):
        """The spec of the model's (last stack's) head of this kind."""
        specs = [s for s in self.model.head_specs if s.kind == kind]
        if not specs:
            raise ValueError(f"{self.info.folder}: the {self.info.model_type} model has no {kind} output.")
        return max(specs, key=lambda s: s.stack)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Network outputs (float32) for a float input batch."""
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            out = self.model(x.contiguous(memory_format=torch.channels_last))
        return {k: v.float() for k, v in out.items()}


@dataclass(frozen=True)
class Options:
    """Decoding options, with sleap-nn's names and defaults (see `load_predictor`)."""

    peak_threshold: tuple[float, float] = (0.2, 0.2)  # (first stage, centered instance)
    integral_refinement: Optional[str] = "integral"
    integral_patch_size: int = 5
    max_instances: Optional[int] = None
    batch_size: int = 4
    max_edge_length_ratio: float = 0.25
    dist_penalty_weight: float = 1.0
    n_points: int = 10
    min_instance_peaks: int | float = 0
    min_line_scores: float = 0.25


def _options(peak_threshold, centroid_threshold, keypoint_threshold, integral_refinement, integral_patch_size,
             max_instances, batch_size, **paf_knobs) -> Options:
    if isinstance(peak_threshold, (list, tuple)):
        if len(peak_threshold) != 2:
            raise ValueError(f"peak_threshold must be a number or a (centroid, instance) pair, got {peak_threshold!r}.")
        thresholds = list(peak_threshold)
    else:
        thresholds = [peak_threshold, peak_threshold]
    for i, override in enumerate((centroid_threshold, keypoint_threshold)):
        if override is not None:
            thresholds[i] = override
    for name, value in zip(("peak_threshold", "peak_threshold"), thresholds):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if integral_refinement == "none":
        integral_refinement = None
    if integral_refinement not in REFINEMENTS:
        raise ValueError(f"integral_refinement must be 'integral' or None, got {integral_refinement!r}.")
    check_int("integral_patch_size", integral_patch_size, minimum=1, maximum=255)
    if max_instances is not None:
        check_int("max_instances", max_instances, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    paf.PAFGrouping(edges=(), n_nodes=1, pafs_stride=1, **paf_knobs)  # checks the grouping knobs for every type
    return Options(tuple(float(t) for t in thresholds), integral_refinement, integral_patch_size, max_instances,
                   batch_size, **paf_knobs)


def _stages(infos: list[ModelInfo], bf16: bool) -> list[Stage]:
    """The networks with their input preparation, as sleap-nn resolves it.

    A top-down pair shares one preprocessing config: each field the centroid
    model leaves unset comes from the centered-instance model, except the input
    scale, which stays per model. The crops fed to the second model are only
    scaled and padded.
    """
    stages = []
    for i, info in enumerate(infos):
        model = load_model(info.folder)
        # Keras models take only their own channel count; sleap-nn's pipeline converts for both kinds.
        model.convert_channels = True
        if i == 0:
            pick = (lambda key: next((getattr(x, key) for x in infos if getattr(x, key) is not None), None))
            prep = Preprocessing(ensure_rgb=bool(pick("ensure_rgb")), ensure_grayscale=bool(pick("ensure_grayscale")),
                                 max_height=pick("max_height"), max_width=pick("max_width"), scale=info.scale,
                                 max_stride=model.maximum_stride)
        else:
            prep = Preprocessing(scale=info.scale, max_stride=model.maximum_stride)
        stages.append(Stage(model, info, prep, bf16))
    return stages


class BatchPredictor:
    """Frames to `Predictions`, batch by batch; subclasses give `predict_batch` and the skeleton
    (`options`, `node_names`, `edges`, `classes`, `skeleton_name`)."""

    def __call__(self, frames, frame_indices: Optional[Iterable[int]] = None) -> Predictions:
        """Poses in uint8 frames (N, H, W, C), NumPy or torch; see `Predictions`.

        Frames with another channel count than the model's are converted as the
        model's loader converts them. Frames without peaks give no instances.

        Raises:
            TypeError, ValueError: the frames are not uint8 (N, H, W, C).
            ValueError: a network produced NaN or infinite values (naming the frame).
        """
        images = as_frames(frames)
        self.check_frames(images)
        indices = np.arange(len(images)) if frame_indices is None else np.asarray(list(frame_indices))
        if len(indices) != len(images):
            raise ValueError(f"frame_indices has {len(indices)} entries for {len(images)} frames.")
        return self.predict_batches(((images[i:i + self.options.batch_size],
                                      indices[i:i + self.options.batch_size])
                                     for i in range(0, len(images), self.options.batch_size)))

    def predict_batches(self, batches: Iterable[tuple[torch.Tensor, np.ndarray]]) -> Predictions:
        """Poses for an iterable of (uint8 (n, C, H, W) frames, (n,) frame indices) batches."""
        poses, indices = [], []
        for images, index in batches:
            poses.extend(self.predict_batch(images, index))
            indices.extend(int(i) for i in index)
        return Predictions.from_frames(poses, self.node_names, self.edges, self.classes, indices, self.skeleton_name)

    def check_frames(self, images: torch.Tensor) -> None:
        """Refuse frames this predictor cannot take (any size here)."""

    def predict_batch(self, images: torch.Tensor, indices: Sequence[int]) -> list[FramePoses]:
        """Per-frame poses of one batch of uint8 (n, C, H, W) frames."""
        raise NotImplementedError


class Predictor(BatchPredictor):
    """Poses from frames with one or two SLEAP models; build it with `load_predictor`.

    Attributes:
        model_type: "single_instance", "centroid", "topdown", "multi_class_topdown",
            "bottomup" or "multi_class_bottomup".
        stages: The networks, centroid first for top-down.
        options: The decoding options.
        node_names, edges, classes: The skeleton and the class names of the output.
    """

    def __init__(self, stages: Sequence[Stage], options: Options):
        self.stages, self.options = list(stages), options
        first = self.stages[0].info
        if len(self.stages) == 2:
            second = self.stages[1].info
            self.model_type = "topdown" if second.model_type == "centered_instance" else "multi_class_topdown"
            crop_size = second.crop_size
            if crop_size is None:
                raise ValueError(f"{second.folder}: the training config gives no crop size "
                                 "(preprocessing.crop_size), which top-down prediction needs.")
            self.crop_size = crop_size
            names = second
        else:
            self.model_type, names = first.model_type, first
        self.node_names, self.edges, self.classes = names.node_names, names.skeleton_edges, names.classes
        self.skeleton_name = names.skeleton_name
        if self.model_type == "bottomup":
            stage = self.stages[0]
            pafs = stage.head("PartAffinityFieldsHead")
            maps = stage.head("MultiInstanceConfmapsHead")
            if len(first.paf_edges) * 2 != pafs.channels:
                raise ValueError(f"{first.folder}: the config lists {len(first.paf_edges)} PAF edges, but the model "
                                 f"has {pafs.channels} PAF channels (two per edge).")
            self.grouping = paf.PAFGrouping(
                edges=first.paf_edges, n_nodes=maps.channels, pafs_stride=pafs.output_stride,
                max_edge_length_ratio=options.max_edge_length_ratio, dist_penalty_weight=options.dist_penalty_weight,
                n_points=options.n_points, min_instance_peaks=options.min_instance_peaks,
                min_line_scores=options.min_line_scores)

    def __repr__(self) -> str:
        folders = ", ".join(s.info.folder for s in self.stages)
        return f"Predictor({self.model_type}: {folders}; nodes={list(self.node_names)})"

    # ------------------------------------------------------------------ public

    def predict_batch(self, images: torch.Tensor, indices: Sequence[int]) -> list[FramePoses]:
        """Per-frame poses of one batch of uint8 (n, C, H, W) frames."""
        decode = {"single_instance": self._single_instance, "centroid": self._centroids_only,
                  "topdown": self._topdown, "multi_class_topdown": self._topdown,
                  "bottomup": self._bottomup, "multi_class_bottomup": self._multi_class_bottomup}[self.model_type]
        return decode(images, list(indices))

    # ----------------------------------------------------------------- helpers

    def _run(self, stage: Stage, images: torch.Tensor, indices: Sequence[int]) -> tuple[dict, float]:
        """Outputs of a stage on uint8 images, checked for NaN/inf, and the size-matching scale."""
        x, eff_scale = stage.preprocessing(images)
        out = stage(x)
        for name, value in out.items():
            bad = ~torch.isfinite(value.flatten(1)).all(dim=1)
            if bool(bad.any()):
                where = int(torch.nonzero(bad)[0, 0])
                frame = indices[where] if where < len(indices) else where
                raise ValueError(f"{stage.info.folder}: the {name} output holds NaN or infinite values "
                                 f"for frame {frame}.")
        return out, eff_scale

    def _peak_args(self, stage: int = 0) -> dict:
        return dict(threshold=self.options.peak_threshold[stage], refinement=self.options.integral_refinement,
                    patch=self.options.integral_patch_size)

    def _centroids(self, images: torch.Tensor, indices: Sequence[int]):
        """Per frame: centroids (c, 2) in frame pixels and their values (c,), capped at max_instances."""
        stage = self.stages[0]
        out, eff_scale = self._run(stage, images, indices)
        head = stage.head("CentroidConfmapsHead")
        points, values, sample, _ = local_peaks(out[head.name], **self._peak_args(0))
        points = points * head.output_stride / stage.preprocessing.scale
        result = []
        for b in range(len(images)):
            mine = sample == b
            p, v = points[mine], values[mine]
            if self.options.max_instances is not None and len(v) > self.options.max_instances:
                v, order = torch.topk(v, self.options.max_instances)
                p = p[order]
            result.append((p / eff_scale if eff_scale != 1.0 else p, v))
        return result, eff_scale

    # ----------------------------------------------------------- model types

    def _single_instance(self, images, indices):
        stage = self.stages[0]
        out, eff_scale = self._run(stage, images, indices)
        head = stage.head("SingleInstanceConfmapsHead")
        points, values = global_peaks(out[head.name], **self._peak_args(0))
        return single_instance_poses(points * head.output_stride / stage.preprocessing.scale / eff_scale, values)

    def _centroids_only(self, images, indices):
        centroids, _ = self._centroids(images, indices)
        return centroid_poses(centroids)

    def _topdown(self, images, indices):
        centroids, eff_scale = self._centroids(images, indices)
        second = self.stages[1]
        size = self.crop_size
        # Crops are cut from the frame size-matched as for the centroid model (no channel conversion).
        sized, _ = self.stages[0].preprocessing.size_match(images)
        centers = [p * eff_scale if eff_scale != 1.0 else p for p, _ in centroids]
        counts = [len(c) for c in centers]
        n_nodes = len(self.node_names)
        multi = self.model_type == "multi_class_topdown"
        if sum(counts) == 0:
            return [FramePoses.empty(n_nodes, multi) for _ in centers]
        centers_all = torch.cat(centers)
        sample = torch.repeat_interleave(torch.arange(len(images)), torch.tensor(counts))
        crops = crop(sized, sample, window_origins(centers_all, size, size), size, size)
        out, _ = self._run(second, crops, [indices[int(s)] for s in sample])
        head = second.head("CenteredInstanceConfmapsHead")
        points, values = global_peaks(out[head.name], **self._peak_args(1))
        corners = centers_all - size / 2 + 0.5  # the crops' corners as sleap-nn adds them back
        points = (points * head.output_stride / second.preprocessing.scale + corners[:, None, :]) / eff_scale
        vectors = out[second.head("ClassVectorsHead").name] if multi else None
        return topdown_poses(points, values, [v for _, v in centroids], vectors)

    def _bottomup(self, images, indices):
        stage = self.stages[0]
        out, eff_scale = self._run(stage, images, indices)
        maps = stage.head("MultiInstanceConfmapsHead")
        pafs = out[stage.head("PartAffinityFieldsHead").name]
        points, values, sample, channel = local_peaks(out[maps.name], **self._peak_args(0))
        points = points * maps.output_stride
        found = paf.candidates(self.grouping, sample, channel)
        scores = paf.line_scores(self.grouping, pafs, points, sample, found)
        return bottomup_poses(self.grouping, points, values, sample, channel, found, scores, len(images),
                              stage.preprocessing.scale * eff_scale, self.options.max_instances)

    def _multi_class_bottomup(self, images, indices):
        stage = self.stages[0]
        out, eff_scale = self._run(stage, images, indices)
        maps = stage.head("MultiInstanceConfmapsHead")
        class_head = stage.head("ClassMapsHead")
        points, values, sample, channel = local_peaks(out[maps.name], **self._peak_args(0))
        in_class_maps = points * maps.output_stride / class_head.output_stride
        probs = identity.peak_class_probabilities(out[class_head.name], in_class_maps, sample)
        return multi_class_bottomup_poses(probs, in_class_maps, values, sample, channel, len(images), maps.channels,
                                          class_head.output_stride, stage.preprocessing.scale, eff_scale,
                                          self.options.max_instances)


# -------------------------------------------------- decoded peaks -> poses
# Shared by `Predictor` and the exported-graph runner (`flexunet.predict.export`).


def single_instance_poses(points: torch.Tensor, values: torch.Tensor) -> list[FramePoses]:
    """One instance per frame from (N, K, 2) frame points and (N, K) values; none where no node was found.
    Its score is the sum of its point scores, as sleap-nn scores single instances."""
    frames = []
    for p, v in zip(points.numpy(), values.numpy()):
        score = np.array([np.nansum(v)], np.float32)
        frames.append(FramePoses(p[None], v[None], score).keep(np.array([not np.isnan(p).all()])))
    return frames


def centroid_poses(centroids: list[tuple[torch.Tensor, torch.Tensor]]) -> list[FramePoses]:
    """One-node instances from per-frame centroids (c, 2) and their values (c,)."""
    return [FramePoses(p.numpy()[:, None], v.numpy()[:, None], v.numpy()) for p, v in centroids]


def topdown_poses(points: torch.Tensor, values: torch.Tensor, centroid_values: list[torch.Tensor],
                  vectors: Optional[torch.Tensor]) -> list[FramePoses]:
    """Per-frame instances from the crops' points (n, K, 2) in frame pixels and values (n, K), the crops
    taken frame by frame (`centroid_values` per frame give the instance scores); multi-class top-down
    also takes the crops' class vectors (n, classes)."""
    frames, start = [], 0
    for scores in centroid_values:
        n = len(scores)
        p, v = points[start:start + n].numpy(), values[start:start + n].numpy()
        poses = FramePoses(p, v, scores.numpy())
        if vectors is not None:
            classes, probs = identity.classify_crops(vectors[start:start + n])
            poses.identities, poses.identity_scores = classes.numpy(), probs.numpy()
        frames.append(poses.keep(~np.isnan(p).all(axis=(1, 2))))
        start += n
    return frames


def bottomup_poses(grouping: paf.PAFGrouping, points: torch.Tensor, values: torch.Tensor, sample: torch.Tensor,
                   channel: torch.Tensor, found: paf.Candidates, scores: torch.Tensor, n_frames: int,
                   scale: float, max_instances: Optional[int]) -> list[FramePoses]:
    """Per-frame instances grouped from peaks (input pixels, ordered by frame) and scored candidates;
    points are divided by `scale` (input scaling times size matching)."""
    frames = []
    frame_of_src = sample[found.src]
    scores = scores.numpy()
    for b in range(n_frames):
        mine = torch.nonzero(sample == b)[:, 0]
        first = int(mine[0]) if len(mine) else 0
        here = torch.nonzero(frame_of_src == b)[:, 0]
        local = paf.Candidates(found.edge[here], found.src[here] - first, found.dst[here] - first)
        instances, point_scores, instance_scores = paf.group(
            grouping, points[mine].numpy(), values[mine].numpy(), channel[mine].numpy(), local, scores[here.numpy()])
        if scale != 1.0:
            instances = instances / np.float32(scale)
        poses = FramePoses(instances, point_scores, instance_scores)
        if max_instances is not None and len(instance_scores) > max_instances:
            poses = poses.keep(np.argsort(instance_scores)[::-1][:max_instances])
        frames.append(poses)
    return frames


def multi_class_bottomup_poses(probs: torch.Tensor, points: torch.Tensor, values: torch.Tensor, sample: torch.Tensor,
                               channel: torch.Tensor, n_frames: int, n_nodes: int, class_stride: int, scale: float,
                               eff_scale: float, max_instances: Optional[int]) -> list[FramePoses]:
    """One instance per class and frame from peaks in class-map pixels and their class probabilities."""
    instances, point_scores, class_scores = identity.group_by_class(probs, points, values, sample, channel,
                                                                    n_frames, n_nodes)
    instances = instances * class_stride
    if scale != 1.0:
        instances = instances / scale
    if eff_scale != 1.0:
        instances = instances / eff_scale
    scores = torch.nanmean(point_scores, dim=-1).numpy()  # NaN for classes without peaks
    identity_scores = torch.nanmean(class_scores, dim=-1).numpy()
    n_classes = probs.shape[1]
    frames = []
    for b in range(n_frames):
        present = ~np.isnan(scores[b])
        if max_instances is not None and present.sum() > max_instances:
            keep = np.zeros(n_classes, bool)
            keep[np.argsort(scores[b])[::-1][:max_instances]] = True
            present &= keep
        poses = FramePoses(instances[b].numpy(), point_scores[b].numpy(), scores[b],
                           np.arange(n_classes, dtype=np.int64), identity_scores[b])
        frames.append(poses.keep(present & ~np.isnan(instances[b].numpy()).all(axis=(1, 2))))
    return frames


def _resolve_folders(folders) -> list[str]:
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    if not isinstance(folders, (list, tuple)) or not folders:
        raise TypeError(f"folders must be a model folder or a list of one or two, got {folders!r}.")
    paths = []
    for folder in folders:
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"folders must be paths, got {folder!r}.")
        path = os.fspath(folder)
        # A training config or weights file inside a folder names the folder.
        paths.append(os.path.dirname(path) if os.path.isfile(path) else path)
    return paths


def _pair(infos: list[ModelInfo]) -> list[int]:
    """The stage order (centroid first) of the folders, or a ValueError saying why they do not pair."""
    types = [i.model_type for i in infos]
    described = ", ".join(f"{i.folder} ({i.model_type})" for i in infos)
    if len(infos) == 1:
        if types[0] in SECOND_STAGE_TYPES:
            raise ValueError(f"{described} predicts from crops around centroids: pass a centroid model folder too.")
        return [0]
    if len(infos) != 2:
        raise ValueError(f"load_predictor takes one model folder or two (centroid + centered instance), "
                         f"got {len(infos)}: {described}.")
    if "centroid" in types:
        other = 1 - types.index("centroid")
        if types[other] in SECOND_STAGE_TYPES:
            return [types.index("centroid"), other]
    raise ValueError(f"these models do not pair: {described}. Two folders must be a centroid model and a "
                     f"centered-instance (or multi-class top-down) model.")


def load_predictor(folders, peak_threshold: float | tuple[float, float] = 0.2,
                   centroid_threshold: Optional[float] = None, keypoint_threshold: Optional[float] = None,
                   integral_refinement: Optional[str] = "integral", integral_patch_size: int = 5,
                   max_instances: Optional[int] = None, max_edge_length_ratio: float = 0.25,
                   dist_penalty_weight: float = 1.0, n_points: int = 10, min_instance_peaks: int | float = 0,
                   min_line_scores: float = 0.25, batch_size: int = 4, bf16: bool = False) -> Predictor:
    """A predictor of poses from one SLEAP model folder or a top-down pair (Keras or sleap-nn).

    Options have sleap-nn's names and defaults:

    Args:
        folders: One folder (single instance, centroid, bottom-up, multi-class
            bottom-up) or two (a centroid model and a centered-instance or
            multi-class top-down model, in any order).
        peak_threshold: Minimum confidence of a peak; a (centroid, instance) pair
            sets the two top-down stages apart.
        centroid_threshold: Top-down: the centroid stage's threshold instead.
        keypoint_threshold: Top-down: the centered-instance stage's threshold instead.
        integral_refinement: "integral" (sub-pixel refinement) or None (also "none").
        integral_patch_size: Side of the refinement window.
        max_instances: At most this many instances per frame (the highest scoring).
        max_edge_length_ratio, dist_penalty_weight, n_points, min_instance_peaks,
            min_line_scores: Bottom-up grouping (`flexunet.predict.paf.PAFGrouping`).
        batch_size: Frames per network call.
        bf16: Run the networks in bfloat16 (`torch.autocast`); decoding stays float32.

    Returns:
        A `Predictor`; `predictor(frames)` returns `Predictions`.

    Raises:
        FileNotFoundError: a folder or one of its files is missing.
        ValueError: the folders do not pair, a config or option is invalid.
    """
    options = _options(peak_threshold, centroid_threshold, keypoint_threshold, integral_refinement,
                       integral_patch_size, max_instances, batch_size, max_edge_length_ratio=max_edge_length_ratio,
                       dist_penalty_weight=dist_penalty_weight, n_points=n_points,
                       min_instance_peaks=min_instance_peaks, min_line_scores=min_line_scores)
    if not isinstance(bf16, bool):
        raise TypeError(f"bf16 must be True or False, got {bf16!r}.")
    paths = _resolve_folders(folders)
    infos = [read_model_info(p) for p in paths]
    order = _pair(infos)
    return Predictor(_stages([infos[i] for i in order], bf16), options)


__all__ = ["BatchPredictor", "Options", "Predictor", "Stage", "load_predictor"]

"""What prediction needs from a SLEAP model folder beyond the network: model type, skeleton,
channel names, classes and preprocessing, read from `training_config.json` (Keras, SLEAP <= 1.4)
or `training_config.yaml` (sleap-nn) the way sleap-nn reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from flexunet.io.config_tree import read_json, read_yaml
from flexunet.io.folders import KERAS_FILES, SLEAP_NN_FILES, require_kind

# SLEAP's Keras head sections -> sleap-nn's model type names.
_KERAS_TYPES = {"single_instance": "single_instance", "centroid": "centroid", "centered_instance": "centered_instance",
                "multi_instance": "bottomup", "multi_class_bottomup": "multi_class_bottomup",
                "multi_class_topdown": "multi_class_topdown"}
MODEL_TYPES = tuple(_KERAS_TYPES.values())


@dataclass(frozen=True)
class ModelInfo:
    """A model folder's prediction settings.

    Attributes:
        folder: The model folder.
        kind: "keras" or "sleap_nn".
        model_type: One of `MODEL_TYPES`.
        node_names: Skeleton nodes, in confidence-map channel order.
        skeleton_edges: Skeleton edges as node index pairs.
        paf_edges: Bottom-up: the PAF edges as channel index pairs, in PAF channel order.
        classes: Multi-class models: class (track) names in output order.
        anchor_part: Centroid and centered-instance models: the anchor node, if any.
        ensure_rgb, ensure_grayscale, max_height, max_width, scale, crop_size: preprocessing
            (None where the config leaves a value unset).
    """

    folder: str
    kind: str
    model_type: str
    node_names: tuple[str, ...]
    skeleton_edges: tuple[tuple[int, int], ...] = ()
    paf_edges: tuple[tuple[int, int], ...] = ()
    classes: tuple[str, ...] = ()
    anchor_part: Optional[str] = None
    ensure_rgb: Optional[bool] = None
    ensure_grayscale: Optional[bool] = None
    max_height: Optional[int] = None
    max_width: Optional[int] = None
    scale: float = 1.0
    crop_size: Optional[int] = None
    skeleton_name: str = field(default="Skeleton-0", compare=False)


def _section(config: Any, *keys: str) -> dict:
    """A nested mapping, or {} where any level is missing or null."""
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else {}


def _names(value: Any, source: str, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source}: {path} must be a list of names, got {value!r}.")
    return tuple(value)


def _edge_indices(edges: Any, names: tuple[str, ...], source: str, path: str) -> tuple[tuple[int, int], ...]:
    """Edges given as name pairs (or sleap-nn's source/destination mappings) as index pairs."""
    out = []
    for edge in edges or []:
        if isinstance(edge, dict):
            edge = (_section(edge, "source").get("name"), _section(edge, "destination").get("name"))
        if not (isinstance(edge, (list, tuple)) and len(edge) == 2 and all(e in names for e in edge)):
            raise ValueError(f"{source}: {path} has the edge {edge!r}, but the nodes are {list(names)}.")
        out.append((names.index(edge[0]), names.index(edge[1])))
    return tuple(out)


def _keras_skeleton(config: dict, source: str) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...], str]:
    """Nodes and edges of the first skeleton in `data.labels.skeletons` (SLEAP's jsonpickle format).

    Decoded by sleap-io, which reads the format as data (nothing in it is run).
    """
    skeletons = _section(config, "data", "labels").get("skeletons")
    if not skeletons:
        return (), (), "Skeleton-0"
    try:
        from sleap_io.io.skeleton import SkeletonDecoder
    except ImportError:
        raise ImportError(f"{source}: reading a SLEAP <= 1.4 skeleton (jsonpickle) needs sleap-io: "
                          "pip install \"flexunet[predict]\"") from None

    try:
        skeleton = SkeletonDecoder().decode(skeletons)[0]
    except Exception as err:  # malformed jsonpickle: say where
        raise ValueError(f"{source}: data.labels.skeletons could not be read as a SLEAP skeleton: {err}") from None
    names = tuple(node.name for node in skeleton.nodes)
    edges = tuple((names.index(e.source.name), names.index(e.destination.name)) for e in skeleton.edges)
    return names, edges, skeleton.name or "Skeleton-0"


def _sleap_nn_skeleton(config: dict, source: str) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...], str]:
    """Nodes and edges of the first skeleton in `data_config.skeletons`."""
    skeletons = _section(config, "data_config").get("skeletons")
    if isinstance(skeletons, dict):  # older files key skeletons by name
        skeletons = [dict(v, name=k) if isinstance(v, dict) else v for k, v in skeletons.items()]
    if not isinstance(skeletons, list) or not skeletons or not isinstance(skeletons[0], dict):
        return (), (), "Skeleton-0"
    skeleton = skeletons[0]
    nodes = skeleton.get("nodes") or []
    names = tuple(n.get("name") if isinstance(n, dict) else n for n in nodes)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: data_config.skeletons[0].nodes must be names, got {nodes!r}.")
    edges = _edge_indices(skeleton.get("edges"), names, source, "data_config.skeletons[0].edges")
    return names, edges, str(skeleton.get("name") or "Skeleton-0")


def _flag(section: dict, key: str, source: str) -> Optional[bool]:
    value = section.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{source}: preprocessing.{key} must be true, false or null, got {value!r}.")
    return value


def _int_or_none(value: Any, source: str, path: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {path} must be a positive integer or null, got {value!r}.")
    return value


def read_model_info(folder: str | os.PathLike) -> ModelInfo:
    """Prediction settings of a Keras or sleap-nn model folder.

    Raises:
        FileNotFoundError: the folder or its training config is missing.
        ValueError: naming the file and entry that is malformed.
    """
    folder = os.fspath(folder)
    kind = require_kind(folder)
    if kind == "keras":
        source = os.path.join(folder, KERAS_FILES[0])
        config = read_json(source)
        heads = _section(config, "model", "heads")
        pre = _section(config, "data", "preprocessing")
        names, edges, skeleton_name = _keras_skeleton(config, source)
        types = {k: _KERAS_TYPES[k] for k in _KERAS_TYPES if heads.get(k) is not None}
        settings = dict(ensure_rgb=_flag(pre, "ensure_rgb", source), ensure_grayscale=_flag(pre, "ensure_grayscale", source),
                        max_height=_int_or_none(pre.get("target_height"), source, "data.preprocessing.target_height"),
                        max_width=_int_or_none(pre.get("target_width"), source, "data.preprocessing.target_width"),
                        scale=pre.get("input_scaling", 1.0) if pre.get("input_scaling") is not None else 1.0,
                        crop_size=_int_or_none(_section(config, "data", "instance_cropping").get("crop_size"),
                                               source, "data.instance_cropping.crop_size"))
        heads_path = "model.heads"
    else:
        source = os.path.join(folder, SLEAP_NN_FILES[0])
        config = read_yaml(source)
        heads = _section(config, "model_config", "head_configs")
        pre = _section(config, "data_config", "preprocessing")
        names, edges, skeleton_name = _sleap_nn_skeleton(config, source)
        types = {k: k for k in MODEL_TYPES if heads.get(k) is not None}
        path = "data_config.preprocessing"
        settings = dict(ensure_rgb=_flag(pre, "ensure_rgb", source), ensure_grayscale=_flag(pre, "ensure_grayscale", source),
                        max_height=_int_or_none(pre.get("max_height"), source, f"{path}.max_height"),
                        max_width=_int_or_none(pre.get("max_width"), source, f"{path}.max_width"),
                        scale=pre.get("scale", 1.0) if pre.get("scale") is not None else 1.0,
                        crop_size=_int_or_none(pre.get("crop_size"), source, f"{path}.crop_size"))
        heads_path = "model_config.head_configs"
    if len(types) != 1:
        raise ValueError(f"{source}: {heads_path} must set exactly one model type; got {sorted(types) or 'none'}.")
    section_name, model_type = next(iter(types.items()))
    head = heads[section_name]
    # sleap-nn nests every confidence-map head under `confmaps`; Keras does so for the multi-head types.
    confmaps = head["confmaps"] if isinstance(head.get("confmaps"), dict) else head
    part_names = _names(confmaps.get("part_names"), source, f"{heads_path}.{section_name}.confmaps.part_names")
    if model_type == "centroid":
        names, edges = ("centroid",), ()
    elif not names:
        names = part_names
    elif part_names and len(part_names) != len(names):
        raise ValueError(f"{source}: the skeleton has {len(names)} nodes but the confidence maps name "
                         f"{len(part_names)} parts ({list(part_names)}).")
    paf_edges: tuple[tuple[int, int], ...] = ()
    if model_type == "bottomup":
        pafs = _section(head, "pafs")
        listed = pafs.get("edges")
        channel_names = part_names or names
        paf_edges = (_edge_indices(listed, channel_names, source, f"{heads_path}.{section_name}.pafs.edges")
                     if listed else edges)
    classes: tuple[str, ...] = ()
    if model_type in ("multi_class_bottomup", "multi_class_topdown"):
        sub = "class_maps" if model_type == "multi_class_bottomup" else "class_vectors"
        classes = _names(_section(head, sub).get("classes"), source, f"{heads_path}.{section_name}.{sub}.classes")
    scale = settings["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{source}: the input scale must be a positive number, got {scale!r}.")
    settings["scale"] = float(scale)
    anchor = confmaps.get("anchor_part")
    return ModelInfo(folder=folder, kind=kind, model_type=model_type, node_names=names, skeleton_edges=edges,
                     paf_edges=paf_edges, classes=classes, anchor_part=anchor if isinstance(anchor, str) else None,
                     skeleton_name=skeleton_name, **settings)


__all__ = ["MODEL_TYPES", "ModelInfo", "read_model_info"]

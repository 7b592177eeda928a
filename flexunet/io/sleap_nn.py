"""Run models trained with sleap-nn, SLEAP's PyTorch backend since SLEAP 1.5.

A sleap-nn model folder holds `training_config.yaml` (sections `data_config`,
`model_config`, `trainer_config`) and `best.ckpt` (a Lightning checkpoint).
flexunet rebuilds the UNet and heads from `model_config` with sleap-nn's
numerics (`UNet(alignment="sleap_nn")`: its transposed convolutions are aligned
one pixel apart from Keras'), and reads the weights with a restricted unpickler
(`flexunet.io.checkpoint`): neither sleap-nn, Lightning nor OmegaConf is needed,
and nothing in the file is run.

    >>> model = flexunet.sleap.load_model("models/centroid_sleap_nn")  # dispatches here
    >>> outputs = model(images)  # {"CentroidConfmapsHead": (N, 1, H/2, W/2)}

Reading the YAML is lenient outside `model_config` and strict inside: a missing
or mistyped value is a `ValueError` naming its dotted path
(`model_config.backbone_config.unet.max_stride`), an unknown key a warning.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch

from flexunet.io.checkpoint import read_state_dict
from flexunet.io.config_tree import ConfigNode, power_of_two, read_yaml, require_unet
from flexunet.io.keras import keras_layers
from flexunet.io.weights import load_checked
from flexunet.nn.heads import HEAD_KINDS, HeadSpec
from flexunet.nn.sleap_model import SleapModel
from flexunet.nn.unet import UNet

CONFIG_FILE = "training_config.yaml"
CHECKPOINT_FILE = "best.ckpt"

BACKBONES = ("unet", "convnext", "swint")
_BACKBONE_KEYS = {*BACKBONES, "pretrained"}
_UNET_KEYS = {"in_channels", "kernel_size", "filters", "filters_rate", "max_stride", "stem_stride", "middle_block",
              "up_interpolate", "stacks", "convs_per_block", "output_stride", "block_contraction"}
_COMMON = {"sigma", "output_stride", "loss_weight"}
_CONFMAPS_KEYS = _COMMON | {"part_names", "anchor_part", "centroid_method", "centroid_fallback", "centroid_source",
                            "use_sigmoid_activation", "focal_loss_alpha", "focal_loss_beta",
                            "focal_loss_pos_threshold"}
# sleap-nn model type -> its heads in output order: (head class, config section, known keys).
MODEL_TYPES: dict[str, list[tuple[str, str, set]]] = {
    "single_instance": [("SingleInstanceConfmapsHead", "confmaps", _CONFMAPS_KEYS)],
    "centroid": [("CentroidConfmapsHead", "confmaps", _CONFMAPS_KEYS)],
    "centered_instance": [("CenteredInstanceConfmapsHead", "confmaps", _CONFMAPS_KEYS)],
    "bottomup": [("MultiInstanceConfmapsHead", "confmaps", _CONFMAPS_KEYS),
                 ("PartAffinityFieldsHead", "pafs", _COMMON | {"edges"})],
    "multi_class_bottomup": [("MultiInstanceConfmapsHead", "confmaps", _CONFMAPS_KEYS),
                             ("ClassMapsHead", "class_maps", _COMMON | {"classes"})],
    "multi_class_topdown": [("CenteredInstanceConfmapsHead", "confmaps", _CONFMAPS_KEYS),
                            ("ClassVectorsHead", "class_vectors",
                             _COMMON | {"classes", "num_fc_layers", "num_fc_units", "global_pool"})],
}
_MODEL_CONFIG_KEYS = {"backbone_config", "head_configs", "init_weights", "pretrained_backbone_weights",
                      "pretrained_head_weights", "total_params"}


# --------------------------------------------------------------------- config


def _positive(value) -> Optional[str]:
    return None if value > 0 else "must be > 0"


def _names(node: ConfigNode, key: str) -> Optional[list]:
    """A list of names (part names, classes) or of name pairs (edges), or None when null."""
    return node.get(key, list, default=None)


def _skeleton(config: Any) -> tuple[Optional[int], Optional[int]]:
    """(nodes, edges) of the first skeleton in `data_config`, read leniently (None where unknown)."""
    try:
        skeleton = config["data_config"]["skeletons"][0]
        nodes = skeleton.get("nodes")
        edges = skeleton.get("edges")
        return (len(nodes) if isinstance(nodes, list) else None, len(edges) if isinstance(edges, list) else None)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, None


def _unet(backbone: ConfigNode) -> dict:
    """UNet constructor arguments from `backbone_config.unet`."""
    unet = require_unet(backbone, BACKBONES).section("unet", _UNET_KEYS)
    stem = unet.get("stem_stride", int, default=None)
    if stem is not None:
        raise ValueError(f"{unet.source}: {unet.path}.stem_stride is {stem}; flexunet runs sleap-nn UNets without "
                         "a stem (stem_stride: null) only.")
    stacks = unet.get("stacks", int, default=1)
    if stacks != 1:
        raise ValueError(f"{unet.source}: {unet.path}.stacks is {stacks}; sleap-nn runs single-stack UNets only, "
                         "so flexunet reads stacks: 1.")
    if unet.get("block_contraction", bool, default=False):
        raise ValueError(f"{unet.source}: {unet.path}.block_contraction is true; flexunet reads sleap-nn UNets "
                         "without block contraction only.")
    max_stride = unet.get("max_stride", int, check=power_of_two)
    output_stride = unet.get("output_stride", int, check=power_of_two)
    if output_stride > max_stride:
        raise ValueError(f"{unet.source}: {unet.path}.output_stride ({output_stride}) must be <= max_stride "
                         f"({max_stride}).")
    params = dict(
        filters=unet.get("filters", int, check=_positive),
        filters_rate=unet.get("filters_rate", (int, float), check=_positive),
        kernel_size=unet.get("kernel_size", int, default=3, check=_positive),
        convs_per_block=unet.get("convs_per_block", int, default=2, check=_positive),
        down_blocks=int(math.log2(max_stride)),
        middle_block=unet.get("middle_block", bool, default=True),
        up_blocks=int(math.log2(max_stride // output_stride)),
        up_interpolate=unet.get("up_interpolate", bool, default=True),
        in_channels=unet.get("in_channels", int, default=1, check=_positive),
        alignment="sleap_nn",
    )
    return params


def _head_entries(heads: ConfigNode, config: Any, max_stride: int) -> list[dict]:
    """`HeadSpec` arguments (and the config `path`) of the one model type set in `head_configs`,
    in sleap-nn's output order.

    Channel counts come from the config (part names, edges, classes, else the
    skeleton in `data_config`); where it leaves them open they are 0, for the
    caller to fill from the checkpoint.
    """
    chosen = [k for k in MODEL_TYPES if heads.value.get(k) is not None]
    unknown = sorted(k for k, v in heads.value.items() if k not in MODEL_TYPES and v is not None)
    if unknown and not chosen:
        raise heads.error(f"sets {unknown[0]!r}, which is not a sleap-nn model type ({', '.join(MODEL_TYPES)}).")
    if len(chosen) != 1:
        raise heads.error(f"must set exactly one of {', '.join(MODEL_TYPES)}; got {chosen or 'none'}.")
    model_type = chosen[0]
    group = heads.section(model_type, {section for _, section, _ in MODEL_TYPES[model_type]})
    nodes, edges = _skeleton(config)
    specs = []
    for kind, section, known in MODEL_TYPES[model_type]:
        node = group.section(section, known)
        stride = node.get("output_stride", int, check=power_of_two)
        activation = HEAD_KINDS[kind]
        extras: dict[str, Any] = {}
        if kind == "CentroidConfmapsHead":
            channels = 1
        elif kind == "PartAffinityFieldsHead":
            listed = _names(node, "edges")
            count = len(listed) if listed is not None else edges
            channels = 2 * count if count is not None else 0
        elif kind in ("ClassMapsHead", "ClassVectorsHead"):
            listed = _names(node, "classes")
            channels = len(listed) if listed is not None else 0
        else:
            listed = _names(node, "part_names")
            count = len(listed) if listed is not None else nodes
            channels = count if count is not None else 0
        if section == "confmaps" and node.get("use_sigmoid_activation", bool, default=False):
            activation = "sigmoid"
        if kind == "ClassVectorsHead":
            extras = dict(num_fc_layers=node.get("num_fc_layers", int, default=1),
                          num_fc_units=node.get("num_fc_units", int, default=64, check=_positive),
                          global_pool=node.get("global_pool", bool, default=True), flatten_order="nchw")
            stride = max_stride  # sleap-nn feeds it the deepest feature, whatever its output_stride says
        specs.append(dict(kind=kind, name=kind, channels=channels, output_stride=stride, activation=activation,
                          path=node.path, **extras))
    return specs


def _parse(config: Any, source: str) -> tuple[dict, list[dict]]:
    """(UNet parameters, head entries) of a parsed `training_config.yaml`."""
    if not isinstance(config, dict):
        raise ValueError(f"{source} must hold a mapping with a model_config section, got {type(config).__name__}.")
    model = ConfigNode(config, "", source).section("model_config", _MODEL_CONFIG_KEYS)
    params = _unet(model.section("backbone_config", _BACKBONE_KEYS))
    heads = model.section("head_configs", set(MODEL_TYPES))
    return params, _head_entries(heads, config, 2 ** params["down_blocks"])


def _build(params: dict, entries: list[dict], channels: dict[str, int], source: str) -> SleapModel:
    specs = []
    for entry in entries:
        entry = dict(entry)
        path = entry.pop("path")
        if not entry["channels"]:
            entry["channels"] = channels.get(entry["name"], 0)
        if not entry["channels"]:
            what = {"PartAffinityFieldsHead": "edges", "ClassMapsHead": "classes",
                    "ClassVectorsHead": "classes"}.get(entry["kind"], "part_names")
            raise ValueError(f"{source}: {path}.{what} is null and no skeleton in data_config says how many, so "
                             f"the {entry['kind']} head's size is unknown.")
        specs.append(HeadSpec(**entry))
    return SleapModel(UNet(**params), specs, convert_channels=True)


def model_from_sleap_nn_config(config: Any, source: str = CONFIG_FILE,
                               in_channels: Optional[int] = None) -> SleapModel:
    """Build the (untrained) model a parsed sleap-nn `training_config.yaml` describes.

    Args:
        config: The parsed YAML.
        source: File name used in error messages.
        in_channels: Input channels instead of `model_config.backbone_config.unet.in_channels`.

    Raises:
        ValueError: naming `source` and the dotted path of what is missing or wrong,
            or saying that only UNet backbones are supported.
    """
    try:
        params, entries = _parse(config, source)
        if in_channels is not None:
            params["in_channels"] = in_channels
        return _build(params, entries, {}, source)
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None


# ----------------------------------------------------------------- weights


def _checkpoint_names(model: SleapModel, state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """sleap-nn state-dict keys -> flexunet state-dict keys; the keys that map to nothing.

    Backbone layers carry the same names in both (`stack0_enc1_conv0`, ...); head
    `i` is `model.head_layers.{i}.{head}.0.*` (maps) or
    `model.head_layers.{i}.{layer}.*` (class vectors).
    """
    modules = keras_layers(model.backbone)
    paths = {m: p for p, m in model.backbone.named_modules()}
    mapping, unexpected = {}, []
    for key in state:
        parts = key.split(".")
        ours = None
        if key.startswith("model.backbone.") and len(parts) >= 4 and parts[-2] in modules:
            ours = f"backbone.{paths[modules[parts[-2]]]}.{parts[-1]}"
        elif key.startswith("model.head_layers.") and len(parts) >= 5 and parts[2].isdigit():
            index = int(parts[2])
            if index < len(model.head_specs):
                spec = model.head_specs[index]
                if spec.is_vector and len(parts) == 5:
                    ours = f"heads.{spec.name}.layers.{parts[3]}.{parts[4]}"
                elif not spec.is_vector and parts[3:5] == [spec.kind, "0"] and len(parts) == 6:
                    ours = f"heads.{spec.name}.{parts[5]}"
        if ours is None:
            unexpected.append(key)
        else:
            mapping[key] = ours
    return mapping, unexpected


def _head_channels(entries: list[dict], state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Output channels of each head as its checkpoint weights say (for heads the config leaves open)."""
    found = {}
    for i, entry in enumerate(entries):
        key = (f"model.head_layers.{i}.ClassVectorsHead.weight" if entry["kind"] == "ClassVectorsHead"
               else f"model.head_layers.{i}.{entry['kind']}.0.weight")
        if key in state and state[key].dim() >= 1:
            found[entry["name"]] = int(state[key].shape[0])
    return found


def _in_features(entries: list[dict], state: dict[str, torch.Tensor]) -> None:
    """Class vectors without global pooling: the flattened size, from the first dense layer."""
    for i, entry in enumerate(entries):
        if entry["kind"] == "ClassVectorsHead" and not entry.get("global_pool", True):
            first = "pre_classification0_fc" if entry["num_fc_layers"] else "ClassVectorsHead"
            weight = state.get(f"model.head_layers.{i}.{first}.weight")
            if weight is not None and weight.dim() == 2:
                entry["in_features"] = int(weight.shape[1])


def load_sleap_nn_model(model_dir: str | os.PathLike) -> SleapModel:
    """Load a sleap-nn model folder (`training_config.yaml` + `best.ckpt`).

    Every UNet model type sleap-nn trains is supported: single instance,
    centroid, centered instance, bottom-up (confidence maps + part affinity
    fields at their own stride), multi-class bottom-up (+ class maps) and
    multi-class top-down (+ class vectors). Outputs are keyed by sleap-nn's head
    names in its order. The model converts grayscale and RGB inputs as sleap-nn
    does (`SleapModel.convert_channels`).

    Args:
        model_dir: The model folder.

    Returns:
        A `SleapModel` in eval mode with the trained weights and sleap-nn's alignment.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: naming the file: malformed YAML or config (with the dotted
            path), a backbone other than UNet, an unreadable or unsafe checkpoint,
            or weights that do not fit the config (every mismatch listed).
    """
    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, CONFIG_FILE)
    weights_path = os.path.join(model_dir, CHECKPOINT_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sleap-nn model folder {model_dir} has no {os.path.basename(path)} ({path}).")
    try:
        params, entries = _parse(read_yaml(config_path), config_path)
    except TypeError as err:
        raise ValueError(f"{config_path}: {err}") from None
    state = read_state_dict(weights_path)
    _in_features(entries, state)
    model = _build(params, entries, _head_channels(entries, state), config_path)
    mapping, unexpected = _checkpoint_names(model, state)
    load_checked(model, {ours: state[key] for key, ours in mapping.items()},
                 f"{weights_path} does not match {config_path}:",
                 labels=("missing from the checkpoint", "not in the model"), unexpected=unexpected)
    return model.eval()


__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "MODEL_TYPES", "load_sleap_nn_model", "model_from_sleap_nn_config",
           "read_yaml"]

"""SLEAP <= 1.4 model folders (`training_config.json` + `best_model.h5`): the UNet and heads
their training config describes, with the Keras weights (`flexunet.sleap.load_model` dispatches here).

SLEAP training configs come from many versions: sections other than
`model.backbone` and `model.heads` are ignored; inside those, a missing or
mistyped value is a `ValueError` naming its JSON path, an unknown key a warning.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from flexunet.io.config_tree import ConfigNode, power_of_two, read_json, require_unet
from flexunet.io.keras import keras_state_dict, read_keras_file
from flexunet.nn.config import UNetConfig
from flexunet.nn.heads import HEAD_KINDS, HeadSpec
from flexunet.nn.sleap_model import SleapModel
from flexunet.nn.unet import UNet

BACKBONES = ("leap", "unet", "hourglass", "resnet", "pretrained_encoder")
_UNET_KEYS = {"stem_stride", "max_stride", "output_stride", "filters", "filters_rate", "middle_block",
              "up_interpolate", "stacks"}
_CONFMAPS_KEYS = {"anchor_part", "part_names", "sigma", "output_stride", "loss_weight", "offset_refinement"}
_HEAD_SECTIONS = {
    "single_instance": None,
    "centroid": None,
    "centered_instance": None,
    "multi_instance": {"confmaps": _CONFMAPS_KEYS, "pafs": {"edges", "sigma", "output_stride", "loss_weight"}},
    "multi_class_bottomup": {
        "confmaps": _CONFMAPS_KEYS,
        "class_maps": {"classes", "sigma", "output_stride", "loss_weight"},
    },
    "multi_class_topdown": {
        "confmaps": _CONFMAPS_KEYS,
        "class_vectors": {"classes", "num_fc_layers", "num_fc_units", "global_pool", "output_stride",
                          "loss_weight"},
    },
}


def _names_check(value) -> Optional[str]:
    if not all(isinstance(v, (str, type(None))) for v in value):
        return "must be a list of names"
    return None


def _count(section: ConfigNode, key: str) -> Optional[int]:
    """len() of a list entry (part names, edges, classes), or None when it is null."""
    value = section.get(key, list, default=None, check=_names_check if key != "edges" else None)
    return None if value is None else len(value)


def _backbone_and_heads(config: Any, source: str) -> tuple[UNetConfig, list[dict]]:
    if not isinstance(config, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(config).__name__}.")
    model = ConfigNode(config, "", source).section("model")
    backbone = require_unet(model.section("backbone", set(BACKBONES)), BACKBONES)
    unet = backbone.section("unet", _UNET_KEYS)
    head_list = _head_entries(model.section("heads", set(_HEAD_SECTIONS)))
    stem = unet.get("stem_stride", int, default=None, check=power_of_two)
    kwargs = dict(
        stem_stride=stem,
        max_stride=unet.get("max_stride", int, check=power_of_two),
        # SLEAP sets the backbone's output stride from the first head, not from this field.
        output_stride=head_list[0]["output_stride"],
        filters=unet.get("filters", int, check=lambda v: None if v >= 1 else "must be >= 1"),
        filters_rate=unet.get("filters_rate", (int, float), check=lambda v: None if v > 0 else "must be > 0"),
        middle_block=unet.get("middle_block", bool, default=True),
        up_interpolate=unet.get("up_interpolate", bool, default=False),
        stacks=unet.get("stacks", int, default=1, check=lambda v: None if v >= 1 else "must be >= 1"),
    )
    try:
        return UNetConfig(**kwargs), head_list
    except ValueError as err:
        raise ValueError(f"{source}: model.backbone.unet: {err}") from None


def _head_entries(heads: ConfigNode) -> list[dict]:
    """Heads in SLEAP's output order: kind, channels (None if unknown), stride, extras."""
    chosen = [k for k in _HEAD_SECTIONS if heads.value.get(k) is not None]
    if len(chosen) != 1:
        raise heads.error(
            f"must set exactly one of {', '.join(_HEAD_SECTIONS)}; got {chosen or 'none'}."
        )
    key = chosen[0]
    stride = lambda sec: sec.get("output_stride", int, check=power_of_two)  # noqa: E731

    def confmaps(sec: ConfigNode, kind: str) -> list[dict]:
        if kind == "CentroidConfmapsHead":
            channels, parts = 1, 1
        else:
            channels = parts = _count(sec, "part_names")
        entries = [dict(kind=kind, channels=channels, output_stride=stride(sec), path=f"{sec.path}.part_names")]
        if sec.get("offset_refinement", bool, default=False):
            entries.append(dict(kind="OffsetRefinementHead", channels=None if parts is None else 2 * parts,
                                output_stride=stride(sec), path=f"{sec.path}.part_names"))
        return entries

    if key in ("single_instance", "centroid", "centered_instance"):
        sec = heads.section(key, _CONFMAPS_KEYS)
        kind = {"single_instance": "SingleInstanceConfmapsHead", "centroid": "CentroidConfmapsHead",
                "centered_instance": "CenteredInstanceConfmapsHead"}[key]
        entries = confmaps(sec, kind)
        return entries
    group = heads.section(key, set(_HEAD_SECTIONS[key]))
    conf_kind = "CenteredInstanceConfmapsHead" if key == "multi_class_topdown" else "MultiInstanceConfmapsHead"
    conf = group.section("confmaps", _HEAD_SECTIONS[key]["confmaps"])
    entries = confmaps(conf, conf_kind)
    offset = entries[1:]
    entries = entries[:1]
    if key == "multi_instance":
        pafs = group.section("pafs", _HEAD_SECTIONS[key]["pafs"])
        edges = _count(pafs, "edges")
        entries.append(dict(kind="PartAffinityFieldsHead", channels=None if edges is None else 2 * edges,
                            output_stride=stride(pafs), path=f"{pafs.path}.edges"))
    elif key == "multi_class_bottomup":
        maps = group.section("class_maps", _HEAD_SECTIONS[key]["class_maps"])
        entries.append(dict(kind="ClassMapsHead", channels=_count(maps, "classes"),
                            output_stride=stride(maps), path=f"{maps.path}.classes"))
    else:
        vec = group.section("class_vectors", _HEAD_SECTIONS[key]["class_vectors"])
        entries.append(dict(
            kind="ClassVectorsHead", channels=_count(vec, "classes"), output_stride=stride(vec),
            path=f"{vec.path}.classes",
            num_fc_layers=vec.get("num_fc_layers", int, default=1, check=lambda v: None if v >= 0 else "must be >= 0"),
            num_fc_units=vec.get("num_fc_units", int, default=64, check=lambda v: None if v >= 1 else "must be >= 1"),
            global_pool=vec.get("global_pool", bool, default=True),
        ))
    return entries + offset


def _head_specs(entries: list[dict], stacks: int, layers: Optional[dict], activations: dict, source: str):
    """HeadSpecs, one per head and stack, named and sized from the weights when given."""
    specs = []
    for entry in entries:
        kind = entry["kind"]
        per_stack = 1 if kind == "ClassVectorsHead" else stacks
        for stack in range(per_stack):
            name = f"{kind}_{stack}"
            if layers is not None and name not in layers and kind in layers and per_stack == 1:
                name = kind  # older SLEAP versions name single-stack heads without an index
            channels = entry["channels"]
            if channels is None:
                weights = (layers or {}).get(name)
                if weights is None or "kernel" not in weights:
                    raise ValueError(f"{source}: {entry['path']} is missing, so the {kind} head's size is unknown.")
                channels = int(weights["kernel"].shape[-1])
            extras = {k: entry[k] for k in ("num_fc_layers", "num_fc_units", "global_pool") if k in entry}
            if kind == "ClassVectorsHead" and not entry.get("global_pool", True) and layers is not None:
                first = layers.get("pre_classification0_fc" if entry["num_fc_layers"] else name)
                if first is not None and "kernel" in first:
                    extras["in_features"] = int(first["kernel"].shape[0])
            specs.append(HeadSpec(
                kind=kind, name=name, channels=channels, output_stride=entry["output_stride"],
                activation=activations.get(name, HEAD_KINDS[kind]), stack=stack, **extras,
            ))
    return specs


def model_from_training_config(config: dict, in_channels: Optional[int] = None,
                               source: str = "training_config.json") -> SleapModel:
    """Build the untrained model a SLEAP training config describes.

    Args:
        config: The parsed `training_config.json`.
        in_channels: Input channels (default: 3 if the config's preprocessing asks
            for RGB, else 1).
        source: File name used in error messages.
    """
    unet_config, entries = _backbone_and_heads(config, source)
    if in_channels is None:
        pre = (((config.get("data") or {}).get("preprocessing")) or {}) if isinstance(config, dict) else {}
        in_channels = 3 if isinstance(pre, dict) and pre.get("ensure_rgb") is True else 1
    backbone = UNet.from_config(unet_config, in_channels=in_channels)
    return SleapModel(backbone, _head_specs(entries, unet_config.stacks, None, {}, source))


KERAS_FILES = ("training_config.json", "best_model.h5")


def _first_conv_name(backbone: UNet) -> str:
    for block in backbone.plan():
        for layer in block.layers():
            if layer.kind == "Conv2D":
                return layer.name
    raise ValueError("the backbone has no convolution.")


def _keras_outputs(model_config: Optional[dict]) -> tuple[Optional[list[str]], dict[str, str]]:
    """Output layer names (in order) and per-layer activations from a Keras graph."""
    if not isinstance(model_config, dict):
        return None, {}
    cfg = model_config.get("config")
    if not isinstance(cfg, dict):
        return None, {}
    outputs = cfg.get("output_layers")
    names = [o[0] for o in outputs] if isinstance(outputs, list) and all(
        isinstance(o, list) and o and isinstance(o[0], str) for o in outputs) else None
    activations = {}
    layers = cfg.get("layers")
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and isinstance(layer.get("config"), dict):
            act = layer["config"].get("activation")
            if isinstance(act, str):
                activations[layer.get("name") or layer["config"].get("name")] = act
    return names, activations


def load_keras_folder(model_dir: str) -> SleapModel:
    """Load a SLEAP <= 1.4 Keras model folder (`training_config.json` + `best_model.h5`); see `flexunet.sleap.load_model`."""
    config_path, weights_path = (os.path.join(model_dir, name) for name in KERAS_FILES)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SLEAP model folder {model_dir} has no {os.path.basename(path)} ({path}).")
    config = read_json(config_path)
    unet_config, entries = _backbone_and_heads(config, config_path)
    layers, model_config = read_keras_file(weights_path)
    output_names, activations = _keras_outputs(model_config)

    probe = UNet.from_config(unet_config, in_channels=1)
    first = _first_conv_name(probe)
    kernel = layers.get(first, {}).get("kernel")
    if kernel is None or kernel.ndim != 4:
        raise ValueError(f"{weights_path} has no 4-D kernel for the first layer {first!r}; is it a SLEAP UNet?")
    backbone = UNet.from_config(unet_config, in_channels=int(kernel.shape[2]))
    specs = _head_specs(entries, unet_config.stacks, layers, activations, config_path)
    if output_names is not None:
        ours = [s.name for s in specs]
        if sorted(ours) != sorted(output_names):
            raise ValueError(
                f"{weights_path} outputs {output_names}, but {config_path} describes heads {ours}."
            )
        order = {name: i for i, name in enumerate(output_names)}
        specs.sort(key=lambda s: order[s.name])
    model = SleapModel(backbone, specs)
    update = keras_state_dict(model, layers, weights_path)
    model.load_state_dict({**model.state_dict(), **update})
    return model.eval()


__all__ = ["KERAS_FILES", "load_keras_folder", "model_from_training_config"]

"""Run SLEAP-trained UNet models (a folder with `training_config.json` and
`best_model.h5`) in PyTorch, heads included, with Keras' outputs.

    >>> import flexunet.sleap
    >>> model = flexunet.sleap.load_model("models/centroid")
    >>> outputs = model(images)  # {"CentroidConfmapsHead_0": (N, 1, H/4, W/4), ...}

SLEAP training configs come from many versions: sections other than
`model.backbone` and `model.heads` are ignored; inside those, a missing or
mistyped value is a `ValueError` naming its JSON path, an unknown key a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

from flexunet.config import UNetConfig
from flexunet.config_files import read_json
from flexunet.encoder_decoder import IntermediateFeature, crop_to_input
from flexunet.heads import HEAD_KINDS, HeadSpec
from flexunet.keras import keras_state_dict, read_keras_file
from flexunet.unet import UNet

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


class SleapModel(nn.Module):
    """A UNet backbone with SLEAP output heads.

    `forward(x)` takes (N, C, H, W) float images exactly as the Keras model takes
    them (after SLEAP's preprocessing) and returns a dict from each Keras output
    layer name to its tensor, in the Keras model's output order; maps are NCHW,
    class vectors (N, classes).

    Args:
        backbone: The UNet.
        heads: Head specs in output order.
    """

    def __init__(self, backbone: UNet, heads: list[HeadSpec]):
        super().__init__()
        if not heads:
            raise ValueError("a SleapModel needs at least one head.")
        self.backbone = backbone
        self.head_specs = list(heads)
        plan = backbone.plan()
        modules, self._routes = {}, []
        for spec in self.head_specs:
            if spec.stack >= backbone.stacks:
                raise ValueError(f"head {spec.name!r} reads stack {spec.stack}, but the backbone has {backbone.stacks}.")
            stack_blocks = [p for p in plan if p.stack == spec.stack and p.section != "stem"]
            decoder = [p for p in stack_blocks if p.section == "decoder"]
            if spec.output_stride == backbone.output_stride:
                route, channels = None, stack_blocks[-1].out_channels
            else:
                # As SLEAP: the first decoder input at the head's stride.
                index = next((i for i, p in enumerate(decoder) if p.in_stride == spec.output_stride), None)
                if index is None:
                    strides = sorted({backbone.output_stride, *(p.in_stride for p in decoder)})
                    raise ValueError(
                        f"head {spec.name!r} has output_stride {spec.output_stride}, but the backbone only "
                        f"provides features at strides {strides}."
                    )
                route, channels = index, decoder[index].in_channels
            if spec.name in modules:
                raise ValueError(f"head names must be unique, {spec.name!r} appears twice.")
            modules[spec.name] = spec.make_head(channels)
            self._routes.append((spec.name, spec.stack, route))
        self.heads = nn.ModuleDict(modules)
        self._needs_features = any(route is not None for _, _, route in self._routes)

    @property
    def in_channels(self) -> int:
        """Channels of the input images."""
        return self.backbone.in_channels

    @property
    def maximum_stride(self) -> int:
        """Input height and width must be multiples of this."""
        return self.backbone.maximum_stride

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a `ValueError`/`TypeError` naming what is wrong with an input batch."""
        self.backbone.check_input(x)

    @property
    def pad_to_stride(self) -> bool:
        """Accept any input size: pad to the maximum stride and crop the maps back (see UNet)."""
        return self.backbone.pad_to_stride

    @pad_to_stride.setter
    def pad_to_stride(self, value: bool) -> None:
        self.backbone.pad_to_stride = bool(value)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run backbone and heads; returns `{output layer name: tensor}` in output order."""
        # Heads see the padded features (as SLEAP runs them on padded images); maps are cropped after.
        outputs, features, size = self.backbone._run_padded(x, keep_features=self._needs_features)
        result = {}
        for spec, (name, stack, route) in zip(self.head_specs, self._routes):
            source = outputs[stack] if route is None else features[stack][route].tensor
            out = self.heads[name](source)
            if size is not None and not spec.is_vector:
                out = crop_to_input(out, spec.output_stride, size)
            result[name] = out
        return result

    def to_config(self) -> dict[str, Any]:
        """Everything needed to rebuild the model (see `flexunet.save`)."""
        return {"backbone": self.backbone.to_dict(), "heads": [h.to_dict() for h in self.head_specs]}


# ----------------------------------------------------------------- JSON reading


class _Json:
    """A value inside a JSON document, remembering its path for error messages."""

    def __init__(self, value: Any, path: str, source: str):
        self.value, self.path, self.source = value, path, source

    def _join(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: {self.path} {message}")

    def section(self, key: str, known: Optional[set] = None, required: bool = True) -> Optional["_Json"]:
        """A sub-object; warn about keys outside `known`."""
        if not isinstance(self.value, dict):
            raise self.error(f"must be a JSON object, got {type(self.value).__name__}.")
        child = _Json(self.value.get(key), self._join(key), self.source)
        if child.value is None:
            if required:
                raise child.error("is missing.")
            return None
        if not isinstance(child.value, dict):
            raise child.error(f"must be a JSON object, got {type(child.value).__name__}.")
        if known is not None:
            for extra in sorted(set(child.value) - known):
                warnings.warn(f"{self.source}: unknown key {child.path}.{extra} ignored.", stacklevel=4)
        return child

    def get(self, key: str, kind, default: Any = ..., check=None) -> Any:
        """A leaf value of Python type(s) `kind`; `default` if absent (else it is required)."""
        value = self.value.get(key) if isinstance(self.value, dict) else None
        path = self._join(key)
        if value is None:
            if default is ...:
                raise ValueError(f"{self.source}: {path} is missing.")
            return default
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _tuple(kind))
        if not ok:
            names = " or ".join(k.__name__ for k in _tuple(kind))
            raise ValueError(f"{self.source}: {path} must be {names}, got {value!r}.")
        if check is not None:
            problem = check(value)
            if problem:
                raise ValueError(f"{self.source}: {path} {problem}, got {value!r}.")
        return value


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _names_check(value) -> Optional[str]:
    if not all(isinstance(v, (str, type(None))) for v in value):
        return "must be a list of names"
    return None


def _stride_check(value) -> Optional[str]:
    return None if value >= 1 and not value & (value - 1) else "must be a power of two"


def _count(section: _Json, key: str) -> Optional[int]:
    """len() of a list entry (part names, edges, classes), or None when it is null."""
    value = section.get(key, list, default=None, check=_names_check if key != "edges" else None)
    return None if value is None else len(value)


def unet_config_from_training_config(config: dict, source: str = "training_config.json") -> UNetConfig:
    """The `UNetConfig` of a SLEAP training config, output stride taken from its heads."""
    return _backbone_and_heads(config, source)[0]


def _backbone_and_heads(config: Any, source: str) -> tuple[UNetConfig, list[dict]]:
    if not isinstance(config, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(config).__name__}.")
    model = _Json(config, "", source).section("model")
    backbone = model.section("backbone", set(BACKBONES))
    chosen = [k for k in BACKBONES if backbone.value.get(k) is not None]
    if chosen != ["unet"]:
        if not chosen:
            raise backbone.error(f"names no backbone; flexunet supports 'unet' (one of {', '.join(BACKBONES)}).")
        other = [k for k in chosen if k != "unet"]
        raise backbone.error(
            f"uses the {other[0]!r} backbone; flexunet supports only 'unet' backbones."
        )
    unet = backbone.section("unet", _UNET_KEYS)
    head_list = _head_entries(model.section("heads", set(_HEAD_SECTIONS)))
    stem = unet.get("stem_stride", int, default=None, check=_stride_check)
    kwargs = dict(
        stem_stride=stem,
        max_stride=unet.get("max_stride", int, check=_stride_check),
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


def _head_entries(heads: _Json) -> list[dict]:
    """Heads in SLEAP's output order: kind, channels (None if unknown), stride, extras."""
    chosen = [k for k in _HEAD_SECTIONS if heads.value.get(k) is not None]
    if len(chosen) != 1:
        raise heads.error(
            f"must set exactly one of {', '.join(_HEAD_SECTIONS)}; got {chosen or 'none'}."
        )
    key = chosen[0]
    stride = lambda sec: sec.get("output_stride", int, check=_stride_check)  # noqa: E731

    def confmaps(sec: _Json, kind: str) -> list[dict]:
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


def load_model(model_dir: str | os.PathLike) -> SleapModel:
    """Load a SLEAP model folder (`training_config.json` + `best_model.h5`).

    The backbone comes from `model.backbone.unet` with the output stride SLEAP
    derives from the heads; the heads from `model.heads`; the input channels,
    head names and any sizes the config leaves open from the weights.

    Args:
        model_dir: The model folder.

    Returns:
        A `SleapModel` in eval mode with the trained weights.

    Raises:
        FileNotFoundError: the folder, `training_config.json` or `best_model.h5` is missing.
        ValueError: the config is malformed or not a UNet, or the weights disagree
            with it (the message lists the layers).
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"SLEAP model folder not found: {model_dir}")
    try:
        return _load_model(model_dir)
    except (ValueError, TypeError) as err:
        message = str(err)
        if model_dir not in message:
            message = f"{model_dir}: {message}"
        raise ValueError(message) from None


def _load_model(model_dir: str) -> SleapModel:
    """`load_model` once the folder is known to exist."""
    config_path = os.path.join(model_dir, "training_config.json")
    weights_path = os.path.join(model_dir, "best_model.h5")
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


__all__ = ["IntermediateFeature", "SleapModel", "load_model", "model_from_training_config",
           "unet_config_from_training_config"]

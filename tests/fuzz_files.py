"""Damage the reference files in many ways and check each load ends well.

Run as a script (the test runs it in a child process, so that a crash of the
HDF5 library would show as a failed test, not a dead test runner):

    python tests/fuzz_files.py --seed 0 --cases 300 --out summary.json

Every case either loads and runs, or raises one of the documented exceptions
(`OSError`, including `FileNotFoundError`, or `ValueError`) with a message that
names the damaged file. Anything else is reported as unexpected.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flexunet  # noqa: E402
from tests.conftest import BACKBONES, REFERENCE, SLEAP_MODELS  # noqa: E402

TINY = dict(filters=8, filters_rate=2, down_blocks=4, up_blocks=4)
DOCUMENTED = (OSError, ValueError)


# ----------------------------------------------------------------- mutations of bytes


def flip_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "flip bits"


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])
    return "truncate"


def zero_block(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(16, 4096))
    data[start:end] = bytes(end - start)
    path.write_bytes(bytes(data))
    return "zero a block"


def replace_with_text(path: Path, rng: random.Random) -> str:
    path.write_bytes(rng.choice([b"", b"hello", b"\x89PNG\r\n\x1a\n" + bytes(100), b"{}"]))
    return "wrong format"


BYTE_MUTATIONS = [flip_bytes, truncate, zero_block, replace_with_text]


# ------------------------------------------------------------- mutations of HDF5 structure


def _datasets(f: h5py.File) -> list[str]:
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _groups(f: h5py.File) -> list[str]:
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Group) else None)
    return names


def h5_delete_dataset(f, rng):
    del f[rng.choice(_datasets(f))]
    return "delete a dataset"


def h5_rename_group(f, rng):
    name = rng.choice(_groups(f))
    f.move(name, name + "_renamed")
    return "rename a group"


def h5_delete_attribute(f, rng):
    holders = [f] + [f[g] for g in _groups(f)]
    holder = rng.choice([h for h in holders if len(h.attrs)] or [f])
    if len(holder.attrs):
        del holder.attrs[rng.choice(list(holder.attrs))]
    return "delete an attribute"


def h5_wrong_shape(f, rng):
    name = rng.choice(_datasets(f))
    shape = f[name].shape
    del f[name]
    new = tuple(max(1, d + rng.choice([-1, 1])) for d in shape) or (2,)
    f[name] = np.zeros(new, dtype="float32")
    return "wrong shape"


def h5_wrong_dtype(f, rng):
    name = rng.choice(_datasets(f))
    shape = f[name].shape
    del f[name]
    f[name] = rng.choice([np.zeros(shape, dtype="int32"), np.zeros(shape, dtype="complex64"),
                          np.array(b"text"), np.zeros(shape, dtype="float16")])
    return "wrong dtype"


def h5_bad_attribute(f, rng):
    target = f if rng.random() < 0.5 else f.get("model_weights", f)
    key = rng.choice(["model_config", "layer_names", "keras_version"])
    target.attrs[key] = rng.choice(["{not json", "[]", '{"config": 3}', np.array([1, 2, 3]), ""])
    return f"bad {key}"


H5_MUTATIONS = [h5_delete_dataset, h5_rename_group, h5_delete_attribute, h5_wrong_shape, h5_wrong_dtype,
                h5_bad_attribute]


def mutate_h5(path: Path, rng: random.Random) -> str:
    if rng.random() < 0.45:
        return rng.choice(BYTE_MUTATIONS)(path, rng)
    with h5py.File(path, "r+") as f:
        return rng.choice(H5_MUTATIONS)(f, rng)


# ------------------------------------------------------------------ mutations of JSON


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path


def mutate_json(path: Path, rng: random.Random, focus: tuple = ()) -> str:
    if rng.random() < 0.3:
        return rng.choice([flip_bytes, truncate, replace_with_text])(path, rng)
    data = json.loads(path.read_text())
    node = data
    for key in focus:
        node = node[key]
    paths = [p for p in _leaves(node) if p]
    target = rng.choice(paths)
    parent = node
    for key in target[:-1]:
        parent = parent[key]
    kind = rng.choice(["delete", "retype", "null", "extra"])
    if kind == "delete" and isinstance(parent, dict):
        del parent[target[-1]]
    elif kind == "extra" and isinstance(parent, dict):
        parent[target[-1] + "_typo"] = 1
    elif kind == "null":
        parent[target[-1]] = None
    else:
        parent[target[-1]] = rng.choice(["16", 1.5, -3, [], {}, True, 0, 10**9])
    path.write_text(json.dumps(data))
    return f"json {kind} {'.'.join(map(str, focus + target))}"


def mutate_yaml(path: Path, rng: random.Random) -> str:
    """Damage a sleap-nn training_config.yaml: its bytes, or one value inside `model_config`."""
    if rng.random() < 0.3:
        return rng.choice([flip_bytes, truncate, replace_with_text])(path, rng)
    data = yaml.safe_load(path.read_text())
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(data))
    what = mutate_json(json_path, _NoBytes(rng), focus=("model_config",))
    path.write_text(yaml.safe_dump(json.loads(json_path.read_text())))
    json_path.unlink()
    return what.replace("json", "yaml", 1)


class _NoBytes(random.Random):
    """A generator whose first draw steers `mutate_json` past its byte-level damage."""

    def __init__(self, rng: random.Random):
        super().__init__(rng.getrandbits(64))
        self._first = True

    def random(self):
        if self._first:
            self._first = False
            return 1.0
        return super().random()


def mutate_checkpoint(path: Path, rng: random.Random) -> str:
    """Damage a Lightning checkpoint: the zip's bytes, its pickle, or one tensor's storage."""
    if rng.random() < 0.4:
        return rng.choice([flip_bytes, truncate, zero_block])(path, rng)
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info.filename)) for info in z.infolist()]
    pickles = [i for i, (info, _) in enumerate(entries) if info.filename.endswith("data.pkl")]
    storages = [i for i, (info, _) in enumerate(entries) if "/data/" in info.filename]
    index = rng.choice(pickles if rng.random() < 0.5 else storages)
    info, data = entries[index]
    data = bytearray(data)
    kind = rng.choice(["flip", "truncate", "extend"])
    if kind == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    else:
        data += bytes(rng.randint(1, 64))
    entries[index] = (info, bytes(data))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, content in entries:
            z.writestr(info, content)
    return f"checkpoint {kind} {info.filename}"


# ------------------------------------------------------------------------- targets


def run_backbone(work: Path, rng: random.Random) -> str:
    path = work / "model.h5"
    shutil.copy(BACKBONES / "tiny_reference.h5", path)
    what = mutate_h5(path, rng)
    model = flexunet.UNet(**TINY).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        flexunet.load_keras_weights(model, path)
    except DOCUMENTED as err:
        if not all(torch.equal(before[k], v) for k, v in model.state_dict().items()):
            raise AssertionError(f"model changed by a failed load ({what})") from err
        _names_file(err, path, what)
        raise
    with torch.no_grad():
        model(torch.rand(1, 1, 32, 32))
    return what


def run_sleap_folder(work: Path, rng: random.Random) -> str:
    folder = work / "model"
    shutil.copytree(SLEAP_MODELS / "minimal_instance.UNet.centroid", folder)
    if rng.random() < 0.5:
        damaged = folder / "best_model.h5"
        what = mutate_h5(damaged, rng)
    else:
        damaged = folder / "training_config.json"
        what = mutate_json(damaged, rng, focus=("model",))
    return _load_and_run(flexunet.sleap.load_model, folder, damaged, what, side=32)


def run_sleap_nn_folder(work: Path, rng: random.Random) -> str:
    folder = work / "model"
    shutil.copytree(REFERENCE / "sleapnn_models" / "minimal_instance_bottomup", folder)
    if rng.random() < 0.5:
        damaged = folder / "best.ckpt"
        what = mutate_checkpoint(damaged, rng)
    else:
        damaged = folder / "training_config.yaml"
        what = mutate_yaml(damaged, rng)
    return _load_and_run(flexunet.sleap.load_model, folder, damaged, what, side=32)


def run_native(work: Path, rng: random.Random) -> str:
    folder = work / "native"
    torch.manual_seed(0)
    flexunet.save(flexunet.UNet(filters=4, down_blocks=2, up_blocks=2), folder)
    if rng.random() < 0.5:
        damaged = folder / "model.safetensors"
        what = rng.choice([flip_bytes, truncate, zero_block, replace_with_text])(damaged, rng)
    else:
        damaged = folder / "config.json"
        what = mutate_json(damaged, rng)
    return _load_and_run(flexunet.load, folder, damaged, what, side=16)


def _load_and_run(load, folder: Path, damaged: Path, what: str, side: int) -> str:
    """Load a damaged folder; a documented error must name the file, a model must run."""
    try:
        model = load(folder)
    except DOCUMENTED as err:
        _names_file(err, damaged, what, also=folder)
        raise
    with torch.no_grad():
        model(torch.rand(1, model.in_channels, side, side))
    return what


def _names_file(err: Exception, path: Path, what: str, also: Path | None = None) -> None:
    text = str(err)
    if str(path) not in text and path.name not in text and (also is None or str(also) not in text):
        raise AssertionError(f"error does not name the file ({what}): {type(err).__name__}: {text}") from err


TARGETS = {"keras_backbone": run_backbone, "sleap_folder": run_sleap_folder, "sleap_nn_folder": run_sleap_nn_folder,
           "native": run_native}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    flexunet.io.keras.READ_TIMEOUT = 10.0  # a hang in the HDF5 library becomes a ValueError after 10 s
    rng = random.Random(args.seed)
    counts: dict = {}
    unexpected, slowest = [], 0.0
    names = list(TARGETS)
    for case in range(args.cases):
        target = names[case % len(names)]
        case_rng = random.Random(rng.getrandbits(64))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            try:
                TARGETS[target](Path(tmp), case_rng)
                outcome = "loaded and ran"
            except DOCUMENTED as err:
                outcome = type(err).__name__
            except Exception as err:  # anything else is a finding
                outcome = "unexpected"
                unexpected.append({"case": case, "target": target, "error": f"{type(err).__name__}: {err}",
                                   "trace": traceback.format_exc(limit=4)})
            slowest = max(slowest, time.perf_counter() - start)
        counts.setdefault(target, {}).setdefault(outcome, 0)
        counts[target][outcome] += 1
    Path(args.out).write_text(json.dumps({"cases": args.cases, "seed": args.seed, "counts": counts,
                                          "unexpected": unexpected, "slowest_case_s": slowest}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which implementation runs a layer: timed once per layer shape on this machine, then remembered.

A 3x3 convolution or a transposed convolution in inference can run on the native
kernels or on PyTorch's own (oneDNN, or Winograd as batched products); which is
faster depends on the CPU (AVX-512, AVX2, ARM), the channels, the size and the
dtype. The first call of each layer shape times every candidate after one warm-up run:
once, and up to `ROUNDS` times interleaved while the two fastest are within
`CLEAR` of each other (at most `BUDGET_S` seconds per candidate), keeps
the fastest, and records it in `choices-<key>.json` in the private kernel cache,
keyed by CPU model and flags, PyTorch version, kernel build and thread count, so
later processes on this machine skip the measurement.

`FLEXUNET_NATIVE` forces a choice: `1` the native kernels wherever they apply,
`0` PyTorch's paths everywhere; unset, the measurement decides. `choices()` lists
what was measured; `clear()` forgets it (here and on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from flexunet.kernels import native

BUDGET_S = 0.25  # timed seconds per candidate and layer shape, after one warm-up run
ROUNDS = 3  # timed runs per candidate at most (interleaved)
CLEAR = 1.25  # a candidate this much faster than the next after one round wins without more rounds
FORMAT = "1"


_FILES: dict[tuple, Optional[Path]] = {}  # by cache setting, kernel build and thread count


def _file() -> Optional[Path]:
    """The choices file of this CPU, PyTorch, kernel build and thread count, or None without a private cache.

    Looked up on every layer call, so worked out once per cache setting, build and thread count."""
    lib = native.library()
    build = os.path.basename(getattr(lib, "_name", "none") if lib is not None else "none")
    setting = (native.cache_dir(), build, torch.get_num_threads())
    if setting not in _FILES:
        directory, _ = native.private_cache_dir()
        key = "\0".join([FORMAT, native._cpu_signature(), torch.__version__, build, str(setting[2])])
        _FILES[setting] = None if directory is None else (
            directory / f"choices-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
    return _FILES[setting]


class Choices:
    """Measured choices, by layer key (a string such as `conv3x3|float32|4x64x96x96|skip0|none|64|relu`)."""

    def __init__(self):
        self._table: Optional[dict[str, dict]] = None
        self._path: Optional[Path] = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict]:
        path = _file()
        if self._table is None or path != self._path:
            self._path, self._table = path, {}
            if path is not None and path.exists():
                try:
                    data = json.loads(path.read_text())
                    if isinstance(data, dict):
                        self._table = {k: v for k, v in data.items() if isinstance(v, dict) and "choice" in v}
                except (OSError, ValueError):
                    pass  # unreadable: measured again, and rewritten
        return self._table

    def get(self, key: str) -> Optional[str]:
        """The recorded choice for `key`, or None when it was not measured."""
        entry = self._load().get(key)
        return None if entry is None else entry["choice"]

    def known(self, key: str, candidates) -> bool:
        """Whether `key` was measured with exactly these candidates (names)."""
        entry = self._load().get(key)
        return entry is not None and entry["choice"] in candidates and set(entry.get("ms", ())) == set(candidates)

    def table(self) -> dict[str, dict]:
        """Every recorded choice: `{key: {"choice": name, "ms": {name: milliseconds}}}`."""
        return {k: dict(v) for k, v in self._load().items()}

    def run(self, key: str, candidates: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        """The result of the fastest of `candidates` for `key`: the recorded one, or measured now (also when
        the recorded measurement timed other candidates: a new version may bring new ones)."""
        if self.known(key, candidates):
            return candidates[self.get(key)]()
        if len(candidates) == 1:
            return next(iter(candidates.values()))()
        results, times = {}, {name: [] for name in candidates}
        for name, fn in candidates.items():  # warm-up: weight transforms cached, buffers allocated
            results[name] = fn()
        spent = dict.fromkeys(candidates, 0.0)
        for round_ in range(ROUNDS):
            if round_ and _clear_winner(times):
                break  # more rounds only while the two fastest are within CLEAR of each other
            for name, fn in candidates.items():
                if spent[name] >= BUDGET_S:
                    continue
                start = time.perf_counter()
                results[name] = fn()
                seconds = time.perf_counter() - start
                times[name].append(seconds)
                spent[name] += seconds
        ms = {name: round(1e3 * min(t), 4) for name, t in times.items()}
        best = min(ms, key=ms.get)
        self._record(key, {"choice": best, "ms": ms})
        return results[best]

    def _record(self, key: str, entry: dict) -> None:
        with self._lock:
            table = self._load()
            table[key] = entry
            if self._path is None:
                return
            try:  # atomic: other processes see the old file or the new one
                with tempfile.NamedTemporaryFile("w", dir=self._path.parent, suffix=".tmp", delete=False) as f:
                    json.dump(table, f, indent=0, sort_keys=True)
                os.replace(f.name, self._path)
            except OSError:
                pass  # kept in memory for this process

    def clear(self) -> None:
        """Forget every choice, in this process and on disk."""
        with self._lock:
            path = _file()
            if path is not None and path.exists():
                path.unlink()
            self._table, self._path = None, None


def _clear_winner(times: dict[str, list]) -> bool:
    best = sorted(min(t) for t in times.values())
    return len(best) < 2 or best[0] * CLEAR < best[1]


CHOICES = Choices()


def choices() -> dict[str, dict]:
    """What this machine measured: `{layer key: {"choice": name, "ms": {name: milliseconds}}}`, names among
    "native", "onednn", "onednn relu" (its ReLU fused), "winograd" (convolutions), "gemm" (transposed),
    "native fp32" / "gemm fp32" (bfloat16 layers computed in float32) and "torch" (weight gradients,
    pooling, the upsampling's adjoint)."""
    return CHOICES.table()


def clear() -> None:
    """Forget the measured choices (they are measured again at the next call of each layer shape)."""
    CHOICES.clear()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def conv3x3_key(x: torch.Tensor, cout: int, dtype: torch.dtype, relu: bool, skip: Optional[torch.Tensor],
                upsample: str, cached: bool = True) -> str:
    """Inference (`cached`: transformed weights kept) and training calls are timed apart."""
    n, cx, h, w = x.shape
    cs = 0 if skip is None else skip.shape[1]
    return (f"conv3x3|{_name(dtype)}|{n}x{cx}x{h}x{w}|skip{cs}|{upsample}|{cout}"
            f"|{'relu' if relu else 'linear'}{'' if cached else '|train'}")


def weight_grad_key(x: torch.Tensor, grad: torch.Tensor, skip: Optional[torch.Tensor], upsample: str) -> str:
    n, cx, h, w = x.shape
    cs = 0 if skip is None else skip.shape[1]
    dtypes = "/".join(_name(t.dtype) for t in (x, grad))
    return f"conv3x3_weight_grad|{dtypes}|{n}x{cx}x{h}x{w}|skip{cs}|{upsample}|{grad.shape[1]}"


def transposed_key(x: torch.Tensor, cout: int, dtype: torch.dtype, bias: bool, kernel: int, stride: int,
                   crop: int) -> str:
    n, cin, h, w = x.shape
    return (f"transposed|{_name(dtype)}|{n}x{cin}x{h}x{w}|{cout}|k{kernel}s{stride}c{crop}"
            f"|{'bias' if bias else 'nobias'}")


def pool_key(x: torch.Tensor) -> str:
    n, c, h, w = x.shape
    return f"max_pool2x2|{_name(x.dtype)}|{n}x{c}x{h}x{w}"


def upsample_adjoint_key(grad: torch.Tensor, start: int, mode: str) -> str:
    n, c, h, w = grad.shape
    return f"upsample2x_adjoint|{_name(grad.dtype)}|{n}x{c}x{h}x{w}|from{start}|{mode}"

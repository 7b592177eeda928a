"""Native CPU kernels: built from `flexunet/csrc` with the system C compiler at first use.

The fused Winograd convolution (`csrc/winograd.c`) keeps the transformed tiles
in cache instead of materialising them as tensors, which is what makes Winograd
beat oneDNN's direct convolution at 64-256 channels. It is compiled once per
machine with `-O3 -march=native -fopenmp` into a cache directory
(`$FLEXUNET_CACHE_DIR`, else `$XDG_CACHE_HOME/flexunet`, else
`~/.cache/flexunet`) and loaded with ctypes; it shares PyTorch's OpenMP runtime
and thread count.

Without a C compiler (or with `FLEXUNET_NATIVE=0`) everything still works: the
layers fall back to the pure PyTorch paths, with one warning saying why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from flexunet import fastconv

SOURCE = Path(__file__).parent / "csrc" / "winograd.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
PANEL = 64  # output channels per kernel panel (NR in the C source)


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("FLEXUNET_CACHE_DIR"):
        return Path(os.environ["FLEXUNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexunet"


def _cpu_signature() -> str:
    """CPU model and feature flags: a library built with -march=native is only valid on the same CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_signature()]).encode())
    target = cache_dir() / f"winograd-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: concurrent processes see a whole file or none
    return target


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (with one warning) when they cannot be built here."""
    if os.environ.get("FLEXUNET_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    reason = None
    if compiler is None:
        reason = "no C compiler found (set CC)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
            fn = lib.flexunet_winograd_f43
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int]
            return lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = str(exc)
    warnings.warn(f"flexunet: native CPU kernels unavailable ({reason}); using the slower PyTorch paths. "
                  "Set FLEXUNET_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
    return None


def available() -> bool:
    """True when the native kernels are built and loaded."""
    return library() is not None


def supports_winograd(dtype: torch.dtype, in_channels: int, out_channels: int) -> bool:
    """Whether `winograd_conv3x3` handles inputs of this dtype and these channel counts."""
    return dtype == torch.float32 and in_channels % 16 == 0 and out_channels % 16 == 0


def pack_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """A (P, Cin, Cout) kernel in the layout the C code reads, float32: (P, Cin * Cout).

    Per position, the output channels are cut into panels of 64 (the last one
    narrower), each stored (Cin, width) row-major.
    """
    p, cin, cout = kernel.shape
    kernel = kernel.float()
    full = cout // PANEL * PANEL
    parts = [kernel[:, :, :full].reshape(p, cin, -1, PANEL).permute(0, 2, 1, 3).reshape(p, -1)]
    if full < cout:
        parts.append(kernel[:, :, full:].reshape(p, -1))
    return torch.cat(parts, dim=1).contiguous()


def transform_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A (Cout, Cin, 3, 3) weight in Winograd F(4x4, 3x3) space, packed for `winograd_conv3x3`.

    The nine taps are packed first and transformed after: the transform is linear
    per column, so this equals `pack_kernel(fastconv.winograd_kernel(weight, 4))`
    at a quarter of the copying.
    """
    cout, cin = weight.shape[:2]
    _, gg, _ = fastconv._winograd_matrices(4, torch.float32)
    taps = pack_kernel(weight.detach().float().permute(2, 3, 1, 0).reshape(9, cin, cout))
    return gg @ taps


def winograd_conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                     relu: bool = False) -> torch.Tensor:
    """3x3 'same' convolution of a float32 (N, Cin, H, W) batch by the fused F(4x4, 3x3) kernel.

    `packed` comes from `transform_kernel(weight)`. The
    result is channels-last float32; callers check `supports_winograd` first.
    """
    lib = library()
    n, cin, h, w = x.shape
    cout = packed.shape[1] // cin
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, cout, h, w), dtype=torch.float32, memory_format=torch.channels_last)
    b = None if bias is None else bias.detach().float().contiguous()
    status = lib.flexunet_winograd_f43(x.data_ptr(), n, h, w, cin, packed.data_ptr(),
                                       None if b is None else b.data_ptr(), out.data_ptr(), cout,
                                       int(relu), torch.get_num_threads())
    if status == 2:
        raise MemoryError("flexunet's Winograd kernel could not allocate its work buffers.")
    if status != 0:
        raise ValueError(f"flexunet's Winograd kernel cannot take an input of shape {tuple(x.shape)} "
                         f"with {cout} output channels (needs H, W >= 1, Cin % 16 == 0, Cout % 16 == 0).")
    return out


class WinogradConv3x3(torch.autograd.Function):
    """3x3 'same' float32 convolution for training on the fused kernel.

    Forward and input gradient (the same convolution with the kernel flipped and
    its channels swapped) run on the native kernel; the weight and bias
    gradients come from PyTorch's own convolution backward. Saves what a plain
    convolution saves: the input and the weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            return winograd_conv3x3(x, transform_kernel(weight), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).transpose(0, 1)
            grad_x = winograd_conv3x3(grad_out, transform_kernel(flipped), None)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1],
                False, [0, 0], 1, [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b

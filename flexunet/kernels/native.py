"""Native CPU kernels: built from `flexunet/kernels/csrc` with the system C compiler at first use.

One file per kernel family (`winograd.c`, `weight_grad.c`, `direct.c`,
`transposed.c`, `pooling.c`, `upsample_adjoint.c`) over shared headers (`simd.h`
vectors, `tiles.h` Winograd tiles, `microkernel.h` the register-blocked product);
`flexunet.h` is the contract: its prototypes become the ctypes signatures here, and
the constants the packing depends on are read from the library itself. The fused
Winograd convolution keeps the transformed tiles in cache instead of materialising
them as tensors, which is what makes Winograd beat oneDNN's direct convolution at
64-256 channels on AVX-512. The sources are compiled once per machine with
`-O3 -march=native -fopenmp` (`FLEXUNET_MARCH` names another target, e.g.
`x86-64-v3`) into a cache directory
(`$FLEXUNET_CACHE_DIR`, else `$XDG_CACHE_HOME/flexunet`, else
`~/.cache/flexunet`) and loaded with ctypes; it shares PyTorch's OpenMP runtime
and thread count. The cache must be private (owned by the current user, not
writable by group or others) and every library is checked against the SHA-256
recorded when it was built, so nobody else can plant code that flexunet loads.

Without a C compiler, a private cache or a verified library (or with
`FLEXUNET_NATIVE=0`) everything still works: the layers fall back to the pure
PyTorch paths, with one warning saying why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from flexunet.kernels import allocator, fastconv

CSRC = Path(__file__).parent / "csrc"
CONTRACT = CSRC / "flexunet.h"
FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wno-psabi"]
# Part of the cache key: libraries cached by flexunet versions without digest records are not reused.
CACHE_FORMAT = "3"


def sources() -> list[Path]:
    """Every file the library is built from (the C files and the headers they include)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".c", ".h"))


def march() -> str:
    """The `-march` target: `$FLEXUNET_MARCH`, else `native` (this CPU)."""
    return os.environ.get("FLEXUNET_MARCH", "").strip() or "native"


def flags() -> list[str]:
    return [*FLAGS, f"-march={march()}"]


_PROTOTYPE = re.compile(r"^int\s+flexunet_(\w+)\s*\(([^)]*)\)\s*;", re.MULTILINE)


def signatures(text: Optional[str] = None) -> dict[str, list]:
    """The ctypes argument types of every entry point, read from the prototypes in `csrc/flexunet.h`:
    pointer parameters as `c_void_p`, `int` parameters as `c_int`."""
    text = CONTRACT.read_text() if text is None else text
    result = {}
    for name, params in _PROTOTYPE.findall(text):
        args = [] if params.strip() in ("", "void") else [p.strip() for p in params.split(",")]
        for arg in args:
            if "*" not in arg and not re.fullmatch(r"int\s+\w+", arg):
                raise RuntimeError(f"{CONTRACT.name}: parameter {arg!r} of flexunet_{name} is neither a pointer nor an int")
        result[name] = [ctypes.c_void_p if "*" in arg else ctypes.c_int for arg in args]
    return result


def cache_dir() -> Path:
    """Where compiled kernels are kept (before the privacy check of `private_cache_dir`)."""
    if os.environ.get("FLEXUNET_CACHE_DIR"):
        return Path(os.environ["FLEXUNET_CACHE_DIR"])
    return default_cache_dir()


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/flexunet`, else `~/.cache/flexunet` (`%LOCALAPPDATA%\\flexunet` on Windows)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA")
    return Path(base or os.path.join(os.path.expanduser("~"), ".cache")) / "flexunet"


def _privacy_problem(path: Path) -> Optional[str]:
    """Why `path` may not hold code this process loads, or None when only the current user can write it."""
    try:
        info = path.stat()
    except OSError as err:
        return f"cannot be inspected ({err.strerror or err})"
    if not path.is_dir():
        return "is not a directory"
    if hasattr(os, "getuid"):
        if info.st_uid != os.getuid():
            return f"is owned by user id {info.st_uid}, not by the current user ({os.getuid()})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'} (mode {info.st_mode & 0o777:o})"
    return None


def private_cache_dir() -> tuple[Optional[Path], Optional[str]]:
    """(directory, None) for a cache only the current user can write, created 0700 if missing;
    (None, reason) when neither `cache_dir()` nor the default qualifies.

    A directory others can write would let them plant a library that every process
    using flexunet loads, so it is never used; `FLEXUNET_CACHE_DIR` pointing at one
    warns and falls back to the default.
    """
    candidates = [cache_dir()]
    if candidates[0] != default_cache_dir():
        candidates.append(default_cache_dir())
    reasons = []
    for path in candidates:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            reasons.append(f"{path} cannot be created ({err.strerror or err})")
            continue
        problem = _privacy_problem(path)
        if problem is None:
            if reasons:
                warnings.warn(f"flexunet: {reasons[0]}; kernels are cached in {path} instead.",
                              RuntimeWarning, stacklevel=4)
            return path, None
        reasons.append(f"the kernel cache {path} {problem}")
    return None, "; ".join(reasons)


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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_name(compiler: str) -> str:
    """`kernels-<key>.so`, the key a digest of every source and header, the compiler's version, the flags
    and the CPU: a change to any of them builds (and loads) another library."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([CACHE_FORMAT, *(f"{p.name}\0{p.read_text()}" for p in sources()), version,
                                    " ".join(flags()), _cpu_signature()]).encode())
    return f"kernels-{key.hexdigest()[:16]}.so"


def _build(compiler: str, directory: Path) -> Path:
    """The library for this source, compiler, flags and CPU in `directory`, compiled if missing.

    Its SHA-256 is recorded beside it (`.sha256`) when it is built; a library whose
    digest does not match (truncated, replaced, or not built by flexunet) is refused.
    """
    files = sources()
    target = directory / library_name(compiler)
    record = target.with_suffix(".sha256")
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags(), *(str(p) for p in files if p.suffix == ".c"),
                                     "-o", str(built)],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            digest_file = Path(tmp) / record.name
            digest_file.write_text(_digest(built))
            os.replace(digest_file, record)
            os.replace(built, target)  # atomic: concurrent processes see a whole file or none
    try:
        expected = record.read_text().strip()
    except OSError:
        raise RuntimeError(f"{target} has no digest record ({record.name}); it was not built by flexunet") from None
    if _digest(target) != expected:
        raise RuntimeError(f"{target} does not match the digest recorded when it was built "
                           "(truncated or replaced); delete it to rebuild")
    return target


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (with one warning) when they cannot be built here."""
    allocator.keep_freed_memory()  # once, at the kernels' first use (see flexunet.kernels.allocator)
    if os.environ.get("FLEXUNET_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    directory, reason = private_cache_dir()
    if directory is not None and compiler is None:
        reason = "no C compiler found (set CC)"
    elif directory is not None:
        try:
            lib = ctypes.CDLL(str(_build(compiler, directory)))
            for name, args in signatures().items():
                fn = getattr(lib, f"flexunet_{name}")
                fn.restype, fn.argtypes = ctypes.c_int, args
            # Asked once: the layers ask at every call.
            lib.bf16 = bool(lib.flexunet_has_bf16())
            lib.panel = ctypes.c_int.in_dll(lib, "flexunet_panel").value
            lib.mr = ctypes.c_int.in_dll(lib, "flexunet_mr").value
            return lib
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
            reason = str(exc)
    warnings.warn(f"flexunet: native CPU kernels unavailable ({reason}); using the slower PyTorch paths. "
                  "Set FLEXUNET_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
    return None


def available() -> bool:
    """True when the native kernels are built and loaded."""
    return library() is not None


@functools.lru_cache(maxsize=None)
def _has_avx512() -> bool:
    return " avx512f" in _cpu_signature()


def _forced() -> Optional[bool]:
    value = os.environ.get("FLEXUNET_NATIVE", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


@torch.compiler.assume_constant_result  # decided once per trace, outside the graph
def mode() -> str:
    """How inference picks its kernels: "native" (`FLEXUNET_NATIVE=1`), "torch" (`FLEXUNET_NATIVE=0`,
    or no native kernels here), else "measure" (each layer shape timed once, `flexunet.kernels.choice`)."""
    allocator.keep_freed_memory()  # at the kernels' first use, native or not (see flexunet.kernels.allocator)
    forced = _forced()
    if forced is False or not available():
        return "torch"
    return "native" if forced else "measure"


def supports_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernels compute in this dtype here (float32; bfloat16 with AVX512-BF16)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and has_bfloat16())


def has_bfloat16() -> bool:
    """True when the kernels were built with AVX512-BF16 (bfloat16 dot products)."""
    lib = library()
    return lib is not None and lib.bf16


def panel() -> int:
    """Output channels per packed kernel panel in this build (64 on AVX-512, else 16)."""
    return library().panel


def register_block() -> int:
    """Pixels per register block in this build: how far past a row the kernels read."""
    return library().mr


def round16(channels: int) -> int:
    """`channels` rounded up to a multiple of 16 (the kernels' vector width)."""
    return -(-channels // 16) * 16


def pack_kernel(kernel: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """A (P, Cin, Cout) kernel in the layout the C code reads: (P, Cin * Cout).

    Per position, the output channels are cut into panels of `panel()` (the last
    one narrower), each stored (Cin, width) row-major, or with `pairs` (bfloat16)
    (Cin / 2, width, 2): two consecutive input channels side by side.
    """
    p, cin, cout = kernel.shape
    parts, width = [], panel()
    for start in range(0, cout, width):
        part = kernel[:, :, start:start + width]
        if pairs:
            part = part.reshape(p, cin // 2, 2, -1).transpose(2, 3)
        parts.append(part.reshape(p, -1))
    return torch.cat(parts, dim=1).contiguous()


def pad_weight(weight: torch.Tensor, even_inputs: bool = False) -> torch.Tensor:
    """A (Cout, Cin, k, k) weight with zero output channels up to a multiple of 16 and, with
    `even_inputs` (bfloat16 pairs), a zero input channel when Cin is odd, as the kernels read it."""
    cout, cin = weight.shape[:2]
    extra_in = cin % 2 if even_inputs else 0
    return F.pad(weight, (0, 0, 0, 0, 0, extra_in, 0, round16(cout) - cout))


def transform_kernel(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (Cout, Cin, 3, 3) weight in Winograd space, padded (`pad_weight`) and packed for
    `winograd_conv3x3` in `dtype`. For a joined input, Cin is the skip's channels then x's.

    Both use F(4x4, 3x3) (36 positions); bfloat16 at the points 0, +-1, 1/2, -2, whose
    transforms lose less to bfloat16 rounding than float32's 0, +-1, +-2.
    The nine taps are packed first and transformed after (the transform is
    linear per column), which copies a quarter as much.
    """
    bf16 = dtype == torch.bfloat16
    padded = pad_weight(weight.detach().float(), even_inputs=bf16)
    cout, cin = padded.shape[:2]
    _, gg, _ = fastconv.winograd_matrices("4-half" if bf16 else 4, torch.float32)
    taps = pack_kernel(padded.permute(2, 3, 1, 0).reshape(9, cin, cout), pairs=bf16)
    return (gg @ taps).to(dtype)


def _padded_bias(bias: Optional[torch.Tensor], channels: int) -> torch.Tensor:
    """The bias as the kernels read it: float32, `channels` rounded up to 16, zeros after (or all zeros)."""
    out = torch.zeros(round16(channels), dtype=torch.float32)
    if bias is not None:
        out[:channels] = bias.detach()
    return out


def _call(name: str, *args) -> int:
    """Entry point `flexunet_<name>` called with `args`: tensors (passed as their data pointers, read
    and written in place), None (NULL) and ints; returns its status."""
    return getattr(library(), f"flexunet_{name}")(
        *(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args))


def _status(name: str, status: int, shape: tuple, cout: int, dtype: torch.dtype) -> None:
    if status == 2:
        raise MemoryError(f"flexunet's {name} kernel could not allocate its work buffers.")
    if status != 0:
        raise ValueError(f"flexunet's {name} kernel cannot take an input of shape {shape} with {cout} "
                         f"output channels in {dtype} (needs H, W >= 1, matching source sizes, and "
                         "AVX512-BF16 for bfloat16).")


UPSAMPLING = {None: 0, "bilinear": 1, "nearest": 2}


def winograd_conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], out_channels: int,
                     relu: bool = False, skip: Optional[torch.Tensor] = None,
                     upsample: Optional[str] = None) -> torch.Tensor:
    """3x3 'same' convolution on the fused kernel, in `packed`'s dtype, of the concatenation
    `[skip, upsample(x)]` (just `x` without `skip`; `upsample` None, "bilinear" or "nearest",
    by 2): the upsampled and concatenated input is formed while tiles are gathered, never stored.

    `packed` comes from `transform_kernel(weight, dtype)`, its input channels those
    of the skip, then x's: F(4x4, 3x3), in bfloat16 with bfloat16 products
    accumulated in float32. `relu` rectifies the output. The
    result is (N, out_channels, H, W), channels-last in that dtype; callers check
    `supports_dtype` first.
    """
    dtype = packed.dtype
    n, cx, h, w = x.shape
    factor = 2 if upsample else 1
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    cs = 0 if skip is None else skip.shape[1]
    if skip is not None:
        if tuple(skip.shape[2:]) != (h * factor, w * factor) or skip.shape[0] != n:
            raise ValueError(f"flexunet's winograd kernel needs matching source sizes: the skip is "
                             f"{tuple(skip.shape)}, x {'upsampled ' if upsample else ''}is "
                             f"{(n, cx, h * factor, w * factor)}.")
        skip = skip.to(dtype).contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, out_channels, h * factor, w * factor), dtype=dtype, memory_format=torch.channels_last)
    b = _padded_bias(bias, out_channels)
    name = "winograd_f43" if dtype == torch.float32 else "winograd_f43_bf16"
    status = _call(name, x, cx, skip, cs, UPSAMPLING[upsample], n, h * factor, w * factor, packed, b, out,
                   out_channels, int(relu), torch.get_num_threads())
    _status(name, status, tuple(x.shape), out_channels, dtype)
    return out


def winograd_weight_grad(x: torch.Tensor, grad: torch.Tensor, skip: Optional[torch.Tensor] = None,
                         upsample: Optional[str] = None) -> torch.Tensor:
    """The weight gradient (Cout, Cskip + Cx, 3, 3) of the float32 3x3 'same' convolution of
    `cat([skip, upsample(x)])` (as `winograd_conv3x3` forms it) whose output gradient is
    `grad`, computed in Winograd F(4x4, 3x3) space on the fused kernel."""
    n, cx, h, w = grad.shape[0], x.shape[1], grad.shape[2], grad.shape[3]
    cout, cs = grad.shape[1], 0 if skip is None else skip.shape[1]
    x = x.float().contiguous(memory_format=torch.channels_last)
    skip = None if skip is None else skip.float().contiguous(memory_format=torch.channels_last)
    grad = grad.float().contiguous(memory_format=torch.channels_last)
    factor = 2 if upsample else 1
    if tuple(x.shape[2:]) != (h // factor, w // factor) or h % factor or w % factor or (
            skip is not None and tuple(skip.shape[2:]) != (h, w)):
        raise ValueError(f"flexunet's weight gradient kernel needs matching source sizes: x {tuple(x.shape)}, "
                         f"skip {None if skip is None else tuple(skip.shape)}, gradient {tuple(grad.shape)}.")
    threads, cin = torch.get_num_threads(), cs + cx
    mr = register_block()
    partial = torch.empty(threads, 36, -(-cin // mr) * mr, round16(cout))
    status = _call("winograd_f43_weight_grad", x, cx, skip, cs, UPSAMPLING[upsample], grad, n, h, w, cout, partial,
                   threads)
    _status("winograd_f43_weight_grad", status, tuple(x.shape), cout, torch.float32)
    du = partial.sum(0)[:, :cin, :cout]  # (36, Cin, Cout)
    _, gg, _ = fastconv.winograd_matrices(4, torch.float32)
    return (gg.t() @ du.reshape(36, -1)).view(3, 3, cin, cout).permute(3, 2, 0, 1).contiguous()


def upsample2x_adjoint(grad: torch.Tensor, start: int, mode: str) -> torch.Tensor:
    """The gradient of a source upsampled by 2 ("bilinear", half-pixel centres, or "nearest") from
    channels `start:` of `grad` (float32, (N, C, 2h, 2w)), read in place: (N, C - start, h, w)."""
    grad = grad.float().contiguous(memory_format=torch.channels_last)
    n, channels, hh, ww = grad.shape
    out = torch.empty((n, channels - start, hh // 2, ww // 2), memory_format=torch.channels_last)
    # From channel `start` of the first pixel; pixels are `channels` apart.
    status = _call("upsample2x_adjoint", grad[:, start:], n, hh, ww, channels, channels - start, out,
                   int(mode == "bilinear"), torch.get_num_threads())
    _status("upsample2x_adjoint", status, tuple(grad.shape), channels - start, torch.float32)
    return out


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 'same' 2x2 max pooling with stride 2 (windows clipped at the bottom/right, NaN
    propagated) of a float32 or bfloat16 (N, C, H, W) batch; channels-last (N, C, ceil(H/2), ceil(W/2))."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    out = torch.empty((n, c, -(-h // 2), -(-w // 2)), dtype=x.dtype, memory_format=torch.channels_last)
    status = _call("max_pool2x2", x, n, h, w, c, out, int(x.dtype == torch.bfloat16), torch.get_num_threads())
    _status("max_pool2x2", status, tuple(x.shape), c, x.dtype)
    return out


# Input channels up to which `direct_conv3x3` is used: with so few, the Winograd transforms of every
# tile would cost more than the products they save.
DIRECT_MAX_CHANNELS = 4


def pack_direct(weight: torch.Tensor) -> torch.Tensor:
    """A (Cout, Cin, 3, 3) weight packed for `direct_conv3x3`: float32 taps, Cout padded to 16."""
    padded = pad_weight(weight.detach().float())
    return pack_kernel(padded.permute(2, 3, 1, 0).reshape(9, weight.shape[1], -1))


def direct_conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], out_channels: int,
                   relu: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """3x3 'same' convolution for few input channels (`DIRECT_MAX_CHANNELS`), float32 products,
    output channels-last in `dtype` (float32 or bfloat16). `packed` from `pack_direct`."""
    n, cin, h, w = x.shape
    # One zero row above and below, one zero column on the left, 1 + MR on the right: reads stay in bounds.
    xp = F.pad(x.float().permute(0, 2, 3, 1), (0, 0, 1, 1 + register_block(), 1, 1)).contiguous()
    out = torch.empty((n, out_channels, h, w), dtype=dtype, memory_format=torch.channels_last)
    b = _padded_bias(bias, out_channels)
    status = _call("direct3x3", xp, n, h, w, cin, packed, b, out, out_channels, int(relu),
                   int(dtype == torch.bfloat16), torch.get_num_threads())
    _status("direct3x3", status, tuple(x.shape), out_channels, dtype)
    return out


def supports_transposed(dtype: torch.dtype, in_channels: int, out_channels: int, kernel: int, stride: int) -> bool:
    """Whether `transposed_conv_k3s2` handles this layer (SLEAP's default upsampling)."""
    return (kernel == 3 and stride == 2 and in_channels % 16 == 0 and out_channels % 16 == 0
            and supports_dtype(dtype))


def pack_transposed(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (Cin, Cout, 3, 3) transposed-convolution weight packed for `transposed_conv_k3s2` in `dtype`."""
    cin, cout = weight.shape[:2]
    taps = weight.detach().float().permute(2, 3, 0, 1).reshape(9, cin, cout)
    return pack_kernel(taps, pairs=dtype == torch.bfloat16).to(dtype)


def transposed_conv_k3s2(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """TensorFlow 'same' transposed convolution, kernel 3, stride 2, on the native kernel.

    `packed` comes from `pack_transposed(weight, dtype)`; the computation runs in
    its dtype (bfloat16 products accumulate in float32). Returns (N, Cout, 2H, 2W),
    channels-last; callers check `supports_transposed` first.
    """
    n, cin, h, w = x.shape
    # One zero row on top, one zero column on the left, MR on the right: every read is in bounds.
    xp = F.pad(x.to(packed.dtype).permute(0, 2, 3, 1), (0, 0, 1, register_block(), 1, 0)).contiguous()
    cout = packed.shape[1] // cin
    out = torch.empty((n, cout, 2 * h, 2 * w), dtype=packed.dtype, memory_format=torch.channels_last)
    bf16 = packed.dtype == torch.bfloat16
    b = None if bias is None else bias.detach().float().contiguous()
    status = _call("transposed_k3s2_bf16" if bf16 else "transposed_k3s2", xp, n, h, w, cin, packed, b, out, cout,
                   torch.get_num_threads())
    _status("transposed_k3s2", status, tuple(x.shape), cout, packed.dtype)
    return out

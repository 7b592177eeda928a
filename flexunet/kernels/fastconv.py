"""CPU fast paths for the two convolutions that dominate a UNet, exact to TensorFlow.

Both work on channels-last (NHWC) data as plain matrix products, which MKL
runs near the machine's peak:

* `transposed_conv`: a 'same' transposed convolution is split into its
  `stride ** 2` output phases; every kernel tap is one GEMM of the padded,
  flattened input (rows shifted by the tap's offset) accumulated into its
  phase, and the phases are interleaved into the output once.
* `winograd_conv3x3`: Winograd F(4x4, 3x3) in float32 (F(2x2, 3x3) in
  bfloat16) for 3x3 'same' convolutions with many channels: batched GEMMs
  over the transformed tiles need 4x (2.25x) fewer multiply-adds, and each
  tile transform is one GEMM with a Kronecker product of 1-D transforms.

They are the pure-PyTorch implementations behind the `flexunet::` operators
(`flexunet.kernels.ops`) where the native kernels (`flexunet.kernels.native`)
do not apply: no C compiler, or channel counts the native kernels do not take.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

# Winograd F(m, 3) transforms (Lavin & Gray, 2016): input B^T, kernel G, output A^T.
_TRANSFORMS = {
    # F(2, 3), points 0, +-1: small coefficients, accurate enough for bfloat16.
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    # F(4, 3), points 0, +-1, +-2: 4x fewer multiplications, for float32.
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
    # F(4, 3), points 0, +-1, 1/2, -2: a third of the rounding error of +-2 when V and U are
    # rounded to bfloat16, for the native bfloat16 kernel (B^T rows scaled to integers, G's by the inverse).
    "4-half": ([[2, -3, -4, 3, 2, 0], [0, -2, 1, 5, 2, 0], [0, 2, -5, 1, 2, 0],
            [0, -2, -1, 2, 1, 0], [0, 1, -2, -1, 2, 0], [0, 2, -3, -4, 3, 2]],
           [[1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6], [-1 / 6, 1 / 6, -1 / 6],
            [-16 / 15, -8 / 15, -4 / 15], [1 / 30, -1 / 15, 2 / 15], [0, 0, 1 / 2]],
           [[1, 1, 1, 1, 1, 0], [0, 1, -1, 1 / 2, -2, 0], [0, 1, 1, 1 / 4, 4, 0], [0, 1, -1, 1 / 8, -8, 1]]),
}


def winograd_tile(dtype: torch.dtype) -> int:
    """Output tile size used for `dtype`: 4 for float32, 2 for bfloat16 (rounding)."""
    return 4 if dtype == torch.float32 else 2


@functools.lru_cache(maxsize=None)
def winograd_matrices(tile: int, dtype: torch.dtype):
    """Winograd F(tile, 3) 2-D transforms as Kronecker products: input (a*a, a*a), kernel (a*a, 9), output (m*m, a*a).

    `tile` is 2, 4, or "4-half" (F(4, 3) at the points 0, +-1, 1/2, -2).
    """
    bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in _TRANSFORMS[tile])
    return tuple(torch.kron(m, m).to(dtype) for m in (bt, g, at))


def winograd_kernel(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """Transform a (Cout, Cin, 3, 3) kernel into Winograd space: ((tile + 2) ** 2, Cin, Cout).

    The transform runs in float32 (float64 for float64 weights) and the result is
    cast to the weight's dtype.
    """
    cout, cin = weight.shape[:2]
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    _, gg, _ = winograd_matrices(tile, work)
    u = gg @ weight.to(work).permute(2, 3, 1, 0).reshape(9, cin * cout)
    return u.view(-1, cin, cout).to(weight.dtype)


class _Tiles(NamedTuple):
    n: int
    h: int
    w: int
    th: int  # tiles along H
    tw: int  # tiles along W
    m: int  # output tile size


def _winograd_input(x: torch.Tensor, m: int) -> tuple[torch.Tensor, _Tiles]:
    """Input tiles in Winograd space, ((m+2)^2, tiles, Cin), and the tiling."""
    a = m + 2
    n, cin, h, w = x.shape
    bb, _, _ = winograd_matrices(m, x.dtype)
    th, tw = -(-h // m), -(-w // m)
    # (m+2)^2 input tiles every m pixels of the padded NHWC image, gathered tap-major:
    # d[(j, k), (n, ty, tx, c)] = x_padded[n, m ty + j, m tx + k, c].
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, m * tw - w + 1, 1, m * th - h + 1))
    tiles = padded.unfold(1, a, m).unfold(2, a, m)  # (N, th, tw, Cin, a, a), a view
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(a * a, -1)
    return (bb @ d).view(a * a, n * th * tw, cin), _Tiles(n, h, w, th, tw, m)


def _winograd_output(prod: torch.Tensor, bias: Optional[torch.Tensor], t: _Tiles) -> torch.Tensor:
    """Output tiles ((m+2)^2, tiles, Cout) back to an (N, Cout, H, W) channels-last tensor."""
    m, cout = t.m, prod.shape[-1]
    _, _, aa = winograd_matrices(m, prod.dtype)
    y = (aa @ prod.reshape(prod.shape[0], -1)).view(m, m, t.n, t.th, t.tw, cout).permute(2, 3, 0, 4, 1, 5)
    b = None if bias is None else bias.to(prod.dtype)
    # A channels-last NCHW tensor, written through its NHWC view: the result is not a view.
    out = torch.empty((t.n, cout, m * t.th, m * t.tw), dtype=prod.dtype, device=prod.device,
                      memory_format=torch.channels_last)
    _store(y, b, out.permute(0, 2, 3, 1).view(t.n, t.th, m, t.tw, m, cout))
    if m * t.th != t.h or m * t.tw != t.w:
        out = out[:, :, : t.h, : t.w]
    return out


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     kernel: Optional[torch.Tensor] = None, tile: Optional[int] = None) -> torch.Tensor:
    """3x3 stride-1 'same' convolution by Winograd F(tile x tile, 3x3).

    Args:
        x: (N, Cin, H, W), best in channels-last memory.
        weight: (Cout, Cin, 3, 3).
        bias: (Cout,) or None.
        kernel: `winograd_kernel(weight, tile)` in x's dtype, if already computed
            (inference caches it).
        tile: 2 or 4; default `winograd_tile(x.dtype)`.

    Returns:
        (N, Cout, H, W) in x's dtype and channels-last memory.
    """
    m = winograd_tile(x.dtype) if tile is None else tile
    v, tiling = _winograd_input(x, m)
    u = winograd_kernel(weight.to(x.dtype), m) if kernel is None else kernel
    return _winograd_output(torch.bmm(v, u), bias, tiling)  # the bmm is the only O(Cin * Cout) work


def winograd_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The weight gradient of a 3x3 'same' convolution, computed in Winograd F(4x4, 3x3) space.

    dU = V^T dM per tile position (V: the input tiles, dM: the output transform's
    adjoint applied to `grad_out`), then dW = G^T dU: one batched product where
    the direct weight gradient needs a full correlation of input and gradient.

    Returns:
        (Cout, Cin, 3, 3), in `x`'s dtype.
    """
    v, t = _winograd_input(x.contiguous(memory_format=torch.channels_last), 4)  # (36, tiles, Cin)
    _, gg, aa = winograd_matrices(4, grad_out.dtype)
    cout, cin = grad_out.shape[1], x.shape[1]
    g = F.pad(grad_out.permute(0, 2, 3, 1), (0, 0, 0, 4 * t.tw - t.w, 0, 4 * t.th - t.h))
    g = g.reshape(t.n, t.th, 4, t.tw, 4, cout).permute(2, 4, 0, 1, 3, 5).reshape(16, -1)
    grad_m = (aa.t() @ g).view(36, -1, cout)  # adjoint of the output transform
    grad_u = torch.bmm(v.transpose(1, 2), grad_m)  # (36, Cin, Cout)
    return (gg.t() @ grad_u.view(36, -1)).view(3, 3, cin, cout).permute(3, 2, 0, 1)


def _store(value: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out[...] = value + bias in one pass (autograd-safe when gradients are on)."""
    tracked = value.requires_grad or out.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and tracked:
        out.copy_(value)
        if bias is not None:
            out.add_(bias)
    elif bias is not None:
        torch.add(value, bias, out=out)
    else:
        out.copy_(value)
    return out


def _phase_taps(kernel: int, stride: int, phase: int, crop: int) -> tuple[list[int], int]:
    """Kernel taps feeding output phase `phase` and the input offset of the first one.

    With `crop` pixels cropped from the start of the full transposed output
    (TensorFlow: `max(k - s, 0) // 2`), output `s * j + phase` sums
    `x[j + e - u] * w[t0 + s * u]`.
    """
    q = phase + crop
    t0, e = q % stride, q // stride
    taps = list(range(t0, kernel, stride))
    return taps, e


def transposed_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                    crop: Optional[int] = None) -> torch.Tensor:
    """'same' transposed convolution by GEMMs on shifted inputs.

    Every kernel tap reads the input at one shift and feeds one output phase.
    Taps are grouped by shift: one GEMM per shift computes every phase it feeds,
    accumulated (`addmm_`) into those phases' columns of a (rows, phases * Cout)
    buffer whose phase order keeps each shift's phases contiguous. The rows are
    the padded, flattened input, so a shift is just a row offset.

    Args:
        x: (N, Cin, H, W), best in channels-last memory.
        weight: (Cin, Cout, k, k), as `nn.ConvTranspose2d` stores it.
        bias: (Cout,) or None.
        stride: Upsampling factor.
        crop: Pixels cropped from the top/left of the full output; default TensorFlow's
            `max(k - stride, 0) // 2` (see `layers.ConvTranspose2dSame` for sleap-nn's).

    Returns:
        (N, Cout, H * stride, W * stride) in x's dtype and channels-last memory (callers
        under autocast cast the operands and disable autocast first, as the layer does).
    """
    n, cin, h, w = x.shape
    cout, k = weight.shape[1], weight.shape[-1]
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    plan = _transposed_plan(k, stride, max(k - stride, 0) // 2 if crop is None else crop)
    hp, wp = h + plan.before + plan.after, w + plan.before + plan.after
    pad = (0, 0, plan.before, plan.after, plan.before, plan.after)
    flat = F.pad(x.permute(0, 2, 3, 1), pad).reshape(n * hp * wp, cin)
    # Output base (n, j, i) is row n*hp*wp + j*wp + i; a shift adds a fixed offset to it.
    rows = n * hp * wp - (plan.before + plan.after) * (wp + 1)
    taps = weight.permute(2, 3, 0, 1)  # (k, k, Cin, Cout)
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # Rows past `rows` only ever hold outputs that are cropped away; without autograd the
    # buffer is allocated at full size so that the GEMMs write into it directly.
    acc = None if grad else flat.new_empty(n * hp * wp, len(plan.order) * cout)
    for i, ((dy, dx), first, fed) in enumerate(plan.shifts):
        offset = (plan.before + dy) * wp + (plan.before + dx)
        lhs = flat[offset: offset + rows]
        rhs = torch.cat([taps[th, tw] for th, tw in fed], dim=1)  # (Cin, len(fed) * Cout)
        cols = slice(first * cout, (first + len(fed)) * cout)
        if i == 0 and len(fed) == len(plan.order):  # the first GEMM initialises every column
            if grad:
                acc = F.pad(lhs @ rhs, (0, 0, 0, n * hp * wp - rows))
            else:
                torch.mm(lhs, rhs, out=acc[:rows])
            continue
        if i == 0:
            acc = flat.new_zeros(n * hp * wp, len(plan.order) * cout)
        acc[:rows, cols].addmm_(lhs, rhs)
    result = torch.empty((n, cout, h * stride, w * stride), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    out = result.permute(0, 2, 3, 1).view(n, h, stride, w, stride, cout)
    if plan.shifts:
        full = acc.view(n, hp, wp, len(plan.order), cout)
        for i, (ph, pw) in enumerate(plan.order):
            _store(full[:, :h, :w, i], bias, out[:, :, ph, :, pw, :])
    for ph, pw in plan.empty:  # a kernel smaller than the stride leaves these to the bias
        _store(x.new_zeros(n, h, w, cout), bias, out[:, :, ph, :, pw, :])
    return result


class _TransposedPlan(NamedTuple):
    before: int  # input padding at the top/left
    after: int  # and at the bottom/right
    order: list  # phases (ph, pw) in column order
    shifts: list  # ((dy, dx), first column block, [(th, tw) for each block])
    empty: list  # phases no tap reaches


@functools.lru_cache(maxsize=None)
def _transposed_plan(kernel: int, stride: int, crop: int) -> _TransposedPlan:
    """Group the taps by input shift and order the phases so each group is contiguous."""
    feeds: dict = {}  # (dy, dx) -> {(ph, pw): (th, tw)}
    phases = [_phase_taps(kernel, stride, r, crop) for r in range(stride)]
    for ph, (taps_h, eh) in enumerate(phases):
        for pw, (taps_w, ew) in enumerate(phases):
            for uh, th in enumerate(taps_h):
                for uw, tw in enumerate(taps_w):
                    feeds.setdefault((eh - uh, ew - uw), {})[(ph, pw)] = (th, tw)
    used = sorted({p for fed in feeds.values() for p in fed})
    order = _contiguous_order(used, [set(fed) for fed in feeds.values()])
    shifts = []
    # Widest group first: when it feeds every phase its GEMM initialises the buffer.
    for shift, fed in sorted(feeds.items(), key=lambda item: (-len(item[1]), item[0])):
        cols = sorted(order.index(p) for p in fed)
        runs = [[cols[0]]]
        for c in cols[1:]:  # one GEMM per run of adjacent columns
            if c == runs[-1][-1] + 1:
                runs[-1].append(c)
            else:
                runs.append([c])
        shifts += [(shift, run[0], [fed[order[c]] for c in run]) for run in runs]
    offsets = [d for shift in feeds for d in shift] or [0]
    everything = [(ph, pw) for ph in range(stride) for pw in range(stride)]
    return _TransposedPlan(max(-min(offsets), 0), max(max(offsets), 0), order, shifts,
                           [p for p in everything if p not in used])


def _contiguous_order(items: list, groups: list) -> list:
    """Order `items` so that every group is a contiguous run.

    The natural order is tried first, then every order of up to 8 phases;
    failing that, the natural order (callers split groups into runs).
    """
    def ok(order):
        pos = {p: i for i, p in enumerate(order)}
        return all(max(pos[p] for p in g) - min(pos[p] for p in g) == len(g) - 1 for g in groups)

    if ok(items):
        return list(items)
    if len(items) <= 8:
        for perm in itertools.permutations(items):
            if ok(perm):
                return list(perm)
    return list(items)  # groups are then split into runs of adjacent columns

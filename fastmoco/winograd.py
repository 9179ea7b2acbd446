"""3×3 stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3), forward and backward.

Each 2×2 block of outputs is computed from a 4×4 tile of input with 16 multiplies per input and
output channel pair instead of 36 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016): Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A, the ⊙ summed over input channels as 16 GEMMs.
torch asks oneDNN for direct convolutions on every CPU, and on an AVX2 CPU those of a wide
layer run at about the mm rate, so 2.25× fewer multiplies pay for the tile transforms where the
layer is wide (benchmarks/RESULTS.md, session of 2026-12-07 (2)). The backward pass stays in the
transformed domain: dU = Vᵀ dM and dV = dM Uᵀ, the same GEMM shapes, then the adjoint transforms.
`run.conv_winograd` chooses (fastmoco/conv_choice.py). Transforms have entries 0, ±½, ±1:
in fp32 the result differs from the direct sum by rounding only (tests/test_winograd.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# G (4×3): the filter transform; the 16×9 matrix G⊗G maps a 3×3 filter to its 4×4 transform.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Aᵀ (2×4): the output transform; each tile's 4×4 products give its 2×2 outputs.
_A_T = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))


@functools.lru_cache(maxsize=None)
def _kron_square(entries: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # once per dtype and device: on a GPU a new host tensor per call would sync the stream
    m = torch.tensor(entries, dtype=dtype, device=device)
    return torch.kron(m, m)


def _filter_matrix(like: torch.Tensor) -> torch.Tensor:
    return _kron_square(_G, like.dtype, like.device)  # (16, 9): row a*4+b, column i*3+j


def _taps_last(weight: torch.Tensor) -> torch.Tensor:
    """The weight as (C_out, 9, C_in): a free view of a channels-last weight."""
    c_out, c_in = weight.shape[:2]
    return weight.permute(0, 2, 3, 1).reshape(c_out, 9, c_in)


def filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """U = G g Gᵀ of a (C_out, C_in, 3, 3) weight, as (16, C_in, C_out) for V @ U (a view of
    (C_out, 16, C_in) memory, which the GEMM reads transposed)."""
    return torch.matmul(_filter_matrix(weight), _taps_last(weight)).permute(1, 2, 0)


def filter_transform_adjoint(grad_u_t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """dL/dg (C_out, C_in, 3, 3) from dL/dU given as (C_out, 16, C_in)."""
    dw = torch.matmul(_filter_matrix(grad_u_t).t(), grad_u_t)  # (C_out, 9, C_in): channels-last
    c_out, _, c_in = dw.shape
    dw = dw.view(c_out, 3, 3, c_in).permute(0, 3, 1, 2)
    return dw if channels_last else dw.contiguous()


def _every_other(t: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    return t[(slice(None),) * dim + (slice(start, start + 2 * count - 1, 2),)]


def _input_transform_1d(src: torch.Tensor, dim: int, tiles: int, out: torch.Tensor) -> None:
    """Bᵀd along `dim` for every tile (4 samples at stride 2): out[k] for k in 0..3."""
    s = [_every_other(src, dim, j, tiles) for j in range(4)]
    torch.sub(s[0], s[2], out=out[0])
    torch.add(s[1], s[2], out=out[1])
    torch.sub(s[2], s[1], out=out[2])
    torch.sub(s[1], s[3], out=out[3])


def _input_adjoint_1d(d: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """The adjoint of `_input_transform_1d`: B d[k] overlap-added over the tiles into `out`
    (2·tiles + 2 long along `dim`, zeroed by the caller)."""
    tiles = d.shape[dim + 1]
    even, odd = _every_other(out, dim, 0, tiles + 1), _every_other(out, dim, 1, tiles + 1)
    first = (slice(None),) * dim + (slice(0, tiles),)
    last = (slice(None),) * dim + (slice(1, tiles + 1),)
    even[first].copy_(d[0])
    even[last].add_(d[1] + d[2] - d[0])
    odd[first].copy_(d[1] - d[2] + d[3])
    odd[last].sub_(d[3])


def zero_padded_nhwc(x: torch.Tensor, top: int, bottom: int, left: int, right: int
                     ) -> torch.Tensor:
    """x (N, C, H, W, any layout) copied into an NHWC buffer with zero borders of these widths;
    only the borders are zeroed."""
    n, c, h, w = x.shape
    xp = x.new_empty(n, top + h + bottom, left + w + right, c)
    xp[:, top:top + h, left:left + w] = x.permute(0, 2, 3, 1)
    for border in (xp[:, :top], xp[:, top + h:], xp[:, top:top + h, :left],
                   xp[:, top:top + h, left + w:]):
        border.zero_()
    return xp


def tile_grid(h: int, w: int) -> tuple[int, int]:
    """Rows and columns of 2×2 output tiles over an H×W map (an odd size's last tile is cut)."""
    return (h + 1) // 2, (w + 1) // 2


def input_transform(x: torch.Tensor) -> torch.Tensor:
    """V = Bᵀ d B for every 4×4 tile (stride 2) of x zero-padded by 1 (and to even sizes):
    (16, N·tiles, C_in) from an (N, C_in, H, W) input."""
    n, c, h, w = x.shape
    th, tw = tile_grid(h, w)
    # the padding of 1, and the rows/columns that complete an odd size's tiles
    xp = zero_padded_nhwc(x, 1, 2 * th + 1 - h, 1, 2 * tw + 1 - w)
    rows = x.new_empty(4, n, th, 2 * tw + 2, c)
    _input_transform_1d(xp, 1, th, rows)
    v = x.new_empty(4, 4, n, th, tw, c)
    for i in range(4):
        _input_transform_1d(rows[i], 2, tw, v[i])
    return v.view(16, n * th * tw, c)


def input_adjoint(grad_v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """dL/dx (channels-last) from dL/dV, the adjoint of `input_transform` for input `shape`."""
    n, c, h, w = shape
    th, tw = tile_grid(h, w)
    dv = grad_v.view(4, 4, n, th, tw, c)
    rows = grad_v.new_zeros(4, n, th, 2 * tw + 2, c)
    for i in range(4):
        _input_adjoint_1d(dv[i], 2, rows[i])
    dxp = grad_v.new_zeros(n, 2 * th + 2, 2 * tw + 2, c)
    _input_adjoint_1d(rows, 1, dxp)
    dx = dxp[:, 1:h + 1, 1:w + 1]
    return dx.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _output_matrix(like: torch.Tensor) -> torch.Tensor:
    return _kron_square(_A_T, like.dtype, like.device)  # (4, 16): row a*2+b, column i*4+j


def output_transform(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Y = Aᵀ M A for every tile: (N, C_out, H, W), channels-last, from M (16, N·tiles, C_out).
    One GEMM with the 4×16 matrix Aᵀ⊗Aᵀ (a single pass over M), then the 2×2 outputs of each
    tile interleaved into the map."""
    th, tw = tile_grid(h, w)
    c = m.shape[-1]
    tiles = (_output_matrix(m) @ m.view(16, -1)).view(2, 2, n, th, tw, c)
    y = m.new_empty(n, th, 2, tw, 2, c)
    y.copy_(tiles.permute(2, 3, 0, 4, 1, 5))
    y = y.view(n, 2 * th, 2 * tw, c)
    if (h, w) != (2 * th, 2 * tw):
        y = y[:, :h, :w]
    return y.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def output_adjoint(grad_y: torch.Tensor) -> torch.Tensor:
    """dL/dM (16, N·tiles, C_out) from dL/dY, the adjoint of `output_transform`."""
    n, c, h, w = grad_y.shape
    th, tw = tile_grid(h, w)
    g = grad_y.permute(0, 2, 3, 1)
    if (h, w) != (2 * th, 2 * tw):
        g = F.pad(g, (0, 0, 0, 2 * tw - w, 0, 2 * th - h))
    tiles = g.reshape(n, th, 2, tw, 2, c).permute(2, 4, 0, 1, 3, 5).reshape(4, -1)
    return (_output_matrix(grad_y).t() @ tiles).view(16, n * th * tw, c)


class _FilterTransform(torch.autograd.Function):
    """U = G g Gᵀ with its gradient: a transformed filter that several calls share (the split-BN
    sub-batches) takes the sum of their dU and transforms it back once."""

    @staticmethod
    def forward(ctx, weight):
        ctx.channels_last = weight.is_contiguous(memory_format=torch.channels_last)
        return filter_transform(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u):
        return filter_transform_adjoint(grad_u.permute(2, 0, 1).contiguous(), ctx.channels_last)


class _WinogradConv(torch.autograd.Function):
    """conv2d(x, ·, bias, stride=1, padding=1) given the transformed 3×3 filter U."""

    @staticmethod
    def forward(ctx, x, u, bias):
        n, _, h, w = x.shape
        v = input_transform(x)
        y = output_transform(torch.bmm(v, u), n, h, w)
        if bias is not None:
            y = y.add_(bias.view(1, -1, 1, 1))
        ctx.save_for_backward(v, u)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        v, u = ctx.saved_tensors
        dm = output_adjoint(grad_y)
        grad_x = grad_u = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = input_adjoint(torch.bmm(dm, u.transpose(1, 2)), ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # dUᵀ = dMᵀ V, written straight into (C_out, 16, C_in), the memory order of U
            c_in, c_out = u.shape[1:]
            du_t = dm.new_empty(c_out, 16, c_in)
            torch.bmm(dm.transpose(1, 2), v, out=du_t.transpose(0, 1))
            grad_u = du_t.permute(1, 2, 0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_u, grad_b


def transformed_filter(weight: torch.Tensor) -> torch.Tensor:
    """U of `weight` (16, C_in, C_out), differentiable when grad mode needs it."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _FilterTransform.apply(weight)
    with torch.no_grad():
        return filter_transform(weight)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            u: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3×3 weight by F(2×2, 3×3); channels-last out.
    `u`: the weight's `transformed_filter`, when the caller already has it."""
    u = transformed_filter(weight) if u is None else u
    if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _WinogradConv.apply(x, u, bias)
    n, _, h, w = x.shape
    y = output_transform(torch.bmm(input_transform(x), u), n, h, w)
    return y if bias is None else y.add_(bias.view(1, -1, 1, 1))


# Transformed filters shared inside `filters_reused` (key: the module and the grad mode); a
# context variable, so that forwards in other threads never see this block's filters.
_shared: contextvars.ContextVar[dict[tuple[int, bool], torch.Tensor] | None] = (
    contextvars.ContextVar("fastmoco_winograd_shared", default=None))


@contextlib.contextmanager
def filters_reused() -> Iterator[None]:
    """Within this block (the outermost one, where blocks nest) the weights do not change (one
    forward over several sub-batches): each WinogradConv2d transforms its filter once, and its
    gradient flows back once."""
    token = _shared.set({}) if _shared.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _shared.reset(token)


# Layers at least this wide: there the 16 GEMMs per tile position are large enough to run near
# the mm rate and the tile transforms (memory passes over 4× the activations) stay small beside
# them. Measured on the AVX2 EPYC (fp32, 2 threads), ResNet-18 at 32 px in sub-batches of 32:
# forward + backward 1.2-1.5× oneDNN from 256 channels, about even at 128 and 0.5× at 64.
MIN_CHANNELS = 256
# ... and calls with at least this many tiles (images × ⌈H/2⌉ × ⌈W/2⌉): each of the 16 GEMMs has
# that many rows. ResNet-50's layer4 in sub-batches of 4 (7×7 maps: 64 tiles) ran 0.74× oneDNN,
# ResNet-18's layer4 in sub-batches of 32 (4×4 maps: 128 tiles) 1.19×.
MIN_TILES = 128
# A call with more tiles runs in chunks of whole images of at most this many tiles: the
# transformed input and output of a chunk (16 × tiles × channels each) then stay in cache. A
# whole batch of 256 at once (MoCo v3, BYOL, SimSiam: no split BN) ran ResNet-18's layer3 at
# 0.83× oneDNN and the v3 step at 0.72× the framework's convolutions; in chunks of 512 tiles
# layer3 ran 1.33× and layer4 1.58× (benchmarks/RESULTS.md).
MAX_TILES = 512


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d (3×3, stride 1, padding 1) computed by F(2×2, 3×3) in fp32/fp64 outside
    autocast and torch.compile, for inputs of at least MIN_TILES tiles (in chunks of at most
    MAX_TILES); otherwise exactly nn.Conv2d. Same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (same_3x3(self) and x.dtype == self.weight.dtype
                and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
                and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling()  # compiled: the compiler's own choice
                and x.shape[0] * tiles_per_image(x) >= MIN_TILES):
            return super().forward(x)
        shared = _shared.get()
        if shared is not None:
            key = (id(self), torch.is_grad_enabled())
            if key not in shared:
                shared[key] = transformed_filter(self.weight)
            u = shared[key]
        else:
            u = transformed_filter(self.weight)  # once for all the chunks
        images = max(1, MAX_TILES // tiles_per_image(x))
        y = torch.cat([conv3x3(part, self.weight, self.bias, u=u) for part in x.split(images)]) \
            if x.shape[0] > images else conv3x3(x, self.weight, self.bias, u=u)
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


def tiles_per_image(x: torch.Tensor) -> int:
    """2×2 output tiles of one image of x (N, C, H, W): ⌈H/2⌉ × ⌈W/2⌉."""
    th, tw = tile_grid(x.shape[2], x.shape[3])
    return th * tw


def same_3x3(conv: nn.Conv2d) -> bool:
    """A 3×3 stride-1 'same' convolution, one group, zero padding: what F(2×2, 3×3) computes."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def winograd_eligible(conv: nn.Module) -> bool:
    """A plain nn.Conv2d that `same_3x3` accepts, at least MIN_CHANNELS wide in and out."""
    return (type(conv) is nn.Conv2d and same_3x3(conv)
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)

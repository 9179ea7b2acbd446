"""The GEMM weight gradient (fastmoco/conv.py) against the framework's convolution gradients:
float64 on both sides to ~1e-12 (the same sums in another order), fp32 against a float64
reference to 1e-5 relative; the module swap and its fall-backs (auto: test_conv_choice.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmoco import conv
from fastmoco.backbone import create_backbone
from fastmoco.conv import GemmGradConv2d, use_gemm_weight_grad_, use_native_convolutions_, weight_grad
from numerics import rel_err

# n, c_in, c_out, h, w, kernel, stride, padding
SHAPES = [
    (4, 8, 16, 12, 12, 3, 1, 1),   # the ResNet 3×3
    (3, 8, 16, 11, 9, 3, 2, 1),    # strided, odd and non-square
    (2, 3, 8, 20, 18, 7, 2, 3),    # the ImageNet stem
    (5, 6, 4, 9, 9, 3, 1, 0),      # no padding
    (2, 4, 4, 8, 8, (3, 5), (1, 2), (1, 2)),  # rectangular kernel, per-axis stride and padding
]


@pytest.fixture
def gemm_everywhere(monkeypatch):
    """The GEMM path for every shape (by default only small maps of wide layers take it)."""
    monkeypatch.setattr(conv, "MIN_IN_CHANNELS", 1)
    monkeypatch.setattr(conv, "MAX_OUTPUT_PIXELS", 10**9)


def pair(v):
    return v if isinstance(v, tuple) else (v, v)


def native_grads(x, w, b, stride, padding, grad_out):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    F.conv2d(x, w, b, stride, padding).backward(grad_out)
    return x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # one image per GEMM / all in one
def test_weight_grad_matches_autograd(shape, channels_last, chunk_bytes):
    n, c, co, h, w, k, s, p = shape
    k, s, p = pair(k), pair(s), pair(p)
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    wt = torch.randn(co, c, *k, generator=g, dtype=torch.float64)
    y = F.conv2d(x, wt, None, s, p)
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    ref = native_grads(x, wt, None, s, p, grad_out)[1]
    got = weight_grad(x, grad_out, k, s, p, chunk_bytes)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-12  # float64: the same sums, another order
    got32 = weight_grad(x.float(), grad_out.float(), k, s, p, chunk_bytes)
    assert got32.dtype == torch.float32 and rel_err(got32, ref) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_gradients_and_forward(bias, dtype, gemm_everywhere):
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 10, 3, 2, 1, bias=bias).to(dtype).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    assert use_gemm_weight_grad_(ours) == 1 and type(ours) is GemmGradConv2d
    x = torch.randn(5, 6, 13, 13, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert torch.equal(y_ref, y_ours)  # the same forward kernel
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)
    y_ours.backward(grad_out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(x_ours.grad, x_ref.grad) < tol
    assert rel_err(ours.weight.grad, ref.weight.grad) < tol
    if bias:
        assert rel_err(ours.bias.grad, ref.bias.grad) < tol
    assert ours.weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_first_layer_input_needs_no_grad(gemm_everywhere):
    """The stem's input (the images) has no gradient: only the weight's is computed."""
    conv2d = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
    use_gemm_weight_grad_(conv2d)
    conv2d(torch.randn(2, 3, 8, 8)).sum().backward()
    assert conv2d.weight.grad is not None and conv2d.weight.grad.abs().sum() > 0


def test_falls_back_where_it_does_not_apply(monkeypatch):
    """No grad (the key encoder), autocast, frozen weights, output maps larger than
    MAX_OUTPUT_PIXELS and layers narrower than MIN_IN_CHANNELS run nn.Conv2d's own path."""
    monkeypatch.setattr(conv, "MIN_IN_CHANNELS", 4)
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
    ours = copy.deepcopy(ref)
    use_gemm_weight_grad_(ours)
    x = torch.randn(2, 4, 8, 8)
    calls = []
    original = conv._GemmWeightGradConv.apply
    conv._GemmWeightGradConv.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()  # autocast's own backward
        ours.weight.requires_grad_(False)
        ours(x)
        ours.weight.requires_grad_(True)
        ours(torch.randn(2, 4, 9, 8)).sum().backward()  # 72 output pixels
        assert calls == []
        ours(x)
        assert calls == [1]
        monkeypatch.setattr(conv, "MIN_IN_CHANNELS", 5)
        ours(x)
        assert calls == [1]
    finally:
        conv._GemmWeightGradConv.apply = original


def test_swap_keeps_parameters_and_state_dict():
    net = create_backbone("resnet18", cifar_stem=True, channels=[8, 16, 32, 64])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spatial = sum(1 for m in net.modules() if type(m) is nn.Conv2d and m.kernel_size != (1, 1))
    assert use_gemm_weight_grad_(net) == spatial == 17  # stem + 16 block convs; not the 1×1s
    assert all(type(m) is nn.Conv2d for m in net.modules()
               if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    twin = copy.deepcopy(net)
    assert sum(type(m) is GemmGradConv2d for m in twin.modules()) == spatial
    use_native_convolutions_(twin)
    assert not any(type(m) is GemmGradConv2d for m in twin.modules())


def test_ineligible_convolutions_are_left_alone():
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    dilated = nn.Conv2d(4, 4, 3, dilation=2)
    same = nn.Conv2d(4, 4, 3, padding="same")
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    assert use_gemm_weight_grad_(nn.Sequential(grouped, dilated, same, reflect)) == 0


def test_default_thresholds():
    """Small maps of wide layers only: ResNet-18 at 32 px has its layer4 (and layer3's 8×8 maps
    from 256 channels) on the GEMM path, the CPU demo's quarter-width network none."""
    assert (conv.MAX_OUTPUT_PIXELS, conv.MIN_IN_CHANNELS) == (64, 256)
    layer4 = GemmGradConv2d(512, 512, 3, 1, 1, bias=False)
    layer1 = GemmGradConv2d(64, 64, 3, 1, 1, bias=False)
    assert layer4._output_pixels(torch.empty(1, 512, 4, 4)) == 16
    assert layer1._output_pixels(torch.empty(1, 64, 32, 32)) == 1024
    strided = GemmGradConv2d(256, 512, 3, 2, 1, bias=False)
    assert strided._output_pixels(torch.empty(1, 256, 8, 8)) == 16


def test_build_model_swaps_and_matches_native(gemm_everywhere, tiny_moco):
    """The one build path swaps both encoders' convolutions when asked; the query encoder's
    gradients then equal the native ones (float64: the same sums in another order)."""
    gemm = tiny_moco("run.conv_weight_grad=gemm", "run.conv_winograd=off")
    native = tiny_moco("run.conv_weight_grad=native", "run.conv_winograd=off")
    gemm.load_state_dict(native.state_dict())
    assert sum(type(m) is GemmGradConv2d for m in gemm.query_encoder.modules()) == 17
    assert sum(type(m) is GemmGradConv2d for m in gemm.key_encoder.modules()) == 17
    assert not any(type(m) is GemmGradConv2d for m in native.modules())
    g = torch.Generator().manual_seed(1)
    x_q, x_k = (torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
                .contiguous(memory_format=torch.channels_last) for _ in range(2))
    for m in (gemm, native):
        torch.manual_seed(2)  # the same shuffle of the keys' split BN
        m(x_q, x_k, momentum=0.99).loss.backward()
    ours = dict(gemm.query_encoder.named_parameters())
    for name, p in native.query_encoder.named_parameters():
        assert p.grad.abs().max() > 0, name
        assert rel_err(ours[name].grad, p.grad) < 1e-10, name

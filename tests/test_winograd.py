"""Winograd F(2×2, 3×3) convolutions (fastmoco/winograd.py) against F.conv2d: values and
gradients in float64 to ~1e-12 (the same sums through exact ±1, ±½ transforms), fp32 against a
float64 reference to 1e-5 relative; filters shared over split-BN sub-batches; the module swap,
its fall-backs (the auto rule: tests/test_conv_choice.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmoco import conv, winograd
from fastmoco.conv import GemmGradConv2d, WinogradGemmConv2d, use_winograd_
from fastmoco.winograd import WinogradConv2d, conv3x3, filters_reused, winograd_eligible
from numerics import rel_err

# n, c_in, c_out, h, w: even maps, odd and non-square ones (padded to whole tiles), 1×1 and 1×2
SHAPES = [(4, 8, 16, 8, 8), (3, 5, 7, 7, 5), (2, 6, 4, 1, 1), (2, 3, 9, 1, 2), (1, 16, 8, 12, 10)]


@pytest.fixture
def every_call(monkeypatch):
    """The module's Winograd path for calls of any size (by default 128 tiles and up)."""
    monkeypatch.setattr(winograd, "MIN_TILES", 1)


@pytest.fixture
def filter_transforms(monkeypatch):
    """A list that grows by one at each filter transform (winograd.filter_transform)."""
    transforms = []
    real = winograd.filter_transform
    monkeypatch.setattr(winograd, "filter_transform", lambda w: transforms.append(1) or real(w))
    return transforms


def conv_pair(c_in, c_out):
    """(nn.Conv2d, WinogradConv2d) 3×3 padding 1 in float64, with the same weights."""
    ref = nn.Conv2d(c_in, c_out, 3, padding=1).double()
    ours = WinogradConv2d(c_in, c_out, 3, padding=1).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(shape, dtype, channels_last, bias, seed=0):
    n, c_in, c_out, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    grad_y = torch.randn(n, c_out, h, w, generator=g, dtype=dtype)
    return x, weight, b, grad_y


def values_and_grads(fn, x, weight, bias, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, grad_y)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_float64_equals_conv2d(shape, channels_last, bias):
    x, weight, b, grad_y = inputs(shape, torch.float64, channels_last, bias)
    ours = values_and_grads(lambda *a: conv3x3(*a), x, weight, b, grad_y)
    ref = values_and_grads(lambda *a: F.conv2d(*a, padding=1), x, weight, b, grad_y)
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert o.shape == r.shape, name
        assert rel_err(o, r) < 1e-12, name
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert ours[2].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_against_float64(seed):
    """fp32 rounding only: the transforms' entries are 0, ±½, ±1, and the ResNet-width sums (288
    and 4,608 terms) stay within 1e-5 of the float64 result."""
    for shape in [(4, 32, 32, 8, 8), (2, 512, 64, 4, 4)]:
        x, weight, b, grad_y = inputs(shape, torch.float64, True, True, seed)
        ref = values_and_grads(lambda *a: F.conv2d(*a, padding=1), x, weight, b, grad_y)
        ours = values_and_grads(lambda *a: conv3x3(*a), x.float(), weight.float(), b.float(),
                                grad_y.float())
        for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
            assert o.dtype == torch.float32
            assert rel_err(o.double(), r) < 1e-5, (shape, name)


def test_no_grad_forward_equals_conv2d():
    x, weight, b, _ = inputs(SHAPES[1], torch.float64, True, True)
    with torch.no_grad():
        assert rel_err(conv3x3(x, weight, b), F.conv2d(x, weight, b, padding=1)) < 1e-12


def test_filters_shared_over_sub_batches(every_call, filter_transforms):
    """Inside `filters_reused` each module transforms its filter once per grad mode; the summed
    dU of the sub-batches flows back once and equals the direct convolution's weight gradient."""
    calls = filter_transforms
    torch.manual_seed(0)
    ref, ours = conv_pair(6, 10)
    x = torch.randn(8, 6, 6, 6, dtype=torch.float64)
    y_ref = torch.cat([ref(chunk) for chunk in x.chunk(4)])
    with filters_reused():
        y = torch.cat([ours(chunk) for chunk in x.chunk(4)])
        with torch.no_grad():  # another grad mode: its own transform, no graph
            y_key = torch.cat([ours(chunk) for chunk in x.chunk(4)])
    assert len(calls) == 2 and not y_key.requires_grad
    assert rel_err(y, y_ref) < 1e-12 and rel_err(y_key, y_ref) < 1e-12
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert rel_err(ours.weight.grad, ref.weight.grad) < 1e-12
    assert rel_err(ours.bias.grad, ref.bias.grad) < 1e-12
    calls.clear()
    ours(x)  # outside the block: nothing is kept between forwards (the weights may change)
    ours(x)
    assert len(calls) == 2 and winograd._shared.get() is None


def test_module_falls_back_outside_fp32_and_fp64(every_call):
    """bf16 and autocast run nn.Conv2d's own forward (exactly its result)."""
    torch.manual_seed(0)
    ours = WinogradConv2d(4, 4, 3, padding=1)
    ref = nn.Conv2d(4, 4, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(ours.bfloat16()(x.bfloat16()), ref.bfloat16()(x.bfloat16()))
    ours.float(), ref.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), ref(x))


def test_eligibility_and_swap():
    wide = nn.Conv2d(256, 256, 3, padding=1, bias=False)
    assert winograd_eligible(wide)
    for other in (nn.Conv2d(128, 256, 3, padding=1), nn.Conv2d(256, 128, 3, padding=1),
                  nn.Conv2d(256, 256, 3, stride=2, padding=1), nn.Conv2d(256, 256, 1),
                  nn.Conv2d(256, 256, 3, padding=2, dilation=2),
                  nn.Conv2d(256, 256, 3, padding=1, groups=2),
                  nn.Conv2d(256, 256, 3, padding="same"),
                  nn.Conv2d(256, 256, 3, padding=1, padding_mode="reflect"),
                  nn.Conv2d(256, 256, 3, padding=0)):
        assert not winograd_eligible(other)
    net = nn.Sequential(wide, nn.Conv2d(256, 256, 1))
    before = net.state_dict()
    assert use_winograd_(net) == 1 and type(net[0]) is WinogradConv2d
    assert use_winograd_(net) == 0  # already swapped
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    conv.use_native_convolutions_(net)
    assert type(net[0]) is nn.Conv2d
    assert use_winograd_(net, gemm_fallback=True) == 1 and type(net[0]) is WinogradGemmConv2d
    conv.use_native_convolutions_(net)
    assert type(net[0]) is nn.Conv2d


def test_module_built_with_another_shape_is_plain_conv2d(every_call):
    """WinogradConv2d constructed directly with a shape F(2×2, 3×3) does not compute (no
    padding, a stride, groups) runs nn.Conv2d's forward: the same output shape and values."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for kwargs in ({"padding": 0}, {"padding": 1, "stride": 2}, {"padding": 1, "groups": 2}):
        ours, ref = WinogradConv2d(4, 4, 3, **kwargs), nn.Conv2d(4, 4, 3, **kwargs)
        ref.load_state_dict(ours.state_dict())
        assert torch.equal(ours(x), ref(x)), kwargs


def test_output_layout_follows_the_input(every_call):
    ours = WinogradConv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    assert ours(x).is_contiguous()
    assert ours(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)


def test_fallback_keeps_the_gemm_weight_gradient(monkeypatch):
    """With both paths on, a call too small for Winograd (ResNet-50's 7×7
    layer4 in sub-batches of 4: 64 tiles) computes its weight gradient by GEMM, as the layer
    would without Winograd."""
    calls = []
    real = conv.weight_grad
    monkeypatch.setattr(conv, "weight_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1, bias=False))
    ref = GemmGradConv2d(256, 256, 3, padding=1, bias=False)
    ref.load_state_dict(layer[0].state_dict())
    use_winograd_(layer, gemm_fallback=True)
    x = torch.randn(4, 256, 7, 7, requires_grad=True)
    layer(x).square().sum().backward()
    assert calls == [1]
    ref(x).square().sum().backward()
    assert rel_err(layer[0].weight.grad, ref.weight.grad) < 1e-5


def test_shared_filters_stay_in_their_thread(every_call):
    """A block in one thread does not hand its filters to a forward in another (the cache is a
    context variable): after the other thread changes the weight, its forward sees the change."""
    import threading

    torch.manual_seed(0)
    ours = WinogradConv2d(4, 4, 3, padding=1, bias=False).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    inside, done = threading.Event(), threading.Event()

    def hold_a_block():
        with filters_reused():
            ours(x)
            inside.set()
            done.wait(10)

    t = threading.Thread(target=hold_a_block)
    t.start()
    assert inside.wait(10)
    with torch.no_grad():
        ours.weight.mul_(2)
        assert rel_err(ours(x), F.conv2d(x, ours.weight, padding=1)) < 1e-12
    done.set()
    t.join()
    assert winograd._shared.get() is None


@pytest.mark.parametrize("weight_grad", ["native", "gemm"])
def test_build_model_matches_direct_convolutions(monkeypatch, every_call, tiny_moco, weight_grad,
                                                filter_transforms):
    """Through the one build path (both encoders swapped, each split-BN block transforming each
    filter once; with `gemm`, AVX2's default pair): the MoCo loss and every query gradient
    equal the direct convolutions' in float64."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "MIN_IN_CHANNELS", 1)
    monkeypatch.setattr(conv, "MAX_OUTPUT_PIXELS", 10**9)
    transforms = filter_transforms

    ours = tiny_moco(f"run.conv_weight_grad={weight_grad}", "run.conv_winograd=on")
    direct = tiny_moco(f"run.conv_weight_grad={weight_grad}", "run.conv_winograd=off")
    ours.load_state_dict(direct.state_dict())
    # the 3×3 stride-1 convolutions: stem + 4 blocks × 2 − 3 strided
    kind = WinogradGemmConv2d if weight_grad == "gemm" else WinogradConv2d
    assert sum(type(m) is kind for m in ours.query_encoder.modules()) == 14
    assert sum(type(m) is kind for m in ours.key_encoder.modules()) == 14
    g = torch.Generator().manual_seed(1)
    x_q, x_k = (torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
                .contiguous(memory_format=torch.channels_last) for _ in range(2))
    losses = []
    for m in (ours, direct):
        torch.manual_seed(2)  # the same shuffle of the keys' split BN
        out = m(x_q, x_k, momentum=0.99)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert len(transforms) == 28  # 14 filters, once for the queries' block, once for the keys'
    assert rel_err(losses[0], losses[1]) < 1e-12
    mine = dict(ours.query_encoder.named_parameters())
    for name, p in direct.query_encoder.named_parameters():
        assert p.grad.abs().max() > 0, name
        assert rel_err(mine[name].grad, p.grad) < 1e-10, name


def test_compiled_module_keeps_the_compilers_convolution(monkeypatch, every_call):
    """Under torch.compile the module traces as nn.Conv2d (the compiler picks its algorithm)."""
    def refuse(*args, **kwargs):
        raise AssertionError("Winograd path traced under torch.compile")

    torch.manual_seed(0)
    ours = WinogradConv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    eager = ours(x)
    monkeypatch.setattr(winograd, "conv3x3", refuse)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="eager")
    assert rel_err(compiled(x), eager) < 1e-5
    torch._dynamo.reset()


def test_calls_with_few_tiles_run_the_framework_convolution(monkeypatch):
    """Below MIN_TILES (e.g. ResNet-50's 7×7 layer4 in sub-batches of 4) the GEMMs are too short
    to pay for the transforms: the module runs nn.Conv2d's forward."""
    used = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: used.append(1) or real(*a, **k))
    ours = WinogradConv2d(4, 4, 3, padding=1)
    assert winograd.MIN_TILES == 128
    ours(torch.randn(4, 4, 7, 7))  # 4 × 4 × 4 = 64 tiles
    assert not used
    ours(torch.randn(8, 4, 7, 7))  # 128 tiles
    assert used


@pytest.mark.parametrize("channels_last", [True, False])
def test_large_calls_run_in_chunks_of_whole_images(monkeypatch, channels_last, filter_transforms):
    """Above MAX_TILES a call runs in chunks of whole images (one filter transform for all):
    values and gradients as the direct convolution, the output in the input's layout."""
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    monkeypatch.setattr(winograd, "MAX_TILES", 2 * 9)  # 5×5 maps: 9 tiles an image, 2 a chunk
    calls, transforms = [], filter_transforms
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, *a, **k: calls.append(len(x)) or real(x, *a, **k))
    torch.manual_seed(0)
    ref, ours = conv_pair(3, 4)
    x = torch.randn(5, 3, 5, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = ours(x_ours), ref(x_ref)
    assert calls == [2, 2, 1] and len(transforms) == 1
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    assert rel_err(y, y_ref) < 1e-12
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert rel_err(x_ours.grad, x_ref.grad) < 1e-12
    assert rel_err(ours.weight.grad, ref.weight.grad) < 1e-12
    assert rel_err(ours.bias.grad, ref.bias.grad) < 1e-12

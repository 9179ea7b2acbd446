"""EMA: flat-buffer, foreach and Triton paths against the per-parameter reference loop.

Triton cases run on CPU only in a TRITON_INTERPRET=1 subprocess (see tests/test_infonce.py).
"""
from __future__ import annotations

import copy

import fastmoco.kernels as K
import pytest
import torch
from fastmoco.kernels import ema_update_, ema_update_reference_, flat_layout, flatten_parameters_
from fastmoco.kernels.ema import matching_flat_buffers
from fastmoco.kernels.launch import interpreter_active
from torch import nn

INTERP = interpreter_active()
interp = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess")
BACKENDS = ["auto", "torch", "foreach", "loop", pytest.param("triton", marks=interp)]


def net(seed: int, dtype=torch.float32) -> nn.Module:
    """A small conv net with BN (buffers) and odd sizes, in channels_last."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 7, 1, bias=False),
        nn.Flatten(), nn.LazyLinear(11),
    )
    m(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        m[1].running_mean.normal_()
    return m.to(dtype=dtype, memory_format=torch.channels_last)


def params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def test_flatten_keeps_values_strides_and_identity():
    m = net(0)
    before = [(p, p.detach().clone(), p.stride()) for p in m.parameters()]
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last)
    buffers = flatten_parameters_(m)
    assert len(buffers) == 1
    storage = buffers[0].untyped_storage().data_ptr()
    for (p, value, stride), q in zip(before, m.parameters(), strict=True):
        assert p is q and torch.equal(q, value) and q.stride() == stride
        assert q.untyped_storage().data_ptr() == storage
        assert q.data_ptr() % 64 == 0  # 16-element alignment in fp32
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_flatten_one_buffer_per_dtype():
    m = net(0)
    m[5].to(torch.bfloat16)
    buffers = flatten_parameters_(m)
    assert sorted(str(b.dtype) for b in buffers) == ["torch.bfloat16", "torch.float32"]


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_matches_reference(flat, backend, dtype):
    target, source = net(1, dtype), net(2, dtype)
    if flat:
        flatten_parameters_(target)
        flatten_parameters_(source)
        assert matching_flat_buffers(target, source) is not None
    want = params(target)
    ema_update_reference_(want, list(source.parameters()), 0.9)
    bn = target[1].running_mean.clone()
    ema_update_(target, source, 0.9, backend=backend)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, w in zip(target.parameters(), want, strict=True):
        torch.testing.assert_close(got, w, rtol=tol, atol=tol)
    assert torch.equal(target[1].running_mean, bn)  # buffers are the key encoder's own


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", [True, False])
def test_momentum_zero_copies_and_one_keeps(backend, flat):
    target, source = net(1), net(2)
    if flat:
        flatten_parameters_(target)
        flatten_parameters_(source)
    kept = params(target)
    ema_update_(target, source, 1.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), kept))
    ema_update_(target, source, 0.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))


def test_flat_path_is_one_operation_per_buffer(monkeypatch):
    target, source = net(1), net(2)
    flatten_parameters_(target)
    flatten_parameters_(source)
    calls = []
    monkeypatch.setattr(K, "ema_update_flat_", lambda t, s, m, use_triton: calls.append(len(t)))
    ema_update_(target, source, 0.5)
    assert calls == [1]


def test_flat_survives_load_state_dict_and_detects_repointing():
    target, source = net(1), net(2)
    flatten_parameters_(target)
    flatten_parameters_(source)
    target.load_state_dict(net(3).state_dict())
    assert flat_layout(target) is not None  # in-place copy kept the views
    want = params(target)
    ema_update_reference_(want, list(source.parameters()), 0.7)
    ema_update_(target, source, 0.7)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(target.parameters(), want))
    target[0].weight.data = target[0].weight.data.clone()  # e.g. what .to(device) does
    assert flat_layout(target) is None and matching_flat_buffers(target, source) is None
    ema_update_(target, source, 0.0)  # falls back to foreach, still right
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))


def test_layouts_must_match():
    target, source = net(1), net(2)
    source[5] = nn.Linear(7 * 4 * 4, 11, bias=False)
    flatten_parameters_(target)
    flatten_parameters_(source)
    assert matching_flat_buffers(target, source) is None
    with pytest.raises(ValueError, match="target tensors"):
        ema_update_(target, source, 0.5)


def test_deepcopy_of_flat_module_then_flatten():
    """The model flattens both encoders after the key encoder is a deepcopy of the query one."""
    source = net(1)
    target = copy.deepcopy(source)
    flatten_parameters_(source)
    flatten_parameters_(target)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    ema_update_(target, source, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))


def test_wrappers_torch_compile_and_ddp(tmp_path):
    import torch.distributed as dist

    target, source = net(1), net(2)
    flatten_parameters_(target)
    flatten_parameters_(source)
    assert matching_flat_buffers(target, torch.compile(source)) is not None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(source)
        assert matching_flat_buffers(target, ddp) is not None  # DDP broadcast kept the views
        ema_update_(target, ddp, 0.0)
        assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))
    finally:
        dist.destroy_process_group()


def test_tensor_lists():
    t, s = [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]
    want = [x.clone() for x in t]
    ema_update_reference_(want, s, 0.3)
    ema_update_(t, s, 0.3)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(t, want))
    with pytest.raises(ValueError, match="unknown backend"):
        ema_update_(t, s, 0.3, backend="fast")


@interp
def test_triton_flat_kernel_tail_block():
    """A buffer that is not a multiple of the block: the masked tail is updated, nothing past it."""
    from fastmoco.kernels.ema import EMA_BLOCK, ema_flat_triton_

    n = EMA_BLOCK + 37
    big_t, s = torch.randn(n + 5), torch.randn(n)
    t = big_t[:n]
    guard = big_t[n:].clone()
    want = t.clone().lerp_(s, 0.25)
    ema_flat_triton_(t, s, 0.75)
    torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(big_t[n:], guard)


def test_triton_cases_in_interpreter(rerun_in_triton_interpreter):
    """Re-run the `interp` cases of this file in a TRITON_INTERPRET=1 subprocess."""
    rerun_in_triton_interpreter(__file__, "triton and not in_interpreter")


@pytest.mark.gpu
def test_triton_flat_cuda_matches_reference():
    dev = torch.device("cuda")
    target, source = net(1).to(dev), net(2).to(dev)
    flatten_parameters_(target)
    flatten_parameters_(source)
    want = params(target)
    ema_update_reference_(want, list(source.parameters()), 0.99)
    ema_update_(target, source, 0.99, backend="triton")
    for a, b in zip(target.parameters(), want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

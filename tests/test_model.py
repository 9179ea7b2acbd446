"""MoCo against a plain-torch re-derivation of the paper's Algorithm 1."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fastmoco.kernels import flat_layout
from torch import nn

from fastmoco import MoCo
from fastmoco.distributed import batch_shuffle, batch_unshuffle
from fastmoco.methods.batchnorm import (
    SplitBatchNorm2d,
    convert_split_bn_,
    forward_in_splits,
    split_norms,
)
from fastmoco.methods.queue import KeyQueue

SMALL = dict(channels=(8, 16, 32, 64))


def small_moco(**kw) -> MoCo:
    args = dict(version="v2", dim=16, queue_size=32, momentum=0.9, temperature=0.2,
                shuffle_bn="none", cifar_stem=True, backbone_kwargs=SMALL)
    args.update(kw)
    return MoCo("resnet18", **args)


def test_key_encoder_starts_as_exact_copy_without_gradients():
    torch.manual_seed(0)
    model = small_moco()
    for pq, pk in zip(model.query_encoder.parameters(), model.key_encoder.parameters()):
        assert torch.equal(pq, pk)
        assert not pk.requires_grad and pq.requires_grad
    assert model.queue.keys.shape == (32, 16)
    torch.testing.assert_close(model.queue.keys.norm(dim=1), torch.ones(32))


@pytest.mark.parametrize("version, flat", [("v1", False), ("v2", False), ("v2", True)])
def test_one_step_matches_algorithm_1(version, flat):
    """Momentum update, keys, loss over [k+, queue]/T, query gradients, enqueue and pointer."""
    torch.manual_seed(1)
    model = small_moco(version=version)
    if flat:  # parameters as views into one flat buffer per encoder: one lerp for the EMA
        model.to(memory_format=torch.channels_last)  # the flat buffers follow the move
        assert flat_layout(model.query_encoder) is not None
    n, m, t = 8, 0.9, 0.2
    # Make the key encoder differ from the query encoder so the momentum update is visible.
    with torch.no_grad():
        for p in model.key_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    f_q, f_k = copy.deepcopy(model.query_encoder), copy.deepcopy(model.key_encoder)
    queue = model.queue.keys.clone()
    x_q, x_k = torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32)

    # Algorithm 1, written out in plain torch.
    with torch.no_grad():
        for pk, pq in zip(f_k.parameters(), f_q.parameters()):
            pk.copy_(m * pk + (1 - m) * pq)
    q = F.normalize(f_q(x_q), dim=1)  # N×C
    with torch.no_grad():
        k = F.normalize(f_k(x_k), dim=1)  # N×C
    l_pos = torch.bmm(q.view(n, 1, -1), k.view(n, -1, 1)).view(n, 1)
    l_neg = torch.mm(q, queue.T)
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    loss_ref = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    loss_ref.backward()
    queue_ref = queue.clone()
    queue_ref[:n] = k

    out = model(x_q, x_k, momentum=m)
    out.loss.backward()
    model.enqueue(out.keys)

    torch.testing.assert_close(out.loss, loss_ref, rtol=1e-5, atol=1e-6)
    acc_ref = (logits.argmax(1) == 0).float().mean() * 100
    torch.testing.assert_close(out.accuracy, acc_ref)
    for pk, rk in zip(model.key_encoder.parameters(), f_k.parameters()):
        torch.testing.assert_close(pk, rk, rtol=1e-6, atol=1e-7)
    for pq, rq in zip(model.query_encoder.parameters(), f_q.parameters()):
        torch.testing.assert_close(pq.grad, rq.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.queue.keys, queue_ref, rtol=1e-5, atol=1e-6)
    assert int(model.queue.ptr) == n
    assert all(p.grad is None for p in model.key_encoder.parameters())


def test_queue_wraps_around():
    queue = KeyQueue(size=12, dim=4)
    batches = [torch.full((4, 4), float(i)) for i in range(1, 5)]
    for b in batches:
        queue.enqueue(b)
    # 4 batches of 4 into 12 rows: the 4th overwrites the 1st.
    assert int(queue.ptr) == 4
    assert torch.equal(queue.keys[:4], batches[3])
    assert torch.equal(queue.keys[4:8], batches[1])
    assert torch.equal(queue.keys[8:], batches[2])


def test_queue_rejects_batch_that_does_not_divide_k():
    queue = KeyQueue(size=10, dim=4)
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        queue.enqueue(torch.zeros(4, 4))


# Compiled vs eager over two steps sum in different orders. A tolerance from the dtype: the
# losses differ by ~1 fp32 ulp on AVX-512 and on AVX2 (measured); 1000 ulps (1.2e-4) leaves room
# for the gradients' longer reductions and stays far below a real error (a wrong sub-batch or a
# missed EMA moves the loss by >1e-2).
TOL32 = dict(rtol=1000 * torch.finfo(torch.float32).eps, atol=1000 * torch.finfo(torch.float32).eps)


def _conv_bn_net(bn: type, **kw) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn(6, **kw), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, stride=2), bn(5, **kw), nn.Flatten())


@pytest.mark.parametrize("layout", ["sub_batches", "sliced"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_matches_the_cifar_demos_split_bn(channels_last, layout):
    """Sub-batches run one at a time, or sliced inside each BN, give the demo's reshaped BN
    exactly: outputs, parameter gradients and running statistics (its sub-batches are
    interleaved, ours contiguous)."""
    from fastmoco.bench.reference_models import SplitBatchNorm

    torch.manual_seed(0)
    s, n = 4, 16
    demo = _conv_bn_net(SplitBatchNorm, num_splits=s)
    ours = convert_split_bn_(_conv_bn_net(nn.BatchNorm2d))
    ours.load_state_dict(demo.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    demo.double()  # float64, so the comparison is exact to 1e-9 whatever the summation order
    ours.double().to(memory_format=fmt)
    for step in range(3):  # several steps: the running statistics compound
        x = torch.randn(n, 3, 8, 8, dtype=torch.float64)
        # The demo's sub-batch j is samples j, j+s, j+2s...; ours is the j-th contiguous block.
        interleaved = x.view(s, n // s, 3, 8, 8).transpose(0, 1).reshape(n, 3, 8, 8)
        y_demo = demo(interleaved).view(n // s, s, -1).transpose(0, 1).reshape(n, -1)
        y = forward_in_splits(ours, x.contiguous(memory_format=fmt), s, split_norms(ours), layout)
        torch.testing.assert_close(y, y_demo, rtol=1e-9, atol=1e-9)
        g = torch.randn_like(y)
        demo.zero_grad()
        ours.zero_grad()
        y_demo.backward(g)
        y.backward(g)
        for (name, p_demo), p in zip(demo.named_parameters(), ours.parameters()):
            torch.testing.assert_close(p.grad, p_demo.grad, rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"{name}: {m}")
    ours_buffers = dict(ours.named_buffers())
    for name, b_demo in demo.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(ours_buffers[name], b_demo, rtol=1e-9, atol=1e-9, msg=name)
    assert int(ours[1].num_batches_tracked) == 3
    ours.eval()
    demo.eval()
    torch.testing.assert_close(ours(x), demo(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_layouts_agree_without_affine(channels_last):
    """BN without affine parameters (MoCo v3's last projector BN): the sliced layout's outputs,
    input gradients and running statistics equal the sub-batch layout's (float64)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    nets = [convert_split_bn_(_conv_bn_net(nn.BatchNorm2d, affine=False)).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=fmt)
    outs, grads = [], []
    for net, layout in zip(nets, ("sub_batches", "sliced")):
        x_in = x.clone().requires_grad_()
        y = forward_in_splits(net, x_in, 3, split_norms(net), layout)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y))
        outs.append(y.detach())
        grads.append(x_in.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)
    for (name, a), b in zip(nets[0].named_buffers(), nets[1].buffers()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)


def test_split_bn_layout_is_checked():
    bn = SplitBatchNorm2d(4)
    with pytest.raises(ValueError, match="unknown split BN layout 'rows'"):
        forward_in_splits(bn, torch.randn(4, 4, 3, 3), 2, [bn], "rows")


def test_split_bn_cumulative_average_when_momentum_is_none():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, momentum=None)
    batches = [torch.randn(8, 3, 4, 4) + i for i in range(3)]
    for x in batches:
        forward_in_splits(bn, x, 2, [bn])
    sub_means = [torch.stack([b[:4].mean((0, 2, 3)), b[4:].mean((0, 2, 3))]).mean(0)
                 for b in batches]
    # Momentum None averages the steps seen so far, starting from the initial zeros.
    torch.testing.assert_close(bn.running_mean, torch.stack(sub_means).mean(0), rtol=1e-5, atol=1e-6)


def test_split_bn_keeps_channels_last_and_checks_the_batch():
    bn = SplitBatchNorm2d(4)
    x = torch.randn(4, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert forward_in_splits(bn, x, 2, [bn]).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="not a multiple of method.bn_splits=3"):
        forward_in_splits(bn, x, 3, [bn])
    assert "split_mean_sum" not in bn.state_dict()  # checkpoints keep nn.BatchNorm2d's keys


def test_convert_split_bn_replaces_only_plain_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    convert_split_bn_(net)
    assert isinstance(net[1], SplitBatchNorm2d) and isinstance(net[2][0], SplitBatchNorm2d)


def test_single_process_shuffle_roundtrip():
    x = torch.arange(10.0).view(10, 1)
    shuffled, idx = batch_shuffle(x)
    assert sorted(shuffled.view(-1).tolist()) == x.view(-1).tolist()
    torch.testing.assert_close(batch_unshuffle(shuffled, idx), x)


def test_split_bn_default_in_one_process_and_trains():
    torch.manual_seed(0)
    model = small_moco(shuffle_bn="auto", bn_splits=4)
    assert model.shuffle_bn == "split"
    out = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_symmetric_and_v3_steps(version):
    torch.manual_seed(0)
    model = small_moco(version=version, symmetric=True, mlp_hidden=32)
    out = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.keys.shape == (16, 16)
    if version == "v3":
        assert model.queue is None and model.predictor is not None
        assert model.predictor[0].weight.grad is not None


def test_unknown_backbone_names_the_fix():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet19'.*timm.list_models"):
        MoCo("resnet19")


def test_module_backbone_without_num_features_is_a_clear_error():
    with pytest.raises(ValueError, match="num_features"):
        MoCo(nn.Conv2d(3, 4, 3), queue_size=16)


def test_compiled_encoders_match_eager_with_split_bn():
    """torch.compile of backbone and head (what `run.compile` turns on for long GPU runs): the
    same loss, gradients and running statistics as eager, and one graph serves every sub-batch."""
    from torch._dynamo.utils import counters

    def tiny(compiled: bool) -> MoCo:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.num_features = 8
        moco = MoCo(net, version="v2", dim=8, queue_size=32, momentum=0.9, temperature=0.2,
                    shuffle_bn="split", bn_splits=4, mlp_hidden=16, loss_backend="torch",
                    ema_backend="torch")
        if compiled:
            moco.compile_encoders()
        return moco

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny(False), tiny(True)
    for step in range(2):
        x_q, x_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
        outs = []
        for moco in (eager, compiled):
            torch.manual_seed(step)  # the same key shuffle
            out = moco(x_q, x_k)
            out.loss.backward()
            moco.enqueue(out.keys)
            outs.append(out.loss.detach())
        torch.testing.assert_close(outs[1], outs[0], **TOL32)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, **TOL32, msg=name)
    bn_e, bn_c = eager.backbone[1], compiled.backbone[1]
    torch.testing.assert_close(bn_c.running_mean, bn_e.running_mean, **TOL32)
    # Query and key backbone: one graph each, whatever the number of sub-batches and steps.
    assert 2 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_split_bn_collects_only_inside_forward_in_splits():
    """Called directly (fine-tuning the backbone, say) a SplitBatchNorm2d is a plain BatchNorm2d;
    a sub-batch that fails leaves no statistics behind."""
    torch.manual_seed(0)
    bn, plain = SplitBatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(bn(x), plain(x))
    torch.testing.assert_close(bn.running_mean, plain.running_mean)
    assert int(bn.split_calls) == 0

    def failing(chunk: torch.Tensor) -> torch.Tensor:
        if failing.calls == 1:
            raise RuntimeError("out of memory")
        failing.calls += 1
        return bn(chunk)

    failing.calls = 0
    with pytest.raises(RuntimeError, match="out of memory"):
        forward_in_splits(failing, x, 2, [bn], "sub_batches")
    assert int(bn.split_calls) == 0 and not bn.collecting
    torch.testing.assert_close(bn.running_mean, plain.running_mean)

    def failing_after_bn(batch: torch.Tensor) -> torch.Tensor:
        bn(batch)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        forward_in_splits(failing_after_bn, x, 2, [bn], "sliced")
    assert int(bn.split_calls) == 0 and not bn.collecting and bn.slices == 1
    torch.testing.assert_close(bn.running_mean, plain.running_mean)


def test_split_mode_needs_plain_batchnorm():
    """BN subclasses (timm's BatchNormAct2d) cannot be split: an explicit `split` says what to do
    instead; `auto` in one process falls back to plain BN with a warning."""
    from timm.layers import BatchNormAct2d

    def net() -> nn.Module:
        m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        m.num_features = 4
        return m

    with pytest.raises(ValueError, match="shuffle_bn=ddp"):
        MoCo(net(), dim=4, queue_size=8, shuffle_bn="split", mlp_hidden=8)
    assert MoCo(net(), dim=4, queue_size=8, shuffle_bn="auto", mlp_hidden=8).shuffle_bn == "none"


def test_moco_split_mode_matches_the_demo_formulation():
    """MoCo's query and key encoders in split mode: features as the demo's reshaped split BN on
    the same (interleaved) sub-batches, one running-statistics step per encoder call."""
    from fastmoco.bench.reference_models import SplitBatchNorm, _split_bn_

    torch.manual_seed(0)
    s, n = 4, 16
    model = small_moco(shuffle_bn="split", bn_splits=s)
    demo = copy.deepcopy(model.query_encoder)
    demo_backbone = demo[0]
    for name, m in list(demo_backbone.named_modules()):
        if isinstance(m, SplitBatchNorm2d):  # back to plain BN, then the demo's split BN
            parent = demo_backbone.get_submodule(name.rpartition(".")[0]) if "." in name else demo_backbone
            plain = nn.BatchNorm2d(m.num_features)
            plain.load_state_dict(m.state_dict())
            setattr(parent, name.rpartition(".")[2], plain)
    _split_bn_(demo_backbone, s)
    for name, m in demo_backbone.named_modules():
        if isinstance(m, SplitBatchNorm):
            m.load_state_dict(model.query_encoder[0].get_submodule(name).state_dict())
    x = torch.randn(n, 3, 32, 32)
    interleaved = x.view(s, n // s, 3, 32, 32).transpose(0, 1).reshape(n, 3, 32, 32)
    ours = model._encode(model.query_encoder, x)
    theirs = demo(interleaved).view(n // s, s, -1).transpose(0, 1).reshape(n, -1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    first_bn = next(m for m in model.query_encoder.modules() if isinstance(m, SplitBatchNorm2d))
    assert int(first_bn.num_batches_tracked) == 1
    demo_bn = next(m for m in demo.modules() if isinstance(m, SplitBatchNorm))
    torch.testing.assert_close(first_bn.running_var, demo_bn.running_var, rtol=1e-4, atol=1e-6)
    model(x, torch.randn(n, 3, 32, 32)).loss.backward()  # one step: query and key, once each
    assert int(first_bn.num_batches_tracked) == 2
    key_bn = next(m for m in model.key_encoder.modules() if isinstance(m, SplitBatchNorm2d))
    assert int(key_bn.num_batches_tracked) == 1


def test_the_model_keeps_its_flat_ema_buffers_and_queue_dtype_through_moves():
    """Any .to() re-points both encoders into flat buffers (one lerp per EMA) with the new
    strides, and the queue follows the parameters' dtype on the CPU (the compute dtype is for
    GPUs, where the fused loss reads it)."""
    model = small_moco(compute_dtype=torch.bfloat16)
    for moved in (model.to(memory_format=torch.channels_last), model.double(), model.float()):
        assert moved is model
        for encoder in (model.query_encoder, model.key_encoder):
            layout = flat_layout(encoder)
            assert layout is not None and len(layout.buffers) == 1
            assert all(p.data_ptr() >= layout.buffers[0].data_ptr() for p in encoder.parameters())
        assert model.queue.keys.dtype == next(model.parameters()).dtype
    conv = next(p for p in model.query_encoder.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    before = [p.clone() for p in model.key_encoder.parameters()]
    with torch.no_grad():
        for p in model.query_encoder.parameters():
            p.add_(1.0)
    model.momentum_update(0.5)  # through the flat buffers
    for b, p, q in zip(before, model.key_encoder.parameters(), model.query_encoder.parameters()):
        torch.testing.assert_close(p, 0.5 * b + 0.5 * q)


def test_the_world_size_is_given_not_read():
    """Shuffle BN's mode follows the world size the model is given, with no process group."""
    assert small_moco(shuffle_bn="auto").shuffle_bn == "split"
    assert small_moco(shuffle_bn="auto", world_size=4).shuffle_bn == "ddp"

"""InfoNCE: the chunked torch path and the Triton kernels against the plain reference.

Triton kernels run on CPU tensors only through Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported; the rest of the suite imports triton
normally (and the compile checks need it that way). So the Triton cases here are marked with
`interp`; in a normal pytest process they skip and one test, `test_triton_cases_in_interpreter`,
re-runs exactly them in a TRITON_INTERPRET=1 subprocess and fails with its output.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fastmoco.kernels import infonce as tri
from fastmoco.kernels import infonce_inbatch_loss, infonce_loss
from fastmoco.kernels.chunked import infonce_chunked, infonce_rows_chunked
from fastmoco.kernels.launch import interpreter_active
from fastmoco.kernels.reference import infonce_inbatch_loss_reference, infonce_loss_reference
from numerics import rel_err

INTERP = interpreter_active()
interp = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make(n: int, c: int, k_rows: int, dtype=torch.float32, scale: float = 1.0, seed: int = 0):
    """Normalised features (as MoCo feeds them) times `scale`; positives near their queries."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, c, generator=g), dim=1)
    k = F.normalize(q + 0.8 * torch.randn(n, c, generator=g), dim=1)
    queue = F.normalize(torch.randn(k_rows, c, generator=g), dim=1)
    return [(x * scale).to(dtype) for x in (q, k, queue)]


def reference(q, k, queue, t, offset=None):
    """Loss, accuracy and dL/dq of the reference, evaluated in fp32 on the same inputs."""
    qr = q.detach().float().requires_grad_()
    if offset is None:
        loss, acc = infonce_loss_reference(qr, k.float(), queue.float(), t)
    else:
        loss, acc = infonce_inbatch_loss_reference(qr, queue.float(), t, offset)
    loss.backward()
    return loss.detach(), acc, qr.grad


def run(fn, q, *args):
    """Loss, accuracy and dL/dq of fn(q, *args)."""
    q = q.detach().clone().requires_grad_()
    loss, acc = fn(q, *args)
    loss.backward()
    return loss.detach(), acc, q.grad


def check(got, want, dtype, n):
    (loss, acc, grad), (loss_r, acc_r, grad_r) = got, want
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(loss, loss_r) <= tol, (loss.item(), loss_r.item())
    assert rel_err(grad.float(), grad_r) <= tol, rel_err(grad.float(), grad_r)
    # low precision can flip a near tie: allow one row
    assert abs(acc.item() - acc_r.item()) <= (1e-4 if dtype == torch.float32 else 100.0 / n + 1e-4)


SHAPES = [  # (N, C, K, T): N=1, C not a power of two, K not a multiple of any block, tiny T
    (1, 100, 1000, 0.07),
    (37, 128, 203, 0.2),
    (5, 256, 77, 0.01),
    (20, 24, 130, 0.1),
]


# ---------------------------------------------------------------- chunked torch path (CPU)
@pytest.mark.parametrize("n,c,k_rows,t", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_reference(n, c, k_rows, t, dtype):
    q, k, queue = make(n, c, k_rows, dtype, seed=n)
    got = run(lambda q_, *a: infonce_chunked(q_, *a, chunk=64), q, k, queue, t)
    check(got, reference(q, k, queue, t), dtype, n)


def test_chunked_inbatch_matches_reference():
    q, _, keys = make(12, 64, 48, seed=3)
    keys[12:24] = F.normalize(q + 0.5 * torch.randn(12, 64), dim=1)  # positives at offset 12
    got = run(lambda q_, kk: infonce_chunked(q_, kk[12:24], kk, 0.1, pos_offset=12, chunk=20), q, keys)
    check(got, reference(q, None, keys, 0.1, offset=12), torch.float32, 12)


def test_chunked_large_magnitude_tiny_temperature():
    q, k, queue = make(9, 100, 300, scale=30.0, seed=5)
    got = run(lambda q_, *a: infonce_chunked(q_, *a, chunk=128), q, k, queue, 0.01)
    assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all()
    check(got, reference(q, k, queue, 0.01), torch.float32, 9)


@pytest.mark.parametrize("inbatch", [False, True])
def test_chunked_switches_from_unshifted_to_shifted(inbatch, monkeypatch):
    """Chunks of logits ≤ UNSHIFTED_MAX run unshifted; a later chunk above it (queue rows scaled
    up) moves the row sums onto the shifted path mid-way. Both paths run; the result is exact."""
    import fastmoco.kernels.chunked as chunked

    q, k, queue = make(10, 32, 96, seed=11)
    queue[64:] *= 80.0  # logits/T up to 80/0.2 = 400 from the third chunk of 32
    exps = []
    real_exp = torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda s: exps.append(s.shape) or real_exp(s))
    subs = []
    real_sub = torch.Tensor.sub_
    monkeypatch.setattr(torch.Tensor, "sub_", lambda s, *a: subs.append(s.shape) or real_sub(s, *a))
    if inbatch:
        keys = torch.cat([queue[:32], F.normalize(q + 0.5 * torch.randn(10, 32), dim=1), queue[32:]])
        got = run(lambda q_, kk: infonce_chunked(q_, kk[32:42], kk, 0.2, pos_offset=32, chunk=32),
                  q, keys)
        want = reference(q, None, keys, 0.2, offset=32)
    else:
        got = run(lambda q_, *a: infonce_chunked(q_, *a, chunk=32), q, k, queue, 0.2)
        want = reference(q, k, queue, 0.2)
    check(got, want, torch.float32, 10)
    chunks = math.ceil((106 if inbatch else 96) / 32)
    assert len(exps) == chunks and 0 < len(subs) < chunks  # some chunks each way
    assert chunked.UNSHIFTED_MAX < 80.0 / 0.2


def test_dispatch_backends_agree_on_cpu():
    q, k, queue = make(6, 32, 50, seed=7)
    want = reference(q, k, queue, 0.2)
    for backend in ("auto", "torch", "chunked"):
        check(run(lambda q_, *a: infonce_loss(q_, *a, backend=backend), q, k, queue, 0.2),
              want, torch.float32, 6)
    with pytest.raises(ValueError, match="unknown backend"):
        infonce_loss(q, k, queue, 0.2, backend="cuda")


def test_dispatch_inbatch_checks_offset():
    q, _, keys = make(4, 16, 8)
    with pytest.raises(ValueError, match="offset"):
        infonce_inbatch_loss(q, keys, 0.2, offset=6)
    check(run(lambda q_, kk: infonce_inbatch_loss(q_, kk, 0.2, 4, backend="chunked"), q, keys),
          reference(q, None, keys, 0.2, offset=4), torch.float32, 4)


def test_bad_input_names_the_fix():
    q, k, queue = make(4, 16, 8)
    with pytest.raises(ValueError, match="same C"):
        infonce_loss(q, k, queue[:, :8], 0.2, backend="chunked")
    with pytest.raises(ValueError, match="temperature"):
        infonce_loss(q, k, queue, 0.0, backend="chunked")


def test_triton_on_cpu_without_interpreter_raises_clearly():
    if INTERP:
        pytest.skip("interpreter is on in this process")
    q, k, queue = make(4, 16, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        infonce_loss(q, k, queue, 0.2, backend="triton")


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=interp)])
def test_exact_value_aligned_keys(backend):
    """q = k = every queue key: all K+1 logits tie, loss = log(K+1), the tie goes to k+."""
    k_rows = 70
    q = torch.full((3, 20), 0.5)  # exact products: no rounding anywhere
    queue = torch.full((k_rows, 20), 0.5)
    loss, acc = infonce_loss(q, q.clone(), queue, 0.5, backend=backend)
    assert loss.item() == pytest.approx(math.log(k_rows + 1), rel=1e-6)
    assert acc.item() == 100.0


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=interp)])
def test_inplace_enqueue_before_backward_raises(backend):
    q, k, queue = make(4, 16, 40)
    q.requires_grad_()
    loss, _ = infonce_loss(q, k, queue, 0.2, backend=backend)
    queue[:4] = k  # what an enqueue does
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=interp)])
def test_scaled_loss_scales_gradient_and_no_grad_path(backend):
    q, k, queue = make(8, 40, 90, seed=11)
    loss_r, _, grad_r = reference(q, k, queue, 0.1)
    def scaled(q_, *a):
        loss, acc = infonce_loss(q_, *a, backend=backend)
        return loss * 2.5, acc

    got = run(scaled, q, k, queue, 0.1)
    assert rel_err(got[2], 2.5 * grad_r) <= 1e-5
    with torch.no_grad():
        loss, _ = infonce_loss(q, k, queue, 0.1, backend=backend)
    assert rel_err(loss, loss_r) <= 1e-5


# ---------------------------------------------------------------- Triton kernels (interpreter)
@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launcher allocates starts as NaN (int8: 2) so unwritten elements fail."""

    def empty(shape, dtype, device):
        fill = 2 if dtype == torch.int8 else float("nan")
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(tri, "_empty", empty)


@interp
@pytest.mark.parametrize("n,c,k_rows,t", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference(poisoned, n, c, k_rows, t, dtype):
    q, k, queue = make(n, c, k_rows, dtype, seed=n + 1)
    got = run(lambda q_, *a: infonce_loss(q_, *a, backend="triton"), q, k, queue, t)
    check(got, reference(q, k, queue, t), dtype, n)


@interp
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("offset", [None, 0, 33])
def test_triton_rows_split_and_inbatch(poisoned, splits, offset):
    """Split-K partials merge exactly; per-row loss, LSE, correct and G against torch."""
    n, c, m_rows, t = 33, 48, 400, 0.1
    q, k, keys = make(n, c, m_rows, seed=splits)
    if offset is not None:
        keys[offset : offset + n] = k
    pos = k if offset is None else keys[offset : offset + n]
    loss, lse, correct, g = tri.infonce_rows_triton(q, pos, keys, t, offset, splits=splits)
    loss_c, lse_c, correct_c, g_c = infonce_rows_chunked(q, pos, keys, t, offset, chunk=64)
    assert set(correct.tolist()) <= {0, 1}
    assert torch.equal(correct.bool(), correct_c)
    for a, b in ((loss, loss_c), (lse, lse_c), (g, g_c)):
        assert rel_err(a, b) <= 1e-5
    want = reference(q, k, keys, t, offset)
    assert rel_err(loss.mean(), want[0]) <= 1e-5
    assert rel_err(g / n, want[2]) <= 1e-5


@interp
def test_triton_inbatch_dispatch_matches_reference(poisoned):
    q, _, keys = make(16, 100, 64, torch.bfloat16, seed=4)
    got = run(lambda q_, kk: infonce_inbatch_loss(q_, kk, 0.2, 16, backend="triton"), q, keys)
    check(got, reference(q, None, keys, 0.2, offset=16), torch.bfloat16, 16)


@interp
def test_triton_large_magnitude_tiny_temperature(poisoned):
    q, k, queue = make(7, 64, 150, scale=30.0, seed=9)
    got = run(lambda q_, *a: infonce_loss(q_, *a, backend="triton"), q, k, queue, 0.01)
    assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all()
    check(got, reference(q, k, queue, 0.01), torch.float32, 7)


@interp
def test_triton_wide_features():
    """C=1000 pads to BLOCK_C=1024 (the widest supported)."""
    q, k, queue = make(3, 1000, 40, seed=2)
    check(run(lambda q_, *a: infonce_loss(q_, *a, backend="triton"), q, k, queue, 0.2),
          reference(q, k, queue, 0.2), torch.float32, 3)


def test_triton_cases_in_interpreter(rerun_in_triton_interpreter):
    """Re-run the `interp` cases of this file in a TRITON_INTERPRET=1 subprocess."""
    rerun_in_triton_interpreter(__file__, "triton and not in_interpreter and not without_interpreter")


# ---------------------------------------------------------------- GPU (lent machines only)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,k_rows", [(256, 128, 65536), (1, 100, 4097), (1000, 256, 3000)])
def test_triton_cuda_matches_reference(n, c, k_rows, dtype):
    dev = torch.device("cuda")
    q, k, queue = (x.to(dev) for x in make(n, c, k_rows, dtype))
    check(run(lambda q_, *a: infonce_loss(q_, *a, backend="triton"), q, k, queue, 0.2),
          reference(q, k, queue, 0.2), dtype, n)


def test_rowwise_function_scales_the_rows_gradient():
    """kernels/rowwise.py on its own: a plain-torch rows function (per-row loss and dL/dq from
    autograd on the reference logits) through RowwiseInfoNCE gives the reference loss, accuracy
    and query gradient; its input checks name the fix."""
    from fastmoco.kernels.rowwise import check_infonce_inputs, rowwise_infonce

    def rows(q, pos, candidates, temperature, pos_offset, need_grad):
        with torch.enable_grad():  # a Function's forward runs without grad mode
            q = q.detach().requires_grad_()
            logits = torch.cat([(q * pos).sum(1, keepdim=True), q @ candidates.T], dim=1) / temperature
            loss_rows = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long), reduction="none")
            (grad,) = torch.autograd.grad(loss_rows.sum(), q)
        return loss_rows.detach(), logits.logsumexp(1).detach(), logits.argmax(1) == 0, grad

    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    loss, acc = rowwise_infonce(rows, q, k, queue, 0.2, None)
    loss.backward()
    q_ref = q.detach().clone().requires_grad_()
    loss_ref, acc_ref = infonce_loss_reference(q_ref, k, queue, 0.2)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc, acc_ref)
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="feature dims differ"):
        check_infonce_inputs(q, k[:, :4], queue, 0.2, "infonce")
    with pytest.raises(ValueError, match="temperature must be a positive finite float"):
        check_infonce_inputs(q, k, queue, 0.0, "infonce")

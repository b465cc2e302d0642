"""The fast copy and attention CE that training runs against the materialised references (the definitions) of
copy_attention.py and distill_attention.py: values and gradients in float64 (eager and compiled), bf16/fp16 within their tolerance, and
nothing N x N saved for backward. CPU, tiny shapes, about 20 s (one compile); CUDA cases run where a GPU is.

    .venv/bin/python -m pytest tests/test_fast_paths.py -q
"""
import pytest
import torch

import copy_attention
import distill_attention
import attention_kernels
import teacher
from copy_attention import copy_reference
from distill_attention import attention_ce_reference

B, H, N = 2, 3, 17  # no other size is 17: a saved tensor with two dimensions of 17 is an N x N map


@pytest.fixture(params=["cpu", "cpu, portable path", pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))])
def device(request, monkeypatch):
    """CPU; CPU on the path GPUs take (copy's forward by SDPA, its map recomputed by a softmax); CUDA. On CPU in blocks
    of 2 heads, so that several blocks run."""
    if request.param == "cuda":
        return "cuda"
    monkeypatch.setattr(attention_kernels, "BLOCK", {"cpu": 2 * N * N})
    if request.param == "cpu, portable path":
        monkeypatch.setattr(attention_kernels, "SDPA_FORWARD", ("cuda", "cpu"))
    return "cpu"


def tensors(d_t=8, d_s=8, device="cpu", dtype=torch.float64, seed=0):
    """q_t, k_t (B, H, N, d_t) and q_s, k_s, v_s (B, H, N, d_s); spread 3 makes peaked maps, not near-uniform ones."""
    g = torch.Generator().manual_seed(seed)
    make = lambda d: (3 * torch.randn(B, H, N, d, generator=g, dtype=torch.float64)).to(device, dtype)
    return make(d_t), make(d_t), make(d_s).requires_grad_(), make(d_s).requires_grad_(), make(d_s).requires_grad_()


def exact(device):
    """Compute dtype and tolerance: float64 on CPU (the blocked kernels run it); CUDA's fused kernels run float32."""
    return (torch.float64, 1e-10) if device == "cpu" else (torch.float32, 2e-4)


def copy_and_grad(fn, q_t, k_t, v, w):
    out = fn(q_t, k_t, v)
    return out.detach(), torch.autograd.grad((out * w).sum(), v)[0]


def ce_and_grads(fn, q_t, k_t, q_s, k_s):
    loss = fn(q_s, k_s, q_t, k_t)
    return (loss.detach(), *torch.autograd.grad(loss, (q_s, k_s)))


def assert_close(got, want, tol):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("d_t,d_s", [(8, 8), (8, 4), (4, 8)])  # a teacher wider or narrower than the student
def test_copy_equals_the_definition(device, d_t, d_s):
    dtype, tol = exact(device)
    q_t, k_t, v, _, _ = tensors(d_t, d_s, device, dtype)
    w = torch.randn(B, H, N, d_s, dtype=dtype, device=device)  # a gradient that is not all ones
    assert_close(copy_and_grad(attention_kernels.copy_fast, q_t, k_t, v, w), copy_and_grad(copy_reference, q_t, k_t, v, w), tol)
    if device == "cpu":  # and against finite differences, not only against autograd of the reference
        small = v[:1, :1].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda v: attention_kernels.copy_fast(q_t[:1, :1], k_t[:1, :1], v), small, fast_mode=True)


@pytest.mark.parametrize("d_t,d_s", [(8, 8), (8, 4), (4, 8)])
def test_attention_ce_equals_the_definition(device, d_t, d_s):
    dtype, tol = exact(device)
    q_t, k_t, q_s, k_s, _ = tensors(d_t, d_s, device, dtype)
    got = ce_and_grads(attention_kernels.attention_ce_fast, q_t, k_t, q_s, k_s)
    assert_close(got, ce_and_grads(attention_ce_reference, q_t, k_t, q_s, k_s), tol)
    assert got[0] > 1.0  # peaked maps that disagree: a loss well above zero, so the comparison means something
    with torch.no_grad():  # without gradients the op skips computing them and returns the same loss
        assert_close([attention_kernels.attention_ce_fast(q_s, k_s, q_t, k_t)], got[:1], tol)
    if device == "cpu":
        small = [t[:1, :1].detach().requires_grad_() for t in (q_s, k_s)]
        assert torch.autograd.gradcheck(lambda q, k: attention_kernels.attention_ce_fast(q, k, q_t[:1, :1], k_t[:1, :1]), small,
                                        fast_mode=True)


def saved_shapes(fn, *args):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, shapes


def n_by_n(shapes):
    return [s for s in shapes if sum(d == N for d in s) >= 2]


def test_nothing_n_by_n_is_saved_eager():
    q_t, k_t, q_s, k_s, v = tensors()
    for fn, args in ((attention_kernels.copy_fast, (q_t, k_t, v)), (attention_kernels.attention_ce_fast, (q_s, k_s, q_t, k_t))):
        shapes = saved_shapes(fn, *args)[1]
        assert shapes and not n_by_n(shapes), (fn.__name__, shapes)
    # the check can fail: the references keep their maps
    assert n_by_n(saved_shapes(copy_reference, q_t, k_t, v)[1])
    assert n_by_n(saved_shapes(attention_ce_reference, q_s, k_s, q_t, k_t)[1])


def test_compiled_equals_the_definition_and_saves_nothing_n_by_n():
    """torch.compile sees the custom ops as opaque: it cannot fuse their insides into N x N tensors it would save."""
    q_t, k_t, q_s, k_s, v = tensors(8, 4)
    w = torch.randn(B, H, N, 4, dtype=torch.float64)

    def both(copy, ce):
        return (copy(q_t, k_t, v) * w).sum() + ce(q_s, k_s, q_t, k_t)

    loss, shapes = saved_shapes(torch.compile(lambda: both(attention_kernels.copy_fast, attention_kernels.attention_ce_fast)))
    assert shapes and not n_by_n(shapes), shapes
    ref = both(copy_reference, attention_ce_reference)
    assert_close([loss.detach(), *torch.autograd.grad(loss, (v, q_s, k_s))],
                 [ref.detach(), *torch.autograd.grad(ref, (v, q_s, k_s))], 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(device, dtype):
    """Low-precision inputs: copy runs in their dtype (as SDPA does), the CE in float32 whatever they are. The
    references get the same rounded inputs in float64, so the tolerances measure our arithmetic only."""
    q_t, k_t, q_s, k_s, v = tensors(device=device, dtype=dtype)
    up = [t.detach().double().requires_grad_() for t in (q_t, k_t, q_s, k_s, v)]
    w = torch.randn(B, H, N, 8, dtype=dtype, device=device)
    out, dv = copy_and_grad(attention_kernels.copy_fast, q_t, k_t, v, w)
    ref_out, ref_dv = copy_and_grad(copy_reference, up[0], up[1], up[4], w.double())
    assert out.dtype == dv.dtype == dtype
    scale = ref_out.abs().max()  # the output is a convex mix of v: half-precision rounding relative to its range
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2 * scale, rtol=0)
    torch.testing.assert_close(dv.double(), ref_dv, atol=2e-2 * ref_dv.abs().max(), rtol=0)  # float32 inside
    loss, dq, dk = ce_and_grads(attention_kernels.attention_ce_fast, q_t, k_t, q_s, k_s)
    ref = ce_and_grads(attention_ce_reference, up[0], up[1], up[2], up[3])
    assert loss.dtype == torch.float32 and dq.dtype == dk.dtype == dtype
    torch.testing.assert_close(loss.double(), ref[0], atol=1e-5, rtol=1e-5)  # float32 arithmetic inside
    for a, b in zip((dq, dk), ref[1:]):
        torch.testing.assert_close(a.double(), b, atol=1e-2 * b.abs().max(), rtol=0)  # only the result is rounded


def test_copy_under_autocast_runs_in_the_autocast_dtype():
    q_t, k_t, _, _, v = tensors(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_kernels.copy_fast(q_t, k_t, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v)  # what the student's blocks compute
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
    out.float().sum().backward()
    assert v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0


def test_custom_ops_are_well_formed_for_the_compiler():
    """torch.library.opcheck: schema, autograd registration, and the fake (shape/dtype/stride-only) versions
    torch.compile plans with agree with the real ops; in bf16 (the CE's outputs are then of mixed dtypes), on q, k, v
    that are views of one qkv tensor laid out (B, N, 3, H, D), as a block hands them over."""
    q_t, k_t = (t.detach().bfloat16() for t in tensors()[:2])
    q_s, k_s, v = torch.randn(B, N, 3, H, 8, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
    torch.library.opcheck(attention_kernels.copy_forward, (q_t, k_t, v.requires_grad_()))
    torch.library.opcheck(attention_kernels.attention_ce_forward, (q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t, True))

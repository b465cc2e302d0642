"""The GPU path's numerics on CUDA: attention copy and the distillation loss against their definitions (float32 and
bf16 autocast, values and gradients), and one compiled distillation training step that keeps no N x N tensor for
backward (the paper's methods, Li et al. 2024, Sec. 3.1-3.2, as run on GPUs). Every test skips without CUDA; on CPU
test_copy.py and test_distill.py check the same functions in float64. benchmarks/gpu_check.sh runs this file on a
GPU machine.

    python3 -m pytest -q tests/test_cuda.py
"""
import pytest
import torch

import attention_kernels
import copy_attention
import distill_attention
import train
import vit
from teacher import Teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it there)")

# Relative error ||ours - reference|| / ||reference|| against a float64 reference. float32: far below what bf16 or
# TF32 rounding (2^-9, 2^-11 per element) would give, so a kernel that quietly drops to either fails. bf16: inputs and
# outputs rounded to 8 bits of mantissa, a few roundings deep.
TOL = {"float32": 1e-5, "bf16": 2e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 means float32 here (train.run may have let matmuls use TF32 in this process)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(ours, ref):
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def randn(*shape, seed, device="cuda"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def autocast(amp, device="cuda"):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16")


def copy_errors(amp, N, D_t=64, D_s=64, device="cuda"):
    """copy_fast against copy_reference in float64: relative error of the output and of the gradient for v_s."""
    q_t, k_t = randn(2, 3, N, D_t, seed=0, device=device), randn(2, 3, N, D_t, seed=1, device=device)
    v_s = randn(2, 3, N, D_s, seed=2, device=device).requires_grad_()
    grad = randn(2, 3, N, D_s, seed=3, device=device)
    with autocast(amp, device):
        out = attention_kernels.copy_fast(q_t, k_t, v_s)
    (g,) = torch.autograd.grad(out, v_s, grad.to(out.dtype))
    v64 = v_s.detach().double().requires_grad_()
    ref = copy_attention.copy_reference(q_t.double(), k_t.double(), v64)
    (g_ref,) = torch.autograd.grad(ref, v64, grad.double())
    return out.dtype, rel_err(out, ref), rel_err(g, g_ref)


@pytest.mark.parametrize("amp", ["float32", "bf16"])
@pytest.mark.parametrize("N,D_t", [(65, 64), (197, 64), (197, 32)])  # D_t 32: a teacher with narrower heads
def test_copy_equals_definition(amp, N, D_t):
    dtype, err_out, err_grad = copy_errors(amp, N, D_t)
    assert dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)  # runs in the autocast dtype, as SDPA does
    assert err_out < TOL[amp] and err_grad < TOL[amp], (err_out, err_grad)


def distill_errors(amp, N, D_t=64, D_s=64, device="cuda"):
    """attention_ce against attention_ce_reference in float64 on the same (dtype-rounded) inputs: the loss's dtype
    and relative error, and the relative errors of the gradients for q_s and k_s."""
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32  # what the student's and teacher's qkv linears give
    q_s, k_s = (randn(4, 3, N, D_s, seed=i, device=device).to(dtype).requires_grad_() for i in (0, 1))
    q_t, k_t = (randn(4, 3, N, D_t, seed=i, device=device).to(dtype) for i in (2, 3))
    with autocast(amp, device):
        loss = attention_kernels.attention_ce_fast(q_s, k_s, q_t, k_t)
    grads = torch.autograd.grad(loss, (q_s, k_s))
    ref_in = [t.detach().double().requires_grad_() for t in (q_s, k_s)]
    ref = distill_attention.attention_ce_reference(*ref_in, q_t.double(), k_t.double())
    ref_grads = torch.autograd.grad(ref, ref_in)
    return loss.dtype, [g.dtype for g in grads], rel_err(loss, ref), [rel_err(a, b) for a, b in zip(grads, ref_grads)]


@pytest.mark.parametrize("amp", ["float32", "bf16"])
@pytest.mark.parametrize("N,D_t", [(65, 64), (197, 64), (577, 64), (197, 32)])
def test_distillation_loss_equals_definition(amp, N, D_t):
    loss_dtype, grad_dtypes, err_loss, err_grads = distill_errors(amp, N, D_t)
    # The loss is computed in float32 whatever the inputs (design: a bf16 softmax over 577 keys loses the small
    # probabilities the cross-entropy weighs), so on bf16 inputs it is float32-accurate; gradients come back in the
    # inputs' dtype, rounded once.
    assert loss_dtype == torch.float32
    assert err_loss < TOL["float32"] * 10, err_loss
    assert grad_dtypes == [torch.bfloat16 if amp == "bf16" else torch.float32] * 2
    assert max(err_grads) < TOL[amp], err_grads


def compiled_distill_step(tmp_path, device="cuda", amp="bf16"):
    """One torch.compile'd training step (forward, backward, fused AdamW) of attention distillation between two tiny
    ViTs, every layer distilled. -> (shapes of the activations saved for backward, N, loss, parameters moved)."""
    torch.manual_seed(0)
    arch = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)  # N = 65, D = 32
    teacher_model = vit.VisionTransformer(**arch, global_pool=False)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher_model.state_dict(), "arch": teacher_model.arch}, path)
    student = vit.VisionTransformer(**arch)
    method = distill_attention.DistillAttention(student, Teacher(str(path), student, ":", None, "qk")).to(device)
    if amp == "bf16":
        train.cast_frozen(method, torch.bfloat16)  # the teacher cast once, as train.py does
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=device == "cuda")
    runner = torch.compile(method)
    images, targets = randn(8, 3, 32, 32, seed=4, device=device), torch.full((8, 10), 0.1, device=device)
    before = [p.detach().clone() for p in student.parameters()]
    params = {p.data_ptr() for p in method.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    for _ in range(2):  # the second step runs the cached compiled graph, the one every later step runs
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(amp, device):
            loss, logs = runner(images, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
    return saved, (32 // 4) ** 2 + 1, loss.detach(), logs, moved


def test_compiled_distillation_step_saves_no_token_by_token_tensor(tmp_path):
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    saved, N, loss, logs, moved = compiled_distill_step(tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    assert saved, "no saved tensor was seen: the hooks did not reach the compiled graph"
    assert not [s for s in saved if list(s).count(N) >= 2], f"an N x N tensor was saved for backward: {saved}"
    assert torch.isfinite(loss) and logs["atd"] > 0 and moved

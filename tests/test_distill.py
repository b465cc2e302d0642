"""Attention distillation: the loss without maps against its definition (values and gradients, float64), memory."""
import pytest
import torch

import distill_attention
import attention_kernels
import teacher
import vit
from teacher import Teacher

naive_ce = distill_attention.attention_ce_reference  # the definition: both N x N maps materialised


def qk(B, H, N, D, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for _ in range(2)]


@pytest.mark.parametrize("N,heads_per_block", [(17, 1), (16, 4), (65, 2), (9, None)])
def test_blocked_loss_and_gradients_equal_naive_float64(N, heads_per_block, monkeypatch):
    if heads_per_block:  # several blocks of heads, the last one partial
        monkeypatch.setattr(attention_kernels, "BLOCK", {"cpu": heads_per_block * N * N})
    q_s, k_s = qk(2, 3, N, 8, 0, requires_grad=True)
    q_t, k_t = qk(2, 3, N, 8, 1)
    ours = attention_kernels.attention_ce_fast(q_s, k_s, q_t, k_t)
    ref = naive_ce(q_s, k_s, q_t, k_t)
    assert torch.allclose(ours.double(), ref, atol=1e-6, rtol=0)
    g_ours = torch.autograd.grad(ours, (q_s, k_s))
    g_ref = torch.autograd.grad(ref, (q_s, k_s))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a.double(), b, atol=1e-6)


def test_head_subset_and_different_head_dims():
    q_s, k_s = qk(2, 4, 11, 8, 0, requires_grad=True)
    q_t, k_t = qk(2, 4, 11, 16, 1)  # a wider teacher: maps exchange, head dims need not match
    ours = attention_kernels.attention_ce_fast(q_s[:, :2], k_s[:, :2], q_t[:, :2], k_t[:, :2])
    ref = naive_ce(q_s[:, :2], k_s[:, :2], q_t[:, :2], k_t[:, :2])
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    (g,) = torch.autograd.grad(ours, (q_s,))
    assert g[:, 2:].abs().max() == 0 and g[:, :2].abs().max() > 0


def test_loss_is_minimal_when_student_equals_teacher():
    q, k = qk(2, 3, 13, 8, 0)
    q_s, k_s = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = attention_kernels.attention_ce_fast(q_s, k_s, q, k)
    g_q, g_k = torch.autograd.grad(loss, (q_s, k_s))
    assert g_q.abs().max() < 1e-12 and g_k.abs().max() < 1e-12
    entropy = naive_ce(q, k, q, k)  # CE(p, p) = H(p): the minimum
    assert torch.allclose(loss.double(), entropy)
    q2, k2 = qk(2, 3, 13, 8, 5)
    assert attention_kernels.attention_ce_fast(q2, k2, q, k) > loss


def test_loss_is_float32_under_bf16_autocast():
    q_s, k_s = [t.float().bfloat16().requires_grad_() for t in qk(1, 2, 9, 8, 0)]
    q_t, k_t = [t.float().bfloat16() for t in qk(1, 2, 9, 8, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = attention_kernels.attention_ce_fast(q_s, k_s, q_t, k_t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q_s.grad.dtype == torch.bfloat16
    ref = naive_ce(*(t.detach().double() for t in (q_s, k_s, q_t, k_t)))
    assert abs(loss.item() - ref.item()) < 1e-4


def distill_step_saved_tensors(tmp_path, img, mode="distill", layers=":", heads=None, weight=3.0):
    """Shapes and bytes of the activations one distillation step saves for backward (parameters excluded)."""
    torch.manual_seed(0)
    arch = dict(img_size=img, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    teacher = vit.VisionTransformer(**arch, global_pool=False)
    with torch.no_grad():  # peaked maps, unlike a random init's near-uniform ones, so that every flag shows
        for block in teacher.blocks:
            block.attn.qkv.weight *= 10
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "arch": teacher.arch}, path)
    student = vit.VisionTransformer(**arch)
    with torch.no_grad():
        for block in student.blocks:
            block.attn.qkv.weight *= 10
    teacher = Teacher(str(path), student, layers, heads, distill_attention.FROM_TEACHER[mode])
    method = distill_attention.DistillAttention(student, teacher, mode, atd_weight=weight).train()
    params = {p.data_ptr() for p in method.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, logs = method(torch.randn(2, 3, img, img), torch.full((2, 5), 0.2))
    loss.backward()
    return saved, loss, logs, method


def test_no_token_by_token_tensor_is_saved_and_memory_grows_linearly(tmp_path):
    per_token = []
    for img in (16, 32, 64):  # N = 17, 65, 257 tokens
        saved, *_ = distill_step_saved_tensors(tmp_path, img)
        N = (img // 4) ** 2 + 1
        assert saved and not [s for s in saved if list(s).count(N) >= 2], "an N x N tensor was saved for backward"
        per_token.append(sum(b for _, b in saved) / N)
    # a saved N x N map would multiply bytes per token by ~15 from N = 17 to 257; linear growth keeps it ~constant
    assert max(per_token) / min(per_token) < 1.3, per_token


def test_flags_change_the_loss(tmp_path):
    _, _, base, _ = distill_step_saved_tensors(tmp_path, 16)
    assert base["atd"] > 0
    for kw in (dict(layers="1"), dict(heads=2), dict(mode="distill_q"), dict(mode="distill_k"), dict(mode="distill_v")):
        _, _, logs, _ = distill_step_saved_tensors(tmp_path, 16, **kw)
        assert torch.allclose(logs["task"], base["task"])  # same student, same images: only the attention loss moves
        assert not torch.allclose(logs["atd"], base["atd"]), kw
    _, loss, logs, _ = distill_step_saved_tensors(tmp_path, 16, weight=0.5)
    assert torch.allclose(loss, logs["task"] + 0.5 * logs["atd"])


def test_teacher_runs_only_the_blocks_needed(tmp_path):
    _, _, _, method = distill_step_saved_tensors(tmp_path, 16, layers="0")
    method.teacher.model.blocks[1].forward = None  # would raise if the teacher ran it
    method(torch.randn(2, 3, 16, 16), torch.full((2, 5), 0.2))
    assert torch.equal(method.predict(method.model.eval(), torch.ones(1, 3, 16, 16)),
                       method.model(torch.ones(1, 3, 16, 16)))  # no teacher at inference


@pytest.mark.parametrize("mode", ["distill", "distill_q"])
def test_explicit_map_trains_with_the_same_numbers(tmp_path, mode):
    """--explicit_map: attention_ce_reference itself, both maps materialised, the same loss and gradients as the
    map-free kernel (float32 in both, as training computes it)."""
    results = []
    for explicit in (False, True):
        _, _, _, method = distill_step_saved_tensors(tmp_path, 16, mode=mode, heads=2)
        method.explicit_map = explicit
        method.zero_grad()
        torch.manual_seed(1)
        loss, logs = method(torch.randn(2, 3, 16, 16), torch.full((2, 5), 0.2))
        loss.backward()
        results.append((logs["atd"].detach(), [p.grad.clone() for p in method.model.parameters()]))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_explicit_map_flag_reaches_the_method(tmp_path, monkeypatch):
    _, _, _, method = distill_step_saved_tensors(tmp_path, 16)
    calls = []
    reference = distill_attention.attention_ce_reference
    monkeypatch.setattr(distill_attention, "attention_ce_reference", lambda *a: calls.append(1) or reference(*a))
    fake = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "16", "--batch_size", "8",
            "--num_workers", "0", "--epochs", "1", "--epoch_steps", "1", "--warmup_epochs", "0", "--val_subset", "8"]
    teacher = ["--teacher", str(tmp_path / "teacher.pth"), "--layers", "0"]
    distill_attention.main(fake + teacher + ["--output_dir", str(tmp_path / "a")])
    assert not calls
    distill_attention.main(fake + teacher + ["--explicit_map", "--output_dir", str(tmp_path / "b")])
    assert calls

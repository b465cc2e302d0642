"""Attention copy: the definition, the fast path against it in float64, every mode and flag, the teacher frozen."""
import math

import pytest
import torch

import copy_attention
import vit
from teacher import Teacher

from conftest import ARCH  # teacher_file (conftest.py) writes a teacher of this shape


def student(**kw):
    torch.manual_seed(1)
    return vit.VisionTransformer(**{**ARCH, **kw})


def method_for(path, mode="copy", layers=":", heads=None, **kw):
    s = student(**kw)
    return copy_attention.CopyAttention(s, Teacher(path, s, layers, heads, copy_attention.EXCHANGE[mode]), mode)


def test_fast_copy_equals_definition_float64():
    g = torch.Generator().manual_seed(0)
    q_t, k_t = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v_s = torch.randn(2, 3, 17, 4, generator=g, dtype=torch.float64, requires_grad=True)  # a wider teacher
    out, ref = copy_attention.copy_fast(q_t, k_t, v_s), copy_attention.copy_reference(q_t, k_t, v_s)
    assert torch.allclose(out, ref, atol=1e-12)
    grad = torch.randn_like(out)
    assert torch.allclose(*(torch.autograd.grad(o, v_s, grad)[0] for o in (out, ref)), atol=1e-12)


def reference_logits(student, teacher, x, layers, heads, mode):
    """Float64, explicit maps: every block written out by hand with softmax(q k^T * scale) @ v."""
    s, t = student.double(), teacher.double()
    x = x.double()

    def qkv(block, h):
        B, N, C = h.shape
        return block.attn.qkv(block.norm1(h)).view(B, N, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)

    hs, ht = s.embed(x), t.embed(x)
    for i, (bs, bt) in enumerate(zip(s.blocks, t.blocks)):
        q, k, v = (a.clone() for a in qkv(bs, hs))
        qt, kt, vt = qkv(bt, ht)
        if i in layers:
            for own, theirs, modes in ((q, qt, ("copy", "copy_q")), (k, kt, ("copy", "copy_k")), (v, vt, ("copy_v",))):
                if mode in modes:
                    own[:, :heads] = theirs[:, :heads]
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        hs = hs + bs.attn.proj((attn @ v).transpose(1, 2).reshape(hs.shape))
        hs = hs + bs.mlp(bs.norm2(hs))
        ht = bt(ht)[0]
    return s.forward_head(hs)


@pytest.mark.parametrize("mode,layers,heads", [("copy", ":", None), ("copy_q", ":2", None), ("copy_k", "1,2", None),
                                               ("copy_v", ":", None), ("copy", "-1:", 2), ("copy_q", ":", 3),
                                               ("copy_v", "0", 1)])
def test_copy_equals_float64_reference(teacher_file, mode, layers, heads):
    method = method_for(teacher_file, mode, layers, heads).eval()
    x = torch.randn(3, 3, 16, 16)
    ours = method.predict(method.model, x)
    ref = reference_logits(method.model, method.teacher.model, x, method.teacher.layers, method.teacher.heads, mode)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    # and the copy really changed the output: the student alone computes something else
    assert (method.model.float()(x) - ours).abs().max() > 1e-6


def test_student_with_teacher_weights_equals_teacher(teacher_file):
    method = method_for(teacher_file, global_pool=False)
    method.model.load_state_dict(method.teacher.model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(method.predict(method.model.eval(), x), method.teacher.model(x), atol=1e-6)


def test_teacher_runs_only_needed_blocks_and_gets_no_gradient(teacher_file):
    method = method_for(teacher_file, layers=":1", drop_path=0.1)
    t = method.teacher.model
    t.blocks[1].forward = t.blocks[2].forward = None  # would raise if called
    before = {k: v.clone() for k, v in t.state_dict().items()}
    opt = torch.optim.SGD(method.model.parameters(), lr=0.1)
    method.train()
    loss, _ = method(torch.randn(2, 3, 16, 16), torch.full((2, 5), 0.2))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in t.parameters())
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())
    assert not t.training and method.model.training


def test_copy_saves_no_more_than_scratch(teacher_file):
    """SDPA gets compact q, k, v: what copy keeps for backward is what a plain student step keeps."""
    def saved_bytes(fn):
        params, total = {p.data_ptr() for p in method.parameters()}, []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(0 if t.data_ptr() in params else t.untyped_storage().nbytes()) or t,
                lambda t: t):
            fn().sum().backward()
        return sum(total)

    method = method_for(teacher_file).train()
    x = torch.randn(4, 3, 16, 16)
    copied = saved_bytes(lambda: method.predict(method.model, x))
    scratch = saved_bytes(lambda: method.model(x))
    assert copied <= scratch

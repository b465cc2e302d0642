"""Attention copy: the SDPA path against an explicit float64 reference, the plan each flag resolves, the CLI."""
import math

import pytest
import torch

import copy_attention
import vit

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=5)


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    teacher = vit.VisionTransformer(**ARCH, global_pool=False)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "arch": teacher.arch}, path)
    return str(path)


def student(**kw):
    torch.manual_seed(1)
    return vit.VisionTransformer(**{**ARCH, **kw})


def reference_logits(student, teacher, x, layers, heads, mode):
    """Float64, explicit maps: every block written out by hand with softmax(q k^T * scale) @ v."""
    s, t = student.double(), teacher.double()
    x = x.double()

    def qkv(block, h):
        B, N, C = h.shape
        q, k, v = block.attn.qkv(block.norm1(h)).view(B, N, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    hs, ht = s.embed(x), t.embed(x)
    for i, (bs, bt) in enumerate(zip(s.blocks, t.blocks)):
        q, k, v = qkv(bs, hs)
        qt, kt, _ = qkv(bt, ht)
        if i in layers:
            q, k = q.clone(), k.clone()
            if mode in ("copy", "copy_q"):
                q[:, :heads] = qt[:, :heads]
            if mode in ("copy", "copy_k"):
                k[:, :heads] = kt[:, :heads]
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        hs = hs + bs.attn.proj((attn @ v).transpose(1, 2).reshape(hs.shape))
        hs = hs + bs.mlp(bs.norm2(hs))
        ht = bt(ht)[0]
    return s.forward_head(hs)


@pytest.mark.parametrize("mode,layers,heads", [("copy", ":", None), ("copy_q", ":2", None), ("copy_k", "1,2", None),
                                               ("copy", "-1:", 2), ("copy_q", ":", 3)])
def test_copy_equals_float64_reference(teacher_file, mode, layers, heads):
    method = copy_attention.CopyAttention(student(), teacher_file, layers, heads, mode).eval()
    x = torch.randn(3, 3, 16, 16)
    ours = method.predict(method.model, x)
    ref = reference_logits(method.model, method.teacher, x, method.layers, method.heads, mode)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    # and the copy really changed the output: the student alone computes something else
    assert (method.model.float()(x) - ours).abs().max() > 1e-6


def test_student_with_teacher_weights_equals_teacher(teacher_file):
    s = student(global_pool=False)
    method = copy_attention.CopyAttention(s, teacher_file, ":")
    s.load_state_dict(method.teacher.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(method.predict(s.eval(), x), method.teacher(x), atol=1e-6)


def test_plan_from_flags(teacher_file, capsys):
    method = copy_attention.CopyAttention(student(), teacher_file, ":-1", 3, "copy_q")
    assert method.layers == [0, 1] and method.heads == 3
    assert "copy_q" in capsys.readouterr().out
    qkv = method.teacher_qkv(torch.randn(1, 3, 16, 16), None)
    inject = method.inject(qkv)
    assert sorted(inject) == [0, 1]
    assert inject[0][1] is None and inject[0][0].shape[1] == 3
    assert copy_attention.parse_layers("-2:", 5) == [3, 4]
    assert copy_attention.parse_layers("0,4", 5) == [0, 4]
    assert copy_attention.parse_layers(":", 3) == [0, 1, 2]


def test_teacher_runs_only_needed_blocks_and_gets_no_gradient(teacher_file):
    method = copy_attention.CopyAttention(student(drop_path=0.1), teacher_file, ":1")
    method.teacher.blocks[1].forward = method.teacher.blocks[2].forward = None  # would raise if called
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    opt = torch.optim.SGD(method.model.parameters(), lr=0.1)
    method.train()
    loss, _ = method(torch.randn(2, 3, 16, 16), torch.full((2, 5), 0.2))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in before.items())
    assert not method.teacher.training


def test_shared_drop_path_masks(teacher_file):
    method = copy_attention.CopyAttention(student(drop_path=0.5), teacher_file, ":").train()
    torch.manual_seed(0)
    masks = method.drop_masks(torch.zeros(4, 3, 16, 16))
    assert masks.shape == (3, 2, 4)
    off = copy_attention.CopyAttention(student(drop_path=0.5), teacher_file, ":", share_drop_path=False).train()
    assert off.drop_masks(torch.zeros(4, 3, 16, 16)) is None


@pytest.mark.parametrize("kw,match", [
    (dict(layers="0,7"), "out of range"),
    (dict(layers="5:"), "selects no layer"),
    (dict(heads=5), "heads 5 is out of range"),
])
def test_bad_plans(teacher_file, kw, match):
    with pytest.raises(ValueError, match=match):
        copy_attention.CopyAttention(student(), teacher_file, **{"layers": ":", **kw})


@pytest.mark.parametrize("kw,match", [(dict(num_heads=2), "heads per layer"), (dict(patch_size=8), "patches"),
                                      (dict(embed_dim=64), "wide")])
def test_models_that_cannot_exchange(teacher_file, kw, match):
    with pytest.raises(ValueError, match=match):
        copy_attention.CopyAttention(student(**kw), teacher_file, ":", mode="copy_q")

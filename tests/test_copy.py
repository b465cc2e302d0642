"""Attention copy: the definition, the fast path against it in float64, every mode and flag, the teacher frozen."""
import argparse
import math
import signal

import pytest
import torch

import attention_kernels
import copy_attention
import evaluate
import run_safety
import train
import vit
from teacher import Teacher

from conftest import ARCH  # teacher_file (conftest.py) writes a teacher of this shape


def student(**kw):
    torch.manual_seed(1)
    return vit.VisionTransformer(**{**ARCH, **kw})


def method_for(path, mode="copy", layers=":", heads=None, **kw):
    s = student(**kw)
    return copy_attention.CopyAttention(s, Teacher(path, s, layers, heads, copy_attention.FROM_TEACHER[mode]), mode)


def test_fast_copy_equals_definition_float64():
    g = torch.Generator().manual_seed(0)
    q_t, k_t = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v_s = torch.randn(2, 3, 17, 4, generator=g, dtype=torch.float64, requires_grad=True)  # a wider teacher
    out, ref = attention_kernels.copy_fast(q_t, k_t, v_s), copy_attention.copy_reference(q_t, k_t, v_s)
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


@pytest.mark.parametrize("mode", ["copy", "copy_q", "copy_k", "copy_v"])
def test_explicit_map_trains_with_the_same_numbers(teacher_file, mode):
    """--explicit_map: the definition itself, the map materialised (and kept for backward), the same loss and
    gradients as the map-free path; in float64, on two heads of three so that the student's own heads run too."""
    torch.manual_seed(0)
    x, targets = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.full((2, 5), 0.2, dtype=torch.float64)
    results = []
    for explicit in (False, True):
        method = method_for(teacher_file, mode, ":", 2).double().train()
        method.explicit_map = explicit
        N = method.model.grid ** 2 + 1
        maps = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: maps.append(list(t.shape).count(N) >= 2) or t,
                                                      lambda t: t):
            loss, _ = method(x, targets)
        grads = torch.autograd.grad(loss, [p for p in method.model.parameters()])
        results.append((loss.detach(), grads, any(maps)))
    (fast, fast_grads, _), (slow, slow_grads, slow_maps) = results
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert slow_maps  # the definition really ran: an N x N map was kept for backward


def test_explicit_map_flag_reaches_the_method(tmp_path, teacher_file, monkeypatch):
    calls = []
    reference = copy_attention.copy_reference
    monkeypatch.setattr(copy_attention, "copy_reference", lambda *a: calls.append(1) or reference(*a))
    fake = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "16", "--batch_size", "8",
            "--num_workers", "0", "--epochs", "1", "--epoch_steps", "1", "--warmup_epochs", "0", "--val_subset", "8"]
    teacher = ["--teacher", teacher_file, "--teacher_heads", "4", "--layers", "0", "--heads", "4"]
    copy_attention.main(fake + teacher + ["--output_dir", str(tmp_path / "a")])
    assert not calls
    copy_attention.main(fake + teacher + ["--explicit_map", "--output_dir", str(tmp_path / "b")])
    assert calls


# ------------------------------------------------------------------------------ the averaged-map ablation (--average)
def block_qkv(block, h):
    """q, k, v (B, H, N, D) of a block's attention on tokens h (B, N, C), written out."""
    B, N, C = h.shape
    return block.attn.qkv(block.norm1(h)).view(B, N, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)


def softmax_map(q, k):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)


def teacher_maps_by_hand(teacher, x, layers, heads):
    """{layer: softmax(q k^T / sqrt(d)) of the first `heads` heads}, (B, heads, N, N): the teacher's blocks written
    out in float64 on x, re-normalised from the student's statistics to the teacher's as teacher.Teacher does."""
    t = teacher.model.double()
    h = t.embed(x.double() * teacher.scale.double() + teacher.shift.double())
    maps = {}
    for i, block in enumerate(t.blocks[:max(layers) + 1]):
        q, k, _ = block_qkv(block, h)
        if i in layers:
            maps[i] = softmax_map(q[:, :heads], k[:, :heads])
        h = block(h)[0]
    return maps


def logits_with_maps(student, x, maps):
    """Float64, every block written out: the student's own softmax(q k^T / sqrt(d)) @ v, except that in each layer of
    `maps` its first heads attend with maps[layer], (B or 1, h, N, N)."""
    s = student.double()
    h = s.embed(x.double())
    for i, block in enumerate(s.blocks):
        q, k, v = block_qkv(block, h)
        attn = softmax_map(q, k)
        if i in maps:
            given = maps[i]
            attn = torch.cat([given.expand(len(x), *given.shape[1:]), attn[:, given.shape[1]:]], dim=1)
        h = h + block.attn.proj((attn @ v).transpose(1, 2).reshape(h.shape))
        h = h + block.mlp(block.norm2(h))
    return s.forward_head(h)


def fake_training_set(size=16):
    """The fake training images as --average images sees them: unaugmented, normalised as the student sees them."""
    args = argparse.Namespace(dataset="fake", data_path="", input_size=size, subset=None, download=False)
    return copy_attention.unaugmented_training_set(args)


def test_average_images_is_the_mean_of_the_teachers_maps_and_the_student_routes_v_with_it(teacher_file, monkeypatch):
    """mean_teacher_map equals the float64 mean of softmax(q k^T / sqrt(d)) over the chosen training images (the
    teacher re-normalising its input, 2 of its 4 heads), and the student's output equals P_mean @ v in those heads
    (its own attention in the others), without the teacher running."""
    s = student().double()
    t = Teacher(teacher_file, s, ":2", 2, "qk", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).double()
    dataset = fake_training_set()
    assert torch.equal(dataset[3][0], dataset[3][0])  # no augmentation: the same image every time
    maps = copy_attention.mean_teacher_map(t, dataset, 40, 16, "cpu")  # batches of 16, 16, 8
    chosen = train.data.balanced_subset(dataset.labels, 40, 0).tolist()
    images = torch.stack([dataset[i][0] for i in chosen])
    by_hand = teacher_maps_by_hand(t, images, [0, 1], 2)
    assert list(maps) == [0, 1]
    for layer in (0, 1):
        assert maps[layer].dtype == torch.float64 and maps[layer].shape == (2, 17, 17)
        torch.testing.assert_close(maps[layer], by_hand[layer].mean(0), atol=1e-13, rtol=0)
    # the maps are not all alike across images, so the mean is not any one image's map
    assert (by_hand[1] - by_hand[1].mean(0)).abs().max() > 1e-3

    mean_map = torch.stack([maps[0], maps[1]])  # (layers, heads, N, N)
    method = copy_attention.CopyAttention(s, t, "copy", average="images", mean_map=mean_map).eval()
    monkeypatch.setattr(t, "forward", None)  # would raise if the teacher ran
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    ours = method.predict(method.model, x)
    torch.testing.assert_close(ours, logits_with_maps(s, x, {0: maps[0][None], 1: maps[1][None]}), atol=1e-12, rtol=0)
    assert method.tensors() == {"mean_map": mean_map} and method.describe()["average"] == "images"


def test_average_queries_replaces_every_query_row_by_the_images_mean_row(teacher_file):
    g = torch.Generator().manual_seed(0)
    q_t, k_t = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v_s = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64)
    out = copy_attention.copy_mean_query(q_t, k_t, v_s)
    p = softmax_map(q_t, k_t)
    for b in range(2):
        for head in range(3):
            for i in range(9):  # every query row i gets the image's mean row applied to v
                torch.testing.assert_close(out[b, head, i], p[b, head].mean(0) @ v_s[b, head], atol=1e-13, rtol=0)
    # in the student: layers 1 and 2, 3 of 4 heads, the teacher run per image
    s = student().double()
    t = Teacher(teacher_file, s, "1,2", 3, "qk").double()
    method = copy_attention.CopyAttention(s, t, "copy", average="queries").eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    by_hand = teacher_maps_by_hand(t, x, [1, 2], 3)
    mean_rows = {layer: p.mean(-2, keepdim=True).expand_as(p) for layer, p in by_hand.items()}
    torch.testing.assert_close(method.predict(method.model, x), logits_with_maps(s, x, mean_rows), atol=1e-12, rtol=0)
    assert method.tensors() == {} and method.describe()["average"] == "queries"


def test_default_copy_is_unchanged(teacher_file, monkeypatch):
    """--average none (the default) runs the copy as before: the map-free kernel on the teacher's per-image maps."""
    monkeypatch.setattr(copy_attention, "copy_mean_query", None)  # would raise if called
    monkeypatch.setattr(copy_attention, "copy_mean_map", None)
    x = torch.randn(3, 3, 16, 16)
    default = method_for(teacher_file, "copy", ":", 2).eval()
    explicit = copy_attention.CopyAttention(default.model, default.teacher, "copy", average="none").eval()
    assert default.average == "none" and default.mean_map is None and default.tensors() == {}
    ours = default.predict(default.model, x)
    assert torch.equal(ours, explicit.predict(explicit.model, x))
    ref = reference_logits(default.model, default.teacher.model, x, default.teacher.layers, 2, "copy")
    assert torch.allclose(ours.double(), ref, atol=1e-5)


def test_average_needs_mode_copy_and_images_its_mean_map(teacher_file):
    for mode, average in (("copy_q", "images"), ("copy_v", "queries")):
        with pytest.raises(ValueError, match=f"--average {average} averages the teacher's whole map: it needs --mode "
                                             f"copy, not --mode {mode}"):
            copy_attention.main(["--preset", "cifar", "--mode", mode, "--average", average])
    s = student()
    t = Teacher(teacher_file, s, ":2", None, "q")
    with pytest.raises(ValueError, match="needs --mode copy, not --mode copy_q"):
        copy_attention.CopyAttention(s, t, "copy_q", average="queries")
    t = Teacher(teacher_file, s, ":2", None, "qk")
    with pytest.raises(ValueError, match=r"mean map \(layers, heads, N, N\) = \(2, 4, 17, 17\), got none"):
        copy_attention.CopyAttention(s, t, "copy", average="images")
    with pytest.raises(ValueError, match=r"= \(2, 4, 17, 17\), got \(1, 4, 17, 17\)"):
        copy_attention.CopyAttention(s, t, "copy", average="images", mean_map=torch.ones(1, 4, 17, 17) / 17)


AVERAGE_RUN = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "16", "--batch_size", "8",
               "--num_workers", "0", "--epochs", "2", "--epoch_steps", "2", "--warmup_epochs", "1",
               "--val_subset", "16", "--drop_path", "0.1", "--layers", ":2", "--average_images", "40", "--no_progress"]


def signal_at(monkeypatch, at_step):
    """SIGINT to this process when train.lr_at is asked for step `at_step` (tests/test_train.py)."""
    lr_at = train.lr_at

    def hook(step, *a):
        if step == at_step:
            signal.raise_signal(signal.SIGINT)
        return lr_at(step, *a)

    monkeypatch.setattr(train, "lr_at", hook)


def fails(*a, **k):
    raise AssertionError("computed again")


@pytest.mark.parametrize("average,other", [("images", "queries"), ("queries", "images")])
def test_average_cli_resumes_to_the_same_weights_and_evaluates_from_its_checkpoint(tmp_path, teacher_file,
                                                                                   monkeypatch, capsys, average, other):
    def run(out, *extra):
        return copy_attention.main(AVERAGE_RUN + ["--teacher", teacher_file, "--average", average,
                                                  "--output_dir", str(out), *extra])

    full = run(tmp_path / "full")
    computed = "the teacher's maps averaged over 40 training images" in capsys.readouterr().out  # --average_images
    assert computed == (average == "images")
    signal_at(monkeypatch, 2)  # the first step of epoch 1
    with pytest.raises(run_safety.Stop):
        run(tmp_path / "cut")
    monkeypatch.undo()
    monkeypatch.setattr(copy_attention, "mean_teacher_map", fails)  # a resume reads the mean map back
    resumed = run(tmp_path / "cut")
    assert [resumed[k] for k in ("train_loss", "val_loss", "val_acc1")] == [full[k] for k in ("train_loss", "val_loss",
                                                                                              "val_acc1")]
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True) for d in ("full", "cut"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["config"]["average"] == average and a["method"]["average"] == average
    if average == "images":
        assert a["method_tensors"]["mean_map"].shape == (2, 4, 17, 17)  # layers 0-1, the teacher's 4 heads, 17 tokens
        assert torch.equal(a["method_tensors"]["mean_map"], b["method_tensors"]["mean_map"])
    else:
        assert a["method_tensors"] == {}
    # a resume with another --average is refused
    with pytest.raises(ValueError, match="not a checkpoint of this run|holds no mean map"):
        copy_attention.main(AVERAGE_RUN + ["--teacher", teacher_file, "--average", other,
                                           "--output_dir", str(tmp_path / "cut")])
    # evaluate.py: the run's last validation again, from the checkpoint alone (and with images, no teacher pass)
    if average == "images":
        monkeypatch.setattr(Teacher, "forward", fails)
    got = evaluate.main([str(tmp_path / "full" / "checkpoint.pth"), "--dataset", "fake", "--val_subset", "16",
                         "--num_workers", "0", "--batch_size", "8", "--no_progress"])
    scores = got["accuracy"]["val"]["models"][0]
    assert got["models"][0]["average"] == average and scores["acc1"] == full["val_acc1"]
    assert math.isclose(scores["loss"], full["val_loss"], rel_tol=1e-5)

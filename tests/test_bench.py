"""benchmarks/bench.py on tiny configurations: each method computes what its naive twin computes, the memory
accounting counts what it claims, the ratios and targets come from the measured numbers, the fresh-process peak and the
CLI work. No timing assertions (speed lives in bench.py's output, not in tests). CPU, about 40 s (two fresh processes).

    .venv/bin/python -m pytest tests/test_bench.py -q
"""
import json
import statistics

import pytest
import torch

import vit
from benchmarks import bench
from teacher import Teacher

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)  # N = 17 tokens
N = 17


def peaked(model):
    """Larger q, k weights: peaked maps, unlike a random init's near-uniform ones, so that a wrong map shows."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight *= 10
    return model


@pytest.fixture
def models(tmp_path):
    """(student, teacher) with peaked attention; the bench's variants share both."""
    torch.manual_seed(1)
    teacher = peaked(vit.VisionTransformer(**ARCH))
    path = str(tmp_path / "teacher.pth")
    torch.save({"model": teacher.state_dict(), "arch": teacher.arch}, path)
    torch.manual_seed(0)
    student = peaked(vit.VisionTransformer(**ARCH))
    return student, Teacher(path, student, ":")


def loss_and_grads(name, student, teacher, images, targets):
    method = bench.build(name, student, teacher).train()
    loss, logs = method(images, targets)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    return loss.detach(), grads, logs


@pytest.mark.parametrize("ours", list(bench.NAIVE))
def test_each_method_computes_what_its_naive_twin_computes(models, ours):
    images, targets = bench.make_inputs(ARCH, 2, "cpu")
    loss, grads, logs = loss_and_grads(ours, *models, images, targets)
    naive_loss, naive_grads, _ = loss_and_grads(bench.NAIVE[ours], *models, images, targets)
    torch.testing.assert_close(loss, naive_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, naive_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if ours.startswith("distill"):
        assert logs["atd"] > 0  # the attention loss is really there (a random teacher and student disagree)
    # and the transfer changes the function: the scratch student alone computes another loss
    assert abs(loss_and_grads("scratch", *models, images, targets)[0] - loss) > 1e-3


def test_the_naive_twins_train_with_the_explicit_map(models):
    assert [bench.build(name, *models).explicit_map for name in ("copy", "naive_copy", "distill", "naive_distill")] \
        == [False, True, False, True]


def test_only_the_naive_twins_save_an_n_by_n_map(models):
    images, targets = bench.make_inputs(ARCH, 2, "cpu")
    saved = {}
    for name in bench.METHODS:
        saved[name] = bench.saved_for_backward(bench.build(name, *models).train(), images, targets, "none")
    n_by_n = {name: [s for s in r["shapes"] if s[-2:] == (N, N)] for name, r in saved.items()}
    assert [name for name in bench.METHODS if n_by_n[name]] == ["naive_copy", "naive_distill"]
    # naive copy keeps the teacher's map per layer (for attn @ v_s); naive distillation at least the teacher's
    # probabilities and the student's log-probabilities per layer
    assert len(n_by_n["naive_copy"]) >= ARCH["depth"] and len(n_by_n["naive_distill"]) >= 2 * ARCH["depth"]
    assert saved["naive_distill"]["bytes"] > saved["distill"]["bytes"] > saved["scratch"]["bytes"]
    # copy's op keeps q_t, k_t and a log-sum-exp where SDPA keeps q, k, v, its output and its log-sum-exp
    assert saved["copy"]["bytes"] < saved["scratch"]["bytes"]


def test_saved_bytes_exclude_parameters_and_scale_with_the_batch(models):
    """Every saved activation has a batch dimension, so with parameters excluded the bytes are exactly proportional
    to the batch; a parameter counted by mistake would add a constant. (Batches 2 and 4: at batch 1 some reshapes
    are views where they are copies otherwise, which changes what is saved.)"""
    for name in bench.METHODS:
        method = bench.build(name, *models).train()
        b2, b4 = (bench.saved_for_backward(method, *bench.make_inputs(ARCH, B, "cpu"), "none")["bytes"]
                  for B in (2, 4))
        assert b2 > 0 and b4 == 2 * b2, name


def test_measured_numbers_and_their_ratios():
    r = bench.bench_config(ARCH, batch=2, warmup=0, repeats=2, label="tiny")
    m, R = r["methods"], r["ratios"]
    assert set(m) == set(bench.METHODS) and r["tokens"] == N and r["teacher_fwd_s"] > 0
    for name, v in m.items():
        assert len(v["times_s"]) == 2 and v["step_s"] == statistics.median(v["times_s"])
        assert v["img_per_s"] == pytest.approx(2 / v["step_s"])
        assert v["saves_n_by_n"] == name.startswith("naive")
    for a, b in [("copy", "scratch"), ("distill", "scratch"), ("copy", "naive_copy"), ("distill", "naive_distill")]:
        per_round = statistics.median(x / y for x, y in zip(m[a]["times_s"], m[b]["times_s"]))
        assert R[f"{a}/{b}"]["step_s"] == per_round  # each round's own ratio: load drifting between rounds cancels
        assert R[f"{a}/{b}"]["saved_bytes"] == m[a]["saved_bytes"] / m[b]["saved_bytes"]
    for ours, naive in bench.NAIVE.items():  # same weights, same images
        assert m[ours]["loss"] == pytest.approx(m[naive]["loss"], rel=1e-5)
    assert "peak_rss" not in m["scratch"]  # memory_steps=0: no fresh process


def test_ratios_pair_variants_of_the_same_mode():
    m = {k: dict(step_s=t, saved_bytes=1.0) for k, t in [("scratch", 1.0), ("copy", 2.0), ("naive_copy", 4.0),
                                                          ("scratch compiled", 0.5), ("copy compiled", 1.5)]}
    R = bench.ratios(m)
    assert set(R) == {"copy/scratch", "copy/naive_copy", "naive_copy/scratch", "copy compiled/scratch compiled"}
    assert R["copy compiled/scratch compiled"]["step_s"] == 3.0 and R["copy/naive_copy"]["step_s"] == 0.5
    m = {"scratch": dict(step_s=1.0, times_s=[1.0, 1.0, 3.0]), "copy": dict(step_s=3.3, times_s=[1.5, 3.3, 3.6])}
    assert bench.ratios(m)["copy/scratch"]["step_s"] == 1.5  # per round 1.5, 3.3, 1.2; the medians' ratio is 3.3


def test_fresh_process_sees_the_naive_maps_in_its_peak_memory():
    arch = dict(ARCH, img_size=96)  # N = 577: each map is 2 x 4 x 577^2 floats = 10.2 MiB
    r = bench.bench_config(arch, batch=2, methods=["scratch", "naive_distill"], warmup=0, repeats=1, memory_steps=1)
    m = r["methods"]
    for v in m.values():
        assert v["peak_rss"] >= v["rss_before_steps"] > 50 * 2 ** 20  # torch is imported: tens of MiB at least
    # 2 maps kept per layer x 2 layers, plus the ones alive only in forward: over 40 MiB more than scratch
    assert m["naive_distill"]["peak_rss"] > m["scratch"]["peak_rss"] + 30 * 2 ** 20
    assert r["ratios"]["naive_distill/scratch"]["peak_rss"] == m["naive_distill"]["peak_rss"] / m["scratch"]["peak_rss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_peak_memory_is_measured_in_place():
    arch = dict(ARCH, img_size=96)  # N = 577
    r = bench.bench_config(arch, batch=2, device="cuda", amp="bf16", methods=["scratch", "naive_distill"], warmup=0,
                           repeats=1, memory_steps=1)
    m = r["methods"]
    assert m["naive_distill"]["cuda_max_allocated"] > m["scratch"]["cuda_max_allocated"] + 2 ** 20
    assert "peak_rss" not in m["scratch"]  # no fresh process on a GPU


def test_targets_report_met_and_missed():
    def result(label, tokens, ratios):
        return dict(label=label, tokens=tokens, ratios=ratios)

    checks = bench.targets([
        result("S", 577, {"distill/scratch": dict(saved_bytes=1.2, step_s=1.5, peak_rss=1.7),
                          "copy/naive_copy": dict(step_s=1.1)}),
        result("S", 197, {"distill compiled/scratch compiled": dict(step_s=1.39), "copy/scratch": dict(step_s=9)}),
        result("B", 197, {"copy/naive_copy": dict(step_s=2.0)})])  # the CPU targets are ViT-S's
    got = {what: (round(value, 3), met) for what, value, _, met in checks}
    assert got == {"S N=577 saved_bytes: distill/scratch": (1.2, False),
                   "S N=577 step_s: distill/scratch": (1.5, True),
                   "S N=577 peak_rss: distill/scratch": (1.7, False),
                   "S N=577 step_s: copy/naive_copy": (1.1, False),
                   "S N=197 step_s: distill compiled/scratch compiled": (1.39, True)}
    gpu = bench.targets([result("L", 577, {"copy/naive_copy": dict(step_s=0.7), "distill/scratch": dict(step_s=9)})],
                        "cuda")
    assert [(w, m) for w, _, _, m in gpu] == [("L N=577 step_s: copy/naive_copy", True)]  # 1.43x faster


def test_cli_quick_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| S | 17 | 1 | naive_distill |" in text and "target S N=17" in text
    data = json.loads(out.read_text())
    assert data["env"]["torch"] == torch.__version__ and data["args"]["depth"] == 1
    (r,) = data["results"]
    assert r["arch"]["embed_dim"] == 384 and r["arch"]["img_size"] == 64 and r["batch"] == 1
    assert {"copy/scratch", "distill/scratch", "copy/naive_copy", "distill/naive_distill"} <= set(r["ratios"])
    with pytest.raises(ValueError, match="not"):
        bench.arch_for("s", 100)
    with pytest.raises(ValueError, match="unknown foo"):
        bench.main(["--quick", "--methods", "copy,foo"])

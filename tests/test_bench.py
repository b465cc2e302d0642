"""bench.py on tiny configurations: the naive references compute what ours compute, the memory accounting counts what
it claims, the ratios come from the measured numbers, the fresh-process peak and the CLI work. No timing assertions
(speed lives in bench.py's output, not in tests). CPU, about 20 s.

    .venv/bin/python -m pytest tests/test_bench.py -q
"""
import json
import statistics

import pytest
import torch

import bench
import vit

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)  # N = 17 tokens
N = 17


def peaked(model):
    """Larger q, k weights: peaked maps, unlike a random init's near-uniform ones, so that a wrong map shows."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight *= 10
    return model


@pytest.fixture
def built(tmp_path):
    path = str(tmp_path / "teacher.pth")
    torch.manual_seed(1)
    teacher = peaked(vit.VisionTransformer(**ARCH))
    torch.save({"model": teacher.state_dict(), "arch": teacher.arch}, path)
    torch.manual_seed(0)
    student = peaked(vit.VisionTransformer(**ARCH))
    return {name: bench.build(name, student, path, "cpu")[0] for name in bench.METHODS}


@pytest.mark.parametrize("naive,ours", list(bench.NAIVE_OF.items()))
def test_naive_reference_computes_the_same_loss_and_gradients(built, naive, ours):
    images, targets = bench.make_inputs(ARCH, 2, "cpu")
    grads = {}
    for name in (naive, ours):
        loss, logs = built[name](images, targets)
        loss.backward()
        grads[name] = (loss.detach(), [p.grad.clone() for p in built[name].model.parameters()])
    torch.testing.assert_close(grads[naive][0], grads[ours][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[naive][1], grads[ours][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if ours == "distill":
        assert logs["atd"] > 0  # the attention loss is really there (a random teacher and student disagree)
    # and the transfer changes the function: the scratch student alone computes another loss
    assert abs(built["scratch"](images, targets)[0].item() - grads[ours][0].item()) > 1e-3


def test_only_the_naive_references_save_an_n_by_n_map(built):
    images, targets = bench.make_inputs(ARCH, 2, "cpu")
    saved = {name: bench.saved_for_backward(m, images, targets, "none") for name, m in built.items()}
    n_by_n = {name: [s for s in r["shapes"] if s[-2:] == (N, N)] for name, r in saved.items()}
    assert not n_by_n["scratch"] and not n_by_n["copy"] and not n_by_n["distill"]
    # naive copy: the teacher's map per layer (kept by attn @ v); naive distillation: softmax, log_softmax and the
    # teacher's probabilities per layer
    assert len(n_by_n["naive_copy"]) >= ARCH["depth"]
    assert len(n_by_n["naive_distill"]) >= 3 * ARCH["depth"]
    assert saved["naive_distill"]["bytes"] > saved["distill"]["bytes"]
    # copy keeps compact copies of q_t, k_t, v_s, never the views that hold both models' whole qkv tensors
    assert saved["copy"]["bytes"] <= saved["scratch"]["bytes"] < saved["distill"]["bytes"]


def test_saved_bytes_exclude_parameters_and_scale_with_the_batch(built):
    """Every saved activation has a batch dimension, so with parameters excluded the bytes are exactly proportional
    to the batch; a parameter counted by mistake would add a constant."""
    for name, method in built.items():
        b1, b3 = (bench.saved_for_backward(method, *bench.make_inputs(ARCH, B, "cpu"), "none")["bytes"] for B in (1, 3))
        assert b1 > 0 and b3 == 3 * b1, name


def test_ratios_are_computed_from_the_measured_numbers():
    r = bench.bench_config(ARCH, batch=2, warmup=0, repeats=2, label="tiny")
    m, R = r["methods"], r["ratios"]
    assert set(m) == set(bench.METHODS) and r["tokens"] == N and r["teacher_fwd_s"] > 0
    for name, v in m.items():
        assert len(v["times_s"]) == 2 and v["step_s"] == statistics.median(v["times_s"])
        assert v["img_per_s"] == pytest.approx(2 / v["step_s"])
        assert v["saves_n_by_n"] == (name in bench.NAIVE_OF)
    for a, b in [("copy", "scratch"), ("distill", "scratch"), ("naive_copy", "copy"), ("naive_distill", "distill")]:
        for k in ("step_s", "saved_bytes"):
            assert R[f"{a}/{b}"][k] == m[a][k] / m[b][k]
    for naive, ours in bench.NAIVE_OF.items():  # same weights, same images
        assert m[naive]["loss"] == pytest.approx(m[ours]["loss"], rel=1e-5)
    assert "peak_rss" not in m["scratch"]  # memory_steps=0: no fresh process


def test_fresh_process_sees_the_naive_maps_in_its_peak_memory():
    arch = dict(ARCH, img_size=128)  # N = 1025: each naive map is 2 x 4 x 1025^2 floats = 32 MiB
    r = bench.bench_config(arch, batch=2, methods=["distill", "naive_distill"], warmup=0, repeats=1, memory_steps=1)
    m = r["methods"]
    for v in m.values():
        assert v["peak_rss"] >= v["rss_before_steps"] > 50 * 2 ** 20  # torch is imported: tens of MiB at least
    # 3 maps kept per layer x 2 layers, plus the ones alive only in forward: well over 100 MiB more
    assert m["naive_distill"]["peak_rss"] > m["distill"]["peak_rss"] + 100 * 2 ** 20
    assert r["ratios"]["naive_distill/distill"]["peak_rss"] == m["naive_distill"]["peak_rss"] / m["distill"]["peak_rss"]


def test_targets_report_met_and_missed():
    def result(label, tokens, **pairs):
        return dict(label=label, tokens=tokens, ratios={k.replace("_over_", "/"): v for k, v in pairs.items()})

    checks = bench.targets([result("S", 577, distill_over_scratch=dict(saved_bytes=1.2),
                                   naive_distill_over_distill=dict(saved_bytes=2.0, step_s=0.8)),
                            result("S", 197, copy_over_scratch=dict(step_s=1.39, saved_bytes=1.01))])
    got = {what: (round(value, 3), met) for what, value, _, _, met in checks}
    assert got == {"S N=577 saved: distill / scratch": (1.2, True),
                   "S N=577 saved: naive distill / distill": (2.0, False),
                   "S N=577 time: distill / naive_distill": (1.25, False),
                   "S N=197 saved: copy / scratch": (1.01, False),
                   "S N=197 time: copy / scratch": (1.39, True)}


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--widths", "s", "--depth", "1", "--tokens", "17", "--batch", "1", "--warmup", "0", "--repeats", "1",
                "--memory_steps", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| S | 17 | 1 | naive_distill |" in text and "target S N=17" in text
    data = json.loads(out.read_text())
    assert data["env"]["torch"] == torch.__version__ and data["args"]["depth"] == 1
    (r,) = data["results"]
    assert r["arch"]["embed_dim"] == 384 and r["arch"]["img_size"] == 64 and r["batch"] == 1
    assert set(r["ratios"]) == {"copy/scratch", "distill/scratch", "naive_copy/copy", "naive_distill/distill"}
    with pytest.raises(ValueError, match="not"):
        bench.arch_for("s", 100)

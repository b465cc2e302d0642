"""benchmarks/gpu_check.sh and benchmarks/gpu_summary.py (README "GPU check"), proven on the CPU: the script's dry run
(GPU_CHECK_DRY_RUN=1) runs every command with tiny settings on a tiny packed CIFAR-like file and must leave the
results folder a GPU run leaves; with no packed file it must say how to build one. The summary is checked on
hand-made logs whose shares of the gap are known.

    .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

import data
from benchmarks import bench, gpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_FILES = {"summary.txt", "results.json", "gpu_check.log", "bench.json", "logs.tar.gz"}
PACK_COMMAND = "python data.py pack ../shared/data/cifar10 data/cifar10.pack.pth"


def gpu_check(tmp_path, **env):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_PYTHON=sys.executable, OUT=str(out),
               GPU_CHECK_WORK=str(tmp_path / "work"), **env)
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.fixture
def tiny_pack(tmp_path):
    """A packed 10-class set of 32 x 32 JPEGs (8 train, 4 test per class), as `python data.py pack` writes it."""
    for split, n in (("train", 8), ("test", 4)):
        for c in range(10):
            folder = tmp_path / "tiny" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (25 * c, 10 * i, 128)).save(folder / f"{i}.jpg")
    data.pack(str(tmp_path / "tiny"), str(tmp_path / "tiny.pack.pth"))
    return str(tmp_path / "tiny.pack.pth")


def test_dry_run_runs_every_command_and_leaves_the_results_folder(tmp_path, tiny_pack):
    proc, out = gpu_check(tmp_path, GPU_CHECK_DATA=tiny_pack)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(os.listdir(out)) == OUT_FILES
    result = json.loads((out / "results.json").read_text())
    assert result["problems"] == []
    tests = result["tests"]
    assert tests["tests"] > 0 and tests["failed"] == tests["errors"] == 0  # test_cuda.py ran: skipped on CPU
    assert all(b["results"] for b in result["bench"].values()) and set(result["bench"]) == {"eager", "compiled"}
    assert json.loads((out / "bench.json").read_text()) == result["bench"]
    assert len(result["mae"]) == 1 and result["teacher_exported"]
    assert [row["run"] for row in result["table"]] == ["scratch", "finetune", "copy", "distill", "ensemble"]
    assert all(len(log) == 1 for log in result["runs"].values())
    summary = (out / "summary.txt").read_text()
    for line in ("(a) tests/test_cuda.py", "(b) bench.py, eager", "(b) bench.py, compiled", "(c) MAE teacher: epochs 1",
                 "share of the scratch-to-fine-tune gap", "| ensemble: fine-tune + distillation |"):
        assert line in summary
    log = (out / "gpu_check.log").read_text()
    for command in ("tests/test_cuda.py", "benchmarks/bench.py --quick", "pretrain_mae.py", "copy_attention.py",
                    "distill_attention.py", "evaluate.py", "benchmarks/gpu_summary.py"):
        assert command in log  # set -x: every command, as it ran
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for run in ("mae", "scratch", "finetune", "copy", "distill"):
        assert f"./{run}/log.jsonl" in names
    assert not [name for name in names if name.endswith(".pth")]


def test_missing_packed_file_is_named_with_the_command_that_builds_it(tmp_path):
    proc, out = gpu_check(tmp_path, GPU_CHECK_DATA=str(tmp_path / "cifar10.pack.pth"))
    assert proc.returncode == 2
    assert PACK_COMMAND in proc.stdout and PACK_COMMAND in (out / "gpu_check.log").read_text()
    assert os.listdir(out) == ["gpu_check.log"] and not (tmp_path / "work").exists()  # nothing ran


def test_a_work_folder_it_did_not_write_is_left_alone(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("mine")
    proc, _ = gpu_check(tmp_path, GPU_CHECK_DATA=__file__)  # a file is there: the check of the data passes
    assert proc.returncode == 2 and "did not write" in proc.stdout
    assert (tmp_path / "work" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ the summary
def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_log(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_tests(path, tests, failures=0, skipped=0):
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" '
                    f'errors="0" failures="{failures}" skipped="{skipped}" tests="{tests}" time="1.0"/></testsuites>')


def bench_output():
    """bench.py's output for one ViT-L configuration at N = 577, with made-up times: copy 0.6x its naive twin's."""
    methods = {name: dict(step_s=t, times_s=[t], img_per_s=2 / t, saved_bytes=b * 2 ** 20, saves_n_by_n=n)
               for name, t, b, n in [("scratch", 0.10, 100, False), ("copy", 0.12, 90, False),
                                     ("naive_copy", 0.20, 400, True)]}
    result = dict(label="L", arch={}, tokens=577, batch=2, methods=methods, teacher_fwd_s=0.03,
                  ratios=bench.ratios(methods))
    checks = [dict(what=w, value=v, limit=limit, met=m) for w, v, limit, m in bench.targets([result], "cuda")]
    return dict(env=dict(device="cuda", gpu="NVIDIA H100 80GB HBM3", cpu="x86_64"),
                args=dict(amp="bf16", compile=False, depth=None), results=[result], targets=checks)


def epochs(*top1):
    """A table run's log.jsonl lines, one per epoch, with these top-1s."""
    return [dict(epoch=i, step=10 * (i + 1), time=8.0, train_loss=2.0 - i / 10, val_acc1=a) for i, a in enumerate(top1)]


def test_summary_of_hand_made_logs_gives_each_method_its_share_of_the_gap(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    write_tests(work / "tests.xml", 24)
    write_json(work / "bench_eager.json", bench_output())
    write_json(work / "bench_compiled.json", bench_output())
    write_log(work / "mae" / "log.jsonl", [dict(epoch=0, time=4.0, train_loss=0.8), dict(epoch=1, time=6.0,
                                                                                          train_loss=0.6)])
    (work / "mae" / "mae_encoder.pth").write_bytes(b"")
    # the table reads the last epoch: the first epochs' top-1s would give other shares
    for run, top1 in {"scratch": (20, 30), "finetune": (45, 50), "copy": (10, 35), "distill": (41, 40)}.items():
        write_log(work / run / "log.jsonl", epochs(*top1))
    write_json(work / "ensemble.json", {"accuracy": {"val": {
        "images": 10000, "models": [{"acc1": 50.0}, {"acc1": 40.0}], "ensemble": {"acc1": 48.0}}}})
    assert gpu_summary.main([str(out), "--work", str(work)]) == 0
    result = json.loads((out / "results.json").read_text())
    shares = {row["run"]: round(row["share"], 6) for row in result["table"]}
    assert shares == {"scratch": 0, "finetune": 100, "copy": 25, "distill": 50, "ensemble": 90}
    assert result["problems"] == [] and result["tests"]["passed"] == 24
    assert json.loads((out / "bench.json").read_text()) == {"eager": bench_output(), "compiled": bench_output()}
    summary = (out / "summary.txt").read_text()
    for line in ("(a) tests/test_cuda.py: 24 tests, 24 passed, 0 failed, 0 errors, 0 skipped",
                 "target L N=577 step_s: copy/naive_copy = 0.60 (<= 0.77): met",
                 "| L | 577 | 2 | naive_copy | 200 |",
                 "(c) MAE teacher: epochs 2, 5.0 s each, train loss 0.8000 -> 0.6000",
                 "copy      epochs 2, 8.0 s each (training); top-1 10.00 35.00",
                 "fine-tune 50.00, distillation 40.00, their ensemble 48.00",
                 "| from scratch | 30.00 | 0% |", "| fine-tune (the teacher's weights) | 50.00 | 100% |",
                 "| attention copy (q, k) | 35.00 | 25% |", "| attention distillation | 40.00 | 50% |",
                 "| ensemble: fine-tune + distillation | 48.00 | 90% |", "missing or failed: nothing"):
        assert line in summary


def test_summary_names_what_is_missing_and_exits_1(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    write_tests(work / "tests.xml", 24, failures=1, skipped=3)
    write_log(work / "copy" / "log.jsonl", epochs(35))
    write_log(work / "distill" / "log.jsonl", epochs(36, 40))
    assert gpu_summary.main([str(out), "--work", str(work)]) == 1
    result = json.loads((out / "results.json").read_text())
    assert result["tests"] == dict(tests=24, passed=20, failed=1, errors=0, skipped=3)
    assert result["table"] == [  # no scratch, no fine-tune: no shares
        dict(run="copy", method="attention copy (q, k)", top1=35, share=None),
        dict(run="distill", method="attention distillation", top1=40, share=None)]
    assert result["problems"] == [
        "(a) tests/test_cuda.py: 1 failed, 0 errors",
        "(b) bench.py eager: no results (it failed or ran out of time)",
        "(b) bench.py compiled: no results (it failed or ran out of time)",
        "(c) MAE pre-training: no encoder exported (it failed or ran out of time)",
        "(d) scratch: no epoch finished", "(d) finetune: no epoch finished",
        "(d) the runs finished different numbers of epochs: {'copy': 1, 'distill': 2}",
        "(d) no ensemble: evaluate.py did not finish"]
    assert "missing or failed: (a) tests/test_cuda.py: 1 failed" in (out / "summary.txt").read_text()


def test_no_gap_gives_no_share():
    assert gpu_summary.gap_share(40.0, 30.0, 30.0) is None
    assert gpu_summary.gap_share(25.0, 30.0, 50.0) == -25.0  # below scratch: a negative share

"""gpu_check.sh, the one script a GPU machine runs, proven on the CPU: its dry run (GPU_CHECK_DRY_RUN=1) runs every
part's commands with tiny settings on a tiny packed CIFAR-like file and must leave the same results folder a GPU run
leaves; with no packed file it must say how to build one."""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_FILES = {"summary.txt", "results.json", "gpu_check.log", "bench.json", "mae_encoder.pth", "reconstruction.png",
             "logs.tar.gz"}


def gpu_check(tmp_path, **env):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_PYTHON=sys.executable, OUT=str(out),
               GPU_CHECK_WORK=str(tmp_path / "work"), **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
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


def test_dry_run_runs_every_part_and_leaves_the_results_folder(tmp_path, tiny_pack):
    proc, out = gpu_check(tmp_path, GPU_CHECK_DATA=tiny_pack)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what a device machine sends back: at most 8 files, plain names, none in a folder
    files = set(os.listdir(out))
    assert files == OUT_FILES and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    result = json.loads((out / "results.json").read_text())
    assert [(p["part"], p["status"]) for p in result["parts"]] == [
        ("env", "ok"), ("a_tests", "ok"), ("b_bench", "ok"), ("c_mae", "ok"), ("d_table", "ok")]
    assert "skipped" in result["tests"] or "passed" in result["tests"]  # test_cuda.py ran: skipped on CPU
    assert all(b and b["results"] for b in result["bench"].values()) and len(result["bench"]) == 2
    assert json.loads((out / "bench.json").read_text()) == result["bench"]
    assert result["mae"]["epochs_done"] == result["mae"]["epochs"] >= 1
    assert result["mae"]["teacher_used"].endswith("c/mae/mae_encoder.pth")  # (d) used (c)'s teacher
    table = result["table"]
    assert set(table["top1"]) == {"scratch", "finetune", "copy", "distill", "ensemble (finetune + distill)"}
    assert all(len(log) == table["plan"]["epochs"] for log in table["logs"].values())
    assert table["throughput"]["loader_img_s"] > 0 and table["throughput"]["step_img_s"] > 0
    summary = (out / "summary.txt").read_text()
    for line in ("(a) tests/test_cuda.py", "(b) bench.py", "(c) MAE teacher", "(d) CIFAR-10 table",
                 "data loader alone", "share of the scratch-to-fine-tune gap", "ensemble (finetune + distill)"):
        assert line in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for run in ("c/mae", "d/scratch", "d/finetune", "d/copy", "d/distill"):
        assert f"gpu_check_work/{run}/log.jsonl" in names


def test_missing_packed_file_is_named_with_the_command_that_builds_it(tmp_path):
    # a budget that ends at once: only the checks run, every timed part is recorded as not done
    proc, out = gpu_check(tmp_path, GPU_CHECK_DATA=str(tmp_path / "cifar10.pack.pth"), GPU_CHECK_BUDGET="10")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "python data.py pack ../shared/data/cifar10" in summary
    result = json.loads((out / "results.json").read_text())
    assert [p["status"] for p in result["parts"]] == ["failed"] * 5

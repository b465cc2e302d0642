"""Reliability: two processes equal one, SIGKILL and resume (mid-epoch and mid-checkpoint-write), every bad input."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "32", "--num_workers", "0",
        "--warmup_epochs", "0", "--val_subset", "32", "--epoch_steps", "3", "--no_progress"]
# A launcher for the scripts with deterministic data (no augmentation) and optional faults, so that runs can be
# compared weight for weight: python launch.py SCRIPT [ARGS]; env KILL_AT_STEP=k or KILL_IN_SAVE=k (k-th save).
LAUNCH = r'''
import os, signal, sys, importlib
sys.path.insert(0, os.environ["REPO"])
import data, torch, train
data.train_transform = lambda img_size, aug, reprob: data.eval_transform(img_size, resize=False)
if "KILL_AT_STEP" in os.environ:
    lr_at = train.lr_at
    def lr_or_die(step, *a):
        if step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return lr_at(step, *a)
    train.lr_at = lr_or_die
if "KILL_IN_SAVE" in os.environ:
    save, calls = torch.save, []
    def half_then_die(obj, f):
        calls.append(1)
        if len(calls) == int(os.environ["KILL_IN_SAVE"]):
            f.write(b"PK\x03\x04 half a checkpoint"); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, f)
    torch.save = half_then_die
importlib.import_module(sys.argv[1]).main(sys.argv[2:])
'''


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "launch.py"
    path.write_text(LAUNCH)
    return str(path)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    teacher = vit.create_model("vit_micro_cifar", num_classes=0, global_pool=False)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "arch": teacher.arch}, path)
    return str(path)


def run(cmd, env=None, check=True):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "REPO": ROOT, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def weights(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("script", ["train", "copy_attention", "distill_attention"])
def test_two_processes_equal_one(tmp_path, launch, teacher_file, script):
    args = FAST + ["--epochs", "1", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--drop_path", "0"]
    if script != "train":
        args += ["--teacher", teacher_file, "--layers", ":", "--ema", "0"]
    run([sys.executable, launch, script] + args + ["--batch_size", "32", "--output_dir", str(tmp_path / "one")])
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", launch, script] + args +
            ["--batch_size", "16", "--output_dir", str(tmp_path / "two")])
    assert "2 process(es)" in r.stdout and r.stdout.count("process(es)") == 1  # one log, from rank 0
    assert_same(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=2e-5)
    logs = [open(tmp_path / d / "log.jsonl").read() for d in ("one", "two")]
    import json
    one, two = (json.loads(l) for l in logs)
    # every validation image counted once: the same accuracy and loss from one shard or two
    assert abs(one["val_acc1"] - two["val_acc1"]) < 1e-6 and abs(one["val_loss"] - two["val_loss"]) < 1e-4


@pytest.mark.parametrize("fault", [{"KILL_AT_STEP": "7"}, {"KILL_IN_SAVE": "2"}])
def test_sigkill_and_rerun_ends_like_an_uninterrupted_run(tmp_path, launch, fault):
    args = FAST + ["--epochs", "3", "--batch_size", "16", "--drop_path", "0.1"]
    run([sys.executable, launch, "train"] + args + ["--output_dir", str(tmp_path / "full")])
    cut = str(tmp_path / "cut")
    r = run([sys.executable, launch, "train"] + args + ["--output_dir", cut], env=fault, check=False)
    assert r.returncode == -signal.SIGKILL
    kept = torch.load(os.path.join(cut, "checkpoint.pth"), weights_only=True)  # a complete file, never half
    assert kept["epoch"] == (2 if "KILL_AT_STEP" in fault else 1)
    run([sys.executable, launch, "train"] + args + ["--output_dir", cut])  # the same command again
    assert_same(weights(tmp_path / "full"), weights(cut))
    assert not [f for f in os.listdir(cut) if ".tmp" in f]


def test_same_seed_same_result(tmp_path, launch):
    for d in ("a", "b"):
        run([sys.executable, "train.py"] + FAST + ["--epochs", "1", "--batch_size", "16", "--output_dir",
                                                   str(tmp_path / d)])
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def make_folder(root, empty_class=False, broken_image=False):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            if empty_class and c == "b":
                continue
            for i in range(4):
                Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / split / c / f"{i}.png")
    if broken_image:
        (root / "train" / "a" / "0.png").write_bytes(b"not a png")
    return str(root)


def bad_inputs(tmp_path, teacher_file):
    """(name, script, extra args, expected message) for every bad input the README's table lists."""
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(teacher_file, "rb").read()[:5000])
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "args": torch.nn.ReLU()}, unsafe)
    other = tmp_path / "other_arch.pth"
    torch.save({"model": vit.create_model("vit_tiny_cifar", num_classes=10).state_dict()}, other)
    return [
        ("unknown teacher name", "distill_attention", ["--teacher", "mae_vit_x"], "unknown model 'mae_vit_x'"),
        ("checkpoint of the wrong architecture", "train", ["--finetune", str(other)], "checkpoint has shape"),
        ("truncated or corrupted checkpoint", "distill_attention", ["--teacher", str(truncated)], "truncated"),
        ("checkpoint needing arbitrary unpickling", "distill_attention", ["--teacher", str(unsafe)],
         "arbitrary unpickling"),
        ("missing data folder", "train", ["--dataset", "folder", "--data_path", str(tmp_path / "none")], "no folder"),
        ("empty class folder", "train",
         ["--dataset", "folder", "--data_path", make_folder(tmp_path / "empty", empty_class=True)], "has no images"),
        ("unreadable image", "train",
         ["--dataset", "folder", "--data_path", make_folder(tmp_path / "broken", broken_image=True)],
         "cannot read image"),
        ("batch larger than the dataset", "train", ["--batch_size", "100000"], "larger than the 512 training images"),
        ("student and teacher cannot exchange attention", "copy_attention",
         ["--teacher", teacher_file, "--model", "vit_tiny_cifar"], "heads per layer"),
        ("layer index out of range", "copy_attention", ["--teacher", teacher_file, "--layers", "0,6"],
         "layer 6 is out of range"),
        ("head count out of range", "distill_attention", ["--teacher", teacher_file, "--heads", "5"],
         "--heads 5 is out of range"),
        ("resuming a folder written for another model", "train", ["--model", "vit_tiny_cifar"],
         "is not a checkpoint of this run"),
        ("NaN loss", "train", ["--lr", "1e30"], "non-finite loss (loss nan)"),
    ]


def test_every_bad_input_is_one_line_and_leaves_the_output_resumable(tmp_path, teacher_file):
    out = str(tmp_path / "out")
    base = FAST + ["--epochs", "2", "--batch_size", "16", "--layers", ":", "--output_dir", out]
    run([sys.executable, "train.py"] + FAST + ["--epochs", "1", "--batch_size", "16", "--output_dir", out])
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read(), open(os.path.join(out, "log.jsonl")).read()
    for name, script, extra, message in bad_inputs(tmp_path, teacher_file):
        args = [a for a in base if script != "train" or a not in ("--layers", ":")] + extra
        r = run([sys.executable, f"{script}.py"] + args, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (name, r.stderr[-2000:])
        after = open(os.path.join(out, "checkpoint.pth"), "rb").read(), open(os.path.join(out, "log.jsonl")).read()
        assert after == before, name
    run([sys.executable, "train.py"] + [a for a in base if a not in ("--layers", ":")])  # still resumes
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["epoch"] == 2

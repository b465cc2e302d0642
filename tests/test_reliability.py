"""Reliability: two processes equal one, errors and stops under torchrun, SIGKILL / SIGTERM and resume (mid-epoch and
mid-checkpoint-write), every bad input a one-line error."""
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "32", "--num_workers", "0",
        "--warmup_epochs", "0", "--val_subset", "32", "--epoch_steps", "3", "--no_progress"]
# A launcher for the scripts with deterministic data (no augmentation) and optional faults, so that runs can be
# compared weight for weight: python launch.py SCRIPT [ARGS]; env SIGNAL_AT_STEP="k signum" (sent to itself when step k
# starts), KILL_IN_SAVE=k (SIGKILL half-way through the k-th save), RANK1_FAILS=plan (a ValueError on rank 1 while the
# data is opened) or RANK1_FAILS=k (rank 1's k-th loss is NaN).
LAUNCH = r'''
import os, signal, sys, importlib
sys.path.insert(0, os.environ["REPO"])
import data, torch, train
data.train_transform = lambda img_size, aug, reprob: data.eval_transform(img_size, resize=False)
if "SIGNAL_AT_STEP" in os.environ:
    at, signum = map(int, os.environ["SIGNAL_AT_STEP"].split())
    lr_at = train.lr_at
    def lr_or_signal(step, *a):
        if step == at:
            os.kill(os.getpid(), signum)
        return lr_at(step, *a)
    train.lr_at = lr_or_signal
if os.environ.get("RANK") == "1" and os.environ.get("RANK1_FAILS") == "plan":
    def no_data(*a, **k):
        raise ValueError("injected on rank 1")
    data.build_dataset = no_data
elif os.environ.get("RANK") == "1" and "RANK1_FAILS" in os.environ:
    ce, calls = train.soft_cross_entropy, []
    def nan_at(logits, targets):
        calls.append(1)
        return ce(logits, targets) * (float("nan") if len(calls) == int(os.environ["RANK1_FAILS"]) else 1)
    train.soft_cross_entropy = nan_at
if "KILL_IN_SAVE" in os.environ:
    save, calls = torch.save, []
    def half_then_die(obj, f):
        calls.append(1)
        if len(calls) == int(os.environ["KILL_IN_SAVE"]):
            f.write(b"PK\x03\x04 half a checkpoint"); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, f)
    torch.save = half_then_die
train.cli(lambda: importlib.import_module(sys.argv[1]).main(sys.argv[2:]))
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
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "REPO": ROOT, **(env or {})},
                       timeout=300)
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
    one, two = (json.loads(l) for l in logs)
    # every validation image counted once: the same accuracy and loss from one shard or two
    assert abs(one["val_acc1"] - two["val_acc1"]) < 1e-6 and abs(one["val_loss"] - two["val_loss"]) < 1e-4


@pytest.mark.parametrize("fault,message", [("plan", "error: injected on rank 1"),
                                           ("2", "error: non-finite loss (loss nan) at epoch 0, step 1")])
def test_a_fault_on_rank_1_stops_both_processes_with_one_line(tmp_path, launch, fault, message):
    """A bad input met by rank 1 alone is printed (by rank 1); a NaN loss on rank 1 stops both ranks at the same step
    (rank 0 says it); neither waits for the other until a timeout."""
    args = FAST + ["--epochs", "1", "--batch_size", "16", "--output_dir", str(tmp_path)]
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", launch, "train"] + args,
            env={"RANK1_FAILS": fault}, check=False)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and errors[0].startswith(message), r.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2", r.stderr) and "ValueError" not in r.stderr and "FloatingPoint" not in r.stderr


ARGS = FAST + ["--epochs", "2", "--batch_size", "16", "--drop_path", "0.1"]  # 2 epochs of 3 steps


@pytest.fixture(scope="module")
def full(tmp_path_factory, launch):
    """An uninterrupted run: what every interrupted-and-rerun one must end with."""
    out = tmp_path_factory.mktemp("full")
    run([sys.executable, launch, "train"] + ARGS + ["--output_dir", str(out)])
    return weights(out)


@pytest.mark.parametrize("fault", [{"SIGNAL_AT_STEP": "4 9"}, {"KILL_IN_SAVE": "2"}])
def test_sigkill_and_rerun_ends_like_an_uninterrupted_run(tmp_path, launch, full, fault):
    """SIGKILL inside epoch 1, or half-way through writing its checkpoint; the same command again finishes the run.
    (Same seed, same result: the rerun is compared with a separate uninterrupted run.)"""
    cut = str(tmp_path / "cut")
    r = run([sys.executable, launch, "train"] + ARGS + ["--output_dir", cut], env=fault, check=False)
    assert r.returncode == -signal.SIGKILL
    kept = torch.load(os.path.join(cut, "checkpoint.pth"), weights_only=True)  # a complete file, never half
    assert kept["epoch"] == 1
    r = run([sys.executable, launch, "train"] + ARGS + ["--output_dir", cut])  # the same command again
    assert "taking over" in r.stdout  # the killed run's lock
    assert_same(full, weights(cut))
    assert not [f for f in os.listdir(cut) if ".tmp" in f]


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
    a_file = tmp_path / "a_file"
    a_file.write_text("")
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
         "is not a checkpoint of this run (embed_dim 128 there, 192 here"),
        ("resuming a folder written by another method", "copy_attention", ["--teacher", teacher_file],
         "method 'Baseline' there, 'CopyAttention' here"),
        ("resuming with a recipe value that changes the result", "train", ["--blr", "1e-3"],
         "is not a checkpoint of this run (blr 0.0005 there, 0.001 here"),
        ("a folder another run is using", "train", [], f"is in use by process {os.getpid()} on"),
        ("output folder is a file", "train", ["--output_dir", str(a_file)], f"--output_dir {a_file} is a file"),
        ("output folder not writable", "train", ["--output_dir", "/proc/at_test"],
         "cannot write in --output_dir /proc/at_test"),
        ("unknown flag", "train", ["--lr_decay", "0.5"], "unrecognized arguments: --lr_decay 0.5"),
        ("NaN loss", "train", ["--lr", "1e30", "--output_dir", str(tmp_path / "nan")], "non-finite loss (loss nan)"),
    ]


def test_every_bad_input_is_one_line_and_leaves_the_output_resumable(tmp_path, launch, teacher_file, full):
    out = str(tmp_path / "out")
    # an unfinished run: SIGTERM at step 3 (epoch 1) finishes the step, saves, says so in one line and exits 143
    r = run([sys.executable, launch, "train"] + ARGS + ["--output_dir", out], env={"SIGNAL_AT_STEP": "3 15"},
            check=False)
    assert r.returncode == 143 and r.stderr.strip().splitlines() == [
        "interrupted at epoch 1, step 4; rerun the same command to resume"], r.stderr[-2000:]
    before = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}
    assert list(before) == ["checkpoint.pth", "log.jsonl"]

    def check(row):  # each row on its own copy of the unfinished run, so that the rows can run at the same time
        i, (name, script, extra, message) = row
        copy = shutil.copytree(out, tmp_path / f"row{i}")
        if name == "a folder another run is using":
            (copy / "run.lock").write_text(f"{os.getpid()} {socket.gethostname()}")
        args = ARGS + ["--output_dir", str(copy)] + (["--layers", ":"] if script != "train" else []) + extra
        r = run([sys.executable, f"{script}.py"] + args, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (name, r.stderr[-2000:])
        (copy / "run.lock").unlink(missing_ok=True)
        assert {f: (copy / f).read_bytes() for f in sorted(os.listdir(copy))} == before, name

    with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(check, enumerate(bad_inputs(tmp_path, teacher_file))))
    r = run([sys.executable, launch, "train"] + ARGS + ["--output_dir", out])  # the same command again
    assert f"resumed {out} at epoch 1, step 4" in r.stdout
    assert_same(full, weights(out))


RANGE_ERRORS = [  # (extra args, expected message): checked before any data is opened
    (["--accum_iter", "0"], "--accum_iter 0 is out of range: it must be in [1, inf)"),
    (["--epoch_steps", "-1"], "--epoch_steps -1 is out of range"),
    (["--epoch_steps", "0"], "--epoch_steps 0 is out of range"),
    (["--epochs", "0"], "--epochs 0 is out of range"),
    (["--batch_size", "0"], "--batch_size 0 is out of range"),
    (["--val_subset", "0"], "--val_subset 0 is out of range"),
    (["--ema", "1.5"], "--ema 1.5 is out of range: it must be in [0, 1)"),
    (["--ema", "1"], "--ema 1.0 is out of range"),
    (["--blr", "0"], "--blr 0.0 is out of range: it must be in (0, inf)"),
    (["--lr", "nan"], "--lr nan is out of range"),
    (["--warmup_epochs", "-1"], "--warmup_epochs -1.0 is out of range"),
    (["--smoothing", "1"], "--smoothing 1.0 is out of range"),
    (["--mixup", "-0.1"], "--mixup -0.1 is out of range"),
    (["--reprob", "1.5"], "--reprob 1.5 is out of range"),
    (["--drop_path", "1"], "--drop_path 1.0 is out of range"),
    (["--clip_grad", "0"], "--clip_grad 0.0 is out of range"),
    (["--save_every_min", "0"], "--save_every_min 0.0 is out of range"),
    (["--min_lr_ratio", "2"], "--min_lr_ratio 2.0 is out of range"),
    (["--input_size", "2"], "--input_size 2 must be a multiple of vit_micro_cifar's patch size 4"),
    (["--input_size", "30"], "--input_size 30 must be a multiple"),
    (["--model", "vit_huge"], "unknown model 'vit_huge'"),
    (["--batch_size", "x"], "argument --batch_size: invalid int value: 'x'"),
]


@pytest.mark.parametrize("extra,message", RANGE_ERRORS)
def test_every_range_is_checked_with_one_line(tmp_path, capsys, extra, message):
    """Through train.cli in this process (the same path as the command line, without starting Python each time)."""
    import train
    with pytest.raises(SystemExit) as exit:
        train.cli(lambda: train.main(FAST + ["--output_dir", str(tmp_path / "out")] + extra))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing created


@pytest.mark.parametrize("script,extra,message", [
    ("pretrain_mae", ["--decoder_depth", "0"], "--decoder_depth 0 is out of range"),
    ("distill_attention", ["--teacher_heads", "0"], "--teacher_heads 0 is out of range"),
    ("copy_attention", ["--heads", "-1"], "--heads -1 is out of range"),
])
def test_method_script_ranges_are_checked(tmp_path, capsys, script, extra, message):
    import importlib
    import train
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit:
        train.cli(lambda: main(FAST + ["--output_dir", str(tmp_path / "out")] + extra))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()

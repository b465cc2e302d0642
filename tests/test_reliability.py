"""Reliability: two processes equal one, errors and stops under torchrun, SIGKILL / SIGTERM and resume (mid-epoch and
mid-checkpoint-write), every bad input a one-line error."""
import collections
import io
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import zipfile
import zlib

import pytest
import torch

import vit
from conftest import one_error_line, run_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "32", "--num_workers", "0",
        "--warmup_epochs", "0", "--val_subset", "32", "--epoch_steps", "3", "--no_progress"]
# A launcher for the scripts with deterministic data (no augmentation) and optional faults, so that runs can be
# compared weight for weight: python launch.py SCRIPT [ARGS]; env SIGNAL_AT_STEP="k signum" (sent to itself when step k
# starts), KILL_IN_SAVE=k (SIGKILL half-way through the k-th save), RANK1_FAILS=early / plan (a ValueError on rank 1
# before the processes talk / while the data is opened), RANK1_FAILS=k (rank 1's k-th loss is NaN), SLOW_PRINTER="r [s]"
# (rank r takes s seconds, default 3, to print its error or interruption).
LAUNCH = r'''
import os, signal, sys, importlib
sys.path.insert(0, os.environ["REPO"])
import data, run_safety, torch, train
data.train_transform = lambda img_size, aug, reprob: data.eval_transform(img_size, resize=False)
if "SIGNAL_AT_STEP" in os.environ:
    at, signum = map(int, os.environ["SIGNAL_AT_STEP"].split())
    lr_at = train.lr_at
    def lr_or_signal(step, *a):
        if step == at:
            signal.raise_signal(signum)
        return lr_at(step, *a)
    train.lr_at = lr_or_signal
if os.environ.get("RANK") == "1" and os.environ.get("RANK1_FAILS") == "early":
    def no_start(*a, **k):
        raise ValueError("injected on rank 1 before the processes talk")
    train.init_distributed = no_start
elif os.environ.get("RANK") == "1" and os.environ.get("RANK1_FAILS") == "plan":
    def no_data(*a, **k):
        raise ValueError("injected on rank 1")
    data.build_dataset = no_data
elif os.environ.get("RANK") == "1" and "RANK1_FAILS" in os.environ:
    ce, calls = train.soft_cross_entropy, []
    def nan_at(logits, targets):
        calls.append(1)
        return ce(logits, targets) * (float("nan") if len(calls) == int(os.environ["RANK1_FAILS"]) else 1)
    train.soft_cross_entropy = nan_at
if os.environ.get("SLOW_PRINTER", "-").split()[0] == os.environ.get("RANK"):
    import builtins, time
    seconds = float((os.environ["SLOW_PRINTER"].split() + ["3"])[1])
    def slow_print(*a, **k):
        time.sleep(seconds if k.get("file") is sys.stderr else 0)
        builtins.print(*a, **k)
    run_safety.print = train.print = slow_print
if "KILL_IN_SAVE" in os.environ:
    save, calls = torch.save, []
    def half_then_die(obj, f):
        calls.append(1)
        if len(calls) == int(os.environ["KILL_IN_SAVE"]):
            f.write(b"PK\x03\x04 half a checkpoint"); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, f)
    torch.save = half_then_die
run_safety.cli(lambda: importlib.import_module(sys.argv[1]).main(sys.argv[2:]))
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
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", launch, script] + args + [
        "--batch_size", "16", "--output_dir", str(tmp_path / "two")]
    if script == "train":
        # SIGTERM to both processes at step 1 (a scheduler's, or Ctrl-C's SIGINT): both stop after that step, rank 0
        # saves and says so in one line though it is slow to print (the other waits for it; 6 s, as a process that ends
        # after the processes talked can take seconds to exit), and the same command again finishes the run as if it
        # had not stopped
        r = run(two, env={"SIGNAL_AT_STEP": "1 15", "SLOW_PRINTER": "0 6"}, check=False)
        lines = [l for l in r.stderr.splitlines() if "interrupted" in l or l.startswith("error")]
        assert r.returncode != 0 and lines == ["interrupted at epoch 0, step 2; rerun the same command to resume"], \
            r.stderr[-3000:]
    r = run(two)
    assert ("resumed" in r.stdout) == (script == "train")
    assert "2 process(es)" in r.stdout and r.stdout.count("process(es)") == 1  # one log, from rank 0
    assert_same(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=2e-5)
    logs = [open(tmp_path / d / "log.jsonl").read() for d in ("one", "two")]
    one, two = (json.loads(l) for l in logs)
    # every validation image counted once: the same accuracy and loss from one shard or two
    assert abs(one["val_acc1"] - two["val_acc1"]) < 1e-6 and abs(one["val_loss"] - two["val_loss"]) < 1e-4


@pytest.mark.parametrize("fault,printer,message", [
    ("flag", "0", "error: unrecognized arguments: --lr_decay 0.5 (see --help)"),
    ("early", "-", "error: injected on rank 1 before the processes talk"),
    ("plan", "1", "error: injected on rank 1"),
    ("2", "0", "error: non-finite loss (loss nan) at epoch 0, step 1")])
def test_a_fault_stops_both_processes_with_one_line(tmp_path, launch, fault, printer, message):
    """A bad flag (met by both ranks before they talk) is printed by rank 0; a bad input met by rank 1 alone is printed
    by rank 1 (before the processes talk: after its wait for rank 0, which did not meet it); a NaN loss on rank 1 stops
    both ranks at the same step (rank 0 says it). Neither waits for the other until a timeout, and the line is printed
    even when the printer is slow (torchrun stops every process once one has ended: the quiet one waits)."""
    args = FAST + ["--epochs", "1", "--batch_size", "16", "--output_dir", str(tmp_path / "out")]
    args += ["--lr_decay", "0.5"] if fault == "flag" else []
    env = {"SLOW_PRINTER": printer, **({} if fault == "flag" else {"RANK1_FAILS": fault})}
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", launch, "train"] + args, env=env,
            check=False)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and errors[0].startswith(message), r.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2", r.stderr), r.stderr[-3000:]
    assert "ValueError" not in r.stderr and "FloatingPoint" not in r.stderr
    if fault == "flag":
        assert errors == [message] and not (tmp_path / "out").exists()


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
         "method 'Method' there, 'CopyAttention' here"),
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
    out = tmp_path / "out"
    # an unfinished run: SIGTERM at step 3 (epoch 1) finishes the step, saves, says so in one line and exits 143
    r = run([sys.executable, launch, "train"] + ARGS + ["--output_dir", str(out)], env={"SIGNAL_AT_STEP": "3 15"},
            check=False)
    assert r.returncode == 143 and r.stderr.strip().splitlines() == [
        "interrupted at epoch 1, step 4; rerun the same command to resume"], r.stderr[-2000:]
    before = {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
    assert list(before) == ["checkpoint.pth", "log.jsonl"]

    for name, script, extra, message in bad_inputs(tmp_path, teacher_file):  # each as `python SCRIPT.py ARGS`
        if name == "a folder another run is using":
            (out / "run.lock").write_text(f"{os.getpid()} {socket.gethostname()}")
        args = ARGS + ["--output_dir", str(out)] + (["--layers", ":"] if script != "train" else []) + extra
        assert message in one_error_line(run_here(script, args), name), name
        (out / "run.lock").unlink(missing_ok=True)
        assert {f: (out / f).read_bytes() for f in sorted(os.listdir(out))} == before, name
    r = run([sys.executable, launch, "train"] + ARGS + ["--output_dir", str(out)])  # the same command again
    assert f"resumed {out} at epoch 1, step 4" in r.stdout
    assert_same(full, weights(out))


RANGE_ERRORS = [  # (extra args, expected message): checked before any data is opened
    (["--accum_iter", "0"], "argument --accum_iter: 0 is out of range: it must be in [1, inf)"),
    (["--epoch_steps", "-1"], "argument --epoch_steps: -1 is out of range"),
    (["--epoch_steps", "0"], "argument --epoch_steps: 0 is out of range"),
    (["--epochs", "0"], "argument --epochs: 0 is out of range"),
    (["--batch_size", "0"], "argument --batch_size: 0 is out of range"),
    (["--val_subset", "0"], "argument --val_subset: 0 is out of range"),
    (["--ema", "1.5"], "argument --ema: 1.5 is out of range: it must be in [0, 1)"),
    (["--ema", "1"], "argument --ema: 1 is out of range"),
    (["--blr", "0"], "argument --blr: 0 is out of range: it must be in (0, inf)"),
    (["--lr", "nan"], "argument --lr: nan is out of range"),
    (["--warmup_epochs", "-1"], "argument --warmup_epochs: -1 is out of range"),
    (["--smoothing", "1"], "argument --smoothing: 1 is out of range"),
    (["--mixup", "-0.1"], "argument --mixup: -0.1 is out of range"),
    (["--reprob", "1.5"], "argument --reprob: 1.5 is out of range"),
    (["--drop_path", "1"], "argument --drop_path: 1 is out of range"),
    (["--clip_grad", "0"], "argument --clip_grad: 0 is out of range"),
    (["--save_every_min", "0"], "argument --save_every_min: 0 is out of range"),
    (["--min_lr_ratio", "2"], "argument --min_lr_ratio: 2 is out of range"),
    (["--input_size", "2"], "--input_size 2 must be a multiple of vit_micro_cifar's patch size 4"),
    (["--input_size", "30"], "--input_size 30 must be a multiple"),
    (["--model", "vit_huge"], "unknown model 'vit_huge'"),
    (["--batch_size", "x"], "argument --batch_size: invalid int value: 'x'"),
]


@pytest.mark.parametrize("extra,message", RANGE_ERRORS)
def test_every_range_is_checked_with_one_line(tmp_path, extra, message):
    r = run_here("train", FAST + ["--output_dir", str(tmp_path / "out")] + extra)
    assert message in one_error_line(r)
    assert not (tmp_path / "out").exists()  # nothing created


@pytest.mark.parametrize("script,extra,message", [
    ("pretrain_mae", ["--decoder_depth", "0"], "argument --decoder_depth: 0 is out of range"),
    ("pretrain_moco", ["--hidden", "0"], "argument --hidden: 0 is out of range"),
    ("distill_attention", ["--teacher_heads", "0"], "argument --teacher_heads: 0 is out of range"),
    ("copy_attention", ["--heads", "-1"], "argument --heads: -1 is out of range"),
])
def test_method_script_ranges_are_checked(tmp_path, script, extra, message):
    r = run_here(script, FAST + ["--output_dir", str(tmp_path / "out")] + extra)
    assert message in one_error_line(r)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ bad files
# Every row runs the real command (README "Runs you cannot lose", Bad input): exit 2, one line, nothing changed.
class Storage:
    """Stands for a tensor's storage, which torch.save writes as the record data/0."""


class Tensor:
    """Pickles as torch.save pickles a float32 tensor of `numel` elements held in a Storage."""

    def __init__(self, numel):
        self.numel = numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (Storage(), 0, (self.numel,), (1,), False, collections.OrderedDict())


class TorchPickler(pickle.Pickler):
    """torch.save's pickling: a Storage becomes the persistent id by which torch.load finds its record."""

    def __init__(self, file, numel):
        super().__init__(file, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", self.numel) if isinstance(obj, Storage) else None


CLAIMED = 2 << 30  # bytes the compressed record inflates to


@pytest.fixture(scope="module")
def inflating(tmp_path_factory):
    """A 2 MB checkpoint whose record data/0 inflates to 2 GiB of zeros: torch.save's own archive, with data.pkl for a
    tensor of that size and data/0 deflated (torch.load takes 2.7 GB of memory to read it; torch writes every record
    STORED). Built in 1 MiB writes: nothing of 2 GiB exists in memory or on disk."""
    real = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(4)}}, real)
    path = tmp_path_factory.mktemp("inflating") / "inflating.pth"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(path, "w") as out:
        for record in src.infolist():
            if record.filename.endswith("/data/0"):
                info = zipfile.ZipInfo(record.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                with out.open(info, "w", force_zip64=True) as f:
                    for _ in range(CLAIMED // len(zeros)):
                        f.write(zeros)
            elif record.filename.endswith("/data.pkl"):
                pickled = io.BytesIO()
                TorchPickler(pickled, CLAIMED // 4).dump({"model": {"w": Tensor(CLAIMED // 4)}})
                out.writestr(record.filename, pickled.getvalue())
            else:
                out.writestr(record.filename, src.read(record.filename))
    assert os.path.getsize(path) < 3e6
    return str(path)


# runs the command given as its arguments and prints that process's peak resident memory (KiB) last
PEAK_RSS = r'''
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("peak KiB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
'''


def peak_rss(cmd):
    """-> (the finished process, its peak resident memory in bytes)."""
    r = run([sys.executable, "-c", PEAK_RSS] + cmd, check=False)
    return r, int(r.stdout.strip().splitlines()[-1].split()[-1]) * 1024


@pytest.fixture(scope="module")
def imports_peak():
    """The peak resident memory of importing the scripts (torch and torchvision: about 0.7 GiB on our machine)."""
    return peak_rss([sys.executable, "-c", "import distill_attention, evaluate, train"])[1]


@pytest.mark.parametrize("script,extra,message", [
    ("train", ["--finetune", "{F}"], "{F} is not a checkpoint torch wrote (record archive/data/0 is compressed"),
    ("distill_attention", ["--teacher", "{F}", "--layers", ":"], "{F} is not a checkpoint torch wrote (record"),
    ("train", ["--resume", "{F}"], "{F} is not a checkpoint torch wrote (record archive/data/0 is compressed"),
    ("evaluate", ["{F}", "--dataset", "fake", "--no_progress"], "{F} is not a checkpoint torch wrote (record"),
    ("train", ["--dataset", "folder", "--data_path", "{F}"], "{F} is not a packed dataset (record archive/data/0"),
])
def test_a_record_that_inflates_to_gigabytes_is_refused_with_little_memory(tmp_path, inflating, imports_peak, script,
                                                                           extra, message):
    out = tmp_path / "out"
    args = [a.replace("{F}", inflating) for a in extra]
    if script != "evaluate":
        args = FAST + ["--epochs", "1", "--output_dir", str(out)] + args
    r, peak = peak_rss([sys.executable, f"{script}.py"] + args)
    assert message.replace("{F}", inflating) in one_error_line(r)
    # reading the record would add 2 GiB (and torch.load's copy of it) to what the imports take
    assert peak - imports_peak < CLAIMED / 4, f"{peak / 2**30:.2f} GiB at peak, {imports_peak / 2**30:.2f} importing"
    assert not out.exists() or not os.listdir(out)


def test_pack_replaces_only_its_own_output(tmp_path):
    """`python data.py pack SRC DST` over a checkpoint, a text file, a folder: refused, each left as it was; over its
    own earlier output: replaced. A checkpoint given as --data_path is named, and no command to overwrite it."""
    src = make_folder(tmp_path / "src")
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 3}, checkpoint)
    notes = tmp_path / "notes.pth"
    notes.write_text("my notes\n")
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    before = {p: p.read_bytes() for p in (checkpoint, notes)}
    for dst in (checkpoint, notes, folder):
        r = run_here("data", ["pack", src, str(dst)])
        assert f"{dst} exists and is not a file python data.py pack wrote: refusing to replace it" in one_error_line(r)
    assert {p: p.read_bytes() for p in (checkpoint, notes)} == before and not os.listdir(folder)
    packed = str(tmp_path / "packed.pth")
    run_here("data", ["pack", src, packed])
    r = run_here("data", ["pack", src, packed])  # its own output: replaced
    assert "packed" in r.stdout and sorted(os.listdir(tmp_path)) == sorted(
        ["src", "checkpoint.pth", "notes.pth", "folder.pth", "packed.pth"])  # no temporary file left
    r = run_here("train", FAST + ["--dataset", "folder", "--data_path", str(checkpoint),
                                  "--output_dir", str(tmp_path / "out")])
    line = one_error_line(r)
    assert f"{checkpoint} is not a packed dataset (it holds ['epoch', 'model']" in line
    assert f"pack SRC {checkpoint}" not in line and checkpoint.read_bytes() == before[checkpoint]
    assert one_error_line(run([sys.executable, "data.py"], check=False)).startswith(
        "error: the following arguments are required: command, src, dst")


def test_bad_files_and_folders_are_named_for_what_they_are(tmp_path, teacher_file):
    """Each message says what the input is and what to pass instead (README's table), before any work."""
    from PIL import Image
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 0, "train_loss": 2.3}\n')
    notes = tmp_path / "notes.txt"
    notes.write_text("teacher: mae_tiny_cifar10\n")
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, resnet)
    one_class = tmp_path / "one_class"
    for split in ("train", "val"):
        os.makedirs(one_class / split / "cat")
        Image.new("RGB", (32, 32)).save(one_class / split / "cat" / "0.png")
    packed = tmp_path / "broken.pth"
    src = make_folder(tmp_path / "src")
    run_here("data", ["pack", src, str(packed)])
    contents = torch.load(packed, weights_only=True)
    images = zlib.decompress(contents["train"]["zlib"].numpy().tobytes())
    a, b = contents["train"]["offsets"][2:4].tolist()
    broken = images[:a] + b"x" * (b - a) + images[b:]  # image 2 of train/ overwritten
    contents["train"]["zlib"] = torch.frombuffer(bytearray(zlib.compress(broken)), dtype=torch.uint8)
    torch.save(contents, packed)
    model = tmp_path / "m.pth"
    torch.save({"model": vit.create_model("vit_micro_cifar", num_classes=10).state_dict(),
                "arch": vit.create_model("vit_micro_cifar", num_classes=10).arch, "config": {"dataset": "fake"}}, model)
    train_args = FAST + ["--epochs", "1", "--output_dir", str(tmp_path / "out")]
    rows = [  # (command, what the line says, what it must not say)
        (["distill_attention.py", "--teacher", str(log), "--layers", ":"] + train_args,
         f"{log} is not a checkpoint torch wrote (it is a JSON file, starting", "unpickling"),
        (["train.py", "--finetune", str(notes)] + train_args,
         f"{notes} is not a checkpoint torch wrote (it is a text file, starting", "unpickling"),
        (["evaluate.py", str(log)], f"{log} is not a checkpoint torch wrote (it is a JSON file", "unpickling"),
        (["distill_attention.py", "--teacher", str(resnet), "--layers", ":"] + train_args,
         f"{resnet} has no patch_embed.proj.weight / pos_embed (its 2 tensors start conv1.weight", None),
        (["train.py", "--finetune", str(resnet)] + train_args, f"{resnet}: checkpoint does not fit the model", None),
        (["evaluate.py", "mae_tiny_cifar10"], "mae_tiny_cifar10 has no trained classifier (untrained: no head): it is "
         "a pre-trained encoder", "no folder"),
        (["evaluate.py", "sup_nano_cifar10"], "sup_nano_cifar10 records no dataset (a training run's checkpoint.pth "
         "does): pass --dataset and --data_path", "no folder"),
        (["evaluate.py", str(model), "--val_subset", "1000"],
         "--val_subset 1000 is larger than the dataset (128 images): lower --val_subset", "--subset"),
        (["evaluate.py"], "give the checkpoints to evaluate", "usage"),
        (["evaluate.py", str(model), "--no_such_flag"], "unrecognized arguments: --no_such_flag", "usage"),
        (["train.py"] + train_args + ["--dataset", "folder", "--data_path", str(one_class)],
         f"{one_class / 'train'} has a single class folder (cat): a classifier needs two classes or more", None),
        (["data.py", "pack", str(one_class), str(tmp_path / "one.pth")],
         f"{one_class / 'train'} has a single class folder (cat)", None),
        (["train.py"] + train_args + ["--dataset", "folder", "--data_path", str(packed)],
         f"cannot read image {packed}:train/2 (not an image PIL can identify): the packed file is damaged", "_io."),
    ]
    for command, message, absent in rows:
        line = one_error_line(run_here(command[0][:-len(".py")], command[1:]))
        assert message in line and (absent is None or absent not in line), (command, line)
    out = tmp_path / "out"
    assert not (tmp_path / "one.pth").exists() and (not out.exists() or not os.listdir(out))

"""run_safety.py as a user meets it: damaged run state, hand-edited checkpoints, a moved teacher, a finished run,
devices that are not there, bad teacher statistics, a second Ctrl-C inside a save, a stop during the evaluation, a
signal sent to every process of the run.
Each case runs the real command (conftest.run_here: the script's main as its `__main__` block runs it; a subprocess
where a process must die) and checks the one `error:` line, the exit code, and that nothing on disk changed."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import copy_attention
import run_safety
import train
from conftest import ROOT, one_error_line, run_here

FAST = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "16", "--batch_size", "8",
        "--num_workers", "0", "--epochs", "2", "--epoch_steps", "2", "--warmup_epochs", "0", "--val_subset", "16",
        "--no_progress"]


def digest(folder):
    """Names and bytes of everything in a folder: 'nothing changed' means this is equal before and after."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            out[name] = "link " + os.readlink(path)
        elif os.path.isdir(path):
            out[name] = "dir"
        else:
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error(r, *needles):
    """The command refused its input with one `error:` line, which names each needle."""
    line = one_error_line(r)
    for needle in needles:
        assert needle in line, line


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch scratch run."""
    out = tmp_path_factory.mktemp("finished")
    train.main(FAST + ["--output_dir", str(out)])
    return out


@pytest.mark.parametrize("damage", ["folder", "garbage", "dangling link"])
def test_a_damaged_lock_is_one_line_and_left_alone(tmp_path, damage):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "run.lock"
    if damage == "folder":
        lock.mkdir()
    elif damage == "garbage":
        lock.write_bytes(b"\xff\xfe\x00 not a lock")
    else:
        lock.symlink_to(tmp_path / "nowhere")
    before = digest(out)
    r = run_here("train", FAST + ["--output_dir", str(out)])
    one_error(r, str(lock), "not a lock file this repository wrote", "delete it")
    assert digest(out) == before


def test_a_stale_lock_in_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    """A dead run's lock in a folder where nothing may be deleted (root ignores chmod, so the refusal is injected)."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(f"{dead.pid} {os.uname().nodename}")
    before = digest(out)
    remove = os.remove

    def read_only(path, *a, **k):
        if str(path).startswith(str(out)):
            raise PermissionError(13, "Permission denied")
        return remove(path, *a, **k)

    monkeypatch.setattr(os, "remove", read_only)
    r = run_here("train", FAST + ["--output_dir", str(out)])
    one_error(r, "cannot take over the stale lock", "Permission denied")
    assert digest(out) == before


def test_a_folder_that_turns_read_only_mid_run_keeps_the_clean_error(tmp_path, monkeypatch):
    """The save fails, and so does removing the lock on the way out: the user sees the save's error, not the lock's."""
    out = tmp_path / "out"
    remove = os.remove

    def read_only_from_now_on(obj, path):
        def refuse(p, *a, **k):
            raise PermissionError(13, "Permission denied", str(p))

        monkeypatch.setattr(os, "remove", refuse)
        raise ValueError(f"cannot write {path} (Read-only file system): free some space or use another --output_dir")

    monkeypatch.setattr(run_safety, "save_atomic", read_only_from_now_on)
    r = run_here("train", FAST + ["--output_dir", str(out)])
    monkeypatch.setattr(os, "remove", remove)
    one_error(r, "cannot write", "Read-only file system")


@pytest.mark.parametrize("edit", ["no scaler", "epoch is text", "missing weight", "misshapen weight", "model a list"])
def test_a_hand_edited_checkpoint_is_one_line_and_left_as_it_was(tmp_path, finished, edit):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = torch.load(finished / "checkpoint.pth", weights_only=True)
    ckpt["epoch"], ckpt["step"] = 1, 2  # mid-run, so that a resume would load it
    if edit == "no scaler":
        del ckpt["scaler"]
    elif edit == "epoch is text":
        ckpt["epoch"] = "one"
    elif edit == "missing weight":
        del ckpt["model"]["head.weight"]
    elif edit == "misshapen weight":
        ckpt["model"]["head.weight"] = ckpt["model"]["head.weight"][:3]
    else:
        ckpt["model"] = [1, 2]
    torch.save(ckpt, out / "checkpoint.pth")
    before = digest(out)
    r = run_here("train", FAST + ["--output_dir", str(out)])
    one_error(r, str(out / "checkpoint.pth"), "damaged or was edited", "delete the file to start over")
    assert digest(out) == before


def test_a_finished_run_says_how_to_train_further(finished, capsys):
    before = digest(finished)
    train.main(FAST + ["--output_dir", str(finished)])  # the same command again: nothing to do, and it says so
    assert "has finished all 2 epochs: nothing to do" in capsys.readouterr().out
    r = run_here("train", FAST + ["--epochs", "3", "--output_dir", str(finished)])
    one_error(r, "epochs 2 there, 3 here", "start a new --output_dir with --finetune")
    assert digest(finished) == before


def test_a_moved_teacher_is_the_same_teacher(tmp_path, capsys, monkeypatch, teacher_file):
    """Resuming compares the teacher's bytes, not its path: --teacher NEWPATH continues the run."""
    out = str(tmp_path / "out")
    lr_at = train.lr_at

    def ctrl_c_in_epoch_1(step, *a):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return lr_at(step, *a)

    monkeypatch.setattr(train, "lr_at", ctrl_c_in_epoch_1)
    r = run_here("copy_attention", FAST + ["--teacher", teacher_file, "--layers", "0", "--output_dir", out])
    assert r.returncode == 130, r.stderr
    monkeypatch.undo()
    moved = str(tmp_path / "moved.pth")
    os.rename(teacher_file, moved)
    stats = copy_attention.main(FAST + ["--teacher", moved, "--layers", "0", "--output_dir", out])
    assert stats["epoch"] == 1 and f"resumed {out} at epoch 1, step 3" in capsys.readouterr().out
    # a teacher with other weights is still another run's
    ckpt = torch.load(moved, weights_only=True)
    other = str(tmp_path / "other.pth")
    torch.save({"model": {k: v + 1 for k, v in ckpt["model"].items()}, "arch": ckpt["arch"]}, other)
    r = run_here("copy_attention", FAST + ["--teacher", other, "--layers", "0", "--epochs", "3", "--output_dir", out])
    one_error(r, "teacher_sha256")


@pytest.mark.parametrize("device", ["tpu", "cuda:0"])
@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_a_device_that_is_not_there_is_one_line(tmp_path, device, script):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if script == "train":
        args = FAST + ["--output_dir", str(tmp_path / "out")]
    else:
        args = ["mae_tiny_cifar10", "--dataset", "fake", "--no_progress"]
    r = run_here(script, args + ["--device", device])
    one_error(r, f"error: --device {device}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,values,message", [
    ("--teacher_std", ["inf", "1", "1"], "argument --teacher_std: inf is out of range"),
    ("--teacher_std", ["0", "0", "0"], "argument --teacher_std: 0 is out of range"),
    ("--teacher_mean", ["nan", "0", "0"], "argument --teacher_mean: nan is not a finite number"),
])
def test_bad_teacher_statistics_are_refused_before_any_work(tmp_path, teacher_file, flag, values, message):
    out = tmp_path / "new"
    r = run_here("copy_attention", FAST + ["--teacher", teacher_file, flag, *values, "--output_dir", str(out)])
    one_error(r, message)
    assert not out.exists()


def test_a_bad_input_found_while_planning_leaves_no_new_folder(tmp_path):
    out = tmp_path / "new"
    r = run_here("train", FAST + ["--batch_size", "4096", "--output_dir", str(out)])
    one_error(r, "--batch_size 4096")
    assert not out.exists()


def test_only_the_saves_own_temporary_files_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth.tmp12345").write_bytes(b"half a checkpoint")  # a save killed mid-write
    (out / "checkpoint.pth.tmp_notes.txt").write_text("mine")
    train.main(FAST + ["--epochs", "1", "--output_dir", str(out)])
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "checkpoint.pth.tmp_notes.txt", "log.jsonl"]


def test_a_second_ctrl_c_inside_a_save_waits_for_the_file(tmp_path, capsys, monkeypatch):
    """The first Ctrl-C asks for a save; a second one landing inside it is held until the file is in place, then
    stops the run at once: one line, exit 130, a whole checkpoint, no temporary file."""
    out = tmp_path / "out"
    save, lr_at, saves = torch.save, train.lr_at, []

    def first_ctrl_c(step, *a):
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return lr_at(step, *a)

    def second_ctrl_c_inside(obj, f):
        saves.append(1)
        signal.raise_signal(signal.SIGINT)  # lands here, half-way through writing
        f.write(b"PK")
        f.seek(0)
        save(obj, f)

    monkeypatch.setattr(train, "lr_at", first_ctrl_c)
    monkeypatch.setattr(torch, "save", second_ctrl_c_inside)
    # Ctrl-C as a terminal delivers it (KeyboardInterrupt): a suite started in the background (`&`, as some CI
    # runners do) inherits Ctrl-C ignored, and the run's second-signal handler is the one it started with
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exit:
            run_safety.cli(lambda: train.main(FAST + ["--output_dir", str(out)]))
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 130 and err == ["interrupted; rerun the same command to resume from the last checkpoint"]
    monkeypatch.undo()
    assert saves == [1] and sorted(os.listdir(out)) == ["checkpoint.pth"]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2)


def test_sigterm_during_the_evaluation_saves_at_once_and_the_resume_evaluates(tmp_path, capsys, monkeypatch,
                                                                                 finished):
    out = tmp_path / "out"
    validate, calls = train.validate, []

    def sigterm_in_first_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # epoch 1's evaluation
            signal.raise_signal(signal.SIGTERM)
        return validate(*a, **k)

    monkeypatch.setattr(train, "validate", sigterm_in_first_batch)
    with pytest.raises(run_safety.Stop) as stop:
        train.main(FAST + ["--output_dir", str(out)])
    assert stop.value.code == 143
    assert capsys.readouterr().err.strip() == ("interrupted at epoch 1, step 4 (before its evaluation); rerun the same "
                                               "command to resume")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 4)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # epoch 1 not logged yet
    monkeypatch.undo()
    train.main(FAST + ["--output_dir", str(out)])
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    want = [json.loads(l) for l in (finished / "log.jsonl").read_text().splitlines()]
    for line in lines + want:
        del line["time"]
    assert lines == want
    assert torch.equal(torch.load(out / "checkpoint.pth", weights_only=True)["model"]["head.weight"],
                       torch.load(finished / "checkpoint.pth", weights_only=True)["model"]["head.weight"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_stops_cleanly(tmp_path, signum):
    """Ctrl-C in a terminal, `timeout`, and a scheduler's SIGTERM reach every process of the run, its data-loader
    workers too: the workers leave it to the main process, which finishes the step, saves and says so in one line."""
    out = tmp_path / "out"
    args = FAST + ["--num_workers", "2", "--epochs", "1000", "--output_dir", str(out)]  # the last --num_workers wins
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        while not p.stdout.readline().startswith('{"epoch": 0'):  # an epoch done: the workers are running
            assert p.poll() is None, p.stderr.read()
        os.killpg(p.pid, signum)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    lines = err.strip().splitlines()
    assert p.returncode == 128 + signum and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("interrupted at epoch ") and lines[0].endswith("; rerun the same command to resume")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] >= 1

"""The shared recipe: lr schedule, parameter groups, the CLI on fake data, interrupt and resume, checks before the
first step, and a real CIFAR-10 epoch.

Interrupts are real signals: a hook on train.lr_at (called once at the start of every optimizer step) sends SIGINT to
this process, train.run's handler notes it, the step finishes, the checkpoint is written and run raises run_safety.Stop(130),
which train.cli turns into exit code 130."""
import argparse
import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import run_safety
import train
import vit

FAST = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "32", "--batch_size", "8",
        "--num_workers", "0", "--epochs", "2", "--epoch_steps", "2", "--warmup_epochs", "1", "--val_subset", "16",
        "--drop_path", "0.1", "--ema", "0.9", "--min_lr_ratio", "0.25"]


def run_cli(out, *extra):
    return train.main(FAST + ["--output_dir", str(out)] + list(extra))


def weights(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted two-epoch run: the weights every interrupted-and-resumed run must end with."""
    out = tmp_path_factory.mktemp("full")
    return out, run_cli(out)


def signal_at(monkeypatch, at_step, signum=signal.SIGINT):
    lr_at = train.lr_at

    def hook(step, *a):
        if step == at_step:
            signal.raise_signal(signum)
        return lr_at(step, *a)

    monkeypatch.setattr(train, "lr_at", hook)


def test_lr_schedule_warmup_peak_end():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert train.lr_at(0, args, 100) == 0
    assert math.isclose(train.lr_at(100, args, 100), 0.5)  # half-way through warmup
    assert math.isclose(train.lr_at(200, args, 100), 1.0)  # peak
    assert math.isclose(train.lr_at(600, args, 100), 0.55)  # half-way through the cosine
    assert math.isclose(train.lr_at(1000, args, 100), 0.1)  # end: min_lr


def test_lr_never_exceeds_the_peak_and_min_lr_ratio_ends_at_that_share(full):
    # the authors' copy recipe: min_lr 2e-3 absolute, written for a peak of 8e-3; at a small batch the peak is lower
    args = argparse.Namespace(lr=1e-3, min_lr=2e-3, warmup_epochs=1, epochs=5)
    lrs = [train.lr_at(s, args, 10) for s in range(51)]
    assert max(lrs) == 1e-3 and lrs[-1] == 1e-3
    # --min_lr_ratio: min_lr = ratio * the peak at any batch (lr = 1e-3 * 16 / 256 here)
    config = torch.load(full[0] / "checkpoint.pth", weights_only=True)["config"]
    assert config["lr"] == 5e-4 * 8 / 256 and config["min_lr"] == 0.25 * config["lr"]
    assert math.isclose(train.lr_at(10 ** 6, argparse.Namespace(**config), 2), 0.25 * config["lr"])


def test_param_groups_decay_and_layer_scales():
    model = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    groups = train.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    assert len(where) == len(names)
    assert where["pos_embed"] == (0.0, 0.125) and where["cls_token"] == (0.0, 0.125)
    assert where["patch_embed.proj.weight"] == (0.05, 0.125)
    assert where["blocks.0.attn.qkv.weight"] == (0.05, 0.25) and where["blocks.0.attn.qkv.bias"] == (0.0, 0.25)
    assert where["blocks.1.mlp.fc1.weight"] == (0.05, 0.5)
    assert where["head.weight"] == (0.05, 1.0) and where["fc_norm.weight"] == (0.0, 1.0)


def test_finetune_starts_a_fresh_head_with_std_2e_5(tmp_path):
    encoder = vit.create_model("vit_micro_cifar", num_classes=0, global_pool=False)  # a pre-trained encoder: no head
    torch.save({"model": encoder.state_dict(), "arch": encoder.arch}, tmp_path / "encoder.pth")
    args = argparse.Namespace(model="vit_micro_cifar", drop_path=0.1, global_pool=True, input_size=32,
                              finetune=str(tmp_path / "encoder.pth"))
    head = train.build_model(args, 10).head.weight
    assert 1e-5 < head.std().item() < 4e-5  # MAE's 2e-5, not the 0.02 of a model trained from scratch
    scratch = train.build_model(argparse.Namespace(**dict(vars(args), finetune="")), 10).head.weight
    assert scratch.std().item() > 1e-2


def test_two_epoch_cli_run_writes_log_and_checkpoint(full):
    tmp_path, stats = full
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1] and lines[-1]["step"] == 4
    assert {"train_loss", "val_acc1", "val_acc5", "ema_acc1", "ema_loss"} <= set(lines[-1]) and stats == lines[-1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"]["embed_dim"] == 128 and ckpt["config"]["model"] == "vit_micro_cifar"
    assert ckpt["method"] == {"method": "Method"} and not (tmp_path / "run.lock").exists()
    # the saved student loads as a plain ViT anywhere a checkpoint is taken
    model, report = vit.load_pretrained(str(tmp_path / "checkpoint.pth"))
    assert not report["fresh"] and model.arch == ckpt["arch"]


def test_model_and_ema_are_evaluated_in_one_pass_with_the_same_numbers():
    torch.manual_seed(0)
    model, ema = (vit.create_model("vit_micro_cifar", num_classes=10).eval() for _ in range(2))
    ds, _ = train.data.build_dataset("fake", "", "val", 32, subset=24)
    passes = []

    class Counted(list):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    loader = Counted(torch.utils.data.DataLoader(ds, 8))
    args = argparse.Namespace(device="cpu", amp="none")
    both = train.validate(train.Method(model), model, loader, args, 1, ema=ema)
    assert passes == [1]
    assert both == {**train.validate(train.Method(model), model, loader, args, 1),
                    **{f"ema_{k}": v for k, v in train.validate(train.Method(ema), ema, loader, args, 1).items()}}
    assert set(both) == {"loss", "acc1", "acc5", "ema_loss", "ema_acc1", "ema_acc5"}


def test_sigint_mid_epoch_saves_and_the_rerun_ends_with_the_same_weights(tmp_path, monkeypatch, capsys, full):
    signal_at(monkeypatch, 2)  # the first step of epoch 1
    with pytest.raises(run_safety.Stop) as stop:
        run_cli(tmp_path)
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted at epoch 1, step 3; rerun the same command to resume"
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3) and not (tmp_path / "run.lock").exists()
    monkeypatch.undo()
    run_cli(tmp_path)  # the same command: continues at step 3 of epoch 1, the same images and draws
    assert f"resumed {tmp_path} at epoch 1, step 3" in capsys.readouterr().out
    assert same(weights(tmp_path), weights(full[0]))
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(l) for l in (full[0] / "log.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1]
    # the resumed epoch's line covers all its steps: the same losses as the uninterrupted run's, nothing "partial"
    assert lines[1]["train_loss"] == uninterrupted[1]["train_loss"] and "partial" not in lines[1]
    assert lines[1]["val_acc1"] == uninterrupted[1]["val_acc1"]


def test_epoch_boundary_resume_of_an_older_checkpoint_with_persistent_workers(tmp_path, monkeypatch, full):
    evaluate, calls = train.validate, []

    def killed_in_epoch_1(*a, **k):  # dies in the second epoch, after its training steps, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(train, "validate", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tmp_path, "--num_workers", "2")
    monkeypatch.undo()
    # made as the older train.py wrote it (the running MAE pre-training's): no such flags, no method record
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    for key in ("min_lr_ratio", "save_every_min"):
        del ckpt["config"][key]
    ckpt["method"] = {}
    del ckpt["epoch_sums"], ckpt["epoch_time"]
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    run_cli(tmp_path, "--num_workers", "2")  # workers persist across epochs; their draws follow from the image
    assert same(weights(tmp_path), weights(full[0]))  # ... and equal those of a run without workers


def test_save_every_min_and_a_failed_write_that_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    saves, save = [], torch.save

    def disk_full_on_fourth_save(obj, f):
        saves.append((obj["epoch"], obj["step"]))
        if len(saves) == 4:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(obj, f)

    monkeypatch.setattr(torch, "save", disk_full_on_fourth_save)
    with pytest.raises(ValueError, match=r"cannot write .*checkpoint.pth \(No space left on device\)"):
        run_cli(tmp_path, "--save_every_min", "1e-9")
    monkeypatch.undo()
    assert saves == [(0, 1), (0, 2), (1, 2), (1, 3)]  # after every step, and at the end of epoch 0
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "log.jsonl"]  # no temporary file, no lock left


def test_keep_epochs_keeps_that_epochs_checkpoint(tmp_path):
    run_cli(tmp_path, "--keep_epochs", "1", "--ema", "0")
    kept, last = (torch.load(tmp_path / f, weights_only=True) for f in ("checkpoint-ep1.pth", "checkpoint.pth"))
    assert (kept["epoch"], kept["step"], last["epoch"]) == (1, 2, 2) and not same(kept["model"], last["model"])
    with pytest.raises(ValueError, match=r"--keep_epochs \[3\]: every E must be in \[1, --epochs 2\]"):
        run_cli(tmp_path / "b", "--keep_epochs", "3")


def test_resume_refuses_another_run_naming_what_differs(tmp_path):
    run_cli(tmp_path, "--epochs", "1", "--epoch_steps", "1")
    with pytest.raises(ValueError, match=r"not a checkpoint of this run \(blr 0.0005 there, 0.001 here; lr"):
        run_cli(tmp_path, "--epochs", "1", "--epoch_steps", "1", "--blr", "1e-3")

    class Other(train.Method):
        def describe(self):
            return {"teacher": "t.pth"}

    args = train.parse_args(train.get_args_parser("", train.FINETUNE, {}),
                            FAST + ["--epochs", "1", "--epoch_steps", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="method 'Method' there, 'Other' here"):
        train.run(args, Other)
    run_cli(tmp_path, "--epochs", "1", "--epoch_steps", "1", "--no_progress", "--save_every_min", "5")  # accepted


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls, ce = [], train.soft_cross_entropy
    monkeypatch.setattr(train, "soft_cross_entropy", lambda logits, targets: calls.append(1) or
                        ce(logits, targets) * (float("nan") if len(calls) == 3 else 1))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(loss nan\) at epoch 1, step 2"):
        run_cli(tmp_path)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_one_run_per_folder_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / "run.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # a live process (this one) holds the folder
    with pytest.raises(ValueError, match=f"is in use by process {os.getpid()} on {socket.gethostname()}"):
        run_cli(tmp_path, "--epochs", "1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid} {socket.gethostname()}")
    run_cli(tmp_path, "--epochs", "1", "--epoch_steps", "1")
    assert f"taking over {lock}: its process {dead.pid} is no longer running" in capsys.readouterr().out
    assert not lock.exists()


def test_frozen_children_are_cast_once_to_the_amp_dtype():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    method = train.Method(student)
    method.teacher = teacher
    train.cast_frozen(method, torch.bfloat16)
    assert teacher.weight.dtype == torch.bfloat16 and student.weight.dtype == torch.float32


def test_bad_batch_size_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        run_cli(tmp_path, "--batch_size", "4096")
    with pytest.raises(FileNotFoundError):
        train.main(["--dataset", "folder", "--data_path", str(tmp_path / "nowhere"), "--preset", "cifar",
                    "--output_dir", str(tmp_path)])


def test_one_epoch_on_real_cifar10_subset(tmp_path, cifar10_root):
    stats = train.main(["--preset", "cifar", "--data_path", cifar10_root, "--subset", "512", "--val_subset", "256",
                        "--model", "vit_micro_cifar", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "64",
                        "--num_workers", "0", "--output_dir", str(tmp_path)])
    assert 0 <= stats["val_acc1"] <= 100 and stats["train_loss"] > 0
    print("accuracy after one epoch on 512 CIFAR-10 images:", stats["val_acc1"])

"""The shared recipe: lr schedule, parameter groups, the CLI on fake data, resume, and a real CIFAR-10 epoch."""
import argparse
import json
import math

import pytest
import torch

import train
import vit

FAST = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "32", "--batch_size", "16",
        "--num_workers", "0", "--epochs", "2", "--epoch_steps", "2", "--warmup_epochs", "1", "--val_subset", "32"]


def test_lr_schedule_warmup_peak_end():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert train.lr_at(0, args, 100) == 0
    assert math.isclose(train.lr_at(100, args, 100), 0.5)  # half-way through warmup
    assert math.isclose(train.lr_at(200, args, 100), 1.0)  # peak
    assert math.isclose(train.lr_at(600, args, 100), 0.55)  # half-way through the cosine
    assert math.isclose(train.lr_at(1000, args, 100), 0.1)  # end: min_lr


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


def run_cli(tmp_path, *extra):
    return train.main(FAST + ["--output_dir", str(tmp_path)] + list(extra))


def test_two_step_cli_run_writes_log_and_checkpoint(tmp_path):
    stats = run_cli(tmp_path, "--ema", "0.9")
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1] and lines[-1]["step"] == 4
    assert {"train_loss", "val_acc1", "val_acc5", "ema_acc1"} <= set(lines[-1]) and stats == lines[-1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"]["embed_dim"] == 128 and ckpt["config"]["model"] == "vit_micro_cifar"
    # the saved student loads as a plain ViT anywhere a checkpoint is taken
    model, report = vit.load_pretrained(str(tmp_path / "checkpoint.pth"))
    assert not report["fresh"] and model.arch == ckpt["arch"]


def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    run_cli(tmp_path / "full", "--drop_path", "0.1")
    calls = []
    evaluate = train.evaluate

    def killed_in_epoch_1(*a, **k):  # dies in the second epoch, after its training steps, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(train, "evaluate", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tmp_path / "cut", "--drop_path", "0.1")
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    run_cli(tmp_path / "cut", "--drop_path", "0.1")  # the same command again: resumes at epoch 1
    full = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)["model"]
    cut = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(full[k], cut[k]) for k in full)
    log = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in log] == [0, 1]


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    run_cli(tmp_path, "--epochs", "1")
    before = (tmp_path / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(train, "soft_cross_entropy", lambda logits, targets: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        run_cli(tmp_path)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


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

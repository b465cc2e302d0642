"""Each method's CLI end to end: two steps on fake data, and a short run on the real CIFAR-10 with the shipped teacher."""
import json

import pytest
import torch

import copy_attention
import distill_attention
import pretrain_mae
import train
import vit

FAST = ["--dataset", "fake", "--model", "vit_micro_cifar", "--input_size", "32", "--batch_size", "16",
        "--num_workers", "0", "--epochs", "1", "--epoch_steps", "2", "--warmup_epochs", "0", "--val_subset", "32"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A vit_micro_cifar teacher written in the official MAE format (encoder + decoder keys + mask_token), which does
    not record its heads: the runs pass --teacher_heads."""
    mae = pretrain_mae.MAE(64, 1, 4, img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4)
    path = tmp_path_factory.mktemp("teacher") / "mae_pretrain_vit_micro.pth"
    torch.save({"model": mae.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("script,mode", [(copy_attention, "copy"), (copy_attention, "copy_q"),
                                         (distill_attention, "distill"), (distill_attention, "distill_v")])
def test_two_step_cli_run_on_fake_data(tmp_path, teacher_file, script, mode, capsys):
    stats = script.main(FAST + ["--teacher", teacher_file, "--teacher_heads", "4", "--mode", mode, "--layers",
                                ":4", "--output_dir", str(tmp_path)])
    assert "layers 0-3 of 6, heads 4/4, runs 3 of its blocks, then block 3's q, k, v" in capsys.readouterr().out
    assert stats["step"] == 2 and "val_acc1" in stats
    if script is distill_attention:
        assert stats["train_atd"] > 0 and stats["train_task"] > 0
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["method"]["teacher"] == teacher_file and ckpt["method"]["layers"] == [0, 1, 2, 3]
    assert len(ckpt["method"]["teacher_sha256"]) == 64 and ckpt["method"]["mode"] == mode


def test_distilled_student_fine_tunes_without_teacher(tmp_path, teacher_file):
    distill_attention.main(FAST + ["--teacher", teacher_file, "--teacher_heads", "4", "--layers", ":",
                                   "--output_dir", str(tmp_path / "d")])
    stats = train.main(FAST + ["--finetune", str(tmp_path / "d" / "checkpoint.pth"),
                               "--output_dir", str(tmp_path / "f")])
    assert stats["step"] == 2


def test_pretrain_mae_writes_a_teacher_and_a_picture(tmp_path):
    pretrain_mae.main(["--preset", "cifar", "--dataset", "fake", "--model", "vit_micro_cifar", "--epochs", "1",
                       "--epoch_steps", "2", "--batch_size", "16", "--num_workers", "0", "--decoder_dim", "32",
                       "--decoder_depth", "1", "--output_dir", str(tmp_path)])
    teacher, report = vit.load_pretrained(str(tmp_path / "mae_encoder.pth"))
    assert not report["dropped"] and report["fresh"] == [] and teacher.arch["embed_dim"] == 128
    state = vit.read_state_dict(str(tmp_path / "checkpoint.pth"))[0]
    assert all(torch.equal(teacher.state_dict()[k], state[k].half().float()) for k in teacher.state_dict())
    from PIL import Image
    assert Image.open(tmp_path / "reconstruction.png").size == (8 * 34 + 2, 3 * 34 + 2)  # 8 x 3 images of 32 px


def test_mae_masks_three_quarters_and_scores_only_masked_patches():
    mae = pretrain_mae.MAE(32, 1, 4, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4)
    images = torch.randn(2, 3, 16, 16)
    loss, pred, mask = mae.forward_loss(images)
    assert mask.shape == (2, 16) and mask.sum(1).tolist() == [12, 12]
    assert torch.equal(mae.unpatchify(mae.patchify(images)), images)


def test_short_distillation_on_real_cifar10_with_shipped_teacher(tmp_path, cifar10_root):
    stats = distill_attention.main(["--preset", "cifar", "--data_path", cifar10_root, "--subset", "256",
                                    "--val_subset", "256", "--epochs", "1", "--epoch_steps", "4", "--batch_size", "32",
                                    "--num_workers", "0", "--output_dir", str(tmp_path)])
    assert stats["train_atd"] > 0 and 0 <= stats["val_acc1"] <= 100
    assert json.loads((tmp_path / "log.jsonl").read_text())["step"] == 4


def test_short_copy_on_real_cifar10_with_shipped_teacher(tmp_path, cifar10_root):
    stats = copy_attention.main(["--preset", "cifar", "--data_path", cifar10_root, "--subset", "256",
                                 "--val_subset", "256", "--epochs", "1", "--epoch_steps", "4", "--batch_size", "32",
                                 "--num_workers", "0", "--output_dir", str(tmp_path)])
    assert 0 <= stats["val_acc1"] <= 100

"""pretrain_moco.py: the views, the loss, the momentum copy, and the exported teacher."""
import math

import torch
import torch.nn.functional as F

import pretrain_moco
import vit

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)


def test_each_image_gets_its_own_view_and_the_pixels_stay_in_range():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16)
    mean = torch.tensor(pretrain_moco.data.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(pretrain_moco.data.STD).view(1, 3, 1, 1)
    batch = ((image - mean) / std).expand(64, -1, -1, -1)
    view1, view2 = pretrain_moco.two_views(batch)
    assert view1.shape == batch.shape
    pixels = view1 * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    differ = (view1 - view2).flatten(1).abs().amax(1) > 1e-3  # the same image, drawn twice
    assert differ.all()
    assert (view1[1:] - view1[:1]).flatten(1).abs().amax(1).gt(1e-3).all()  # every image its own draws


def test_a_full_crop_without_jitter_is_the_image():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    assert torch.allclose(F.grid_sample(images, grid, align_corners=False), images, atol=1e-5)


def test_infonce_is_the_cross_entropy_of_finding_its_own_key():
    torch.manual_seed(0)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    logits = F.cosine_similarity(q[:, None], k[None], dim=-1) / pretrain_moco.TEMPERATURE
    expected = -torch.log_softmax(logits, 1).diagonal().mean() * 2 * pretrain_moco.TEMPERATURE
    assert torch.allclose(pretrain_moco.infonce(q, k), expected, atol=1e-6)
    eye = torch.eye(6, 8) * 10  # every q points at its own key only
    assert pretrain_moco.infonce(eye, eye) < 0.02 and pretrain_moco.infonce(eye, eye.roll(1, 0)) > 1


def test_momentum_copy_starts_equal_follows_at_one_percent_and_gets_no_gradient():
    torch.manual_seed(0)
    model = pretrain_moco.MoCo(64, 16, **SMALL)
    pairs = model.pairs()
    encoder_tensors = len(vit.VisionTransformer(num_classes=0, global_pool=False, **SMALL).state_dict())
    assert len(pairs) == encoder_tensors + len(model.projector.state_dict())
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert not model.patch_embed.proj.weight.requires_grad and not model.pos_embed.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    model.train()
    model.forward_loss(torch.randn(8, 3, 16, 16)).backward()
    opt.step()
    after = model.blocks[0].attn.qkv.weight.detach()
    assert not torch.equal(before, after)
    model.forward_loss(torch.randn(8, 3, 16, 16))  # the next step's forward moves the copy first
    expected = pretrain_moco.MOMENTUM * before + (1 - pretrain_moco.MOMENTUM) * after
    assert torch.allclose(model.momentum_encoder.blocks[0].attn.qkv.weight, expected, atol=1e-6)
    model.eval()
    copy = model.momentum_encoder.blocks[0].attn.qkv.weight.clone()
    model.forward_loss(torch.randn(8, 3, 16, 16))
    assert torch.equal(model.momentum_encoder.blocks[0].attn.qkv.weight, copy)  # evaluation moves nothing


def test_pretrain_moco_writes_a_teacher_the_methods_take(tmp_path):
    pretrain_moco.main(["--preset", "cifar", "--dataset", "fake", "--model", "vit_micro_cifar", "--epochs", "1",
                        "--epoch_steps", "2", "--batch_size", "16", "--num_workers", "0", "--hidden", "32",
                        "--dim_out", "16", "--output_dir", str(tmp_path)])
    teacher, report = vit.load_pretrained(str(tmp_path / "moco_encoder.pth"))
    assert not report["dropped"] and report["fresh"] == [] and teacher.arch["embed_dim"] == 128
    state = vit.read_state_dict(str(tmp_path / "checkpoint.pth"))[0]
    assert any(k.startswith("momentum_encoder.") for k in state)
    assert all(torch.equal(teacher.state_dict()[k], state[k].half().float()) for k in teacher.state_dict())
    assert not math.isnan(teacher(torch.randn(2, 3, 32, 32)).sum().item())
    same, report = vit.load_pretrained(str(tmp_path / "checkpoint.pth"))  # the run's own file is a teacher too
    assert {k.split(".")[0] for k in report["dropped"]} == {"projector", "predictor", "momentum_encoder",
                                                             "momentum_projector"}

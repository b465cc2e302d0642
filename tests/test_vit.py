"""vit.py: our ViT against timm's on the same weights, steerable attention against float64 references, checkpoint
formats with their exact key reports, position-embedding resizing, stochastic depth, and every bad input."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vit

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)


def model(**kw):
    torch.manual_seed(0)
    return vit.VisionTransformer(**{**SMALL, "num_classes": 7, **kw})


@pytest.mark.parametrize("arch", [SMALL, dict(img_size=24, patch_size=8, embed_dim=48, depth=3, num_heads=3)])
@pytest.mark.parametrize("global_pool", [False, True])
def test_matches_timm_on_the_same_weights(arch, global_pool):
    ours = model(**arch, global_pool=global_pool).eval()
    timm = TimmViT(**arch, num_classes=7, global_pool="avg" if global_pool else "token", qkv_bias=True).eval()
    timm.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(3, 3, arch["img_size"], arch["img_size"])
    torch.testing.assert_close(ours(x), timm(x), atol=1e-5, rtol=0)


def explicit_block(block, x, q_ext=None, k_ext=None):
    """Float64 reference: softmax(q k^T * scale) v with the map written out, external heads replacing the first."""
    B, N, C = x.shape
    q, k, v = block.attn.qkv(block.norm1(x)).view(B, N, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    if q_ext is not None:
        q = torch.cat([q_ext, q[:, q_ext.shape[1]:]], 1) if q_ext.shape[-1] == q.shape[-1] else q_ext
    if k_ext is not None:
        k = torch.cat([k_ext, k[:, k_ext.shape[1]:]], 1) if k_ext.shape[-1] == k.shape[-1] else k_ext
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("case", ["qk", "q", "k", "subset", "wider"])
def test_external_qk_through_sdpa_equals_explicit_float64(case):
    m = model().double()
    block = m.blocks[0]
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    D = 16 if case == "wider" else 8
    q_ext, k_ext = torch.randn(2, 2, 4, 17, D, dtype=torch.float64)
    if case == "q":
        k_ext = None
    if case == "k":
        q_ext = None
    if case == "subset":
        q_ext, k_ext = q_ext[:, :2], k_ext[:, :2]
    out, own = block.attn(block.norm1(x), q_ext, k_ext)
    torch.testing.assert_close(out, explicit_block(block, x, q_ext, k_ext), atol=1e-10, rtol=0)
    assert len(own) == 3 and own[0].shape == (2, 4, 17, 8)


def test_returned_qkv_reproduce_the_blocks_own_attention():
    m = model().double()
    block = m.blocks[1]
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    out, (q, k, v) = block.attn(block.norm1(x))
    manual = block.attn.proj((vit.attention_map(q, k).double() @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, explicit_block(block, x), atol=1e-10, rtol=0)


def test_gradients_reach_v_but_not_external_or_own_qk():
    m = model()
    q_ext, k_ext = torch.randn(2, 4, 17, 8, requires_grad=True), torch.randn(2, 4, 17, 8, requires_grad=True)
    tokens, _ = m.forward_features(torch.randn(2, 3, 16, 16), inject={0: (q_ext, k_ext)})
    tokens.sum().backward()
    g = m.blocks[0].attn.qkv.weight.grad  # rows: q (0:32), k (32:64), v (64:96)
    assert g[:64].abs().max() == 0 and g[64:].abs().max() > 0
    assert q_ext.grad is None and k_ext.grad is None


def sd_of(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def mae_pretrain_checkpoint(tmp_path):
    enc = model(num_classes=0, global_pool=False)
    sd = sd_of(enc)
    sd.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
               "decoder_pred.bias": torch.zeros(48)})
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": sd}, path)
    return path, enc


def test_mae_pretrained_into_global_pool_and_cls_classifiers(tmp_path):
    path, enc = mae_pretrain_checkpoint(tmp_path)
    gp = model(global_pool=True)
    r = vit.load_state(gp, str(path))
    assert sorted(r["dropped"]) == ["decoder_embed.weight", "decoder_pred.bias", "mask_token", "norm.bias",
                                    "norm.weight"]
    assert r["fresh"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and not r["resized"]
    assert torch.equal(gp.blocks[1].attn.qkv.weight, enc.blocks[1].attn.qkv.weight)
    cls = model(global_pool=False)
    r = vit.load_state(cls, str(path))
    assert sorted(r["dropped"]) == ["decoder_embed.weight", "decoder_pred.bias", "mask_token"]
    assert r["fresh"] == ["head.bias", "head.weight"] and torch.equal(cls.norm.weight, enc.norm.weight)


def test_mae_finetuned_head_of_another_class_count_is_left_fresh(tmp_path):
    ft = model(num_classes=1000)
    torch.save({"model": sd_of(ft)}, tmp_path / "ft.pth")
    m = model(num_classes=10)
    r = vit.load_state(m, str(tmp_path / "ft.pth"))
    assert r["fresh"] == ["head.weight (checkpoint (1000, 32), model (10, 32))",
                          "head.bias (checkpoint (1000,), model (10,))"]
    assert torch.equal(m.fc_norm.weight, ft.fc_norm.weight) and not r["dropped"]


@pytest.mark.parametrize("fmt", ["timm_pth", "safetensors", "dino", "deit", "ddp"])
def test_real_formats_load_exactly(tmp_path, fmt, monkeypatch):
    monkeypatch.setitem(vit.PRESETS, "tiny_test", (16, 4, 32, 2, 4))  # what the architecture is inferred from
    src = model(global_pool=False, num_classes=0 if fmt == "dino" else 7)
    sd = sd_of(src)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        obj = {"model": sd} if fmt == "deit" else {f"module.{k}": v for k, v in sd.items()} if fmt == "ddp" else sd
        torch.save(obj, path)
    m, r = vit.load_pretrained(str(path))
    assert m.arch["embed_dim"] == 32 and m.num_heads == 4 and not m.global_pool  # inferred from the shapes
    assert r["dropped"] == [] and r["resized"] == [] and r["fresh"] == []
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    if fmt == "dino":  # no head in the file: a classifier built on it starts with a fresh one
        assert vit.load_state(model(global_pool=False), str(path))["fresh"] == ["head.bias", "head.weight"]


def test_names_resolve_download_errors_and_unknown_names(tmp_path, monkeypatch):
    path, _ = mae_pretrain_checkpoint(tmp_path)
    monkeypatch.setitem(vit.PRESETS, "tiny_test", (16, 4, 32, 2, 4))
    monkeypatch.setitem(vit.TEACHERS, "local", ("tiny_test", str(path), dict(global_pool=False)))
    m, r = vit.load_pretrained("local")
    assert r["fresh"] == ["head.bias", "head.weight"]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = "https://127.0.0.1:9/mae_pretrain_nothing.pth"
    monkeypatch.setitem(vit.TEACHERS, "offline", ("tiny_test", url, {}))
    with pytest.raises(ValueError, match=r"cannot download 'offline' from https://127\.0\.0\.1:9/.*pass the file's path"):
        vit.load_pretrained("offline")
    with pytest.raises(ValueError, match="unknown model 'nope'.*mae_vit_l"):
        vit.load_pretrained("nope")


def test_pos_embed_resize_keeps_cls_and_constants(tmp_path):
    pe = torch.cat([torch.full((1, 1, 8), 5.0), torch.full((1, 16, 8), 2.0)], 1)  # 4x4 grid
    out = vit.resize_pos_embed(pe, 6)
    assert out.shape == (1, 37, 8) and torch.equal(out[:, 0], pe[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 36, 8), 2.0))
    src = model()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    big = model(img_size=32)
    r = vit.load_state(big, str(tmp_path / "w.pth"))
    assert r["resized"] == ["pos_embed (1, 17, 32) -> (1, 65, 32)"]


def test_bad_checkpoints(tmp_path):
    m = model()
    sd = sd_of(m)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint has shape \(64, 32\), model has \(128, 32\)"):
        vit.load_state(model(), sd)
    deeper = sd_of(model(depth=3))
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.2\."):
        vit.load_state(model(), deeper)
    torch.save({"model": sd_of(m), "args": torch.nn.ReLU()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="arbitrary unpickling"):
        vit.load_state(model(), str(tmp_path / "unsafe.pth"))
    torch.save(sd_of(m), tmp_path / "full.pth")
    (tmp_path / "half.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated"):
        vit.load_state(model(), str(tmp_path / "half.pth"))
    with pytest.raises(FileNotFoundError):
        vit.load_state(model(), str(tmp_path / "missing.pth"))


def test_heads_and_tokens_mismatch():
    block = model().blocks[0]
    x = torch.randn(2, 17, 32)
    with pytest.raises(ValueError, match="5 heads but the block has 4"):
        block.attn(x, torch.randn(2, 5, 17, 8), None)
    with pytest.raises(ValueError, match="batch x tokens 2 x 9 but the block has 2 x 17"):
        block.attn(x, torch.randn(2, 4, 9, 8), None)
    with pytest.raises(ValueError, match="head dim"):
        block.attn(x, torch.randn(2, 4, 17, 16), None)  # only q replaced, with another head dim


def test_drop_masks_explicit_shared_and_train_only():
    m = model(drop_path=0.5)
    x = torch.randn(2, 3, 16, 16)
    zeros = torch.zeros(2, 2, 2)
    tokens, _ = m.forward_features(x, drop_masks=zeros)  # every branch dropped: the blocks are identities
    torch.testing.assert_close(tokens, m.embed(x))
    m.eval()
    assert torch.equal(m(x), m(x))  # no drop in eval mode
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.equal(a, m(x))  # sampled in training mode
    masks = m.sample_drop_masks(64)
    assert masks.shape == (2, 2, 64) and set(masks[0].unique().tolist()) == {1.0}  # rate 0 in the first block
    assert set(masks[1].unique().tolist()) <= {0.0, 2.0}  # rate 0.5 in the last: 0 or 1/keep
    other = model(drop_path=0.5)
    one = torch.ones(2, 2, 2)
    one[:, :, 1] = 0  # sample 1 dropped everywhere, in both models
    for net in (m, other):
        t, _ = net.forward_features(x, drop_masks=one)
        torch.testing.assert_close(t[1], net.embed(x)[1])


def test_depth_and_collect(monkeypatch):
    m = model(depth=3)
    monkeypatch.setattr(m.blocks[2], "forward", None)  # would raise if run
    tokens, qkv = m.forward_features(torch.randn(1, 3, 16, 16), collect=[1], depth=2)
    assert list(qkv) == [1] and tokens.shape == (1, 17, 32)
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        m.forward_features(torch.randn(1, 3, 16, 16), collect=[2], depth=2)

"""vit.py: our ViT against timm's on the same weights, the attention_fn hook against float64 references, every checkpoint
format loaded from its weights alone and attending exactly as the model that wrote it, heads from records only,
position-embedding resizing, stochastic depth, downloads under torchrun, and every bad input."""
import argparse
import math
import struct
import zipfile

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled as TimmDeiT
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


def replace(own, ext):
    """The first heads of own (B, H, N, D) replaced by ext (B, h, N, D'); all of it when the head dims differ."""
    if ext is None:
        return own
    return torch.cat([ext, own[:, ext.shape[1]:]], 1) if ext.shape[-1] == own.shape[-1] else ext


def explicit_block(block, x, q_ext=None, k_ext=None):
    """Float64 reference: softmax(q k^T * scale) v with the map written out, external heads replacing the first."""
    B, N, C = x.shape
    q, k, v = block.attn.qkv(block.norm1(x)).view(B, N, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = replace(q, q_ext), replace(k, k_ext)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("case", ["qk", "q", "k", "subset", "wider"])
def test_attention_fn_through_sdpa_equals_explicit_float64(case):
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
    seen = []

    def attention_fn(q, k, v):  # what a method file passes: its own way to attend, given the block's own q, k, v
        seen.append((q, k, v))
        return F.scaled_dot_product_attention(replace(q, q_ext), replace(k, k_ext), v)

    out, own = block.attn(block.norm1(x), attention_fn)
    torch.testing.assert_close(out, explicit_block(block, x, q_ext, k_ext), atol=1e-10, rtol=0)
    assert len(own) == 3 and own[0].shape == (2, 4, 17, 8)
    assert len(seen) == 1 and all(a is b for a, b in zip(seen[0], own))  # fn got the block's own q, k, v


def test_returned_qkv_reproduce_the_blocks_own_attention():
    m = model().double()
    block = m.blocks[1]
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    out, (q, k, v) = block.attn(block.norm1(x))
    manual = block.attn.proj((vit.attention_map(q, k).double() @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, explicit_block(block, x), atol=1e-10, rtol=0)


def test_attention_fn_replaces_only_its_layer():
    m = model(depth=3).eval()
    x = torch.randn(2, 3, 16, 16)
    plain, qkv = m.forward_features(x, collect=range(3))
    same, _ = m.forward_features(x, attention_fns={1: F.scaled_dot_product_attention})
    assert torch.equal(same, plain)  # SDPA passed as the fn: nothing changes
    zeroed, got = m.forward_features(x, attention_fns={2: lambda q, k, v: torch.zeros_like(v)}, collect=[1, 2])
    assert all(torch.equal(a, b) for l in (1, 2) for a, b in zip(got[l], qkv[l]))  # own q, k, v still handed out
    before, _ = m.forward_features(x, depth=2)  # the input of block 2
    b = m.blocks[2]
    h = before + b.attn.proj.bias  # zero attention: only the projection's bias remains
    torch.testing.assert_close(zeroed, h + b.mlp(b.norm2(h)), atol=1e-6, rtol=0)


def test_gradients_reach_v_but_not_external_or_own_qk():
    m = model()
    q_ext, k_ext = torch.randn(2, 4, 17, 8, requires_grad=True), torch.randn(2, 4, 17, 8, requires_grad=True)
    attention_fns = {0: lambda q, k, v: F.scaled_dot_product_attention(q_ext.detach(), k_ext.detach(), v)}
    tokens, _ = m.forward_features(torch.randn(2, 3, 16, 16), attention_fns=attention_fns)
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
def test_real_formats_load_exactly(tmp_path, fmt):
    src = model(global_pool=False, num_classes=0 if fmt == "dino" else 7)
    sd = sd_of(src)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        obj = {"model": sd} if fmt == "deit" else {f"module.{k}": v for k, v in sd.items()} if fmt == "ddp" else sd
        torch.save(obj, path)
    m, r = vit.load_pretrained(str(path), num_heads=4)
    assert m.arch["embed_dim"] == 32 and m.num_heads == 4 and not m.global_pool  # read from the shapes
    assert r["dropped"] == [] and r["resized"] == [] and r["fresh"] == [] and r["mean"] is None
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    if fmt == "dino":  # no head in the file: a classifier built on it starts with a fresh one
        assert vit.load_state(model(global_pool=False), str(path))["fresh"] == ["head.bias", "head.weight"]


# A shape no preset has: depth 5, width 96, MLP ratio 2, 3 heads.
TINY = dict(img_size=32, patch_size=4, embed_dim=96, depth=5, num_heads=3, mlp_ratio=2)


def writer_attention(net, x):
    """The writing model's own attention, softmax(q k^T * scale) from each block's qkv output (a hook), and logits."""
    maps = []

    def hook(qkv, args, out):
        B, N, _ = out.shape
        q, k, _ = out.reshape(B, N, 3, qkv.heads, -1).permute(2, 0, 3, 1, 4)
        maps.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1))

    hooks = []
    for block in net.blocks:
        block.attn.qkv.heads = block.attn.num_heads
        hooks.append(block.attn.qkv.register_forward_hook(hook))
    with torch.no_grad():
        logits = net.eval()(x)
    for h in hooks:
        h.remove()
    return maps, logits


def write(tmp_path, fmt):
    """A checkpoint in format fmt -> (path, the model that wrote it, heads to pass, heads expected)."""
    torch.manual_seed(1)
    timm_kw = dict(timm=dict(), timm_reg=dict(reg_tokens=2), timm_gap=dict(class_token=False, global_pool="avg"),
                   deit3=dict(no_embed_class=True, reg_tokens=1), mae=dict(num_classes=0), dino=dict(num_classes=0))
    if fmt in timm_kw:
        net = TimmViT(**{**TINY, "num_classes": 10, **timm_kw[fmt]})
    elif fmt == "deit":
        net = TimmDeiT(**TINY, num_classes=10)
    else:
        net = vit.VisionTransformer(**{**TINY, "num_heads": 6, "num_classes": 10})
    sd = sd_of(net)
    for p in ("cls_token", "reg_token", "dist_token"):
        if p in sd:  # timm starts registers near 0: make every prefix token matter
            sd[p].normal_()
    net.load_state_dict(sd)
    if fmt == "mae":
        sd.update({"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(64, 96),
                   "decoder_blocks.0.attn.qkv.weight": torch.zeros(192, 64), "decoder_pos_embed": torch.zeros(1, 65, 64)})
    obj = {"model": sd} if fmt in ("mae", "deit") else {"model": sd, "arch": net.arch, "epoch": 3} if fmt == "ours" else sd
    torch.save(obj, tmp_path / f"{fmt}.pth")
    return str(tmp_path / f"{fmt}.pth"), net, None if fmt == "ours" else 3, 6 if fmt == "ours" else 3


@pytest.mark.parametrize("fmt", ["timm", "timm_reg", "timm_gap", "deit3", "mae", "dino", "deit", "ours"])
def test_any_vit_attends_as_the_model_that_wrote_it(tmp_path, fmt):
    path, net, num_heads, heads = write(tmp_path, fmt)
    m, report = vit.load_pretrained(path, num_heads=num_heads)
    assert m.num_heads == heads and m.arch["mlp_ratio"] == 2 and m.depth == 5 and m.grid == 8
    assert report["fresh"] == [] and report["resized"] == []
    assert sorted(report["dropped"]) == (["decoder_blocks.0.attn.qkv.weight", "decoder_embed.weight", "decoder_pos_embed",
                                  "mask_token"] if fmt == "mae" else [])
    x = torch.randn(2, 3, 32, 32)
    maps, logits = writer_attention(net, x)
    with torch.no_grad():
        tokens, qkv = m.eval().forward_features(x, collect=range(5))
        ours = m.forward_head(tokens)
    assert len(maps) == 5 and maps[0].shape == (2, heads, 64 + m.num_prefix_tokens, 64 + m.num_prefix_tokens)
    for layer in range(5):
        torch.testing.assert_close(vit.attention_map(*qkv[layer][:2]), maps[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=0)  # pooling, norms and heads too


def test_heads_are_never_guessed(tmp_path):
    path, *_ = write(tmp_path, "timm")
    with pytest.raises(ValueError, match=r"heads of .*timm\.pth cannot be read from the weights.*--teacher_heads"):
        vit.load_pretrained(path)
    with pytest.raises(ValueError, match=r"width 96, which 5 heads do not divide.*--teacher_heads"):
        vit.load_pretrained(path, num_heads=5)
    path, *_ = write(tmp_path, "ours")  # records 6 heads
    assert vit.load_pretrained(path, num_heads=6)[0].num_heads == 6
    with pytest.raises(ValueError, match="records 6 heads but --teacher_heads is 3"):
        vit.load_pretrained(path, num_heads=3)


@pytest.mark.parametrize("record", [
    dict(args=argparse.Namespace(model="deit_small_patch16_224", lr=5e-4)),  # DeiT's main.py
    dict(args=argparse.Namespace(model="mae_vit_small_patch16")),  # MAE's main_pretrain.py (its names)
    dict(args=dict(arch="vit_small", patch_size=8)),  # DINO
    dict(arch="vit_small_patch16_224", args=argparse.Namespace(model="vit_small_patch16_224")),  # timm's train.py
    dict(pretrained_cfg=dict(architecture="vit_small_patch16_224")),  # timm
    dict(model_args=dict(num_heads=6)),  # timm's hub config
])
def test_heads_from_records_others_wrote(tmp_path, record):
    src = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=384, depth=1, num_heads=6, num_classes=0)
    torch.save({"state_dict" if "arch" in record else "model": sd_of(src), **record}, tmp_path / "w.pth")
    assert vit.load_pretrained(str(tmp_path / "w.pth"))[0].num_heads == 6
    narrow = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=96, depth=1, num_heads=3, num_classes=0)
    torch.save({"model": sd_of(narrow), **record}, tmp_path / "n.pth")
    if "model_args" not in record:  # a name says the heads only of the width it names
        with pytest.raises(ValueError, match="--teacher_heads"):
            vit.load_pretrained(str(tmp_path / "n.pth"))


def test_non_finite_weights_are_refused_by_name(tmp_path):
    sd = sd_of(model())
    sd["blocks.1.attn.proj.weight"][0, 0] = float("nan")
    sd["head.weight"][0, 0] = float("inf")
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: tensor blocks\.1\.attn\.proj\.weight holds NaN or Inf"):
        vit.load_pretrained(str(tmp_path / "bad.pth"), num_heads=4)
    with pytest.raises(ValueError, match=r"bad\.pth: tensor blocks\.1\.attn\.proj\.weight"):
        vit.load_state(model(), str(tmp_path / "bad.pth"))


def test_teacher_table_heads_and_statistics(tmp_path, monkeypatch):
    path, enc = mae_pretrain_checkpoint(tmp_path)
    monkeypatch.setitem(vit.TEACHERS, "local", dict(source=str(path), num_heads=4, mean=(0.5,) * 3, std=(0.25,) * 3))
    m, r = vit.load_pretrained("local")
    assert m.num_heads == 4 and r["mean"] == (0.5,) * 3 and r["std"] == (0.25,) * 3 and r["fresh"] == []
    torch.save({"model": sd_of(enc), "mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]}, path)  # the checkpoint's own wins
    assert vit.load_pretrained("local")[1]["mean"] == (0.1, 0.2, 0.3)
    # the shipped teachers: arch records, ImageNet statistics
    for name in ("mae_tiny_cifar10", "mae90_tiny_cifar10", "mae90_ep8_tiny_cifar10", "sup_nano_cifar10"):
        m, r = vit.load_pretrained(name)
        assert m.num_heads == 3 and r["mean"] == (0.485, 0.456, 0.406) and r["std"] == (0.229, 0.224, 0.225)
    assert all(t["num_heads"] and t["mean"] and t["std"] for t in vit.TEACHERS.values())


def test_names_resolve_download_errors_and_unknown_names(tmp_path, monkeypatch):
    path, _ = mae_pretrain_checkpoint(tmp_path)
    monkeypatch.setitem(vit.TEACHERS, "local", dict(source=str(path), num_heads=4))
    m, r = vit.load_pretrained("local")  # the MAE encoder as it was written: no head, its final norm
    assert m.num_heads == 4 and m.arch["num_classes"] == 0 and not m.global_pool and r["mean"] is None
    assert r["fresh"] == [] and sorted(r["dropped"]) == ["decoder_embed.weight", "decoder_pred.bias", "mask_token"]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = "https://127.0.0.1:9/mae_pretrain_nothing.pth"
    monkeypatch.setitem(vit.TEACHERS, "offline", dict(source=url, num_heads=4))
    with pytest.raises(ValueError, match=r"cannot download 'offline' from https://127\.0\.0\.1:9/.*pass the file's path"):
        vit.load_pretrained("offline")
    with pytest.raises(ValueError, match="unknown model 'nope'.*mae_vit_l"):
        vit.load_pretrained("nope")


@pytest.mark.parametrize("local_rank", ["0", "1"])
@pytest.mark.parametrize("process_group", [True, False])
def test_under_torchrun_local_rank_0_downloads_and_the_others_wait(tmp_path, monkeypatch, local_rank, process_group):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setitem(vit.TEACHERS, "remote", dict(source="https://example.org/w.pth", num_heads=4))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    target, events = tmp_path / "checkpoints" / "w.pth", []

    def download(url, path):
        events.append("download")
        open(path, "w").close()

    def rank_0_finishes(*args):  # the barrier, or one wait of a rank polling for the file: rank 0 writes it now
        events.append("wait")
        target.parent.mkdir(exist_ok=True)
        target.touch()

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: process_group)
    monkeypatch.setattr(torch.distributed, "barrier", rank_0_finishes)
    monkeypatch.setattr(vit.time, "sleep", rank_0_finishes)
    assert vit.resolve("remote") == str(target) and target.exists()
    assert events == (["download"] if local_rank == "0" else []) + (["wait"] if process_group or local_rank == "1" else [])


def test_pos_embed_resize_keeps_prefix_rows_and_constants(tmp_path):
    pe = torch.cat([torch.full((1, 1, 8), 5.0), torch.full((1, 16, 8), 2.0)], 1)  # 4x4 grid
    out = vit.resize_pos_embed(pe, 6)
    assert out.shape == (1, 37, 8) and torch.equal(out[:, 0], pe[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 36, 8), 2.0))
    src = model()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    big = model(img_size=32)
    r = vit.load_state(big, str(tmp_path / "w.pth"))
    assert r["resized"] == ["pos_embed (1, 17, 32) -> (1, 65, 32)"]
    regs = model(reg_tokens=2, class_token=False, global_pool=True)  # 2 prefix rows kept, 16 patch rows resized
    r = vit.load_state(model(reg_tokens=2, class_token=False, global_pool=True, img_size=32), regs.state_dict())
    assert r["resized"] == ["pos_embed (1, 18, 32) -> (1, 66, 32)"]
    t, _ = vit.load_pretrained(str(tmp_path / "w.pth"), num_heads=4, img_size=32)  # a teacher at the student's size
    assert t.grid == 8 and torch.equal(t.state_dict()["pos_embed"], big.state_dict()["pos_embed"])


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
    del sd["pos_embed"]
    torch.save(sd, tmp_path / "nopos.pth")
    with pytest.raises(ValueError, match=f"{tmp_path / 'nopos.pth'} has no .*pos_embed .*not a ViT with timm/MAE"):
        vit.load_pretrained(str(tmp_path / "nopos.pth"), num_heads=4)
    with pytest.raises(ValueError, match=f"{tmp_path / 'nopos.pth'}: checkpoint does not fit the model"):
        vit.load_state(model(), str(tmp_path / "nopos.pth"))  # the file is named, as --finetune gives it


def claim(path, name, size):
    """Rewrite the zip archive's central directory: record `name` holds `size` bytes (stored, so compressed too)."""
    raw = bytearray(path.read_bytes())
    entry = raw.find(b"PK\x01\x02")  # the central directory's entries, one per record
    while raw[entry + 46:entry + 46 + struct.unpack_from("<H", raw, entry + 28)[0]] != name.encode():
        entry = raw.find(b"PK\x01\x02", entry + 4)
    struct.pack_into("<II", raw, entry + 20, size, size)  # compressed size, uncompressed size
    path.write_bytes(raw)


def test_files_torch_did_not_write_are_refused_before_torch_load(tmp_path):
    """torch.load inflates a compressed record whole, at the size the archive claims, before any check: a compressed
    record, or one claiming more bytes than the file holds, is refused from the central directory alone. A text,
    JSON, empty or other file is named for what it is (torch.load would say it needs arbitrary unpickling); torch's
    legacy (pre-zip) format still loads."""
    torch.save(sd_of(model()), tmp_path / "real.pth")
    with zipfile.ZipFile(tmp_path / "real.pth") as src, zipfile.ZipFile(tmp_path / "deflated.pth", "w") as out:
        for record in src.infolist():
            deflated = record.filename.endswith("/data/0")
            out.writestr(record.filename, src.read(record.filename),
                         compress_type=zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED)
    with pytest.raises(ValueError, match=r"deflated.pth is not a checkpoint torch wrote \(record real/data/0 is "
                                         r"compressed to inflate to \d+ bytes, and torch stores every record "
                                         r"uncompressed"):
        vit.load_file(str(tmp_path / "deflated.pth"))
    (tmp_path / "claims.pth").write_bytes((tmp_path / "real.pth").read_bytes())
    claim(tmp_path / "claims.pth", "real/data/1", 2**31)
    with zipfile.ZipFile(tmp_path / "claims.pth") as archive:
        assert archive.getinfo("real/data/1").file_size == 2**31
    with pytest.raises(ValueError, match=r"claims.pth is not a checkpoint torch wrote \(record real/data/1 claims "
                                         r"2147483648 bytes where the file has \d+: it is corrupt\)"):
        vit.load_file(str(tmp_path / "claims.pth"))
    files = {"log.jsonl": ('{"epoch": 0}\n', "it is a JSON file, starting '{\"epoch\": 0}'"),
             "notes.pth": ("teacher:\n  mae_tiny_cifar10\n", "it is a text file, starting 'teacher: mae_tiny_cifar10'"),
             "empty.pth": ("", "it is empty")}
    for name, (text, what) in files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as e:
            vit.load_file(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name} is not a checkpoint torch wrote ({what}): pass a file "
                                       "torch.save wrote"), e.value
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="it starts with the bytes .*PNG.*, neither a zip archive nor a pickle"):
        vit.load_file(str(tmp_path / "picture.png"))
    torch.save({"w": torch.arange(3.0)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(vit.load_file(str(tmp_path / "legacy.pth"))["w"], torch.arange(3.0))


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


# The teachers of the other pre-training methods (TEACHERS): each name, the address its official repository gives, and
# the layout of the file there, written below for a tiny ViT with the table's 12 heads.
OTHER_METHODS = {
    "dino_vit_b": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "mocov3_vit_b": "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
    "deit_vit_b": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
}


def moco_v3_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """moco-v3's moco/builder.py _build_mlp: Linear without bias, BatchNorm, ReLU; the last BatchNorm without affine."""
    layers = []
    for l in range(num_layers):
        dim1 = input_dim if l == 0 else mlp_dim
        dim2 = output_dim if l == num_layers - 1 else mlp_dim
        layers.append(torch.nn.Linear(dim1, dim2, bias=False))
        if l < num_layers - 1:
            layers += [torch.nn.BatchNorm1d(dim2), torch.nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(torch.nn.BatchNorm1d(dim2, affine=False))
    return torch.nn.Sequential(*layers)


def moco_v3(arch, dim=8, mlp_dim=16):
    """moco-v3's MoCo_ViT (moco/builder.py) inside DDP, as main_moco.py saves it: module.base_encoder, a timm ViT whose
    head is the projector MLP; module.momentum_encoder, the same with other weights (momentum < 1 leaves them apart);
    module.predictor."""
    moco = torch.nn.Module()
    moco.base_encoder = TimmViT(**arch, num_classes=mlp_dim)
    moco.momentum_encoder = TimmViT(**arch, num_classes=mlp_dim)
    for encoder in (moco.base_encoder, moco.momentum_encoder):
        encoder.head = moco_v3_mlp(3, arch["embed_dim"], mlp_dim, dim)
    moco.predictor = moco_v3_mlp(2, dim, mlp_dim, dim)
    ddp = torch.nn.Module()
    ddp.module = moco  # DistributedDataParallel's attribute: every key starts with module.
    return ddp


def write_as_released(path, name):
    """A tiny ViT with 12 heads saved at path in the layout of the file behind TEACHERS[name], its other entries
    included -> the network whose attention and outputs the loaded model must reproduce."""
    torch.manual_seed(2)
    arch = {**TINY, "num_heads": 12}
    if name == "dino_vit_b":  # "backbone only": the state dict of DINO's vit_base(num_classes=0), nothing else
        net = TimmViT(**arch, num_classes=0)
        torch.nn.init.normal_(net.cls_token)
        torch.save(sd_of(net), path)
    elif name == "deit_vit_b":  # DeiT's main.py checkpoint: the model beside its EMA, optimizer, schedule, args
        net = TimmViT(**arch, num_classes=10)
        torch.nn.init.normal_(net.cls_token)
        ema = {k: v + 1 for k, v in sd_of(net).items()}  # the same names, other weights: not the ones to load
        torch.save({"model": sd_of(net), "optimizer": torch.optim.AdamW(net.parameters()).state_dict(),
                    "lr_scheduler": {"last_epoch": 299}, "epoch": 299, "model_ema": ema, "scaler": {"scale": 65536.0},
                    "args": argparse.Namespace(model="deit_base_patch16_224", lr=5e-4)}, path)
    else:  # main_moco.py's save_checkpoint
        ddp = moco_v3(arch)
        net = ddp.module.base_encoder
        torch.nn.init.normal_(net.cls_token)
        torch.save({"epoch": 300, "arch": "vit_base", "state_dict": ddp.state_dict(),
                    "optimizer": torch.optim.SGD(ddp.parameters(), lr=0.1).state_dict(),
                    "scaler": {"scale": 65536.0, "growth_factor": 2.0}}, path)
        net.head = torch.nn.Identity()  # the projector trained MoCo, it is not part of the ViT: compare features
    return net


@pytest.mark.parametrize("name", list(OTHER_METHODS))
def test_other_methods_names_fail_offline_then_load_their_files_layout(tmp_path, monkeypatch, name):
    url = OTHER_METHODS[name]
    assert vit.TEACHERS[name] == dict(source=url, num_heads=12, **vit.IMAGENET)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    asked = []

    def offline(src, path):
        asked.append(src)
        raise ConnectionError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError) as e:
        vit.load_pretrained(name)
    assert asked == [url] and str(e.value) == (f"cannot download '{name}' from {url} (ConnectionError: no network); "
                                               f"download it on a machine that can and pass the file's path instead "
                                               f"of '{name}'")
    cached = tmp_path / "checkpoints" / url.rsplit("/", 1)[1]  # where a download puts it
    net = write_as_released(cached, name)
    m, report = vit.load_pretrained(name)  # found in the cache: no download
    assert asked == [url] and m.num_heads == 12 and not m.global_pool and m.depth == 5
    assert report["mean"] == (0.485, 0.456, 0.406) and report["std"] == (0.229, 0.224, 0.225)
    assert report["fresh"] == report["dropped"] == report["resized"] == []
    assert m.arch["num_classes"] == (10 if name == "deit_vit_b" else 0)
    x = torch.randn(2, 3, 32, 32)
    maps, outputs = writer_attention(net, x)
    with torch.no_grad():
        tokens, qkv = m.eval().forward_features(x, collect=range(5))
        ours = m.forward_head(tokens)
    for layer in range(5):
        torch.testing.assert_close(vit.attention_map(*qkv[layer][:2]), maps[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, outputs, atol=1e-5, rtol=0)  # logits (DeiT) or the normed class token


def test_moco_v3_arch_names_are_not_read_as_heads(tmp_path):
    """MoCo v3's 'vit_small' has 12 heads (moco-v3 vits.py) where every other small ViT has 6: its record gives none."""
    ddp = moco_v3(dict(img_size=16, patch_size=8, embed_dim=384, depth=1, num_heads=12))
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": ddp.state_dict()}, tmp_path / "vit-s.pth.tar")
    path = str(tmp_path / "vit-s.pth.tar")
    m, _ = vit.load_pretrained(path, num_heads=12)
    assert m.num_heads == 12 and m.arch["embed_dim"] == 384
    assert torch.equal(m.blocks[0].attn.qkv.weight, ddp.module.base_encoder.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="cannot be read from the weights.*--teacher_heads"):
        vit.load_pretrained(path)

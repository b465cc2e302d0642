"""evaluate.py: accuracy against hand computations, ensembles, the 200-class restriction, attention JSD and pictures,
copy checkpoints with and without their teacher, teachers rebuilt from records, class names, ViT files of any shape,
outputs that never replace a foreign file, bad input. Tiny models (16 px, 16 patches) on a few fake images."""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy
import pytest
import torch

import copy_attention
import evaluate
import teacher
import train
import vit
from conftest import one_error_line, run_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=10)
FAKE = ["--dataset", "fake", "--val_subset", "20", "--num_workers", "0", "--batch_size", "8", "--no_progress"]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return vit.VisionTransformer(**{**ARCH, **kw})


def constant(bias, **kw):
    """A model whose logits are `bias` for every image: top-1, top-5 and loss can be computed by hand."""
    model = tiny(num_classes=len(bias), **kw)
    torch.nn.init.zeros_(model.head.weight)
    model.head.bias.data = torch.tensor(bias, dtype=torch.float32)
    return model


def save(path, model, ema=None, method=None, config=None):
    """A checkpoint as train.run writes it."""
    torch.save(dict(model=model.state_dict(), ema=ema.state_dict() if ema is not None else None, optimizer={},
                    scaler={}, epoch=1, step=1, arch=model.arch, config=config or dict(dataset="fake", data_path=""),
                    method=method or {}), path)
    return str(path)


def run(*argv):
    return evaluate.main(list(map(str, argv)))


def test_accuracy_equals_hand_computation(tmp_path):
    bias = [9.0 - c for c in range(10)]  # class 0 always first, classes 0-4 the top five
    ckpt = save(tmp_path / "c.pth", constant(bias))
    val = run(ckpt, *FAKE, "--output", tmp_path / "r.json")["accuracy"]["val"]
    # 20 fake images, labels i % 10 balanced: 2 per class
    assert val["images"] == 20 and val["models"][0]["acc1"] == 10.0 and val["models"][0]["acc5"] == 50.0
    hand_loss = math.log(sum(math.exp(b) for b in bias)) - sum(bias) / 10  # mean over labels of logsumexp - b[y]
    assert math.isclose(val["models"][0]["loss"], hand_loss, rel_tol=1e-6)
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"]["val"] == val
    # a real model: the same numbers as train.validate's loop on the same images
    model = tiny(3)
    got = run(save(tmp_path / "m.pth", model), *FAKE)["accuracy"]["val"]["models"][0]
    args = argparse.Namespace(device="cpu", amp="none")
    ds, _ = evaluate.data.build_dataset("fake", "", "val", 16, subset=20)
    ref = train.validate(train.Method(model), model, torch.utils.data.DataLoader(ds, 8), args, 1)
    assert all(math.isclose(got[k], ref[k], rel_tol=1e-5) for k in ("acc1", "acc5", "loss"))


def test_ema_flag_evaluates_the_ema_weights(tmp_path):
    raw, ema = [float(c) for c in range(10)], [2.0 * (9 - c) for c in range(10)]
    ckpt = save(tmp_path / "c.pth", constant(raw), ema=constant(ema))
    for flags, bias, weights in (([], raw, "model"), (["--ema"], ema, "ema")):
        result = run(ckpt, *FAKE, *flags)
        loss = math.log(sum(math.exp(b) for b in bias)) - sum(bias) / 10
        assert result["models"][0]["weights"] == weights
        assert math.isclose(result["accuracy"]["val"]["models"][0]["loss"], loss, rel_tol=1e-6)
    # no EMA in the checkpoint: raw weights, and the result says so
    assert run(save(tmp_path / "n.pth", constant(raw)), *FAKE, "--ema")["models"][0]["weights"] == "model"


def test_ensemble_of_a_model_with_itself_is_the_model(tmp_path):
    a, b = save(tmp_path / "a.pth", tiny(1)), save(tmp_path / "b.pth", tiny(2))
    for how in ("probs", "logits"):
        val = run(a, a, *FAKE, "--ensemble", how)["accuracy"]["val"]
        for k in ("acc1", "acc5", "loss"):
            assert math.isclose(val["ensemble"][k], val["models"][0][k], rel_tol=1e-6, abs_tol=1e-9)
    # two different models: the mean of their probabilities (or logits), computed here by hand
    ds, _ = evaluate.data.build_dataset("fake", "", "val", 16, subset=20)
    images, labels = torch.stack([ds[i][0] for i in range(20)]), torch.tensor([ds[i][1] for i in range(20)])
    with torch.no_grad():
        la, lb = tiny(1).eval()(images), tiny(2).eval()(images)
    probs = (la.softmax(-1) + lb.softmax(-1)) / 2
    val = run(a, b, *FAKE)["accuracy"]["val"]
    assert math.isclose(val["ensemble"]["loss"], -probs[range(20), labels].log().mean().item(), rel_tol=1e-5)
    assert math.isclose(val["ensemble"]["acc1"], 100 * (probs.argmax(1) == labels).double().mean().item())
    val = run(a, b, *FAKE, "--ensemble", "logits")["accuracy"]["val"]
    assert math.isclose(val["ensemble"]["loss"], torch.nn.functional.cross_entropy((la + lb) / 2, labels).item(),
                        rel_tol=1e-5)
    assert "ensemble" not in run(a, b, *FAKE, "--ensemble", "none")["accuracy"]["val"]


def model(name, net):
    return evaluate.Model(name, net.eval(), train.Method(net), {})


def peaked(net):
    """Sharper attention than at initialisation (q k^T of order 1 instead of 1e-3), so maps differ visibly."""
    with torch.no_grad():
        for blk in net.blocks:
            blk.attn.qkv.weight.mul_(30)
    return net


def test_jsd_of_a_model_with_itself_is_zero_and_symmetric():
    a, b = model("a", peaked(tiny(1))), model("b", peaked(tiny(2)))
    images = torch.randn(3, 3, 16, 16)
    jsd = evaluate.attention_jsd([a, a, b], images, [0, 1], batch_size=2)
    assert all(v["index"] == 0 and v["best"] == 0 for v in jsd["0-1"].values())
    assert all(v["best_heads"] == [0, 1, 2, 3] for v in jsd["0-1"].values())
    ab = evaluate.attention_jsd([a, b], images, [0, 1], 3)["0-1"]
    ba = evaluate.attention_jsd([b, a], images, [0, 1], 3)["0-1"]
    for l in (0, 1):
        assert 1e-2 < ab[l]["index"] < math.log(2) and math.isclose(ab[l]["index"], ba[l]["index"], rel_tol=1e-5)
        assert ab[l]["best"] <= ab[l]["index"]
    # the formula against the definition, 0.5 KL(p||m) + 0.5 KL(q||m), in float64
    p, q = torch.tensor([0.7, 0.3, 0.0]), torch.tensor([0.1, 0.4, 0.5])
    m = (p + q) / 2
    kl = lambda x: sum(xi * math.log(xi / mi) for xi, mi in zip(x.tolist(), m.tolist()) if xi > 0)
    assert math.isclose(evaluate.jsd(p, q).item(), 0.5 * kl(p) + 0.5 * kl(q), rel_tol=1e-6)
    assert math.isclose(evaluate.jsd(torch.tensor([1.0, 0]), torch.tensor([0, 1.0])).item(), math.log(2), rel_tol=1e-6)


def test_best_match_finds_permuted_heads():
    """A model with its heads permuted computes the same function; index-matched JSD is > 0, best match is 0."""
    a = peaked(tiny(1)).eval()
    b = peaked(tiny(1)).eval()
    perm = torch.tensor([2, 0, 3, 1])
    D = 32 // 4
    rows = (torch.arange(32).view(4, D)[perm]).flatten()  # new head h = old head perm[h]
    with torch.no_grad():
        for blk in b.blocks:
            w, bias = blk.attn.qkv.weight.view(3, 32, 32), blk.attn.qkv.bias.view(3, 32)
            w.copy_(w[:, rows].clone())
            bias.copy_(bias[:, rows].clone())
            blk.attn.proj.weight.copy_(blk.attn.proj.weight[:, rows].clone())
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(a(x), b(x), atol=1e-5)
    ma, mb = model("a", a), model("b", b)
    jsd = evaluate.attention_jsd([ma, mb], x, [0, 1], 2)["0-1"]
    for l in (0, 1):
        assert jsd[l]["index"] > 1e-2 and jsd[l]["best"] < 1e-6
        assert jsd[l]["best_heads"] == perm.argsort().tolist()  # head i of a is head perm^-1[i] of b


def test_200_class_restriction_and_ood_side_by_side(tmp_path):
    from PIL import Image
    wnids = [f"n{i:08d}" for i in range(1000)]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids))
    for kind, classes in (("a", (3, 42, 500)), ("sketch", (42, 999))):
        for c in classes:
            for i in range(2):
                os.makedirs(tmp_path / kind / wnids[c], exist_ok=True)
                Image.new("RGB", (20, 24), (c % 256, i, 0)).save(tmp_path / kind / wnids[c] / f"{i}.png")
    bias = [0.0] * 1000
    bias[999], bias[42] = 10.0, 5.0  # first overall: 999, which ImageNet-A does not have; first of A's 200: 42
    ckpt = save(tmp_path / "c.pth", constant(bias))
    acc = run(ckpt, *FAKE, "--no_val", "--ood", f"a={tmp_path / 'a'}", f"sketch={tmp_path / 'sketch'}",
              "--wnids", tmp_path / "wnids.txt")["accuracy"]
    assert list(acc) == ["a", "sketch"] and acc["a"]["images"] == 6 and acc["sketch"]["images"] == 4
    a = acc["a"]["models"][0]
    assert math.isclose(a["acc1"], 100 / 3) and a["acc5"] == 100.0  # 42 right among 3 classes; top-5 of 3 = all
    assert math.isclose(a["loss"], math.log(2 + math.exp(5)) - 5 / 3, rel_tol=1e-6)  # logits (0, 5, 0) only
    assert acc["sketch"]["models"][0]["acc1"] == 50.0  # all 1000 logits: 999 wins, right for half the images
    # the default class list is <data_path>/train's sorted sub-folders
    with pytest.raises(FileNotFoundError, match="--wnids"):
        run(ckpt, *FAKE, "--no_val", "--ood", f"a={tmp_path / 'a'}", "--data_path", tmp_path / "none")


def test_picture_grid_size_and_copy_maps_equal_teachers(tmp_path, copy_ckpt):
    ckpt, teacher = copy_ckpt
    scratch = save(tmp_path / "s.pth", tiny(5))
    out = tmp_path / "att.png"
    result = run(ckpt, scratch, *FAKE, "--no_val", "--with_teacher", "--pictures", out, "--picture_layers", "0,1",
                 "--picture_images", "2", "--analysis_images", "4", "--jsd")
    from PIL import Image
    im = Image.open(out)
    # 2 images x 2 layers x 3 models (teacher, copy, scratch) rows; image + 4 heads columns; 16 px cells, 2 px pads,
    # beside a margin of row labels and above one of column labels
    (left, top), pitch = result["pictures"]["origin"], result["pictures"]["pitch"]
    assert pitch == 18 and 0 < top < 18 and left > 0 and im.size == (left + 5 * 18 + 2, top + 12 * 18 + 2)
    c = result["jsd"]["classes"][0]  # the class name of analysis image 0 (fake data: '0'..'9')
    assert c in [str(i) for i in range(10)] and len(result["jsd"]["classes"]) == 4
    assert result["pictures"]["rows"][:3] == [f"image 0 ({c}), layer 0, teacher {teacher}",
                                             f"image 0 ({c}), layer 0, " + ckpt, f"image 0 ({c}), layer 0, " + scratch]
    assert result["pictures"]["columns"] == ["image", "head 0", "head 1", "head 2", "head 3"]
    pix = torch.from_numpy(numpy.asarray(im.convert("RGB")).copy())  # (H, W, 3)
    cell = lambda r, c: pix[top + 2 + 18 * r:top + 18 * (r + 1), left + 2 + 18 * c:left + 18 * (c + 1)]
    # the copy student runs on its teacher's maps in layer 0 (copied) but not in layer 1; scratch differs from both
    assert torch.equal(cell(0, 1), cell(1, 1)) and not torch.equal(cell(0, 1), cell(2, 1))
    assert not torch.equal(cell(3, 1), cell(4, 1))
    jsd = result["jsd"]
    assert jsd["images"] == 4 and jsd["pairs"]["0-1"][0]["index"] == 0 and jsd["pairs"]["0-1"][1]["index"] > 0
    assert jsd["pairs"]["0-2"][0]["index"] > 0
    # --layers selects the layers compared
    assert list(run(ckpt, scratch, *FAKE, "--no_val", "--jsd", "--layers", "1", "--analysis_images", "2")
                ["jsd"]["pairs"]["0-1"]) == [1]


@pytest.fixture
def copy_ckpt(tmp_path):
    """A teacher file ({'model', 'arch'}) and a copy checkpoint of layer 0 that records it."""
    net = peaked(tiny(7, global_pool=False))
    tpath = str(tmp_path / "teacher.pth")
    torch.save({"model": net.state_dict(), "arch": net.arch}, tpath)
    student = peaked(tiny(8))
    method = copy_attention.CopyAttention(student, teacher.Teacher(tpath, student, "0"), "copy").describe()
    return save(tmp_path / "copy.pth", student, method=method), tpath


def test_with_teacher_from_a_distillation_checkpoint(tmp_path, copy_ckpt):
    """The teacher rebuilt from a distillation checkpoint's record attends as the teacher file itself does."""
    import distill_attention
    _, tpath = copy_ckpt
    student = peaked(tiny(8))
    method = distill_attention.DistillAttention(student, teacher.Teacher(tpath, student, ":"), "distill").describe()
    ckpt = save(tmp_path / "d.pth", student, method=method)
    flags = [*FAKE, "--no_val", "--jsd", "--analysis_images", "2"]
    jsd = run(ckpt, *flags, "--with_teacher")["jsd"]
    assert jsd["models"] == [f"teacher {tpath}", ckpt] and all(v["index"] > 1e-3 for v in jsd["pairs"]["0-1"].values())
    assert run(tpath, ckpt, *flags)["jsd"]["pairs"] == jsd["pairs"]


def test_copy_checkpoint_runs_with_its_teacher_and_fails_clearly_without(tmp_path, copy_ckpt):
    ckpt, tpath = copy_ckpt
    got = run(ckpt, *FAKE)
    assert got["models"][0]["method"] == "copy" and got["models"][0]["teacher"] == tpath
    ds, _ = evaluate.data.build_dataset("fake", "", "val", 16, subset=20)
    images, labels = torch.stack([ds[i][0] for i in range(20)]), torch.tensor([ds[i][1] for i in range(20)])
    student = peaked(tiny(8))
    method = copy_attention.CopyAttention(student, teacher.Teacher(tpath, student, "0"), "copy").eval()
    with torch.no_grad():
        logits, alone = method.predict(student.eval(), images), student(images)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert math.isclose(got["accuracy"]["val"]["models"][0]["loss"], loss, rel_tol=1e-5)
    assert (logits - alone).abs().max() > 1e-2  # the teacher mattered
    moved = str(tmp_path / "elsewhere.pth")
    shutil.move(tpath, moved)
    r = subprocess.run([sys.executable, "evaluate.py", ckpt] + FAKE, cwd=ROOT, capture_output=True, text=True)
    line = one_error_line(r)
    assert f"needs its teacher {tpath}" in line and "--teacher PATH" in line, line
    assert run(ckpt, *FAKE, "--teacher", moved)["accuracy"] == got["accuracy"]
    torch.save({"model": tiny(9, global_pool=False).state_dict(), "arch": tiny(9, global_pool=False).arch}, tpath)
    with pytest.raises(ValueError, match="not the one .* was trained with .*sha256"):
        run(ckpt, *FAKE)


def test_bad_input_is_a_clear_error(tmp_path):
    model = tiny(1)
    ckpt = torch.load(save(tmp_path / "m.pth", model), weights_only=True)
    torch.save(dict(ckpt, arch=dict(model.arch, embed_dim=48)), tmp_path / "arch.pth")
    with pytest.raises(ValueError, match="do not fit the architecture it records.*cls_token"):
        run(tmp_path / "arch.pth", *FAKE)
    torch.save(dict(ckpt, config=dict(model="vit_micro_cifar", input_size=32)), tmp_path / "config.pth")
    with pytest.raises(ValueError, match="config says vit_micro_cifar at 32 px, but its recorded arch differs.*embed_dim 128 vs 32"):
        run(tmp_path / "config.pth", *FAKE)
    other = save(tmp_path / "k.pth", tiny(2, num_classes=7))
    with pytest.raises(ValueError, match="different class counts cannot be ensembled.*7"):
        run(tmp_path / "m.pth", other, *FAKE)
    with pytest.raises(ValueError, match="has 7 classes but val has 10"):
        run(other, *FAKE)
    encoder = save(tmp_path / "e.pth", tiny(3, num_classes=0))
    with pytest.raises(ValueError, match="no trained classifier"):
        run(encoder, *FAKE)
    with pytest.raises(ValueError, match="--ood takes KIND=PATH"):
        run(tmp_path / "m.pth", *FAKE, "--ood", "c=/x")
    with pytest.raises(ValueError, match="--picture_layers 5: layer 5 is out of range"):
        run(tmp_path / "m.pth", *FAKE, "--no_val", "--pictures", tmp_path / "p.png", "--picture_layers", "5")
    with pytest.raises(ValueError, match="--jsd compares maps of equal shape"):
        run(tmp_path / "m.pth", save(tmp_path / "h.pth", tiny(2, num_heads=2)), *FAKE, "--no_val", "--jsd")
    with pytest.raises(ValueError, match="--with_teacher: none of the checkpoints records a teacher"):
        run(tmp_path / "m.pth", *FAKE, "--no_val", "--jsd", "--with_teacher")


def folder_data(root, classes, per_class=2):
    """An ImageFolder tree root/{train,val}/<class>/<i>.png of 16 px images, each class its own colour."""
    from PIL import Image
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (80 * c, 30 * i, 200)).save(root / split / name / f"{i}.png")
    return root


def test_class_names_in_reports_and_pictures(tmp_path):
    root = folder_data(tmp_path / "data", ["cat", "dog", "frog"])
    config = dict(dataset="folder", data_path=str(root))
    ckpt = save(tmp_path / "c.pth", peaked(constant([0.0, 2.0, 1.0])), config=config)  # always 'dog'
    other = save(tmp_path / "o.pth", peaked(tiny(2, num_classes=3)), config=config)
    flags = ["--num_workers", "0", "--no_progress", "--pictures", tmp_path / "p.png", "--picture_layers", "1",
             "--picture_images", "3", "--analysis_images", "3"]
    result = run(ckpt, other, *flags, "--picture_heads", "mean", "--picture_size", "32")
    assert result["accuracy"]["val"]["models"][0]["per_class"] == {"cat": 0.0, "dog": 100.0, "frog": 0.0}
    assert set(result["accuracy"]["val"]["ensemble"]["per_class"]) == {"cat", "dog", "frog"}
    pic = result["pictures"]  # --picture_heads mean: a row per image, the image then a column per model
    # one image of each class (class-balanced, in file order)
    assert pic["rows"] == [f"image {i} ({c}), layer 1" for i, c in enumerate(["cat", "dog", "frog"])]
    assert pic["columns"] == ["image", ckpt, other] and pic["pitch"] == 34
    from PIL import Image
    im = Image.open(tmp_path / "p.png")
    (left, top) = pic["origin"]
    assert im.size == (left + 3 * 34 + 2, top + 3 * 34 + 2) and im.info["Software"] == "evaluate.py"
    margin = numpy.asarray(im.convert("L"))[top:, :left]
    assert margin.min() < 128  # the row labels are drawn
    per_head = run(ckpt, other, *flags)["pictures"]  # the flag changes the layout: a row per model, a column per head
    assert len(per_head["rows"]) == 6 and per_head["columns"] == ["image"] + [f"head {h}" for h in range(4)]
    # a val/ folder whose classes differ from train/'s is refused (labels would not mean the model's classes)
    shutil.rmtree(root / "val" / "frog")
    with pytest.raises(ValueError, match="does not have train/'s classes.*frog"):
        run(ckpt, "--num_workers", "0", "--no_progress")


def test_mean_picture_cell_is_the_mean_over_heads(tmp_path):
    a, b = model("copy", peaked(tiny(1))), model("scratch", peaked(tiny(2)))
    a.info, b.info = dict(method="copy"), dict(method="scratch")
    images = torch.randn(2, 3, 16, 16)
    lay = evaluate.pictures([a, b], images, ["cat", "dog"], [1], str(tmp_path / "p.png"), mean_heads=True, size=32)
    assert lay["rows"] == ["image 0 (cat), layer 1", "image 1 (dog), layer 1"]
    from PIL import Image
    pix = torch.from_numpy(numpy.asarray(Image.open(tmp_path / "p.png").convert("RGB")).copy()).permute(2, 0, 1)
    (left, top), p = lay["origin"], lay["pitch"]
    for r, c, m in ((0, 1, a), (1, 2, b)):
        want = evaluate.heat(evaluate.cls_attention(m, images, [1])[1][r].mean(0, keepdim=True), 32)[0]
        got = pix[:, top + 2 + p * r:top + p * (r + 1), left + 2 + p * c:left + p * (c + 1)]
        assert torch.equal(got, (want * 255).byte())  # torchvision's to_pil_image truncates


def test_any_vit_file_runs_given_its_heads(tmp_path):
    """A ViT of a shape no preset has (width 24, depth 3, MLP ratio 2, 3 heads) as a plain timm-named state dict."""
    torch.manual_seed(4)
    odd = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0,
                                num_classes=10, global_pool=False).eval()
    with torch.no_grad():
        odd.head.weight.mul_(300)  # logits that depend clearly on the input
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="--teacher_heads"):
        run(tmp_path / "odd.pth", *FAKE)
    got = run(tmp_path / "odd.pth", *FAKE, "--teacher_heads", "3", "--pictures", tmp_path / "p.png",
              "--picture_layers", "2", "--analysis_images", "2")
    assert {k: got["models"][0]["arch"][k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")} == \
        dict(embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0)
    assert got["pictures"]["columns"] == ["image", "head 0", "head 1", "head 2"]
    ds, _ = evaluate.data.build_dataset("fake", "", "val", 16, subset=20)
    images, labels = torch.stack([ds[i][0] for i in range(20)]), torch.tensor([ds[i][1] for i in range(20)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(odd(images), labels).item()
    assert math.isclose(got["accuracy"]["val"]["models"][0]["loss"], loss, rel_tol=1e-5)
    # a file that records its input statistics (as pretrain_mae.py exports do) sees the pixels normalised with them
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    torch.save({"model": odd.state_dict(), "arch": odd.arch, "mean": mean, "std": std}, tmp_path / "stats.pth")
    pixels = images * torch.tensor(evaluate.data.STD).view(3, 1, 1) + torch.tensor(evaluate.data.MEAN).view(3, 1, 1)
    with torch.no_grad():
        own = odd((pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    got = run(tmp_path / "stats.pth", *FAKE)["accuracy"]["val"]["models"][0]["loss"]
    assert math.isclose(got, torch.nn.functional.cross_entropy(own, labels).item(), rel_tol=1e-5)
    assert not math.isclose(got, loss, rel_tol=1e-3)


def test_outputs_never_replace_a_foreign_file(tmp_path):
    ckpt = save(tmp_path / "m.pth", tiny(1))
    before = (tmp_path / "m.pth").read_bytes()
    for flag in ("--output", "--pictures"):
        with pytest.raises(ValueError, match=f"{flag} .*m.pth exists and is not an output of evaluate.py"):
            run(ckpt, *FAKE, flag, ckpt)
    assert (tmp_path / "m.pth").read_bytes() == before
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    for flag, name in (("--pictures", "photo.png"), ("--output", "notes.json")):
        with pytest.raises(ValueError, match="not an output of evaluate.py"):
            run(ckpt, *FAKE, flag, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no folder"):
        run(ckpt, *FAKE, "--output", tmp_path / "none" / "r.json")
    # its own outputs are replaced
    outputs = ["--output", tmp_path / "r.json", "--pictures", tmp_path / "p.png", "--analysis_images", "2"]
    run(ckpt, *FAKE, *outputs)
    first = (tmp_path / "r.json").read_text()
    run(ckpt, *FAKE, *outputs, "--val_subset", "10")
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"]["val"]["images"] == 10 != \
        json.loads(first)["accuracy"]["val"]["images"]


def test_bad_input_through_the_cli_changes_nothing(tmp_path):
    """Exit 2, one line `error: ...`, no traceback, and every file in the output folder as it was."""
    ckpt = save(tmp_path / "m.pth", tiny(1))
    run(ckpt, *FAKE, "--output", tmp_path / "r.json", "--pictures", tmp_path / "p.png", "--analysis_images", "2")
    files = lambda: {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    before = files()
    outputs = ["--output", tmp_path / "r.json", "--pictures", tmp_path / "p.png", "--no_progress"]
    argv = [ckpt, "--dataset", "folder", "--data_path", tmp_path / "missing", *outputs]
    r = subprocess.run([sys.executable, "evaluate.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    assert one_error_line(r).startswith("error: no folder") and r.stdout == "", r.stdout
    with pytest.raises(ValueError, match="unknown model"):  # in-process: train.cli makes it the same one line
        run(tmp_path / "nope.pth", *FAKE, *outputs)
    assert files() == before


def test_curves_draws_top1_per_epoch_or_names_matplotlib(tmp_path):
    logs = []
    for name, accs in (("scratch", [10, 20]), ("distill", [15, 30])):
        (tmp_path / name).mkdir()
        logs.append(tmp_path / name / "log.jsonl")
        logs[-1].write_text("".join(json.dumps({"epoch": e, "val_acc1": a}) + "\n" for e, a in enumerate(accs)))
    png = tmp_path / "curves.png"
    try:
        import matplotlib  # noqa: F401 -- optional: only --curves uses it
    except ImportError:
        with pytest.raises(ValueError, match="pip install matplotlib"):
            evaluate.main([*map(str, logs), "--curves", str(png)])
        return
    evaluate.main([*map(str, logs), "--curves", str(png)])
    assert evaluate.written_here(png)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no val_acc1"):
        evaluate.main([str(tmp_path / "bad.jsonl"), "--curves", str(png)])


def test_gap_shares_reads_evaluate_outputs_named_by_teacher_epochs(tmp_path):
    def output(name, acc1):
        (tmp_path / f"{name}.json").write_text(json.dumps({"accuracy": {"val": {"models": [{"acc1": acc1}]}}}))
        return str(tmp_path / f"{name}.json")
    files = [output("scratch", 30), output("eval_finetune_ep12", 50), output("eval_finetune_ep48", 40),
             output("copy_q_ep12", 35), output("distill_ep12", 40), output("distill_ep48", 45)]
    assert evaluate.gap_shares(files) == {"copy_q": ([12], [25.0]), "distill": ([12, 48], [50.0, 150.0])}
    with pytest.raises(ValueError, match="no finetune_ep24.json"):
        evaluate.gap_shares(files + [output("copy_ep24", 33)])
    with pytest.raises(ValueError, match="name it METHOD_epE.json"):
        evaluate.gap_shares(files[:1] + [output("distill", 40)])
    with pytest.raises(ValueError, match="add copy's or distillation's"):
        evaluate.gap_shares(files[:2])
    try:
        import matplotlib  # noqa: F401 -- optional: only --curves uses it
    except ImportError:
        return
    evaluate.main([*files, "--curves", str(tmp_path / "gap.png")])
    assert evaluate.written_here(tmp_path / "gap.png")


def test_teacher_shares_reads_a_manifest_of_evaluate_outputs(tmp_path):
    def output(name, *acc1s):
        models = [{"name": f"runs/{name}{i}/checkpoint.pth"} for i in range(len(acc1s))]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"models": models, "accuracy": {"val": {"models": [{"acc1": a} for a in acc1s]}}}))
        return str(path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"specificity": [0.1, 0.3]}))
    manifest = {"scratch": [output("scratch", 29), output("scratch_s1", 31)],  # mean 30
                "teachers": {"T": {"specificity": str(spec),
                                   "top": [[output("seed0", 50, 35), "runs/seed00/checkpoint.pth"]],  # two models
                                   "copy": [[str(tmp_path / "seed0.json"), "runs/seed01/checkpoint.pth"]],
                                   "distillation": [output("d0", 40), output("d1", 42)]}}}
    path = tmp_path / "teachers.json"
    path.write_text(json.dumps(manifest))
    (x, shares), = evaluate.teacher_shares(str(path)).values()
    assert x == pytest.approx(0.2) and shares == pytest.approx({"copy": 25.0, "distillation": 55.0})
    if importlib.util.find_spec("matplotlib"):  # optional: only --curves uses it
        evaluate.main([str(path), "--curves", str(tmp_path / "shares.png")])
        assert evaluate.written_here(tmp_path / "shares.png")
    t = manifest["teachers"]["T"]
    for key, refs, error in (("top", [t["top"][0][0]], "holds 2 models: name one"),
                             ("top", [[t["top"][0][0], "runs/x"]], "has no model 'runs/x'"),
                             ("distillation", [], "T's distillation names no evaluate.py output"),
                             ("copy", [str(spec)], "spec.json is not an evaluate.py output with top-1"),
                             ("specificity", str(tmp_path / "d0.json"), "d0.json is not an evaluate.py --specificity")):
        path.write_text(json.dumps({**manifest, "teachers": {"T": {**t, key: refs}}}))
        with pytest.raises(ValueError, match=error):
            evaluate.teacher_shares(str(path))


# ------------------------------------------------------------------------------------------------ --specificity
def specificity_reference(net, images):
    """The measure in one pass, every map in memory, float64: -> (specificity, entropy) per layer of net on images
    (B, 3, S, S) as the net should see them."""
    with torch.no_grad():
        _, qkv = net.eval().forward_features(images, collect=range(net.depth))
    spec, entropy = [], []
    for l in range(net.depth):
        q, k, _ = (t.double() for t in qkv[l])
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, N, N)
        mean = p.mean(0, keepdim=True)  # (1, H, N, N): the mean map over the images
        m = (p + mean) / 2
        kl_p, kl_mean = torch.xlogy(p, p / m).sum(-1), torch.xlogy(mean, mean / m).sum(-1)  # (B, H, N)
        spec.append(((kl_p + kl_mean) / 2).mean().item())
        entropy.append(-torch.xlogy(p, p).sum(-1).mean().item())
    return spec, entropy


def blind(net):
    """net with no patch-embedding weights: every image gives the same tokens (CLS and position embeddings, plus the
    patch bias), so the same maps in every layer."""
    with torch.no_grad():
        net.patch_embed.proj.weight.zero_()
    return net


def batches(images, size):
    """A re-iterable loader of (images, labels), as the CLI passes evaluate.specificity."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(len(images))), size)


def test_specificity_is_zero_for_attention_that_ignores_the_image_and_large_when_it_follows_it():
    torch.manual_seed(0)
    images = torch.randn(7, 3, 16, 16)
    seeing = peaked(tiny(5))
    ignoring = blind(peaked(tiny(5)))
    spec, entropy = evaluate.specificity(model("blind", ignoring), batches(images, 3))  # batches of 3, 3 and 1
    assert len(spec) == len(entropy) == ARCH["depth"]
    assert all(abs(s) < 1e-6 for s in spec), spec
    # the zero is not that of uniform maps: the rows are far from uniform (ln 17 = 2.83 nats)
    assert all(e < math.log(17) - 0.3 for e in entropy), entropy
    assert entropy == pytest.approx(specificity_reference(ignoring, images)[1], abs=1e-5)
    spec, entropy = evaluate.specificity(model("seeing", seeing), batches(images, 3))
    assert all(s > 0.05 for s in spec), spec
    # two passes over batches = the definition with every map in memory, in float64
    ref_spec, ref_entropy = specificity_reference(seeing, images)
    assert spec == pytest.approx(ref_spec, rel=1e-5) and entropy == pytest.approx(ref_entropy, rel=1e-5)
    # the batch size changes nothing
    assert evaluate.specificity(model("seeing", seeing), batches(images, 7))[0] == pytest.approx(spec, rel=1e-6)


def test_specificity_cli_writes_its_json_and_never_a_foreign_file(tmp_path):
    net = peaked(tiny(6))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # recorded in the file, as pretrain_mae.py exports do
    path = tmp_path / "teacher.pth"
    torch.save({"model": net.state_dict(), "arch": net.arch, "mean": mean, "std": std}, path)
    flags = ["--dataset", "fake", "--val_subset", "20", "--num_workers", "0", "--batch_size", "8", "--no_progress"]
    got = run("--specificity", path, *flags, "--output", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(got))
    assert got["written_by"] == "evaluate.py" and got["teacher"] == str(path) and got["images"] == 20
    assert (got["heads"], got["tokens"], got["mean"], got["std"]) == (4, 17, mean, std)
    assert got["teacher_sha256"] == teacher.sha256(path)
    # the same 20 class-balanced fake images, re-normalised from data.MEAN / STD to the teacher's statistics
    ds, _ = evaluate.data.build_dataset("fake", "", "val", 16, subset=20)
    images = torch.stack([ds[i][0] for i in range(20)])
    pixels = images * torch.tensor(evaluate.data.STD).view(3, 1, 1) + torch.tensor(evaluate.data.MEAN).view(3, 1, 1)
    own = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    ref_spec, ref_entropy = specificity_reference(net, own)
    assert got["specificity"] == pytest.approx(ref_spec, rel=1e-5)
    assert got["entropy"] == pytest.approx(ref_entropy, rel=1e-5)
    # --teacher_mean / --teacher_std win over the record
    stats = ["--teacher_mean", *evaluate.data.MEAN, "--teacher_std", *evaluate.data.STD]
    plain = run("--specificity", path, *flags, *stats)
    assert plain["specificity"] == pytest.approx(specificity_reference(net, images)[0], rel=1e-5)
    assert plain["specificity"] != pytest.approx(got["specificity"], rel=1e-3)
    # --output replaces only this script's outputs
    before = path.read_bytes()
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    for foreign in (path, tmp_path / "notes.json"):
        with pytest.raises(ValueError, match="not an output of evaluate.py"):
            run("--specificity", path, *flags, "--output", foreign)
    assert path.read_bytes() == before and (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    # a plain state dict says no heads: --teacher_heads, as for the method scripts
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="--teacher_heads"):
        run("--specificity", tmp_path / "plain.pth", *flags)
    assert run("--specificity", tmp_path / "plain.pth", *flags, "--teacher_heads", "4", *stats)["specificity"] == \
        pytest.approx(plain["specificity"], rel=1e-6)
    # the teacher is analysed alone; its statistics flags mean nothing without it
    with pytest.raises(ValueError, match="analyses its teacher alone"):
        run(path, "--specificity", path, *flags)
    with pytest.raises(ValueError, match="--specificity TEACHER"):
        run(path, *flags, *stats)
    with pytest.raises(ValueError, match="--specificity TEACHER"):
        run(*flags)


# The first two measured independently (512 CIFAR-10 test images, the same definition) before this measure existed
# here; the others are the README's (results/specificity/).
SHIPPED_SPECIFICITY = {"mae_tiny_cifar10": [0.019, 0.057, 0.032, 0.020, 0.020, 0.022],
                       "sup_nano_cifar10": [0.149, 0.197, 0.220, 0.232, 0.237, 0.245],
                       "mae90_tiny_cifar10": [0.058, 0.094, 0.121, 0.176, 0.164, 0.080],
                       "mae90_ep8_tiny_cifar10": [0.045, 0.061, 0.079, 0.121, 0.126, 0.047]}


@pytest.mark.parametrize("teacher", list(SHIPPED_SPECIFICITY))
def test_specificity_of_the_shipped_teachers_through_the_cli(tmp_path, cifar10_root, teacher):
    """CIFAR-10 found without --data_path; a line per layer on stderr, the JSON in --output; the numbers of the
    README's table within 0.02 of an outside measurement."""
    r = run_here("evaluate", ["--specificity", teacher, "--num_workers", "0", "--no_progress",
                              "--output", str(tmp_path / "s.json")])
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert sum(line.startswith("layer ") for line in r.stderr.splitlines()) == 6
    got = json.loads((tmp_path / "s.json").read_text())
    assert (got["dataset"], got["images"], got["heads"], got["tokens"]) == ("cifar10", 512, 3, 65)
    assert all(abs(a - b) < 0.02 for a, b in zip(got["specificity"], SHIPPED_SPECIFICITY[teacher])), got
    assert len(got["specificity"]) == 6


def test_a_file_without_a_training_config_is_told_what_to_pass(tmp_path):
    """A plain ViT file (a teacher name, timm's weights) records no dataset: the error says to pass --dataset and
    --data_path, not 'no folder train'; a pre-trained encoder, that it has no classifier to evaluate. --val_subset is
    named as evaluate.py spells it, and argparse's errors are one line, as the other scripts'."""
    model = tiny(5)
    torch.save({"model": model.state_dict(), "arch": model.arch}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"plain.pth records no dataset \(a training run's checkpoint.pth does\): "
                                         "pass --dataset and --data_path"):
        run(tmp_path / "plain.pth", "--num_workers", "0", "--no_progress")
    assert run(tmp_path / "plain.pth", *FAKE)["accuracy"]["val"]["images"] == 20  # what the message asks for
    encoder = tiny(6, num_classes=0)
    torch.save({"model": encoder.state_dict(), "arch": encoder.arch}, tmp_path / "encoder.pth")
    with pytest.raises(ValueError, match=r"encoder.pth has no trained classifier \(untrained: no head\): it is a "
                                         r"pre-trained encoder, with no accuracy to measure; fine-tune it"):
        run(tmp_path / "encoder.pth", "--num_workers", "0", "--no_progress")
    ckpt = save(tmp_path / "m.pth", model)
    with pytest.raises(ValueError, match=r"^--val_subset 129 is larger than the dataset \(128 images\): lower "
                                         r"--val_subset$"):
        run(ckpt, *FAKE, "--val_subset", "129")
    with pytest.raises(ValueError, match=r"^unrecognized arguments: --subset 8 \(see --help\)$"):
        run(ckpt, *FAKE, "--subset", "8")


def test_copy_checkpoint_of_average_images_runs_with_its_saved_map_and_no_teacher_pass(tmp_path, copy_ckpt,
                                                                                       monkeypatch):
    """--average images: the checkpoint's mean map routes the student's values; the teacher (still checked by its
    sha256) does not run. A checkpoint that lost its map is refused in one line."""
    _, tpath = copy_ckpt
    student = peaked(tiny(8))
    mean_map = torch.softmax(torch.randn(1, 4, 17, 17, generator=torch.Generator().manual_seed(3)), -1)
    method = copy_attention.CopyAttention(student, teacher.Teacher(tpath, student, "0"), "copy", average="images",
                                          mean_map=mean_map).eval()
    path = save(tmp_path / "avg.pth", student, method=method.describe())
    ckpt = torch.load(path, weights_only=True)
    torch.save(dict(ckpt, method_tensors=method.tensors()), path)
    ds, _ = evaluate.data.build_dataset("fake", "", "val", 16, subset=20)
    images, labels = torch.stack([ds[i][0] for i in range(20)]), torch.tensor([ds[i][1] for i in range(20)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(method.predict(student.eval(), images), labels).item()

    def fails(*a, **k):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(teacher.Teacher, "forward", fails)
    got = run(path, *FAKE)
    assert got["models"][0]["average"] == "images"
    assert math.isclose(got["accuracy"]["val"]["models"][0]["loss"], loss, rel_tol=1e-5)
    with pytest.raises(ValueError, match=r"avg.pth copies averaged maps \(--average\): --jsd and --pictures"):
        run(path, *FAKE, "--no_val", "--jsd")
    torch.save(ckpt, path)  # without method_tensors
    with pytest.raises(ValueError, match=r"avg.pth was trained with --average images but holds no mean map"):
        run(path, *FAKE)


@pytest.mark.parametrize("part,value,message", [
    ("config", [1], "its 'config' is a list, not a record"), ("method", "copy", "its 'method' is a str, not a record"),
    ("arch", "x", "its 'arch' is a str, not a record"), ("arch", {"depth": 1, "width": 3}, "its 'arch' does not build")])
def test_a_hand_edited_checkpoint_is_named_as_one(tmp_path, part, value, message):
    ckpt = torch.load(save(tmp_path / "c.pth", tiny(1)), weights_only=True)
    torch.save(dict(ckpt, **{part: value}), tmp_path / "edited.pth")
    with pytest.raises(ValueError, match=f"edited.pth is damaged or was edited \\({message}"):
        run(tmp_path / "edited.pth", *FAKE)

"""Tests for data.py: MixUp/CutMix targets, OOD label mapping, ImageFolder loading, subsets, errors, fake data, and
a 512-image subset of the real CIFAR-10 beside the repository (conftest.cifar10_root). CPU, a few seconds.

    .venv/bin/python -m pytest tests/test_data.py -q
"""
import itertools
import os
import pickle
import shutil
import warnings
import zlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data

WNIDS = [f"n{i:08d}" for i in range(1000)]  # a fake ImageNet class list, sorted like ImageFolder sorts it
MEAN, STD = torch.tensor(data.MEAN).view(3, 1, 1), torch.tensor(data.STD).view(3, 1, 1)


def write_image(path, value, size=8):
    """A small image whose pixels encode `value` (so tests can tell images apart); format from the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.full((size, size, 3), value % 256, dtype=np.uint8)
    pixels[0, 0] = (value // 256, 7, 9)
    Image.fromarray(pixels).save(path)


def make_tree(root, classes=("cat", "dog", "emu"), per_class=6, splits=("train", "test")):
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_image(os.path.join(root, split, name, f"{i}.png"), 10 * c + i)
    return str(root)


def unnormalise(x):
    return (x * STD + MEAN) * 255


# ------------------------------------------------------------------------------------------------ MixUp / CutMix
def test_mixup_cutmix_targets_are_distributions():
    torch.manual_seed(0)
    mix = data.MixupCutmix(0.8, 1.0, 0.1, num_classes=10)
    for _ in range(6):  # both branches get drawn
        images, targets = mix(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
        assert images.shape == (8, 3, 16, 16) and targets.shape == (8, 10) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing floor


def test_no_mixing_is_smoothed_one_hot():
    labels = torch.tensor([0, 3, 9, 3])
    images = torch.randn(4, 3, 8, 8)
    out, targets = data.MixupCutmix(0.0, 0.0, 0.1, num_classes=10)(images, labels)
    expected = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.1 / 10
    torch.testing.assert_close(targets, expected)
    assert torch.equal(out, images)


def test_mixup_mixes_images_and_targets_alike():
    torch.manual_seed(0)
    x, labels = torch.randn(6, 3, 8, 8), torch.arange(6)  # distinct labels: lambda can be read off the targets
    out, targets = data.MixupCutmix(0.8, 0.0, 0.0, num_classes=6)(x, labels)
    lam = targets[torch.arange(6), labels]
    assert 0 < lam[0] < 1 and torch.allclose(lam, lam[0])  # one lambda per batch
    torch.testing.assert_close(out, lam[0] * x + (1 - lam[0]) * x.roll(1, 0))


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    torch.manual_seed(1)
    x, labels = torch.randn(6, 3, 16, 16), torch.arange(6)
    out, targets = data.MixupCutmix(0.0, 1.0, 0.0, num_classes=6)(x, labels)
    own = (out == x).all(1)  # (B, H, W): pixels still from the image itself
    assert ((out == x) | (out == x.roll(1, 0))).all()
    torch.testing.assert_close(own.float().mean((1, 2)), targets[torch.arange(6), labels])


# ------------------------------------------------------------------------------------------------ transforms
def test_train_transforms_normalise_and_erase():
    torch.manual_seed(0)
    flat = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    x = data.train_transform(32, aug="crop", reprob=0)(flat)  # crop + flip of a flat image: the normalised colour
    torch.testing.assert_close(x, ((200 / 255 - MEAN) / STD).expand(3, 32, 32), atol=1e-3, rtol=0)
    noise = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = torch.stack([data.train_transform(32, reprob=0)(noise) for _ in range(4)])
    assert x.min() < -1.5 and x.max() > 2  # black and white pixels, normalised
    # random erasing fills a box (>= 2% of the image) with N(0, 1) noise, off the grid of normalised uint8 values
    for aug, reprob in itertools.product(("randaug", "crop"), (0.0, 1.0)):  # --reprob acts with either --aug
        for _ in range(4):
            k = unnormalise(data.train_transform(32, aug, reprob)(noise))
            off_grid = (k - k.round()).abs() > 0.01
            assert off_grid.float().mean() > 0.01 if reprob else not off_grid.any()
            assert not reprob or len(k[off_grid].unique()) > 50  # noise, not a constant (value=0) fill
    with pytest.raises(ValueError, match="unknown --aug"):
        data.train_transform(32, aug="autoaugment")


# ------------------------------------------------------------------------------------------------ OOD sets
def test_restrict_logits():
    logits = torch.arange(2000.0).view(2, 1000)
    assert torch.equal(data.restrict_logits(logits, [3, 42, 500]), logits[:, [3, 42, 500]])
    assert data.restrict_logits(logits, None) is logits


@pytest.mark.parametrize("kind", ["a", "r"])
def test_ood_200_class_sets_map_to_class_index(tmp_path, kind):
    for w in (500, 3, 42):
        for i in range(2):
            write_image(str(tmp_path / WNIDS[w] / f"{i}.{'jpg' if i else 'png'}"), w)
    ds, class_index = data.build_ood_dataset(kind, str(tmp_path), 16, WNIDS)
    assert class_index == [3, 42, 500] and len(ds) == 6
    for f, label in zip(ds.files, ds.labels):
        assert WNIDS[class_index[label]] == os.path.basename(os.path.dirname(f))
    image, label = ds[5]
    assert image.shape == (3, 16, 16) and label == 2  # a 500 image -> position 2 of class_index
    logits = torch.zeros(1, 1000)
    logits[0, 500] = 1
    assert data.restrict_logits(logits, class_index).argmax(1).item() == label


def test_ood_v2_folders_are_class_numbers_not_string_order(tmp_path):
    for name in ("0", "1", "10", "2"):
        write_image(str(tmp_path / name / "a.jpeg"), int(name))
    ds, class_index = data.build_ood_dataset("v2", str(tmp_path), 16, WNIDS)
    assert class_index is None
    by_folder = {os.path.basename(os.path.dirname(f)): label for f, label in zip(ds.files, ds.labels)}
    assert by_folder == {"0": 0, "1": 1, "2": 2, "10": 10}
    # a model whose outputs are in another order: V2's numbers are still the sorted-wnid numbering
    shuffled = WNIDS[::-1]
    ds, _ = data.build_ood_dataset("v2", str(tmp_path), 16, shuffled)
    by_folder = {os.path.basename(os.path.dirname(f)): label for f, label in zip(ds.files, ds.labels)}
    assert by_folder["10"] == shuffled.index(WNIDS[10]) == 989


def test_ood_sketch_and_bad_folders(tmp_path):
    for w in (7, 900):
        write_image(str(tmp_path / "sketch" / WNIDS[w] / "x.JPEG"), w)
    ds, class_index = data.build_ood_dataset("sketch", str(tmp_path / "sketch"), 16, WNIDS)
    assert class_index is None and sorted(ds.labels) == [7, 900]
    write_image(str(tmp_path / "notv2" / "n00000001" / "x.png"), 1)
    with pytest.raises(ValueError, match="not ImageNet-V2"):
        data.build_ood_dataset("v2", str(tmp_path / "notv2"), 16, WNIDS)
    write_image(str(tmp_path / "a" / "n99999999" / "x.png"), 1)
    with pytest.raises(ValueError, match="not among the model's classes"):
        data.build_ood_dataset("a", str(tmp_path / "a"), 16, WNIDS)
    with pytest.raises(FileNotFoundError, match="no folder"):
        data.build_ood_dataset("r", str(tmp_path / "missing"), 16, WNIDS)


# ------------------------------------------------------------------------------------------------ ImageFolder
def test_folder_loads_in_memory_and_falls_back_to_test(tmp_path):
    root = make_tree(tmp_path)
    train, k = data.build_dataset("folder", root, "train", 8)
    val, k_val = data.build_dataset("folder", root, "val", 8)  # no val/: test/
    assert k == k_val == 3 and len(train) == len(val) == 18
    assert train.images.shape == (18, 3, 8, 8) and train.images.dtype == torch.uint8
    image, label = val[7]  # dog (class 1), image 1: value 11, exactly recovered from the lossless PNG
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1
    torch.testing.assert_close(unnormalise(image)[:, 1:, 1:], torch.full((3, 7, 7), 11.0), atol=1e-3, rtol=0)
    x, y = train[0]
    assert x.shape == (3, 8, 8) and y == 0


def test_folder_large_images_are_read_lazily(tmp_path):
    root = make_tree(tmp_path, per_class=1)
    ds, k = data.build_dataset("folder", root, "train", 72)
    assert isinstance(ds, data.Files) and k == 3 and ds[2][0].shape == (3, 72, 72) and ds[2][1] == 2
    assert data.build_dataset("folder", root, "val", 72)[0][0][0].shape == (3, 72, 72)


def test_subset_is_balanced_and_deterministic(tmp_path):
    root = make_tree(tmp_path)
    a, _ = data.build_dataset("folder", root, "train", 8, subset=6, seed=0)
    b, _ = data.build_dataset("folder", root, "train", 8, subset=6, seed=0)
    c, _ = data.build_dataset("folder", root, "train", 8, subset=6, seed=1)
    assert torch.bincount(a.labels).tolist() == [2, 2, 2]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    uneven = torch.as_tensor([0] * 10 + [1] * 2 + [2] * 10)  # a small class gives what it has, others fill in
    assert torch.bincount(uneven[data.balanced_subset(uneven, 12, 0)]).tolist() == [5, 2, 5]
    with pytest.raises(ValueError, match=r"--subset 19 is larger than the dataset \(18 images\): lower --subset$"):
        data.build_dataset("folder", root, "train", 8, subset=19)
    with pytest.raises(ValueError, match=r"--val_subset 19 is larger than the dataset \(18 images\): lower "
                                         r"--val_subset$"):
        data.build_dataset("folder", root, "val", 8, subset=19)  # evaluate.py has --val_subset only
    with pytest.raises(ValueError, match=r"--val_subset 129 is larger than the dataset \(128 images\)"):
        data.build_dataset("fake", None, "val", 8, subset=129)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*--data_path should point at"):
        data.build_dataset("folder", str(tmp_path / "nowhere"), "train", 8)
    root = make_tree(tmp_path / "only_train", splits=("train",))
    with pytest.raises(FileNotFoundError, match="neither val/ nor test/"):
        data.build_dataset("folder", root, "val", 8)
    with pytest.raises(FileNotFoundError, match="train.*--data_path"):
        data.build_dataset("folder", make_tree(tmp_path / "only_test", splits=("test",)), "train", 8)
    os.makedirs(tmp_path / "empty" / "train" / "emu")
    write_image(str(tmp_path / "empty" / "train" / "cat" / "0.png"), 0)
    with pytest.raises(ValueError, match="class folder .*emu has no images"):
        data.build_dataset("folder", str(tmp_path / "empty"), "train", 8)
    write_image(str(tmp_path / "flat" / "train" / "0.png"), 0)  # images but no class folders
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.build_dataset("folder", str(tmp_path / "flat"), "train", 8)
    root = make_tree(tmp_path / "bad", per_class=1)
    with open(os.path.join(root, "train", "dog", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        data.build_dataset("folder", root, "train", 8)
    lazy, _ = data.build_dataset("folder", root, "train", 72)  # read per item: fails when the item is read
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        lazy[[os.path.basename(f) for f in lazy.files].index("broken.jpg")]
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("imagenet", root, "train", 8)


# ------------------------------------------------------------------------------------------------ fake data
def test_fake_data_shapes_and_determinism():
    train, k = data.build_dataset("fake", None, "train", 16)
    val, _ = data.build_dataset("fake", None, "val", 16)
    again, _ = data.build_dataset("fake", None, "val", 16)
    assert k == 10 and len(train) == 512 and len(val) == 128
    assert torch.equal(val.images, again.images) and torch.equal(val[3][0], again[3][0])
    assert not torch.equal(train.images[:128], val.images)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    torch.manual_seed(0)
    assert not torch.equal(train[0][0], train[0][0])  # training items are augmented afresh each time
    # DataLoader workers get the dataset by pickling
    assert torch.equal(pickle.loads(pickle.dumps(val))[5][0], val[5][0])
    big, _ = data.build_dataset("fake", None, "val", 72, subset=10)
    assert big[0][0].shape == (3, 72, 72) and torch.bincount(big.labels).tolist() == [1] * 10


# ------------------------------------------------------------------------------------------------ real CIFAR-10
def test_cifar10_folder_subset(cifar10_root):
    ds, k = data.build_dataset("folder", cifar10_root, "train", 32, subset=512, seed=0)
    assert k == 10 and len(ds) == 512 and ds.images.shape == (512, 3, 32, 32)
    assert sorted(set(torch.bincount(ds.labels, minlength=10).tolist())) == [51, 52]
    val, _ = data.build_dataset("folder", cifar10_root, "val", 32, subset=100, seed=0)  # test/ used as val
    assert torch.bincount(val.labels).tolist() == [10] * 10
    x, y = val[0]
    assert x.shape == (3, 32, 32) and -3 < x.min() < x.max() < 3 and 0 <= y < 10
    assert data.class_names("cifar10", cifar10_root) == data.CIFAR10_CLASSES  # the folders are torchvision's names


# ------------------------------------------------------------------------------------------------ bad data
def test_val_classes_must_be_train_classes(tmp_path):
    root = make_tree(tmp_path / "missing", per_class=1, splits=("train",))
    make_tree(root, classes=("cat", "dog"), per_class=1, splits=("test",))
    with pytest.raises(ValueError, match=r"missing 1: \['emu'\]; extra 0"):
        data.build_dataset("folder", root, "val", 8)
    root = make_tree(tmp_path / "renamed", per_class=1, splits=("train",))
    make_tree(root, classes=("cat", "dgo", "emu"), per_class=1, splits=("val",))
    with pytest.raises(ValueError, match=r"missing 1: \['dog'\]; extra 1: \['dgo'\]"):
        data.build_dataset("folder", root, "val", 72)  # lazily read sets are checked too
    with pytest.raises(ValueError, match="does not have train/'s classes"):
        data.pack(root, str(tmp_path / "p.pth"))


def test_every_pil_mode_becomes_rgb(tmp_path):
    def rgb(im):
        return np.asarray(data.to_rgb(im)).reshape(-1, 3)[0].tolist()

    deep = np.full((4, 4), 40000, dtype=np.uint16)  # 16-bit grey: 40000 >> 8 = 156, not white
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert data.decode(str(tmp_path / "deep.png"))[:, 0, 0].tolist() == [156] * 3
    assert rgb(Image.frombytes("I;16B", (4, 4), deep.astype(">u2").tobytes())) == [156] * 3
    assert rgb(Image.fromarray(deep.astype(np.int32))) == [156] * 3  # mode 'I'
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=1)  # the pixels' own colour is transparent: alpha is dropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.decode(str(tmp_path / "p.png"))[:, 0, 0].tolist() == [10, 20, 30]
    assert rgb(Image.new("L", (4, 4), 77)) == [77] * 3
    assert rgb(Image.new("LA", (4, 4), (77, 0))) == [77] * 3
    assert rgb(Image.new("RGBA", (4, 4), (1, 2, 3, 0))) == [1, 2, 3]
    assert rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == [255, 0, 0]
    Image.new("F", (4, 4), 0.5).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*float.tif .*PIL mode 'F'"):
        data.load(str(tmp_path / "float.tif"))


def test_corrupt_evaluation_image_is_found_when_the_set_is_built(tmp_path):
    root = make_tree(tmp_path, per_class=1)
    with open(os.path.join(root, "test", "dog", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg") as err:  # in memory: all decoded now
        data.build_dataset("folder", root, "val", 8)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="skipping 1 unreadable evaluation image.*broken.jpg"):
        lazy, _ = data.build_dataset("folder", root, "val", 72)  # read per item: headers checked, the bad one skipped
    assert len(lazy) == 3 and not any(f.endswith("broken.jpg") for f in lazy.files)


@pytest.mark.parametrize("subset", [0, -3])
def test_subset_must_be_positive(tmp_path, subset):
    with pytest.raises(ValueError, match=f"--val_subset {subset}: a subset must be at least 1"):
        data.build_dataset("fake", None, "val", 8, subset=subset)
    with pytest.raises(ValueError, match=f"--subset {subset}: a subset must be at least 1"):
        data.build_dataset("folder", make_tree(tmp_path, per_class=1), "train", 8, subset=subset)


# ------------------------------------------------------------------------------------------------ CIFAR-10 found
class FakeTorchvisionCIFAR10:
    """Stands in for torchvision's CIFAR10: 'downloads' by making its folder, never touching the network."""
    downloads = 0

    def __init__(self, root, train=True, download=False):
        folder = os.path.join(root, "cifar-10-batches-py")
        if download:
            FakeTorchvisionCIFAR10.downloads += 1
            os.makedirs(folder, exist_ok=True)
        if not os.path.isdir(folder):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data, self.targets, self.classes = np.zeros((20, 32, 32, 3), np.uint8), [0, 1] * 10, data.CIFAR10_CLASSES


def test_cifar10_is_found_without_data_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "REPO", str(tmp_path / "repo"))
    monkeypatch.setattr(data, "_announced", set())
    make_tree(tmp_path / "data" / "cifar10", per_class=1)  # 1. ./data/cifar10: 3 classes
    make_tree(tmp_path / "shared" / "data" / "cifar10", classes=("a", "b"), per_class=1)  # 2. ../shared: 2 classes
    assert data.build_dataset("cifar10", "", "train", 8)[1] == 3
    assert data.build_dataset("cifar10", None, "val", 8)[1] == 3
    assert capsys.readouterr().out.count(f"CIFAR-10 from {tmp_path / 'data' / 'cifar10'}") == 1  # printed once
    shutil.rmtree(tmp_path / "data" / "cifar10")
    assert data.build_dataset("cifar10", "", "train", 8)[1] == 2
    assert data.class_names("cifar10", "") == ["a", "b"]
    shutil.rmtree(tmp_path / "shared")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeTorchvisionCIFAR10)  # 3. torchvision into ./data
    ds, k = data.build_dataset("cifar10", "", "train", 32)
    assert (k, len(ds), FakeTorchvisionCIFAR10.downloads) == (10, 20, 1)
    assert "downloading it with torchvision into ./data" in capsys.readouterr().out
    data.build_dataset("cifar10", "", "val", 32)
    assert FakeTorchvisionCIFAR10.downloads == 1 and data.class_names("cifar10", "") == data.CIFAR10_CLASSES
    shutil.rmtree(tmp_path / "data")

    def offline(root, train=True, download=False):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="download failed .*name resolution.*--data_path .*train/") as err:
        data.build_dataset("cifar10", "", "train", 32)
    assert "\n" not in str(err.value)


def test_cifar10_root_with_train_folder_is_an_image_folder(tmp_path):
    root = make_tree(tmp_path, per_class=2)
    ds, k = data.build_dataset("cifar10", root, "val", 8)
    assert k == 3 and len(ds) == 6 and data.class_names("cifar10", root) == ["cat", "dog", "emu"]
    assert data.class_names("fake", None) == [str(i) for i in range(10)]


# ------------------------------------------------------------------------------------------------ packed file
def test_pack_round_trip(tmp_path, capsys):
    root = make_tree(tmp_path / "src", per_class=3)
    write_image(str(tmp_path / "src" / "train" / "dog" / "photo.jpg"), 99)  # JPEG bytes are kept, not re-encoded
    dst = str(tmp_path / "out" / "c.pack.pth")
    data.main(["pack", root, dst])
    assert "train 10 images, test 9 images" in capsys.readouterr().out
    packed = torch.load(dst, weights_only=True)
    assert packed["classes"] == ["cat", "dog", "emu"] and set(packed) == {"written_by", "classes", "train", "test"}
    files, labels, _ = data.scan(os.path.join(root, "train"))
    i = files.index(str(tmp_path / "src" / "train" / "dog" / "photo.jpg"))
    a, b = packed["train"]["offsets"][i:i + 2].tolist()
    with open(files[i], "rb") as f:
        assert zlib.decompress(packed["train"]["zlib"].numpy().tobytes())[a:b] == f.read()  # unchanged bytes
    for split in ("train", "val"):
        folder, k = data.build_dataset("folder", root, split, 8)
        for name in ("folder", "cifar10"):
            ds, k_packed = data.build_dataset(name, dst, split, 8)
            assert k_packed == k and torch.equal(ds.images, folder.images) and torch.equal(ds.labels, folder.labels)
    sub, _ = data.build_dataset("folder", dst, "train", 8, subset=3)
    assert torch.bincount(sub.labels).tolist() == [1, 1, 1]
    big, _ = data.build_dataset("folder", dst, "val", 72)  # in memory at the stored size, resized per item
    assert big.images.shape == (9, 3, 8, 8) and big[0][0].shape == (3, 72, 72)
    assert data.class_names("folder", dst) == ["cat", "dog", "emu"]
    with pytest.raises(SystemExit) as exit_:
        data.main(["pack", root, str(tmp_path / "c.bin")])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: packed file")
    with pytest.raises(FileNotFoundError, match="python data.py pack"):
        data.build_dataset("folder", str(tmp_path / "none.pth"), "train", 8)
    torch.save({"model": {}}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not a packed dataset .*python data.py pack"):
        data.build_dataset("cifar10", str(tmp_path / "checkpoint.pth"), "train", 8)


def test_pack_replaces_its_own_earlier_output_and_names_a_bad_image(tmp_path, capsys):
    """pack replaces its own earlier output (marked, or with pack's layout from before the mark; anything else it
    refuses: test_reliability.py runs that command); an unreadable image is named at pack time, and nothing is written."""
    root = make_tree(tmp_path / "src", per_class=2)
    dst = str(tmp_path / "c.pack.pth")
    data.pack(root, dst)
    old = torch.load(dst, weights_only=True)
    del old["written_by"]  # as pack wrote it before it marked its files
    torch.save(old, dst)
    data.pack(root, dst)
    assert torch.load(dst, weights_only=True)["written_by"] == data.PACKED
    write_image(os.path.join(root, "test", "dog", "bad.png"), 0)
    with open(os.path.join(root, "test", "dog", "bad.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*test/dog/bad.png \(not an image PIL can identify\): "
                                         "delete or replace the file"):
        data.pack(root, str(tmp_path / "new.pth"))
    assert not os.path.exists(tmp_path / "new.pth") and sorted(os.listdir(tmp_path)) == ["c.pack.pth", "src"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        data.main([])
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the following arguments are required: command, src, dst (see --help)"]


def test_packed_files_are_checked_before_they_are_inflated(tmp_path):
    """Every part of a packed file is checked; its images inflate to at most the size its offsets say, and that size
    must be plausible for encoded images; a damaged image is named by its place in the file; a checkpoint given as
    --data_path is called what it is, and no command that would overwrite it is suggested."""
    root = make_tree(tmp_path / "src", per_class=2)
    dst = str(tmp_path / "p.pth")
    data.pack(root, dst)
    good = torch.load(dst, weights_only=True)

    def packed_with(split, **parts):  # good, with some tensors of one split replaced
        changed = {**good, split: {**good[split], **parts}}
        torch.save(changed, tmp_path / "changed.pth")
        return str(tmp_path / "changed.pth")

    zeros = zlib.compress(bytes(2**24))  # 16 MiB of zeros in 16 KiB: far beyond what images inflate by
    bomb = packed_with("train", zlib=torch.frombuffer(bytearray(zeros), dtype=torch.uint8),
                       offsets=torch.tensor([0] + [2**24 // 6] * 5 + [2**24 - 5 * (2**24 // 6)]).cumsum(0))
    with pytest.raises(ValueError, match=r"not a packed dataset \(its train split claims 16777216 bytes of images in "
                                         r"\d+ compressed bytes, more than 100x\)"):
        data.build_dataset("folder", bomb, "train", 8)
    with pytest.raises(ValueError, match="do not index its 6 images"):
        data.build_dataset("folder", packed_with("test", offsets=good["test"]["offsets"].flip(0)), "val", 8)
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2"):
        data.build_dataset("folder", packed_with("train", labels=good["train"]["labels"] + 1), "train", 8)
    short = packed_with("train", offsets=good["train"]["offsets"] - torch.arange(7))
    with pytest.raises(ValueError, match="do not inflate to the .* bytes its offsets say"):
        data.build_dataset("folder", short, "train", 8)
    images = bytearray(zlib.decompress(good["train"]["zlib"].numpy().tobytes()))
    a, b = good["train"]["offsets"][3:5].tolist()
    images[a:b] = bytes(b - a)  # image 3 overwritten
    damaged = packed_with("train", zlib=torch.frombuffer(bytearray(zlib.compress(bytes(images))), dtype=torch.uint8))
    with pytest.raises(ValueError) as e:
        data.build_dataset("folder", damaged, "train", 8)
    assert str(e.value) == (f"cannot read image {damaged}:train/3 (not an image PIL can identify): the packed file "
                            "is damaged: pack it again from its folder")
    checkpoint = str(tmp_path / "checkpoint.pth")
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1}, checkpoint)
    with pytest.raises(ValueError) as e:
        data.build_dataset("folder", checkpoint, "train", 8)
    assert str(e.value).startswith(f"{checkpoint} is not a packed dataset (it holds ['epoch', 'model'], not the "
                                   "class names and images pack writes): --data_path takes a folder")
    assert f"pack SRC {checkpoint}" not in str(e.value)
    assert data.class_names("folder", dst) == ["cat", "dog", "emu"]  # from the file's record, nothing inflated


def test_a_single_class_and_a_bad_val_folder_are_refused_before_decoding(tmp_path, monkeypatch):
    """One class trains to loss 0 and 100% accuracy: refused, naming the folder, by every path that reads classes.
    The val/ (or test/) layout is checked when the training split is built, before its images are decoded."""
    one = make_tree(tmp_path / "one", classes=("cat",), per_class=2)
    for split, folder in (("train", "train"), ("val", "test")):
        with pytest.raises(ValueError, match=f"{one}/{folder} has a single class folder \\(cat\\): a classifier "
                                             "needs two classes or more"):
            data.build_dataset("folder", one, split, 8)
    with pytest.raises(ValueError, match="has a single class folder"):
        data.pack(one, str(tmp_path / "one.pth"))
    decoded = []
    monkeypatch.setattr(data, "decode", lambda source, img_size=None: decoded.append(source))
    root = make_tree(tmp_path / "renamed", per_class=1, splits=("train",))
    make_tree(root, classes=("cat", "dgo", "emu"), per_class=1, splits=("val",))
    with pytest.raises(ValueError, match=r"val does not have train/'s classes \(missing 1: \['dog'\]"):
        data.build_dataset("folder", root, "train", 8)
    with pytest.raises(FileNotFoundError, match="neither val/ nor test/"):
        data.build_dataset("folder", make_tree(tmp_path / "no_val", splits=("train",)), "train", 8)
    assert decoded == [] and not os.path.exists(tmp_path / "one.pth")


def test_images_of_two_sizes_stop_at_the_first_that_differs(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "src", per_class=2)
    write_image(os.path.join(root, "train", "dog", "big.png"), 0, size=12)  # train/4 of 7
    data.pack(root, str(tmp_path / "p.pth"))
    decoded, decode = [], data.decode

    def counted(source, img_size=None):
        decoded.append(source)
        return decode(source, img_size)

    monkeypatch.setattr(data, "decode", counted)
    with pytest.raises(ValueError, match=r"differ in size \(.*p.pth:train/4: \(3, 12, 12\), .*p.pth:train/0: "
                                         r"\(3, 8, 8\)\): pack images of one size"):
        data.build_dataset("folder", str(tmp_path / "p.pth"), "train", 72)
    assert len(decoded) == 5  # the two after it are never decoded

"""data.py: datasets and transforms for every script (the MAE fine-tuning augmentation that the paper's recipes use,
Li et al. 2024, arXiv 2411.09702).

    train_set, num_classes = build_dataset("cifar10", "", "train", 32, subset=512)   # CIFAR-10 found as below
    mix = MixupCutmix(0.8, 1.0, 0.1, num_classes); images, targets = mix(images, labels)   # targets (B, K)
    ood_set, class_index = build_ood_dataset("r", "/data/imagenet-r", 224, imagenet_wnids)
    logits = restrict_logits(model(images), class_index)                                   # (B, 200) for -A/-R
    python data.py pack ../shared/data/cifar10 data/cifar10.pack.pth   # the whole dataset as one file (18.3 MiB)

Datasets: 'folder' (ImageFolder tree: root/train + root/val, or root/test), torchvision 'cifar10'/'cifar100', 'fake'
(deterministic noise for smoke runs), and ImageNet-V2/-A/-R/-Sketch for evaluation. 'cifar10' with no root looks in
./data/cifar10 (ImageFolder, train/ + test/), then ../shared/data/cifar10 beside the repository, then downloads
torchvision's copy into ./data (find_cifar10). A root that holds train/ is read as an ImageFolder tree, a root ending
in .pth as a packed file (`python data.py pack`: the encoded bytes of every image, unchanged, zlib-compressed: 18.3 MiB
for CIFAR-10; it replaces no file but its own earlier output). A val/ (or test/) folder must have exactly train/'s
class folders: label i has to mean the same class in both; one class folder alone is refused (it trains to loss 0).
At img_size <= 64 (CIFAR-sized), and for packed files at any size, every image is decoded once and held in memory as
uint8 (N, 3, H, W), so epochs are not spent decoding: the 50,000 32x32 CIFAR-10 JPEGs take about 6 s with PIL on our
shared 2-core machine (torchvision.io's decoders are deprecated as of torchvision 0.29; a thread pool was slower than
one thread for such small files); an unreadable image is then a one-line error naming it. Larger images (ImageNet) are
read lazily with PIL, as ImageFolder does; their evaluation images' headers are opened when the set is built, and an
unreadable one is skipped with one warning naming it (a corrupt training image is an error naming it when read).
Every PIL mode becomes RGB (to_rgb): 16-bit grey keeps its top 8 bits, alpha is dropped, others are refused by name.

Augmentation (torchvision.transforms.v2), --aug randaug, img_size > 64, as MAE fine-tuning: RandomResizedCrop (0.08-1,
bicubic), flip, RandAugment m9, ToDtype, Normalize, RandomErasing(--reprob); eval: Resize(img_size / 0.875, bicubic)
+ CenterCrop (MAE: crop ratio 1 above 224 px). At <= 64 px (not in the authors' code, which is ImageNet-only):
RandomCrop with 4 px zero padding instead of RandomResizedCrop, and no resizing at eval. --aug crop (MAE pre-training):
RandomResizedCrop (0.2-1) and flip (and RandomErasing(--reprob), which MAE's recipe sets to 0).

Where this differs from timm's create_transform(aa='rand-m9-mstd0.5-inc1', re_mode='pixel', re_count=1) that MAE and
the authors used:
  - timm picks 2 of its ops (with replacement) and applies each with probability 0.5; we do the same with two
    RandomApply(p=0.5) around a 1-op torchvision RandAugment (whose plain num_ops=2 would always apply both).
  - Magnitude scale: timm's m9 means 9/10 of each op's range; torchvision's default 31 bins would make 9 mean 9/30,
    so we use num_magnitude_bins=11. mstd0.5: timm draws each op's magnitude from N(9, 0.5) clipped to [0, 10];
    torchvision's is fixed at 9.
  - Op list: torchvision has 14 ops including Identity; timm's 'inc1' list has 15, with Invert and SolarizeAdd and no
    Identity. torchvision's Brightness/Color/Contrast/Sharpness (factor 1 +- 0.81 at m9) and Solarize (threshold
    falls with magnitude) already behave as timm's 'Increasing' variants; its Posterize keeps 4 bits at m9 where
    timm's PosterizeIncreasing keeps 1.
  - Geometric RandAugment ops interpolate bilinearly (torchvision has no bicubic affine for tensors; timm: bicubic).
    Both fill the uncovered corners with the ImageNet mean colour.
  - RandomErasing(value='random') fills one box per image with per-pixel N(0, 1) noise in normalised space, box area
    2-33%, log-uniform aspect ratio 0.3-3.3: what timm's re_mode='pixel' does, with the same defaults.
MixUp/CutMix: like timm's Mixup(mixup_alpha, cutmix_alpha, switch_prob 0.5, mode 'batch', correct_lam), except that
torchvision pairs image i with image i-1 (timm: with B-1-i), which gives the same distribution of pairs.
"""
import argparse
import hashlib
import io
import os
import pathlib
import signal
import sys
import warnings
import zlib

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

import vit

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as MAE uses for every dataset
FILL = [round(255 * m) for m in MEAN]  # timm's RandAugment fill colour (its hparams img_mean)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's list
BICUBIC = v2.InterpolationMode.BICUBIC
LAYOUT = "--data_path should point at the folder containing train/ and val/ (or test/), one sub-folder per class"
REPO = os.path.dirname(os.path.abspath(__file__))  # find_cifar10 looks in REPO/../shared/data/cifar10
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PACKED = "data.py pack"  # written into every packed file: pack only ever replaces a file that carries it
# The most a packed split's images may inflate, over its compressed bytes: encoded images (PNG, JPEG) hardly compress
# further (CIFAR-10's JPEGs inflate 3x), so a file that claims more is corrupt or made to exhaust memory.
MAX_INFLATE = 100


def train_transform(img_size, aug="randaug", reprob=0.25):
    """uint8 tensor (3, H, W) or PIL image -> augmented, normalised float tensor (3, img_size, img_size)."""
    erase = [v2.RandomErasing(p=reprob, value="random")] if reprob > 0 else []
    finish = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), *erase, v2.ToPureTensor()]
    if aug == "crop":
        crop = v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=BICUBIC)
        return v2.Compose([crop, v2.RandomHorizontalFlip(), *finish])
    if aug != "randaug":
        raise ValueError(f"unknown --aug {aug!r}: randaug or crop")
    crop = (v2.RandomCrop(img_size, padding=4) if img_size <= 64 else  # zero padding, the usual CIFAR crop
            v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=BICUBIC))
    one_op = v2.RandAugment(num_ops=1, magnitude=9, num_magnitude_bins=11, fill=FILL,
                            interpolation=v2.InterpolationMode.BILINEAR)
    return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.RandomApply([one_op], p=0.5),
                       v2.RandomApply([one_op], p=0.5), *finish])


def eval_transform(img_size, resize=True):
    """-> normalised float tensor; resize=False for images already stored at img_size (in-memory small sets)."""
    crop_pct = 0.875 if img_size <= 224 else 1.0  # MAE's util/datasets.py
    sizing = [v2.Resize(int(img_size / crop_pct), interpolation=BICUBIC), v2.CenterCrop(img_size)] if resize else []
    return v2.Compose([*sizing, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
                       v2.ToPureTensor()])


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as a uint8 tensor (N, 3, H, W), transformed per item."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, torch.as_tensor(labels), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


class Files(torch.utils.data.Dataset):
    """Images read from disk per item with PIL (ImageNet-sized folders, the OOD sets)."""

    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(load(self.files[i])), self.labels[i]


def class_folders(folder):  # ImageFolder's classes: the sub-folders, sorted by name
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def scan(folder, classes=None):
    """ImageFolder's layout folder/<class>/<image> -> (files, labels, classes); classes sorted by name unless given."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder}: {LAYOUT}")
    classes = classes or class_folders(folder)
    if not classes:
        raise ValueError(f"no class sub-folders in {folder}: expected {folder}/<class>/<image>; {LAYOUT}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(e.path for e in os.scandir(os.path.join(folder, name)) if e.name.lower().endswith(EXTENSIONS))
        if not found:
            raise ValueError(f"class folder {os.path.join(folder, name)} has no images: add some or remove it")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def open_folder(root, split):
    """root/train, or for 'val' root/val else root/test -> (files, labels, classes). The val/test classes must be
    train/'s: one missing class would shift every later label and silently give a wrong accuracy."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder {root}: {LAYOUT}")
    folder = os.path.join(root, split)
    if split == "val" and not os.path.isdir(folder):
        folder = os.path.join(root, "test")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{root} has neither val/ nor test/: {LAYOUT}")
    files, labels, classes = scan(folder)
    train = os.path.join(root, "train")
    if split == "val" and os.path.isdir(train) and classes != class_folders(train):
        expected = class_folders(train)
        missing, extra = [c for c in expected if c not in classes], [c for c in classes if c not in expected]
        raise ValueError(f"{folder} does not have train/'s classes (missing {len(missing)}: {missing[:5]}; extra "
                         f"{len(extra)}: {extra[:5]}): give it the same class folders as {train}")
    if len(classes) == 1:  # every label the same: loss 0 and 100% accuracy, and nothing learnt
        raise ValueError(f"{folder} has a single class folder ({classes[0]}): a classifier needs two classes or "
                         f"more; {LAYOUT}")
    return files, labels, classes


def pack(src, dst):
    """`python data.py pack SRC DST`: the ImageFolder tree SRC (train/ and val/ or test/) -> one file DST holding every
    image's encoded bytes unchanged (no re-encoding): a dataset that travels as one file.
    DST holds {'written_by': PACKED, 'classes': [str], split: {'zlib': uint8, the bytes of all files zlib-compressed,
    'offsets': int64 (N + 1,) into the decompressed bytes, 'labels': int64 (N,)}}
    and loads with torch.load(weights_only=True); --data_path DST reads it like SRC. Every image is opened first (an
    unreadable one is named here, not on the machine the file goes to). An existing DST is replaced only if pack wrote
    it: never a checkpoint or any other file."""
    if not dst.endswith(".pth"):
        raise ValueError(f"packed file {dst} must end in .pth: that is how --data_path tells it from a folder")
    if os.path.exists(dst) and not written_by_pack(dst):
        raise ValueError(f"{dst} exists and is not a file python data.py pack wrote: refusing to replace it; give "
                         "another DST")
    out = {"written_by": PACKED}
    for split in ("train", "val"):
        files, labels, out["classes"] = open_folder(src, split)
        for f in files:
            load(f)  # a ValueError naming the file if PIL cannot read it
        chunks = [pathlib.Path(f).read_bytes() for f in files]
        offsets = torch.tensor([0] + [len(c) for c in chunks]).cumsum(0)
        name = split if os.path.isdir(os.path.join(src, split)) else "test"  # what open_folder read
        # zlib, lossless: each small JPEG repeats the same ~600 bytes of headers, so CIFAR-10 packs to a third
        blob = zlib.compress(b"".join(chunks), 6)
        out[name] = {"zlib": torch.frombuffer(bytearray(blob), dtype=torch.uint8), "offsets": offsets,
                     "labels": torch.tensor(labels)}
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with open(tmp, "wb") as f:  # a Python file: a full disk is an OSError, not torch's RuntimeError
            torch.save(out, f)
        os.replace(tmp, dst)  # never a half-written file under the real name
    except OSError as e:  # a full disk, a folder that cannot be written
        raise ValueError(f"cannot write {dst} ({e.strerror or oneline(e)}): free some space or give another DST") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    counts = ", ".join(f"{k} {len(v['labels'])} images" for k, v in out.items() if isinstance(v, dict))
    print(f"packed {src} into {dst}: {counts}, {os.path.getsize(dst) / 2**20:.1f} MiB")


def written_by_pack(path):
    """Whether an existing file is an output of pack(): it carries PACKED, or (written before the mark) it has pack's
    layout, which no checkpoint has."""
    try:
        packed = open_pack(path)
    except (ValueError, FileNotFoundError):
        return False
    return packed.get("written_by") == PACKED or "written_by" not in packed


def open_pack(path):
    """A file written by pack() -> its contents, every part checked (without inflating the images); a one-line error
    naming the file otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no packed file {path}: build it with python data.py pack SRC {path}, or {LAYOUT}")
    try:
        problem = vit.torch_file_problem(path)  # a compressed record could take gigabytes inside torch.load
        packed = {} if problem else torch.load(path, weights_only=True, mmap=True)
    except Exception as e:  # a truncated copy, a checkpoint holding Python objects, ...
        problem = f"{type(e).__name__}: {oneline(e)}"
    problem = problem or pack_problem(packed)
    if problem:
        raise ValueError(f"{path} is not a packed dataset ({problem}): --data_path takes a folder with train/ and val/ "
                         "(or test/), or a file that python data.py pack SRC NEW.pth writes")
    return packed


def pack_problem(packed):
    """What in a loaded file is not as pack() writes it, as a phrase, or None."""
    if not isinstance(packed, dict) or "classes" not in packed:
        keys = sorted(map(str, packed))[:4] if isinstance(packed, dict) else type(packed).__name__
        return f"it holds {keys}, not the class names and images pack writes"
    classes = packed["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        return "its class names are not two strings or more"
    splits = [k for k in ("train", "val", "test") if k in packed]
    if "train" not in splits or len(splits) != 2:
        return f"it has the splits {splits}, not train and val (or test)"
    for split in splits:
        part = packed[split] if isinstance(packed[split], dict) else {}
        dtypes = {k: v.dtype for k, v in part.items() if isinstance(v, torch.Tensor)}
        if dtypes != {"zlib": torch.uint8, "offsets": torch.int64, "labels": torch.int64}:
            return f"its {split} split is not the tensors zlib (uint8), offsets and labels (int64)"
        offsets, labels = part["offsets"], part["labels"]
        if offsets.ndim != 1 or len(offsets) != len(labels) + 1 or offsets[0] != 0 or (offsets.diff() < 0).any():
            return f"the offsets of its {split} split do not index its {len(labels)} images"
        if len(labels) and not (0 <= labels.min() and labels.max() < len(classes)):
            return f"its {split} split has labels outside 0..{len(classes) - 1}"
        if offsets[-1] > MAX_INFLATE * part["zlib"].numel():
            return (f"its {split} split claims {offsets[-1].item()} bytes of images in {part['zlib'].numel()} "
                    f"compressed bytes, more than {MAX_INFLATE}x")
    return None


def read_pack(path, split):
    """A file written by pack() -> (sources [(name, bytes)], labels, classes) of split ('val': val, else test)."""
    packed = open_pack(path)
    split = split if split in packed else "test"
    part = packed[split]
    offsets = part["offsets"].tolist()
    inflater = zlib.decompressobj()
    try:
        blob = inflater.decompress(part["zlib"].numpy().tobytes(), offsets[-1])  # never more than the offsets say
    except zlib.error:
        blob = b""  # said below
    if len(blob) != offsets[-1] or not inflater.eof:
        raise ValueError(f"{path} is not a packed dataset (its {split} images do not inflate to the {offsets[-1]} "
                         f"bytes its offsets say): the file is damaged; pack it again from its folder")
    sources = [(f"{path}:{split}/{i}", blob[a:b]) for i, (a, b) in enumerate(zip(offsets, offsets[1:]))]
    return sources, part["labels"].tolist(), packed["classes"]


def find_cifar10():
    """Where CIFAR-10 is when no --data_path is given (the README's first command): ./data/cifar10 (ImageFolder
    train/ + test/), else ../shared/data/cifar10 beside the repository, else torchvision's copy in ./data, downloaded
    on first use. -> that folder, or a FileNotFoundError naming --data_path."""
    shared = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10"))
    for folder in (os.path.join("data", "cifar10"), shared):
        if os.path.isdir(os.path.join(folder, "train")) and os.path.isdir(os.path.join(folder, "test")):
            return folder
    if not os.path.isdir(os.path.join("data", "cifar-10-batches-py")):
        print(f"CIFAR-10 is in neither ./data/cifar10 nor {shared}: downloading it with torchvision into ./data")
        try:
            torchvision.datasets.CIFAR10("data", download=True)
        except Exception as e:
            raise FileNotFoundError(f"no CIFAR-10 in ./data/cifar10 or {shared}, and the download failed "
                                    f"({oneline(e)}): {LAYOUT}") from e
    return "data"


def oneline(e):  # an exception's first line: error messages stay one line
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def to_rgb(im):
    """A PIL image of any common mode -> RGB. 16-bit grey ('I;16', 'I;16B', 'I'; convert() would clip it to white)
    keeps its top 8 bits; palette and grey become RGB; alpha is dropped, as torchvision's ImageFolder loader and timm
    drop it, so images look as they did to the authors' models; CMYK and YCbCr are converted by PIL. Other modes
    (float 'F', 'LAB', premultiplied 'La'/'RGBa', ...) raise a ValueError naming the mode."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 'I' holds 16-bit PNGs in older Pillow versions
        grey = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if im.mode in ("P", "PA"):  # via RGBA: PIL warns for palette images with transparency converted straight to RGB
        im = im.convert("RGBA")
    if im.mode not in ("RGB", "RGBA", "RGBX", "L", "LA", "1", "CMYK", "YCbCr"):
        raise ValueError(f"PIL mode {im.mode!r} is not converted to RGB: save the image as 8/16-bit RGB or grey")
    return im.convert("RGB")


def load(source):
    """A file path, or (name, bytes) from a packed file -> RGB PIL image; a one-line ValueError naming it if bad."""
    name, fp = source if isinstance(source, tuple) else (source, source)
    try:
        with Image.open(io.BytesIO(fp) if isinstance(fp, bytes) else fp) as im:
            return to_rgb(im)
    except UnidentifiedImageError:  # PIL's message names the file object (<_io.BytesIO ...>), not the image
        reason = "not an image PIL can identify"
    except Exception as e:
        reason = oneline(e)
    fix = "delete or replace the file"
    if isinstance(fp, bytes):
        fix = "the packed file is damaged: pack it again from its folder"
    raise ValueError(f"cannot read image {name} ({reason}): {fix}")


def name_of(source):  # a file path, or (name, bytes) from a packed file -> its name
    return source[0] if isinstance(source, tuple) else source


def decode(source, img_size=None):
    """One image -> uint8 (3, H, W); with img_size, another size gets its shorter side resized and is center-cropped."""
    image = v2.functional.pil_to_tensor(load(source))
    if img_size and image.shape[1:] != (img_size, img_size):
        image = v2.functional.center_crop(v2.functional.resize(image, img_size, BICUBIC), img_size)
    return image


def readable(files, labels):
    """Drop the files whose header PIL cannot open or verify (cheap: nothing is decoded), with one warning naming
    them: a corrupt evaluation image is found when the set is built rather than after the first epoch."""
    ok = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
            ok.append(True)
        except Exception:
            ok.append(False)
    if not all(ok):
        bad = [f for f, good in zip(files, ok) if not good]
        warnings.warn(f"skipping {len(bad)} unreadable evaluation image(s): {', '.join(bad[:5])}")
    return [f for f, good in zip(files, ok) if good], [l for l, good in zip(labels, ok) if good]


def balanced_subset(labels, n, seed, flag="the subset"):
    """Indices (sorted) of n items, the classes as equal as possible, chosen at random; the same for the same seed.
    flag: what chose n (--subset, --val_subset), for the error when n is too large."""
    labels = torch.as_tensor(labels)
    if n > len(labels):
        raise ValueError(f"{flag} {n} is larger than the dataset ({len(labels)} images): lower {flag}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    # rank of each shuffled item among the shuffled items of its class; take all ranks 0, then all ranks 1, ...
    by_class = torch.argsort(labels[order], stable=True)
    counts = torch.bincount(labels)
    first = torch.cumsum(counts, 0) - counts  # where each class starts in by_class
    rank = torch.empty_like(order)
    rank[by_class] = torch.arange(len(order)) - first[labels[order][by_class]]
    take = torch.argsort(rank * len(order) + torch.arange(len(order)))[:n]  # ties broken by the shuffled position
    return order[take].sort().values


_announced = set()  # CIFAR-10 folders found by find_cifar10 and already printed


def build_dataset(name, root, split, img_size, subset=None, seed=0, download=False, aug="randaug", reprob=0.25):
    """-> (dataset of (float image (3, img_size, img_size) normalised with MEAN/STD, int label), num_classes).

    name: 'folder' (root/train, root/val or else root/test; or a packed .pth file), 'cifar10' (no root: find_cifar10;
    else a folder with train/, a packed file, or torchvision's root), 'cifar100' (torchvision, under root), 'fake'.
    split: 'train' (augmented with train_transform(aug, reprob)) or 'val'. subset: this many images, class-balanced,
    chosen with seed. Small images (img_size <= 64) and packed files are held in memory, decoded once."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    flag = "--subset" if split == "train" else "--val_subset"  # the flag of train.py and evaluate.py that sets it
    if subset is not None and subset < 1:
        raise ValueError(f"{flag} {subset}: a subset must be at least 1 image (or left out)")
    root = os.fspath(root or "")
    if name == "cifar10" and not root:
        root = find_cifar10()
        if root not in _announced and os.environ.get("RANK", "0") == "0":  # once, and on rank 0 under torchrun
            print(f"CIFAR-10 from {os.path.abspath(root)} (no --data_path given)")
            _announced.add(root)
    if name == "cifar10" and (root.endswith(".pth") or os.path.isdir(os.path.join(root, "train"))):
        name = "folder"  # CIFAR-10 as an ImageFolder tree or a packed file
    if name == "fake":
        # fixed generators: the same images in every process and every call, different for train and val
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 512 if split == "train" else 128
        images = torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=g)
        labels, num_classes = torch.arange(n) % 10, 10
    elif name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            ds = cls(root, train=split == "train", download=download)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            inner = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
            raise FileNotFoundError(f"no {name} under {root}: pass --download, or point --data_path at the folder "
                                    f"holding {inner}/") from e
        images, labels = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
        num_classes = len(ds.classes)
    elif name == "folder":
        packed = root.endswith(".pth")
        files, labels, classes = read_pack(root, split) if packed else open_folder(root, split)
        if split == "train" and not packed:  # val/'s layout too, before the training images are decoded
            open_folder(root, "val")
        if subset is not None:  # before decoding: only the chosen images are read
            keep = balanced_subset(labels, subset, seed, flag).tolist()
            files, labels, subset = [files[i] for i in keep], [labels[i] for i in keep], None
        if img_size > 64 and not packed:
            if split == "train":
                return Files(files, labels, train_transform(img_size, aug, reprob)), len(classes)
            return Files(*readable(files, labels), eval_transform(img_size)), len(classes)
        decoded = []
        for f in files:
            decoded.append(decode(f, img_size if img_size <= 64 else None))  # above 64 px: the stored size
            if decoded[-1].shape != decoded[0].shape:  # at the first that differs, not after decoding them all
                raise ValueError(f"the images in {root} differ in size ({name_of(f)}: {tuple(decoded[-1].shape)}, "
                                 f"{name_of(files[0])}: {tuple(decoded[0].shape)}): pack images of one size, or use "
                                 "--input_size <= 64")
        images, num_classes = torch.stack(decoded), len(classes)
    else:
        raise ValueError(f"unknown dataset {name!r}: folder, cifar10, cifar100 or fake")

    if subset is not None:
        keep = balanced_subset(labels, subset, seed, flag)
        images, labels = images[keep], torch.as_tensor(labels)[keep]
    small = img_size <= 64
    if small and images.shape[-2:] != (img_size, img_size):  # once here rather than every epoch
        images = v2.functional.center_crop(v2.functional.resize(images, img_size, BICUBIC), img_size)
    # above 64 px the stored images keep their size (CIFAR at 224 would be 7.5 GB): the transforms resize per item
    tf = train_transform(img_size, aug, reprob) if split == "train" else eval_transform(img_size, resize=not small)
    return TensorImages(images, labels, tf), num_classes


def class_names(name, root):
    """Class names in label order (for reports and pictures), name and root as for build_dataset: an ImageFolder
    tree's class folders, a packed file's stored names, CIFAR-10's or CIFAR-100's for torchvision's copy, '0'..'9'
    for 'fake'."""
    root = os.fspath(root or "")
    if name == "fake":
        return [str(i) for i in range(10)]
    if name == "cifar100":
        return torchvision.datasets.CIFAR100(root, train=False).classes
    root = root or (find_cifar10() if name == "cifar10" else "")
    if root.endswith(".pth"):
        return open_pack(root)["classes"]
    for split in ("train", "val", "test"):
        if os.path.isdir(os.path.join(root, split)):
            return class_folders(os.path.join(root, split))
    if name == "cifar10":  # torchvision's copy
        return list(CIFAR10_CLASSES)
    raise FileNotFoundError(f"no folder {os.path.join(root, 'train')}: {LAYOUT}")


# ------------------------------------------------------------------------------------ deterministic sampling
# Every random draw of a run follows from (seed, epoch, image) or (seed, process, step): a run stopped and resumed
# draws exactly what an uninterrupted one draws, whichever worker or process loads an image
# (README "Runs you cannot lose").
def seed_of(*ints):
    """A 63-bit seed that follows from the integers alone (the same in every process and Python version)."""
    return int.from_bytes(hashlib.sha256(repr(ints).encode()).digest()[:8], "little") >> 1


class Seeded(torch.utils.data.Dataset):
    """dataset[(epoch, i)] is dataset[i] drawn with torch's generator seeded from (seed, epoch, i): an image's
    augmentation follows from these alone, whichever worker or process loads it, so workers persist across epochs
    and a resumed run draws what an uninterrupted one would."""

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):  # the loading process's own stream is left as it was
            torch.manual_seed(seed_of(self.seed, epoch, i))
            return self.dataset[i]


class EpochBatches(torch.utils.data.Sampler):
    """This process's batches of an epoch: a permutation fixed by (seed, epoch), split between processes as
    DistributedSampler splits it (rank, rank + world_size, ...), whole batches only. Set .epoch, and .skip to start
    that many batches in (a mid-epoch resume), before iterating."""

    def __init__(self, n, batch_size, rank, world_size, seed):
        self.n = n
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def __len__(self):
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_of(self.seed, self.epoch)))
        mine = order[self.rank::self.world_size].tolist()
        for b in range(self.skip, len(self)):
            yield [(self.epoch, i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]


def quiet_worker(_):
    """A loader worker ignores Ctrl-C and SIGTERM: they are the main process's to handle (it finishes the step, then
    saves). Both often reach the workers too (Ctrl-C in a terminal, `timeout`, a scheduler's SIGTERM go to every process
    of the run), and a worker killed by one would end the run with a traceback instead. The main process still stops
    its workers when it exits."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class MixupCutmix:
    """(images (B, 3, H, W) float, labels (B,) int64) -> (images, soft targets (B, K) float32 summing to 1).

    Per batch, MixUp or CutMix (each half the time when both alphas are > 0; one lambda per batch), then label
    smoothing: targets * (1 - s) + s / K, equal to timm's mix of two smoothed one-hots. Alphas 0: smoothed one-hot.
    Random draws come from torch's global generator (train.py seeds it)."""

    def __init__(self, mixup, cutmix, smoothing, num_classes):
        self.smoothing, self.num_classes = smoothing, num_classes
        ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
              ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
        self.mix = v2.RandomChoice(ops) if ops else None

    def __call__(self, images, labels):
        if self.mix is None:
            targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        else:
            images, targets = self.mix(images, labels)
        return images, targets.float() * (1 - self.smoothing) + self.smoothing / self.num_classes


def build_ood_dataset(kind, root, img_size, imagenet_wnids):
    """ImageNet-V2 ('v2'), -A ('a'), -R ('r') or -Sketch ('sketch') under root -> (dataset, class_index).

    imagenet_wnids: the model's classes in its output order (sorted for a model trained with ImageFolder).
    V2's folders are named '0'..'999', the index of the class in the sorted wnid list (so '10' is class 10, not the
    position of '10' among sorted strings); Sketch has all 1000 wnid folders. A and R have 200 wnid folders: their
    labels are positions in class_index (the sorted model indices of those 200 classes); cut the logits down with
    restrict_logits(logits, class_index). class_index is None when labels are already model indices."""
    if kind not in ("v2", "a", "r", "sketch"):
        raise ValueError(f"unknown distribution-shift set {kind!r}: v2, a, r or sketch")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder {root}: give the ImageNet-{kind} folder that holds its class folders")
    index = {w: i for i, w in enumerate(imagenet_wnids)}  # wnid -> model output index
    tf = eval_transform(img_size)  # always resize: these images come in every size
    if kind == "v2":
        names = [e.name for e in os.scandir(root) if e.is_dir()]
        if not names or not all(s.isdigit() and int(s) < len(imagenet_wnids) for s in names):
            raise ValueError(f"{root} is not ImageNet-V2: expected class folders named 0..{len(imagenet_wnids) - 1}")
        names.sort(key=int)  # label l of scan() below is the folder names[l]
        files, labels, _ = scan(root, names)
        standard = sorted(imagenet_wnids)  # V2's numbering is the standard (sorted) one
        return Files(files, [index[standard[int(names[l])]] for l in labels], tf), None
    files, labels, wnids = scan(root)
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"{root} has class folders that are not among the model's classes, e.g. {unknown[:3]}")
    if kind == "sketch":
        return Files(files, [index[wnids[l]] for l in labels], tf), None
    class_index = sorted(index[w] for w in wnids)
    position = {c: p for p, c in enumerate(class_index)}
    return Files(files, [position[index[wnids[l]]] for l in labels], tf), class_index


def restrict_logits(logits, class_index):
    """(B, 1000) -> (B, len(class_index)): the columns of the classes a 200-class set covers; identity for None."""
    return logits if class_index is None else logits[:, class_index]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line `error: ...`, as train.py's scripts print it, not argparse's usage block
        raise ValueError(f"{message} (see --help)")


def main(argv=None):
    p = Parser(description="data.py pack SRC DST: an ImageFolder tree (train/ and val/ or test/) "
                      "-> one .pth file with the images' bytes unchanged, usable as --data_path")
    p.add_argument("command", choices=["pack"])
    p.add_argument("src", help="folder with train/ and val/ (or test/), one sub-folder per class")
    p.add_argument("dst", help="the packed file to write, ending in .pth (e.g. data/cifar10.pack.pth)")
    try:
        args = p.parse_args(argv)
        pack(args.src, args.dst)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

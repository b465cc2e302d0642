"""data.py: datasets and transforms for every script (method.md, "Recipes": the MAE fine-tune augmentation).

    build_dataset(name, root, split, img_size, ...) -> (dataset of (normalised float image, label), num_classes)
    MixupCutmix(mixup, cutmix, smoothing, num_classes)(images, labels) -> (images, soft targets)
    build_ood_dataset(kind, root, img_size, imagenet_wnids) -> (dataset, class_index); restrict_logits(...)

Datasets: an ImageFolder tree ('folder': ImageNet's train/ + val/, or ../shared/data/cifar10's train/ + test/),
torchvision CIFAR-10/100, ImageNet-V2/-A/-R/-Sketch for evaluation, and 'fake' data for smoke runs. CIFAR-sized
images (img_size <= 64) are decoded once and kept in memory as uint8, so a 2-core CPU does not spend its epochs
decoding JPEGs (the 50,000 CIFAR-10 train JPEGs: 12 s with PIL on 2 cores).

Augmentation (torchvision.transforms.v2), --aug randaug: the MAE fine-tune recipe at 224 px (RandomResizedCrop
(0.08-1, bicubic), flip, RandAugment(2 ops, magnitude 9), RandomErasing(--reprob)); eval resizes to img/0.875 and
center-crops. At <= 64 px: RandomCrop with 4 px padding instead of RandomResizedCrop, no resizing at eval.
--aug crop (MAE pre-training): RandomResizedCrop (0.2-1) and flip only. Where this differs from timm's
create_transform('rand-m9-mstd0.5-inc1', re_mode='pixel') that MAE and the authors used: torchvision's RandAugment
has a fixed magnitude (no std 0.5 noise) and its own op list (no 'inc' magnitude-increasing variants, no
SolarizeAdd); RandomErasing fills erased boxes with per-pixel normal noise in normalised space here
(value='random'), as timm's 'pixel' mode does, but with one box per image (timm: 1 by default too).
MixUp/CutMix: like timm's Mixup with switch prob 0.5, one lambda per batch, label smoothing applied to the targets.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision
from torchvision.transforms import v2

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as MAE uses for every dataset
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def transform(split, img_size, aug="randaug", reprob=0.25):
    """The v2 pipeline for uint8 tensors or PIL images -> normalised float tensors."""
    small = img_size <= 64
    finish = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if split != "train":
        resize = [] if small else [v2.Resize(int(img_size / 0.875), interpolation=v2.InterpolationMode.BICUBIC),
                                   v2.CenterCrop(img_size)]
        return v2.Compose([v2.ToImage(), *resize, *finish[1:]])
    if aug == "crop":
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), antialias=True,
                                                              interpolation=v2.InterpolationMode.BICUBIC),
                           v2.RandomHorizontalFlip(), *finish[1:]])
    crop = (v2.RandomCrop(img_size, padding=4) if small else
            v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC))
    erase = [v2.RandomErasing(p=reprob, value="random")] if reprob > 0 else []
    return v2.Compose([v2.ToImage(), crop, v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9),
                       *finish[1:], *erase])


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as a uint8 tensor (N, 3, H, W), transformed per item."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, torch.as_tensor(labels), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


class Files(torch.utils.data.Dataset):
    """Images read from disk per item with PIL (ImageNet-sized folders)."""

    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {self.files[i]} ({e}); delete or replace it") from e
        return self.transform(image), self.labels[i]


def scan(folder, class_names=None):
    """ImageFolder's layout: folder/<class>/<image>. -> (files, labels, class names); classes sorted by name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder}: --data_path must hold train/ and val/ (or test/) with one "
                                "sub-folder of images per class")
    classes = class_names or sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(e.path for e in os.scandir(os.path.join(folder, name)) if e.name.lower().endswith(EXTENSIONS))
        if not found:
            raise ValueError(f"class folder {os.path.join(folder, name)} has no images: remove it or add some")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def decode_all(files, img_size):
    """Decode every file once into a uint8 tensor (N, 3, img_size, img_size), resizing images of another size."""
    def read(path):
        from PIL import Image
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {path} ({e}); delete or replace it") from e
        if image.size != (img_size, img_size):
            image = image.resize((img_size, img_size), Image.BICUBIC)
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(img_size, img_size, 3)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return torch.stack(list(pool.map(read, files, chunksize=256))).permute(0, 3, 1, 2).contiguous()


def balanced_subset(labels, n, seed):
    """Indices of n items with the classes as equal as possible, the same for the same seed."""
    labels = torch.as_tensor(labels)
    if n > len(labels):
        raise ValueError(f"subset of {n} asked from a dataset of {len(labels)} images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    rank_in_class = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        members = order[labels[order] == c]
        rank_in_class[members] = torch.arange(len(members))
    # take everyone's first image, then everyone's second, ...: ties broken by the random order
    chosen = sorted(order.tolist(), key=lambda i: rank_in_class[i].item())[:n]
    return sorted(chosen)


def build_dataset(name, root, split, img_size, subset=None, seed=0, download=False, aug="randaug", reprob=0.25):
    """-> (dataset of (float image (3, img_size, img_size), int label), num_classes). See the module docstring."""
    tf = transform(split, img_size, aug, reprob)
    if name == "fake":
        g = torch.Generator().manual_seed(1 if split == "train" else 2)
        n = 512 if split == "train" else 128
        images = torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        num_classes = 10
    elif name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            ds = cls(root, train=split == "train", download=download)
        except RuntimeError as e:
            raise FileNotFoundError(f"{name} not found under {root!r}: pass --download, or the folder that holds "
                                    f"{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}") from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets)
        num_classes = len(ds.classes)
    elif name == "folder":
        folder = os.path.join(root, split)
        if split == "val" and not os.path.isdir(folder):
            folder = os.path.join(root, "test")
        files, labels, classes = scan(folder)
        num_classes = len(classes)
        if subset:
            keep = balanced_subset(labels, subset, seed)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
            subset = None
        if img_size > 64:
            return Files(files, labels, tf), num_classes
        images = decode_all(files, img_size)
    else:
        raise ValueError(f"unknown dataset {name!r}: folder, cifar10, cifar100 or fake")
    if subset:
        keep = balanced_subset(labels, subset, seed)
        images, labels = images[keep], torch.as_tensor(labels)[keep]
    if images.shape[-1] != img_size:
        images = v2.functional.resize(images, [img_size, img_size], antialias=True)
    return TensorImages(images, labels, tf), num_classes


class MixupCutmix:
    """(images, labels) -> (images, soft targets): per batch MixUp or CutMix (each half the time when both are on),
    then label smoothing, as timm's Mixup(mixup_alpha, cutmix_alpha, label_smoothing) that MAE uses."""

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
        return images, targets * (1 - self.smoothing) + self.smoothing / self.num_classes


def build_ood_dataset(kind, root, img_size, imagenet_wnids):
    """ImageNet-V2 ('v2'), -A ('a'), -R ('r') or -Sketch ('sketch') under root -> (dataset, class_index).

    V2 names its folders '0'..'999' (the class index itself, not sorted as strings); Sketch has all 1000 wnid
    folders; A and R have 200: their labels are positions in class_index (the ImageNet indices of those 200), and
    logits must be cut down with restrict_logits(logits, class_index).
    """
    tf = transform("val", img_size)
    if kind == "v2":
        names = sorted((d.name for d in os.scandir(root) if d.is_dir()), key=int)
        files, labels, _ = scan(root, names)
        return Files(files, [int(names[l]) for l in labels], tf), None
    if kind not in ("a", "r", "sketch"):
        raise ValueError(f"unknown distribution-shift set {kind!r}: v2, a, r or sketch")
    files, labels, wnids = scan(root)
    index = {w: i for i, w in enumerate(imagenet_wnids)}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"{root} has class folders that are not ImageNet classes: {unknown[:3]}")
    if kind == "sketch":
        return Files(files, [index[wnids[l]] for l in labels], tf), None
    return Files(files, labels, tf), [index[w] for w in wnids]


def restrict_logits(logits, class_index):
    """(B, 1000) -> (B, len(class_index)): the columns of the classes a 200-class set covers."""
    return logits if class_index is None else logits[:, class_index]

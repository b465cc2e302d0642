"""data.py: datasets and transforms for every script (method.md, "Recipes": the MAE fine-tune augmentation).

    train_set, num_classes = build_dataset("folder", "../shared/data/cifar10", "train", 32, subset=512)
    mix = MixupCutmix(0.8, 1.0, 0.1, num_classes); images, targets = mix(images, labels)   # targets (B, K)
    ood_set, class_index = build_ood_dataset("r", "/data/imagenet-r", 224, imagenet_wnids)
    logits = restrict_logits(model(images), class_index)                                   # (B, 200) for -A/-R

Datasets: 'folder' (ImageFolder tree: root/train + root/val, or root/test as in ../shared/data/cifar10), torchvision
'cifar10'/'cifar100', 'fake' (deterministic noise for smoke runs), and ImageNet-V2/-A/-R/-Sketch for evaluation.
At img_size <= 64 (CIFAR-sized) every image is decoded once and held in memory as uint8 (N, 3, H, W), so epochs are
not spent decoding: the 50,000 32x32 CIFAR-10 JPEGs take about 6 s with PIL on our shared 2-core machine, so there is
no cache file (torchvision.io.decode_image took 2.5-5 s but is deprecated as of torchvision 0.29; a thread pool was
slower than one thread for such small files). Larger images (ImageNet) are read lazily with PIL, as ImageFolder does.

Augmentation (torchvision.transforms.v2), --aug randaug, img_size > 64, as MAE fine-tuning: RandomResizedCrop (0.08-1,
bicubic), flip, RandAugment m9, ToDtype, Normalize, RandomErasing(--reprob); eval: Resize(img_size / 0.875, bicubic)
+ CenterCrop (MAE: crop ratio 1 above 224 px). At <= 64 px (not in the authors' code, which is ImageNet-only):
RandomCrop with 4 px zero padding instead of RandomResizedCrop, and no resizing at eval. --aug crop (MAE pre-training):
RandomResizedCrop (0.2-1) and flip only.

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
import os

import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as MAE uses for every dataset
FILL = [round(255 * m) for m in MEAN]  # timm's RandAugment fill colour (its hparams img_mean)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's list
BICUBIC = v2.InterpolationMode.BICUBIC
LAYOUT = "--data_path should point at the folder containing train/ and val/ (or test/), one sub-folder per class"


def train_transform(img_size, aug="randaug", reprob=0.25):
    """uint8 tensor (3, H, W) or PIL image -> augmented, normalised float tensor (3, img_size, img_size)."""
    finish = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if aug == "crop":
        crop = v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=BICUBIC)
        return v2.Compose([crop, v2.RandomHorizontalFlip(), *finish, v2.ToPureTensor()])
    if aug != "randaug":
        raise ValueError(f"unknown --aug {aug!r}: randaug or crop")
    crop = (v2.RandomCrop(img_size, padding=4) if img_size <= 64 else  # zero padding, the usual CIFAR crop
            v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=BICUBIC))
    one_op = v2.RandAugment(num_ops=1, magnitude=9, num_magnitude_bins=11, fill=FILL,
                            interpolation=v2.InterpolationMode.BILINEAR)
    erase = [v2.RandomErasing(p=reprob, value="random")] if reprob > 0 else []
    return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.RandomApply([one_op], p=0.5),
                       v2.RandomApply([one_op], p=0.5), *finish, *erase, v2.ToPureTensor()])


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


def scan(folder, classes=None):
    """ImageFolder's layout folder/<class>/<image> -> (files, labels, classes); classes sorted by name unless given."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder}: {LAYOUT}")
    classes = classes or sorted(e.name for e in os.scandir(folder) if e.is_dir())
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


def load(path):
    """One image file -> RGB PIL image; a ValueError naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {path} ({e}): delete or replace the file") from e


def decode(path, img_size):
    """One file -> uint8 (3, img_size, img_size); another size gets its shorter side resized and is center-cropped."""
    image = v2.functional.pil_to_tensor(load(path))
    if image.shape[1:] != (img_size, img_size):
        image = v2.functional.center_crop(v2.functional.resize(image, img_size, BICUBIC), img_size)
    return image


def balanced_subset(labels, n, seed):
    """Indices (sorted) of n items, the classes as equal as possible, chosen at random; the same for the same seed."""
    labels = torch.as_tensor(labels)
    if n > len(labels):
        raise ValueError(f"subset of {n} is larger than the dataset ({len(labels)} images): lower --subset or "
                         "--val_subset")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    # rank of each shuffled item among the shuffled items of its class; take all ranks 0, then all ranks 1, ...
    by_class = torch.argsort(labels[order], stable=True)
    counts = torch.bincount(labels)
    first = torch.cumsum(counts, 0) - counts  # where each class starts in by_class
    rank = torch.empty_like(order)
    rank[by_class] = torch.arange(len(order)) - first[labels[order][by_class]]
    take = torch.argsort(rank * len(order) + torch.arange(len(order)))[:n]  # ties broken by the shuffled position
    return order[take].sort().values


def build_dataset(name, root, split, img_size, subset=None, seed=0, download=False, aug="randaug", reprob=0.25):
    """-> (dataset of (float image (3, img_size, img_size) normalised with MEAN/STD, int label), num_classes).

    name: 'folder' (root/train, root/val or else root/test), 'cifar10'/'cifar100' (torchvision, under root), 'fake'.
    split: 'train' (augmented with train_transform(aug, reprob)) or 'val'. subset: this many images, class-balanced,
    chosen with seed. Small images (img_size <= 64) are held in memory, resized once if stored at another size."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
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
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no folder {root}: {LAYOUT}")
        folder = os.path.join(root, split)
        if split == "val" and not os.path.isdir(folder):
            folder = os.path.join(root, "test")
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{root} has neither val/ nor test/: {LAYOUT}")
        files, labels, classes = scan(folder)
        if subset is not None:  # before decoding: only the chosen images are read
            keep = balanced_subset(labels, subset, seed).tolist()
            files, labels, subset = [files[i] for i in keep], [labels[i] for i in keep], None
        if img_size > 64:
            tf = train_transform(img_size, aug, reprob) if split == "train" else eval_transform(img_size)
            return Files(files, labels, tf), len(classes)
        images, num_classes = torch.stack([decode(f, img_size) for f in files]), len(classes)
    else:
        raise ValueError(f"unknown dataset {name!r}: folder, cifar10, cifar100 or fake")

    if subset is not None:
        keep = balanced_subset(labels, subset, seed)
        images, labels = images[keep], torch.as_tensor(labels)[keep]
    small = img_size <= 64
    if small and images.shape[-2:] != (img_size, img_size):  # once here rather than every epoch
        images = v2.functional.center_crop(v2.functional.resize(images, img_size, BICUBIC), img_size)
    # above 64 px the stored images keep their size (CIFAR at 224 would be 7.5 GB): the transforms resize per item
    tf = train_transform(img_size, aug, reprob) if split == "train" else eval_transform(img_size, resize=not small)
    return TensorImages(images, labels, tf), num_classes


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

"""evaluate.py: accuracy, ensembles, distribution shift, and attention-map distances and pictures (Li et al. 2024,
arXiv 2411.09702: its ensembles, distribution-shift sets and attention-map analysis; README "Evaluation").

Each checkpoint runs as it was trained to: a scratch, fine-tuned or distilled student alone; an attention-copy student
as teacher.Teacher + copy_attention.CopyAttention rebuilt from its checkpoint's record, with the recorded teacher
(sha256 checked; --teacher points elsewhere). Any other file vit.load_pretrained reads (MAE, timm, DeiT, DINO, a ViT
of any shape; --teacher_heads where the file does not say) runs as a plain ViT, on images re-normalised with the
statistics it records.

    python evaluate.py runs/distill/checkpoint.pth --ema            # dataset and data_path from the checkpoint
    python evaluate.py ft.pth distill.pth --data_path /imagenet --ood v2=/data/imagenetv2 a=/data/imagenet-a \
        r=/data/imagenet-r sketch=/data/imagenet-sketch --output result.json
    python evaluate.py runs/{copy,distill,scratch}/checkpoint.pth --with_teacher --no_val --jsd \
        --pictures attention.png --picture_heads mean --picture_size 96     # teacher, copy, distill, scratch
    python evaluate.py --specificity mae_tiny_cifar10 --output results/specificity/mae_tiny_cifar10.json

The JSON result goes to stdout or --output (which only ever replaces an earlier output of this script), tables to
stderr; nothing is written before every input has been checked.
  accuracy  per image set (val unless --no_val, then each --ood set): top-1, top-5 (%), loss and top-1 per class name
            of each model and of their ensemble (the mean of the softmax probabilities, or of the logits). ImageNet-A/-R
            keep the logits of their 200 classes. --ood's classes are --wnids, by default <data_path>/train's folders.
  jsd       per layer and pair of models: the Jensen-Shannon divergence (natural log, 0..ln 2) between their attention
            maps on the same images, averaged over images and query rows; head h against head h ("index") and each
            head of the first model against its closest head of the second ("best"), then averaged over heads.
  pictures  attention from the CLS query (the mean query without a CLS token) to the patches, each map scaled to
            0..1, black-red-yellow-white: per image and layer a row per model and a column per head, or
            (--picture_heads mean) one row, the image and then the mean over heads of each model.
  specificity  (--specificity TEACHER, alone) how image-specific a teacher's attention is, per layer: the mean over
            images, heads and query rows (CLS included) of the JSD (nats, 0..ln 2) between an image's attention row
            and the same row of the mean map over the images (0: the maps ignore the image), and the mean row entropy.
            TEACHER is a name or file as the method scripts take it, with --teacher_heads, --teacher_mean and
            --teacher_std; --val_subset unaugmented val images (512 by default, class-balanced by --seed) of
            --dataset (default: CIFAR-10 without --data_path, else a folder). results/specificity holds both teachers'.
A copy student's maps are the ones it runs with: the teacher's q and/or k in the layers and heads it copies.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from tqdm import tqdm

import copy_attention
import data
import run_safety
import teacher
import train
import vit

MARK = "evaluate.py"  # written into every JSON and PNG this script makes: only such files are ever replaced


@dataclasses.dataclass
class Model:
    """A model ready to evaluate: method.predict(net, inputs(images)) gives its logits (a copy student runs its
    teacher); images arrive normalised with data.MEAN / data.STD."""
    name: str
    net: vit.VisionTransformer
    method: train.Method
    info: dict  # what the result records about it; info["method"] labels it in pictures
    fresh: list = dataclasses.field(default_factory=list)  # untrained tensors (a pre-trained encoder has no head)
    record: dict = dataclasses.field(default_factory=dict)  # the checkpoint's 'method' (Teacher.describe(), mode)
    config: dict = dataclasses.field(default_factory=dict)  # the checkpoint's 'config' (dataset, data_path, ...)
    mean: tuple = data.MEAN  # the input statistics it was trained with
    std: tuple = data.STD

    def inputs(self, images):
        """The images as this model was trained to see them: one affine map, the same as teacher.Teacher's."""
        if (tuple(self.mean), tuple(self.std)) == (data.MEAN, data.STD):
            return images
        s_s, m_s, s_t, m_t = (torch.tensor(v).view(1, 3, 1, 1).to(images.device)
                              for v in (data.STD, data.MEAN, self.std, self.mean))
        return images * (s_s / s_t) + (m_s - m_t) / s_t


def load_model(path, args):
    """A checkpoint file (or a vit.TEACHERS name) -> Model on the CPU in eval mode."""
    ckpt = vit.load_file(vit.resolve(path))
    if not (isinstance(ckpt, dict) and "config" in ckpt and "arch" in ckpt and isinstance(ckpt.get("model"), dict)):
        net, report = vit.load_pretrained(path, num_heads=args.teacher_heads)  # architecture read from the weights
        return Model(path, net.eval(), train.Method(net).eval(), dict(method="pre-trained", weights="model"),
                     report["fresh"], mean=report["mean"] or data.MEAN, std=report["std"] or data.STD)
    arch, record, config = ckpt["arch"], ckpt.get("method") or {}, ckpt["config"] or {}
    for part, value in (("arch", arch), ("method", record), ("config", config)):
        if not isinstance(value, dict):
            raise ValueError(f"{path} is damaged or was edited (its '{part}' is a {type(value).__name__}, not a "
                             "record): use the file its run wrote")
    check_config(path, arch, config)
    weights = "ema" if args.ema and ckpt.get("ema") else "model"  # a model trained without EMA is evaluated raw
    try:
        net = vit.VisionTransformer(**arch)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged or was edited (its 'arch' does not build a ViT: {e}): use the file its "
                         "run wrote") from None
    try:
        report = vit.load_state(net, ckpt[weights])
    except ValueError as e:
        raise ValueError(f"{path}: its weights do not fit the architecture it records ({e})") from None
    mode = record.get("mode") or ("fine-tune" if config.get("finetune") else
                                  "mae pre-training" if "mask_ratio" in config else "scratch")
    info = dict(method=mode, weights=weights, **{k: record[k] for k in ("teacher", "layers", "heads") if k in record})
    method = train.Method(net)
    if mode in copy_attention.FROM_TEACHER:  # the teacher runs at inference too (not with --average images)
        average = record.get("average", "none")  # absent from checkpoints written before the ablation existed
        mean_map = (ckpt.get("method_tensors") or {}).get("mean_map")  # --average images: saved, not computed again
        if average == "images" and mean_map is None:
            raise ValueError(f"{path} was trained with --average images but holds no mean map (method_tensors): the "
                             "file was edited or mixed up; use the original")
        method = copy_attention.CopyAttention(net, build_teacher(path, record, net, args), mode, average=average,
                                              mean_map=mean_map)
        info["teacher"] = method.teacher.name
        info["average"] = average
    return Model(path, net.eval(), method.eval(), info, report["fresh"], record, config)


def check_config(path, arch, config):
    """The preset and input size in a checkpoint's config must describe the architecture it records."""
    if config.get("model") not in vit.PRESETS:
        return
    with torch.device("meta"):  # the preset's arch without allocating its weights
        said = vit.create_model(config["model"], **{"img_size": config["input_size"]} if "input_size" in config
                                else {}).arch
    diff = [f"{k} {said[k]} vs {arch.get(k)}" for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
            if arch.get(k) != said[k]]
    if diff:
        raise ValueError(f"{path}: its config says {config['model']} at {said['img_size']} px, but its recorded arch "
                         f"differs ({', '.join(diff)}): the file was edited or mixed up; use the original")


def build_teacher(path, record, student, args):
    """The teacher.Teacher a transfer checkpoint records (Teacher.describe()), or --teacher's file instead."""
    source = args.teacher or record["teacher"]
    try:
        file = vit.resolve(source)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"{path} needs its teacher {source} ({e}): pass --teacher PATH pointing at the "
                                "teacher it was trained with") from None
    sha, recorded = teacher.sha256(file), record.get("teacher_sha256")
    if recorded and sha != recorded:
        raise ValueError(f"teacher {source} is not the one {path} was trained with (sha256 {sha[:12]}..., recorded "
                         f"{recorded[:12]}...): pass --teacher PATH pointing at that file")
    exchange = record.get("exchange") or copy_attention.FROM_TEACHER.get(record.get("mode"), "qk")
    return teacher.Teacher(source, student, ",".join(map(str, record["layers"])), record.get("heads"), exchange,
                            (record.get("teacher_arch") or {}).get("num_heads") or args.teacher_heads,
                            record.get("teacher_mean"), record.get("teacher_std"))


def teacher_model(models, args):
    """The recorded teacher of the first copy/distill checkpoint, as a model of its own (--with_teacher)."""
    m = next((m for m in models if m.record.get("teacher")), None)
    if m is None:
        raise ValueError("--with_teacher: none of the checkpoints records a teacher (only copy and distill do)")
    t = build_teacher(m.name, m.record, m.net, args)
    return Model(f"teacher {t.name}", t.model, train.Method(t.model).eval(), dict(method="teacher", weights="model"),
                 mean=t.mean, std=t.std)


# ------------------------------------------------------------------------------------------------ accuracy
def image_sets(args, size):
    """-> [(name, dataset, class_index, class names, output classes)] at image size `size`: val unless --no_val, then
    the --ood sets. Models of different input sizes see the same images in the same order."""
    sets = []
    if not args.no_val:
        ds, _ = data.build_dataset(args.dataset, args.data_path, "val", size, subset=args.val_subset, seed=args.seed)
        sets.append(("val", ds, None, args.names, len(args.names)))
    for kind, root in args.ood.items():
        ds, index = data.build_ood_dataset(kind, root, size, args.wnids)
        sets.append((kind, ds, index, [args.wnids[i] for i in index] if index else args.wnids, len(args.wnids)))
    return sets


@torch.no_grad()
def collect_logits(model, dataset, args, class_index=None, desc=""):
    """-> (logits (N, K) float32 on the CPU, labels (N,)) over the dataset in order; only the columns of
    class_index for ImageNet-A/-R."""
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, num_workers=args.num_workers,
                                         pin_memory=args.device.startswith("cuda"))
    logits, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, disable=not args.progress):
        with train.autocast(args):
            out = model.method.predict(model.net, model.inputs(images.to(args.device, non_blocking=True)))
        logits.append(data.restrict_logits(out.float(), class_index).cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def scores(logits, labels, names):
    """Top-1 and top-5 (%), mean cross-entropy of logits or log-probabilities (N, K) as train.validate counts them,
    and top-1 per class present, by name."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit, count = (top5[:, 0] == labels).double(), torch.bincount(labels, minlength=len(names))
    per_class = torch.zeros(len(names), dtype=torch.float64).index_add_(0, labels, hit) / count.clamp_min(1)
    return dict(acc1=100 * hit.mean().item(), acc5=100 * (top5 == labels[:, None]).any(1).double().mean().item(),
                loss=F.cross_entropy(logits.double(), labels).item(),
                per_class={n: 100 * a for n, a, c in zip(names, per_class.tolist(), count.tolist()) if c})


def ensemble(logits, how):
    """Several models' (N, K) logits -> the ensemble's: log of the mean softmax probability, or the mean logit."""
    stacked = torch.stack(logits)  # (M, N, K)
    if how == "logits":
        return stacked.mean(0)
    return torch.logsumexp(F.log_softmax(stacked.double(), -1), 0) - math.log(len(logits))


def accuracy(models, args):
    """{set: {images, models: [scores of each model], ensemble: scores}} over val and the --ood sets."""
    sets = {size: image_sets(args, size) for size in {m.net.arch["img_size"] for m in models}}  # once per size
    for m in models:
        for name, _, _, _, k in sets[m.net.arch["img_size"]]:
            if m.net.arch["num_classes"] != k:
                raise ValueError(f"{m.name} has {m.net.arch['num_classes']} classes but {name} has {k}: evaluate it "
                                 "on the dataset it was trained for (--dataset, --data_path, --wnids)")
    results = {}
    for i, (name, _, index, names, _) in enumerate(next(iter(sets.values()))):
        out = [collect_logits(m, sets[m.net.arch["img_size"]][i][1], args, index, f"{name} {m.name}") for m in models]
        logits, labels = [l for l, _ in out], out[0][1]  # the same images in the same order for every model
        results[name] = dict(images=len(labels), models=[scores(l, labels, names) for l in logits])
        if len(models) > 1 and args.ensemble != "none":
            results[name]["ensemble"] = scores(ensemble(logits, args.ensemble), labels, names)
    return results


# ------------------------------------------------------------------------------------------------ attention
def with_heads(own, theirs):
    """own (B, H, N, D) with its first heads replaced by theirs (B, h, N, D'): what a copy student attends with."""
    return theirs if theirs.shape[1] == own.shape[1] else torch.cat([theirs, own[:, theirs.shape[1]:]], dim=1)


@torch.no_grad()
def attention_qk(model, images, layers):
    """{layer: (q, k)}, each (B, H, N, D), of the attention the model runs with on images (B, 3, S, S)."""
    images, attention_fns, taken = model.inputs(images), {}, {}
    if isinstance(model.method, copy_attention.CopyAttention):  # the copy as CopyAttention.predict runs it
        t = model.method.teacher
        taken = t(images)
        attention_fns = {l: functools.partial(model.method.attention, teacher_qkv=qkv) for l, qkv in taken.items()}
    _, qkv = model.net.forward_features(images, attention_fns=attention_fns, collect=layers)
    out = {}
    for l, (q, k, _) in qkv.items():
        if l in taken:  # the teacher's q and/or k in the copied heads (copy: both, copy_q: q, copy_k: k, copy_v: none)
            q = with_heads(q, taken[l][0]) if "q" in t.exchange else q
            k = with_heads(k, taken[l][1]) if "k" in t.exchange else k
        out[l] = (q, k)
    return out


def jsd(p, q):
    """Jensen-Shannon divergence (natural log) of distributions along the last dim, broadcast over the others."""
    m = (p + q) / 2
    return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m) + torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)


def head_jsd(qk_a, qk_b):
    """(q, k) of one layer of two models -> (H, H): JSD of head i of a with head j of b, summed over images and query
    rows. One head of a at a time, so only B x H maps of N x N exist at once."""
    pa, pb = vit.attention_map(*qk_a), vit.attention_map(*qk_b)  # (B, H, N, N)
    return torch.stack([jsd(pa[:, h:h + 1], pb).sum((0, 2)) for h in range(pa.shape[1])])


def attention_jsd(models, images, layers, batch_size):
    """{"i-j": {layer: summary}} for every pair i < j of models, on the same images (B, 3, S, S)."""
    pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
    tokens = [m.net.grid ** 2 + m.net.num_prefix_tokens for m in models]
    for i, j in pairs:
        if (tokens[i], models[i].net.num_heads) != (tokens[j], models[j].net.num_heads):
            raise ValueError(f"--jsd compares maps of equal shape, but {models[i].name} has {tokens[i]} tokens and "
                             f"{models[i].net.num_heads} heads, {models[j].name} {tokens[j]} and "
                             f"{models[j].net.num_heads}")
    sums = {pair: {l: 0.0 for l in layers} for pair in pairs}
    for batch in images.split(batch_size):
        qk = [attention_qk(m, batch, layers) for m in models]
        for i, j in pairs:
            for l in layers:
                sums[(i, j)][l] = sums[(i, j)][l] + head_jsd(qk[i][l], qk[j][l]).double().cpu()
    rows = images.shape[0] * tokens[0]  # images x query rows
    return {f"{i}-{j}": {l: summarize(s / rows) for l, s in per.items()} for (i, j), per in sums.items()}


def summarize(matrix):
    """(H, H) mean JSD of every head pair -> index-matched and best-matched means, which heads matched, per head."""
    best = matrix.min(1)  # each head of the first model with its closest head of the second
    return dict(index=matrix.diagonal().mean().item(), best=best.values.mean().item(),
                best_heads=best.indices.tolist(), per_head=matrix.diagonal().tolist())


def cls_attention(model, images, layers):
    """{layer: (B, H, g, g)}: each head's attention from the CLS query (the mean query without one) to the patches."""
    g, out = model.net.grid, {}
    for l, (q, k) in attention_qk(model, images, layers).items():
        rows = vit.attention_map(q[:, :, :1], k) if model.net.arch.get("class_token", True) else \
            vit.attention_map(q, k).mean(2, keepdim=True)  # (B, H, 1, N)
        out[l] = rows[:, :, 0, -g * g:].unflatten(-1, (g, g)).cpu()  # the patches are the last g*g tokens
    return out


def heat(maps, size):
    """Maps (n, g, g) -> RGB (n, 3, size, size): each scaled to 0..1, upsampled (nearest), on the 'hot' ramp
    (black, red, yellow, white)."""
    lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    x = F.interpolate(((maps - lo) / (hi - lo).clamp_min(1e-12))[:, None], size=(size, size), mode="nearest")
    return torch.cat([(3 * x - i).clamp(0, 1) for i in range(3)], dim=1)


@torch.no_grad()
def pictures(models, images, names, layers, path, mean_heads=False, size=None):
    """Draws the PNG (module docstring) of images (B, 3, S, S) whose classes are `names` at `size` px a cell; returns
    its layout: what each row and column is, where the cells start (origin) and their pitch (cell + 2 px)."""
    size = size or images.shape[-1]
    shown = images.cpu() * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)
    shown = F.interpolate(shown.clamp(0, 1), size=(size, size), mode="nearest")
    maps = [cls_attention(m, images, layers) for m in models]
    cells, rows, labels = [], [], []  # rows: for the JSON (full model names); labels: drawn (method names)
    for b in range(len(images)):
        for l in layers:
            if mean_heads:
                cells.append([shown[b]] + [heat(a[l][b].mean(0, keepdim=True), size)[0] for a in maps])
                rows.append(f"image {b} ({names[b]}), layer {l}")
                labels.append(f"{names[b]}, layer {l}")
            for m, a in zip(models, maps if not mean_heads else []):
                cells.append([shown[b], *heat(a[l][b], size)])
                rows.append(f"image {b} ({names[b]}), layer {l}, {m.name}")
                labels.append(f"{names[b]}, layer {l}, {m.info['method']}")
    width = max(map(len, cells))
    columns = ["image"] + ([m.name for m in models] if mean_heads else [f"head {h}" for h in range(width - 1)])
    heads = [m.info["method"] for m in models] if mean_heads else columns[1:]
    blank = torch.zeros(3, size, size)  # where a model has fewer heads than the widest
    grid = torchvision.utils.make_grid(torch.stack([c for r in cells for c in r + [blank] * (width - len(r))]),
                                       nrow=width, padding=2, pad_value=1.0)
    font, pitch = ImageFont.load_default(), size + 2
    left = 6 + int(max(font.getlength(t) for t in labels))
    canvas = Image.new("RGB", (left + grid.shape[2], 14 + grid.shape[1]), "white")
    canvas.paste(torchvision.transforms.functional.to_pil_image(grid), (left, 14))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(labels):
        draw.text((2, 14 + 2 + pitch * r + (size - 11) // 2), text, fill="black", font=font)
    for c, text in enumerate(["image"] + heads):
        draw.text((left + 2 + pitch * c, 1), text, fill="black", font=font)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", MARK)
    write_atomic(path, lambda f: canvas.save(f, format="PNG", pnginfo=info))
    return dict(path=path, rows=rows, columns=columns, origin=[left, 14], pitch=pitch)


def analysis_images(models, args):
    """The same --analysis_images val images (class-balanced, fixed by --seed) for every model, on args.device,
    and their class names."""
    sizes = {m.net.arch["img_size"] for m in models}
    if len(sizes) > 1:
        raise ValueError(f"--jsd / --pictures show the models the same images, but their input sizes differ {sizes}")
    ds, _ = data.build_dataset(args.dataset, args.data_path, "val", sizes.pop(), seed=args.seed)
    keep = data.balanced_subset(ds.labels, min(args.analysis_images, len(ds)), args.seed).tolist()
    return torch.stack([ds[i][0] for i in keep]).to(args.device), [args.names[ds[i][1]] for i in keep]


# ------------------------------------------------------------------------------------------------ specificity
def specificity_teacher(args):
    """--specificity's teacher loaded as the method scripts load one (vit.load_pretrained, --teacher_heads), seeing its
    images re-normalised with --teacher_mean / --teacher_std, else the statistics it records, else data.MEAN / STD."""
    net, report = vit.load_pretrained(args.specificity, num_heads=args.teacher_heads)
    mean = tuple(args.teacher_mean or report["mean"] or data.MEAN)
    std = tuple(args.teacher_std or report["std"] or data.STD)
    return Model(args.specificity, net.eval(), train.Method(net).eval(), dict(method="teacher", weights="model"),
                 report["fresh"], mean=mean, std=std)


@torch.no_grad()
def specificity(model, loader, device="cpu"):
    """How image-specific each layer's attention is over the images of loader (batches of (images, labels)), all the
    model's layers: -> (specificity, entropy), one float per layer, nats.

    specificity: the mean over images, heads and query rows (the CLS row too) of JSD(the image's attention row, the
    same row of the mean map), where the mean map is the average of softmax(q k^T / sqrt(d)) over the images, per
    layer, head and query row; 0 when every image gets the same map, at most ln 2. entropy: the mean entropy of the
    attention rows. Two passes over the loader, the mean maps first, so besides the mean maps (depth, H, N, N) only
    one batch's q, k (of every layer) and maps (of one layer, (B, H, N, N)) exist at once: a ViT-B at 224 px peaks
    at 3.8 GB on the CPU at batch 64, whatever the number of images."""
    layers = list(range(model.net.depth))
    sums = {l: 0.0 for l in layers}  # becomes (H, N, N) float64 per layer
    count = 0
    for images, _ in loader:
        count += len(images)
        for l, (q, k) in attention_qk(model, images.to(device), layers).items():
            sums[l] = sums[l] + vit.attention_map(q, k).double().sum(0)
    mean_map = {l: s / count for l, s in sums.items()}  # (H, N, N)
    divergence = {l: 0.0 for l in layers}
    entropy = {l: 0.0 for l in layers}
    for images, _ in loader:
        for l, (q, k) in attention_qk(model, images.to(device), layers).items():
            p = vit.attention_map(q, k).double()  # (B, H, N, N)
            divergence[l] += jsd(p, mean_map[l]).sum().item()  # the mean map broadcast over the batch
            entropy[l] += -torch.xlogy(p, p).sum().item()
    heads, tokens = mean_map[0].shape[:2]
    rows = count * heads * tokens  # images x heads x query rows
    return [divergence[l] / rows for l in layers], [entropy[l] / rows for l in layers]


def specificity_result(args):
    """--specificity: the teacher's per-layer specificity and entropy on --val_subset val images (default 512),
    class-balanced (--seed) and unaugmented, of --dataset (default: CIFAR-10 without --data_path, else a folder)."""
    model = specificity_teacher(args)
    dataset = args.dataset or ("folder" if args.data_path else "cifar10")
    size = model.net.arch["img_size"]
    ds, _ = data.build_dataset(dataset, args.data_path, "val", size, subset=args.val_subset or 512, seed=args.seed)
    loader = torch.utils.data.DataLoader(ds, args.batch_size, num_workers=args.num_workers,
                                         pin_memory=args.device.startswith("cuda"))
    model.method.to(args.device)
    spec, entropy = specificity(model, loader, args.device)
    file = vit.resolve(args.specificity)
    return dict(written_by=MARK, teacher=args.specificity, teacher_sha256=teacher.sha256(file),
                arch=model.net.arch, mean=list(model.mean), std=list(model.std), dataset=dataset,
                data_path=args.data_path or "", images=len(ds), seed=args.seed, heads=model.net.num_heads,
                tokens=model.net.grid ** 2 + model.net.num_prefix_tokens, specificity=spec, entropy=entropy)


def specificity_table(result):
    """--specificity's result as text for stderr: a line per layer."""
    lines = [f"{result['teacher']}: attention specificity (JSD to the mean map, nats, 0..{math.log(2):.3f}) and row "
             f"entropy (nats, 0..{math.log(result['tokens']):.3f}) on {result['images']} {result['dataset']} val "
             f"images, {result['heads']} heads, {result['tokens']} tokens, mean {result['mean']} std {result['std']}"]
    for l, (spec, entropy) in enumerate(zip(result["specificity"], result["entropy"])):
        lines.append(f"layer {l:<3d} specificity {spec:.4f}  entropy {entropy:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the script
def parse_layers(flag, spec, depth):
    """A slice of range(depth) like ':' or '-3:', or a list like '0,3,5' (as the method scripts' --layers)."""
    try:
        layers = (list(range(depth))[slice(*(int(s) if s.strip() else None for s in spec.split(":")))]
                  if ":" in spec else sorted({int(s) for s in spec.split(",")}))
    except (ValueError, TypeError):
        raise ValueError(f"{flag} {spec!r} is neither a slice like ':-6' nor a list like '0,3,5'") from None
    bad = [l for l in layers if not 0 <= l < depth]
    if bad or not layers:
        raise ValueError(f"{flag} {spec}: " + (f"layer {bad[0]} is out of range" if bad else "selects no layer") +
                         f": the models analysed share layers 0-{depth - 1}")
    return layers


def written_here(path):
    """Whether an existing file is an output of this script: a PNG or JSON carrying MARK."""
    try:
        with Image.open(path) as im:
            return im.info.get("Software") == MARK
    except Exception:
        pass
    try:
        with open(path, "rb") as f:  # the first byte first: a checkpoint is never read whole
            return f.read(1) == b"{" and json.loads(b"{" + f.read()).get("written_by") == MARK
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return False


def check_writable(flag, path):
    """Before any work: the folder exists, and an existing file is this script's own output (never a checkpoint)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {path}: there is no folder {folder}; create it first")
    if os.path.exists(path) and not (os.path.isfile(path) and written_here(path)):
        raise ValueError(f"{flag} {path} exists and is not an output of evaluate.py: refusing to replace it; "
                         "give another file name")


def write_atomic(path, write):
    """write(binary file) into a temporary file beside path, then rename it: path holds the old output or the new."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def table(result):
    """The accuracy side by side (and top-1 per class, up to 20 classes) and the JSD, as text for stderr."""
    lines = [f"{m['name']}: {m['method']}, {m['weights']} weights" + (f", teacher {m['teacher']}" if m.get("teacher")
                                                                     else "") for m in result["models"]]
    acc = result.get("accuracy")
    if acc:
        lines.append(f"{'top-1 / top-5 (%)':40s}" + "".join(f"{s + ' (' + str(r['images']) + ')':>18s}"
                                                          for s, r in acc.items()))
        rows = [(m["name"], [r["models"][i] for r in acc.values()]) for i, m in enumerate(result["models"])]
        if all("ensemble" in r for r in acc.values()):
            rows.append((f"ensemble ({result['ensemble']})", [r["ensemble"] for r in acc.values()]))
        lines += [f"{n[-40:]:40s}" + "".join(f"{s['acc1']:>11.2f} /{s['acc5']:>5.1f}" for s in row) for n, row in rows]
        lines += [f"  {n[-38:]}: " + ", ".join(f"{c} {a:.1f}" for c, a in row[0]["per_class"].items())
                  for n, row in rows if len(row[0]["per_class"]) <= 20]
    if "jsd" in result:
        pairs, models = result["jsd"]["pairs"], ", ".join(f"{i} {n}" for i, n in enumerate(result["jsd"]["models"]))
        lines += [f"attention JSD (nats, 0..{math.log(2):.3f}), heads matched by index / best; models: {models}",
                  "layer" + "".join(f"{p:>18s}" for p in pairs)]
        lines += [f"{l:<5d}" + "".join(f"{p[l]['index']:>10.4f}/{p[l]['best']:.4f}" for p in pairs.values())
                  for l in next(iter(pairs.values()))]
    return "\n".join(lines)


def read_wnids(args):
    """The 1000 ImageNet classes in the models' output order: a text file (one wnid a line) or a folder whose sorted
    sub-folders are the classes; default <data_path>/train, the ImageFolder order train.py trained with."""
    source = args.wnids or os.path.join(args.data_path, "train")
    if os.path.isfile(source) or os.path.isdir(source):
        return open(source).read().split() if os.path.isfile(source) else data.class_folders(source)
    raise FileNotFoundError(f"--ood needs the models' ImageNet classes: no {source}; pass --wnids FILE (one wnid a "
                            "line, in output order) or --data_path holding the ImageNet train/ folder")


def evaluate(args):
    """Everything but writing the JSON: -> the result (module docstring). All input is checked before the long part."""
    models = [load_model(c, args) for c in args.checkpoints]
    for m in models:  # before the data is looked for: a teacher name records none
        if (m.fresh or not m.net.arch["num_classes"]) and (not args.no_val or args.ood):
            raise ValueError(f"{m.name} has no trained classifier (untrained: {', '.join(m.fresh) or 'no head'}): "
                             f"it is a pre-trained encoder, with no accuracy to measure; fine-tune it (train.py "
                             f"--finetune {m.name}), or only analyse its attention (--no_val with --jsd or --pictures)")
    averaged = [m.name for m in models if m.info.get("average", "none") != "none"]
    if args.analysed and averaged:  # attention_qk would show the teacher's per-image maps, not the averaged ones
        raise ValueError(f"{averaged[0]} copies averaged maps (--average): --jsd and --pictures analyse per-image "
                         "attention; evaluate its accuracy only")
    needs_images = not args.no_val or args.analysed
    if needs_images and args.dataset is None and args.data_path is None and "dataset" not in models[0].config:
        raise ValueError(f"{models[0].name} records no dataset (a training run's checkpoint.pth does): "
                         "pass --dataset and --data_path of the images to evaluate it on (--dataset cifar10 finds "
                         "CIFAR-10 by itself)")
    args.dataset = args.dataset or models[0].config.get("dataset") or "folder"
    args.data_path = args.data_path if args.data_path is not None else models[0].config.get("data_path", "")
    args.names = data.class_names(args.dataset, args.data_path) if needs_images else None
    args.wnids = read_wnids(args) if args.ood else None
    if len(models) > 1 and args.ensemble != "none" and len({m.net.arch["num_classes"] for m in models}) > 1:
        counts = ", ".join(f"{m.name}: {m.net.arch['num_classes']}" for m in models)
        raise ValueError(f"models with different class counts cannot be ensembled ({counts}): pass --ensemble none")
    result = dict(written_by=MARK, models=[dict(name=m.name, **m.info, arch=m.net.arch) for m in models],
                  ensemble=args.ensemble)
    if args.analysed:
        analysed = ([teacher_model(models, args)] if args.with_teacher else []) + models
        depth = min(m.net.depth for m in analysed)
        layers = parse_layers("--layers", args.layers, depth)
        shown = parse_layers("--picture_layers", args.picture_layers or f"0,{depth // 2},{depth - 1}", depth)
        if args.jsd and len(analysed) < 2:
            raise ValueError("--jsd compares models: give two checkpoints, or one with --with_teacher")
        images, names = analysis_images(analysed, args)
    for m in models + (analysed[:1] if args.with_teacher else []):
        m.method.to(args.device)
    if not args.no_val or args.ood:
        result["accuracy"] = accuracy(models, args)
    if args.jsd:
        result["jsd"] = dict(images=len(images), classes=names, models=[m.name for m in analysed],
                             pairs=attention_jsd(analysed, images, layers, args.batch_size))
    if args.pictures:
        result["pictures"] = pictures(analysed, images[:args.picture_images], names, shown, args.pictures,
                                      args.picture_heads == "mean", args.picture_size)
    return result


def plot_curves(files, path):
    """One PNG, the only use of matplotlib in this repository (pip install matplotlib). From train.py's log.jsonl
    files (a line an epoch): top-1 per epoch of each run. From this script's outputs, one per run, named METHOD_epE.json
    (or eval_METHOD_epE.json) where E is the teacher's pre-training epochs, plus one from scratch: the share of the
    scratch-to-fine-tune gap that each method recovers, against E (README "Results": the teacher curve). From one
    manifest of teachers (teacher_shares): each teacher's shares of the gap against its attention's specificity."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--curves draws with matplotlib, which is not installed: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if len(files) == 1 and files[0].endswith(".json") and "teachers" in read_json(files[0]):
        points = teacher_shares(files[0])
        x = [spec for spec, _ in points.values()]
        for i, method in enumerate(("copy", "distillation")):
            ax.scatter(x, [shares[method] for _, shares in points.values()], marker="os"[i], label=method)
        for name, (spec, shares) in points.items():
            ax.annotate(name, (spec, max(shares.values())), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(100, color="gray", lw=0.8, ls="--")
        ax.set(xlim=(0, 1.4 * max(x)), ylim=(0, 105),
               xlabel="teacher's attention specificity (nats, mean over layers)",
               ylabel="share of the scratch-to-fine-tune gap (%)", title="what attention transfer recovers")
    elif all(f.endswith(".json") for f in files):
        curves = gap_shares(files)
        for method, (epochs, shares) in curves.items():
            ax.plot(epochs, shares, marker="o", label=method)
        ax.axhline(100, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="teacher's MAE pre-training epochs", ylabel="share of the scratch-to-fine-tune gap (%)",
               title="what attention transfer recovers", xticks=sorted({e for es, _ in curves.values() for e in es}))
    else:
        for log in files:
            with open(log) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if not rows or "val_acc1" not in rows[0]:
                raise ValueError(f"{log} is not a log.jsonl of a classifier run (no val_acc1): pass train.py's logs")
            name = os.path.splitext(os.path.basename(log))[0]
            name = os.path.basename(os.path.dirname(os.path.abspath(log))) if name == "log" else name
            ax.plot([r["epoch"] + 1 for r in rows], [r["val_acc1"] for r in rows], marker="o", label=name)
        ax.set(xlabel="epoch", ylabel="top-1 (%), validation images", title="top-1 per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", metadata={"Software": MARK}))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def top1_of(ref, where):
    """A top-1 an evaluate.py output holds: REF is its path (an output of one model) or [path, model name] (the
    checkpoint's name as the output records it, for an output of several models)."""
    if not (isinstance(ref, str) or isinstance(ref, list) and len(ref) == 2):
        raise ValueError(f"{where}: {ref!r} is neither a file nor [file, model name]")
    path, name = (ref, None) if isinstance(ref, str) else ref
    out = read_json(path)
    if not (isinstance(out, dict) and "val" in out.get("accuracy", {})):
        raise ValueError(f"{where}: {path} is not an evaluate.py output with top-1 on the val images")
    models, accs = out.get("models", [{}]), out["accuracy"]["val"]["models"]
    if name is None:
        if len(accs) != 1:
            raise ValueError(f"{where}: {path} holds {len(accs)} models: name one, [\"{path}\", MODEL]")
        return accs[0]["acc1"]
    names = [m.get("name") for m in models]
    if name not in names:
        raise ValueError(f"{where}: {path} has no model {name!r} (it has {', '.join(map(str, names))})")
    return accs[names.index(name)]["acc1"]


def teacher_shares(manifest):
    """README "When attention transfer works at this scale": each teacher's share of the gap against how
    image-specific its attention is. MANIFEST (JSON) names the files: {"scratch": [REF, ...], "teachers": {NAME:
    {"specificity": its --specificity output, "top": [REF, ...], "copy": [...], "distillation": [...]}}}, where a REF
    is an evaluate.py output (see top1_of), one per seed, and "top" is the top of the teacher's gap: its fine-tuned
    students (or the teacher itself, where it cannot seed the student). -> {NAME: (mean specificity over layers,
    {method: % of the gap from scratch's mean top-1 to top's mean, of the method's mean})}."""
    m = read_json(manifest)

    def mean(refs, where):
        if not refs:
            raise ValueError(f"{manifest}: {where} names no evaluate.py output")
        return sum(top1_of(r, f"{manifest}, {where}") for r in refs) / len(refs)

    scratch = mean(m.get("scratch"), "scratch")
    points = {}
    for name, t in m["teachers"].items():
        missing = sorted({"specificity", "top", "copy", "distillation"} - set(t))
        if missing:
            raise ValueError(f"{manifest}: teacher {name!r} names no {', '.join(missing)}")
        spec = read_json(t["specificity"]).get("specificity")
        if not spec:
            raise ValueError(f"{manifest}: {t['specificity']} is not an evaluate.py --specificity output")
        top = mean(t.get("top"), f"{name}'s top")
        if top <= scratch:
            raise ValueError(f"{manifest}: {name}'s top ({top:.2f}) is not above scratch's ({scratch:.2f}): no gap")
        points[name] = (sum(spec) / len(spec), {k: 100 * (mean(t.get(k), f"{name}'s {k}") - scratch) / (top - scratch)
                                                for k in ("copy", "distillation")})
    return points


def gap_shares(files):
    """evaluate.py outputs named [eval_]METHOD_epE.json and one scratch -> {method: (teacher epochs, % of the gap)},
    where the gap at E is fine-tune_epE's top-1 minus scratch's."""
    top1, scratch = {}, None
    for f in files:
        name = os.path.basename(f).removesuffix(".json").removeprefix("eval_")
        acc = read_json(f)["accuracy"]["val"]["models"][0]["acc1"]
        method, _, epoch = name.rpartition("_ep")
        if name == "scratch":
            scratch = acc
        elif method and epoch.isdigit():
            top1.setdefault(method, {})[int(epoch)] = acc
        else:
            raise ValueError(f"{f}: name it METHOD_epE.json (E: the teacher's pre-training epochs) or scratch.json")
    if scratch is None or "finetune" not in top1:
        raise ValueError("the gap needs scratch.json and finetune_epE.json among the files")
    ft = top1.pop("finetune")
    if not top1:
        raise ValueError("no METHOD_epE.json but fine-tune's among the files: add copy's or distillation's")
    missing = sorted({e for by in top1.values() for e in by} - set(ft))
    if missing:
        raise ValueError(f"no finetune_ep{missing[0]}.json among the files: the gap at {missing[0]} epochs needs it")
    return {m: (sorted(by), [100 * (by[e] - scratch) / (ft[e] - scratch) for e in sorted(by)])
            for m, by in top1.items()}


def main(argv=None):
    p = train.Parser(description="Evaluate checkpoints: accuracy, ensembles, distribution shift, and "
                     "attention analysis.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="checkpoint files (this repository's, or any ViT "
                   "vit.load_pretrained reads: MAE, timm, DeiT, DINO) or teacher names; with --curves, log.jsonl "
                   "files or this script's outputs; none with --specificity")
    p.add_argument("--curves", metavar="PNG", help="only draw (matplotlib): top-1 per epoch of log.jsonl files, or "
                   "the share of the gap against teacher epochs of this script's METHOD_epE.json outputs, or against "
                   "specificity from one manifest of teachers (README \"When attention transfer works at this scale\")")
    p.add_argument("--ema", action="store_true", help="EMA weights where a checkpoint has them (raw otherwise)")
    p.add_argument("--teacher", help="the teacher file for copy checkpoints / --with_teacher, instead of the recorded")
    p.add_argument("--teacher_heads", type=int, help="heads per layer, for a file that does not record them")
    p.add_argument("--specificity", metavar="TEACHER", help="only this: how image-specific the attention of TEACHER "
                   "(a name or file, as the method scripts take it) is, per layer, on --val_subset val images (512 "
                   "if not given) of --dataset (default: CIFAR-10 without --data_path, else folder)")
    p.add_argument("--teacher_mean", type=teacher.finite, nargs=3, help="--specificity's teacher's input mean "
                   "(default: its record)")
    p.add_argument("--teacher_std", type=train.in_range(0, math.inf, low_open=True), nargs=3,
                   help="--specificity's teacher's input std (default: its record)")
    p.add_argument("--dataset", choices=["folder", "cifar10", "cifar100", "fake"],
                   help="default: what the first checkpoint was trained on, else folder")
    p.add_argument("--data_path", help="default: what the first checkpoint was trained on")
    p.add_argument("--val_subset", type=int, help="evaluate on this many val images (class-balanced, --seed)")
    p.add_argument("--no_val", action="store_true", help="no accuracy on the val set (only --ood, or only analysis)")
    p.add_argument("--ood", nargs="+", default=[], metavar="KIND=PATH", help="ImageNet-V2/-A/-R/-Sketch folders: "
                   "v2=PATH a=PATH r=PATH sketch=PATH")
    p.add_argument("--wnids", help="the models' ImageNet classes for --ood: a file (one wnid a line, in output "
                   "order) or a folder of class folders; default <data_path>/train")
    p.add_argument("--ensemble", default="probs", choices=["probs", "logits", "none"],
                   help="average softmax probabilities or logits of several checkpoints")
    p.add_argument("--jsd", action="store_true", help="per-layer JSD between the attention maps of every two models")
    p.add_argument("--layers", default=":", help="layers for --jsd: a slice like ':' or '-3:', or a list '0,3,5'")
    p.add_argument("--pictures", metavar="PNG", help="draw the attention pictures into this file")
    p.add_argument("--picture_layers", help="layers to draw (default: first, middle, last)")
    p.add_argument("--picture_images", type=int, default=2, help="draw this many of the analysis images")
    p.add_argument("--picture_heads", default="all", choices=["all", "mean"],
                   help="a row per model and a column per head, or a row per image and a column per model")
    p.add_argument("--picture_size", type=int, help="pixels per picture cell (default: the input size)")
    p.add_argument("--analysis_images", type=int, default=64, help="val images for --jsd and --pictures")
    p.add_argument("--with_teacher", action="store_true",
                   help="add the first copy/distill checkpoint's teacher as model 0 of --jsd and --pictures")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast for accuracy (auto: bf16 on GPU, none on CPU); the attention analysis is fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON result here instead of stdout")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    train.check_device(args.device)
    args.amp = ("bf16" if args.device.startswith("cuda") else "none") if args.amp == "auto" else args.amp
    args.progress, args.analysed = not args.no_progress and sys.stderr.isatty(), args.jsd or bool(args.pictures)
    ood = [s.split("=", 1) for s in args.ood]
    if any(len(s) != 2 or s[0] not in ("v2", "a", "r", "sketch") for s in ood):
        raise ValueError(f"--ood takes KIND=PATH with KIND v2, a, r or sketch, not {' '.join(args.ood)}")
    args.ood = dict(ood)
    for flag in ("batch_size", "val_subset", "teacher_heads", "picture_images", "picture_size", "analysis_images"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.with_teacher and not args.analysed:
        raise ValueError("--with_teacher adds the teacher to --jsd / --pictures: pass one of them")
    if args.specificity and (args.checkpoints or args.analysed or args.ood or args.curves or args.ema or args.teacher):
        raise ValueError("--specificity TEACHER analyses its teacher alone: give no checkpoints, --jsd, --pictures, "
                         "--ood, --curves, --ema or --teacher with it")
    if not args.specificity and (args.teacher_mean or args.teacher_std):
        raise ValueError("--teacher_mean / --teacher_std are the input statistics of --specificity's teacher: pass "
                         "--specificity TEACHER")
    if not args.specificity and not args.checkpoints:
        raise ValueError("give the checkpoints to evaluate, or --specificity TEACHER")
    for flag, path in (("--output", args.output), ("--pictures", args.pictures), ("--curves", args.curves)):
        if path:
            check_writable(flag, path)
    if args.curves:
        return plot_curves(args.checkpoints, args.curves)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone (data.py and the logs print)
        result = specificity_result(args) if args.specificity else evaluate(args)
    print(specificity_table(result) if args.specificity else table(result), file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.output:
        write_atomic(args.output, lambda f: f.write((text + "\n").encode()))
    print(f"wrote {args.output}" if args.output else text, file=sys.stderr if args.output else sys.stdout)
    return result


if __name__ == "__main__":
    run_safety.cli(main)

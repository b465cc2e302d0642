"""evaluate.py: accuracy, distribution shift, ensembles, and attention-map distances and pictures (method.md,
"Variants the paper studies": ensemble, distribution shift, analysis).

Every checkpoint runs the way it was trained to: a scratch, fine-tuned or distilled student alone; an attention-copy
student with the teacher its checkpoint records (by name or path, checked by sha256; --teacher points elsewhere).
The logits of each model are collected once per image set and reused for its own numbers and the ensemble's.

    python evaluate.py runs/distill/checkpoint.pth --ema            # dataset and data_path from the checkpoint
    python evaluate.py ft.pth distill.pth --data_path /imagenet --ood v2=/data/imagenetv2 a=/data/imagenet-a \
        r=/data/imagenet-r sketch=/data/imagenet-sketch --output result.json
    python evaluate.py runs/copy/checkpoint.pth runs/distill/checkpoint.pth runs/scratch/checkpoint.pth \
        --with_teacher --no_val --jsd --pictures attention.png     # the attention analysis only

One JSON object goes to stdout (or --output FILE); tables and logs go to stderr.
  accuracy  per image set (val unless --no_val, then each --ood set): top-1, top-5 (%) and loss of every model and of
            their ensemble: the mean of the softmax probabilities (--ensemble probs) or of the logits. ImageNet-A/-R
            keep only the logits of their 200 classes (data.restrict_logits), for each model before any averaging.
            The models' output classes for --ood: --wnids (a file, one wnid a line in output order, or a folder of
            class folders, sorted), by default <data_path>/train: the ImageFolder order train.py trained with.
  jsd       per layer and pair of models: the Jensen-Shannon divergence (natural log, 0..ln 2) between their attention
            maps on the same images, averaged over images and query rows, head h against head h ("index", then the
            mean over heads) and each head of the first model against its closest head of the second ("best").
  pictures  a PNG grid; for each picture image and layer (--picture_layers), one row per model: the image, then each
            head's CLS-query attention over the patches (CLS column dropped, scaled to 0..1 per map, black-red-yellow-
            white), upsampled (nearest) to the image size. The JSON lists what each row and column is.
A copy student's maps are the ones it runs with: the teacher's q and/or k in the heads and layers it copies.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import copy_attention
import data
import train
import vit

COPY_MODES = ("copy", "copy_q", "copy_k")


@dataclasses.dataclass
class Model:
    """A model ready to evaluate: method.predict(net, images) gives its logits (a copy student runs its teacher)."""
    name: str
    net: vit.VisionTransformer
    method: train.Baseline
    info: dict  # what the result records about it
    fresh: list = dataclasses.field(default_factory=list)  # untrained tensors (a pre-trained encoder has no head)
    record: dict = dataclasses.field(default_factory=dict)  # the checkpoint's 'method' (teacher, layers, ...)
    config: dict = dataclasses.field(default_factory=dict)  # the checkpoint's 'config' (dataset, data_path, ...)


def load_model(path, ema=False, teacher=None):
    """A checkpoint file (or a vit.TEACHERS name) -> Model on the CPU in eval mode."""
    ckpt = vit.load_file(vit.resolve(path))
    if not (isinstance(ckpt, dict) and "arch" in ckpt and isinstance(ckpt.get("model"), dict)):
        net, report = vit.load_pretrained(path)  # MAE, timm, DeiT, DINO: architecture inferred from the shapes
        return Model(path, net.eval(), train.Baseline(net).eval(), dict(method="pre-trained", weights="model"),
                     report["fresh"])
    arch, record, config = ckpt["arch"], ckpt.get("method") or {}, ckpt.get("config") or {}
    check_config(path, arch, config)
    weights = "ema" if ema and ckpt.get("ema") else "model"  # a model trained without EMA is evaluated raw
    net = vit.VisionTransformer(**arch)
    try:
        report = vit.load_state(net, ckpt[weights])
    except ValueError as e:
        raise ValueError(f"{path}: its weights do not fit the architecture it records ({e})") from None
    method = record.get("mode") or ("fine-tune" if config.get("finetune") else
                                    "mae pre-training" if "mask_ratio" in config else "scratch")
    info = dict(method=method, weights=weights, teacher=record.get("teacher"))
    if method not in COPY_MODES:
        return Model(path, net.eval(), train.Baseline(net).eval(), info, report["fresh"], record, config)
    source = find_teacher(path, record, teacher)
    with contextlib.redirect_stdout(sys.stderr):  # CopyAttention prints its plan; stdout is for the JSON
        copy = copy_attention.CopyAttention(net, source, ",".join(map(str, record["layers"])), record["heads"],
                                            record["mode"])
    check_sha(path, record, source, copy.teacher_sha256)
    info.update(teacher=source, layers=copy.layers, heads=copy.heads)
    return Model(path, net.eval(), copy.eval(), info, report["fresh"], record, config)


def check_config(path, arch, config):
    """The preset and input size in a checkpoint's config must describe the architecture it records."""
    if config.get("model") not in vit.PRESETS:
        return
    img, patch, dim, depth, heads = vit.PRESETS[config["model"]]
    said = dict(img_size=config.get("input_size", img), patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
    diff = [f"{k} {v} vs {arch.get(k)}" for k, v in said.items() if arch.get(k) != v]
    if diff:
        raise ValueError(f"{path}: its config says {config['model']} at {said['img_size']} px, but its recorded arch "
                         f"differs ({', '.join(diff)}): the file was edited or mixed up; use the original")


def find_teacher(path, record, override):
    """The teacher a transfer checkpoint records (a vit.TEACHERS name or a file), or --teacher instead."""
    source = override or record.get("teacher")
    if source and os.path.isfile(source):
        return source
    if source in vit.TEACHERS:
        try:
            vit.resolve(source)  # a shipped file, or downloaded once into torch.hub's cache
            return source
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"{path} needs its teacher {source}: {e}; or pass --teacher PATH") from None
    if override:
        raise FileNotFoundError(f"--teacher {override} is not a file or a teacher name ({', '.join(vit.TEACHERS)})")
    raise FileNotFoundError(f"{path} needs its teacher {source}, which is not a file here: pass --teacher PATH "
                            "pointing at the teacher it was trained with")


def check_sha(path, record, source, sha):
    if record.get("teacher_sha256") and sha != record["teacher_sha256"]:
        raise ValueError(f"teacher {source} is not the one {path} was trained with (sha256 {sha[:12]}..., recorded "
                         f"{record['teacher_sha256'][:12]}...): pass --teacher PATH pointing at that file")


def load_teacher(models, override):
    """The recorded teacher of the first transfer model, as a model of its own attention (--with_teacher)."""
    model = next((m for m in models if m.record.get("teacher")), None)
    if model is None:
        raise ValueError("--with_teacher: none of the checkpoints records a teacher (only copy and distill do)")
    if isinstance(model.method, copy_attention.CopyAttention):
        net, source = model.method.teacher, model.info["teacher"]
    else:
        source = find_teacher(model.name, model.record, override)
        net, _ = vit.load_pretrained(source, img_size=model.net.arch["img_size"])
        check_sha(model.name, model.record, source, copy_attention.sha256(vit.resolve(source)))
    return Model(f"teacher {source}", net.eval(), train.Baseline(net).eval(), dict(method="teacher", weights="model"))


# ------------------------------------------------------------------------------------------------ accuracy
def image_sets(args, size):
    """-> [(name, dataset, class_index, num_classes)] at image size `size`: val unless --no_val, then the --ood sets.
    Models of different input sizes see the same images in the same order."""
    sets = []
    if not args.no_val:
        ds, k = data.build_dataset(args.dataset, args.data_path, "val", size, subset=args.val_subset, seed=args.seed)
        sets.append(("val", ds, None, k))
    for kind, root in args.ood.items():
        ds, index = data.build_ood_dataset(kind, root, size, args.wnids)
        sets.append((kind, ds, index, len(args.wnids)))
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
            out = model.method.predict(model.net, images.to(args.device, non_blocking=True))
        logits.append(data.restrict_logits(out.float(), class_index).cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def scores(logits, labels):
    """Top-1 and top-5 (%) and mean cross-entropy of logits or log-probabilities (N, K), as train.evaluate counts."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return dict(acc1=100 * (top5[:, 0] == labels).double().mean().item(),
                acc5=100 * (top5 == labels[:, None]).any(1).double().mean().item(),
                loss=F.cross_entropy(logits.double(), labels).item())


def ensemble(logits, how):
    """Several models' (N, K) logits -> the ensemble's: log of the mean softmax probability, or the mean logit."""
    stacked = torch.stack(logits)  # (M, N, K)
    if how == "logits":
        return stacked.mean(0)
    return torch.logsumexp(F.log_softmax(stacked.double(), -1), 0) - math.log(len(logits))


def accuracy(models, args):
    """{set: {images, models: [scores of each model], ensemble: scores}} over val and the --ood sets."""
    sets = {size: image_sets(args, size) for size in {m.net.arch["img_size"] for m in models}}  # once per size
    results = {}
    for i, name in enumerate(s[0] for s in next(iter(sets.values()))):
        logits = []
        for m in models:
            _, ds, index, k = sets[m.net.arch["img_size"]][i]
            if m.net.arch["num_classes"] != k:
                raise ValueError(f"{m.name} has {m.net.arch['num_classes']} classes but {name} has {k}: evaluate it "
                                 "on the dataset it was trained for (--dataset, --data_path, --wnids)")
            out, labels = collect_logits(m, ds, args, index, desc=f"{name} {m.name}")
            logits.append(out)
        results[name] = dict(images=len(labels), models=[scores(l, labels) for l in logits])
        if len(models) > 1 and args.ensemble != "none":
            results[name]["ensemble"] = scores(ensemble(logits, args.ensemble), labels)
    return results


# ------------------------------------------------------------------------------------------------ attention
@torch.no_grad()
def attention_qk(model, images, layers):
    """{layer: (q, k)}, each (B, H, N, D), of the attention the model runs with."""
    inject = {}
    if isinstance(model.method, copy_attention.CopyAttention):
        inject = model.method.inject(model.method.teacher_qkv(images, None))
    _, qkv = model.net.forward_features(images, inject=inject, collect=layers)
    out = {}
    for l, (q, k, _) in qkv.items():  # forward_features hands out each block's own q, k: apply the copy to them too
        q_ext, k_ext = inject.get(l, (None, None))
        out[l] = (q if q_ext is None else vit._replace_heads(q, q_ext, "q"),
                  k if k_ext is None else vit._replace_heads(k, k_ext, "k"))
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
    for i, j in pairs:
        a, b = models[i].net, models[j].net
        if (a.grid, a.num_heads) != (b.grid, b.num_heads):
            raise ValueError(f"--jsd compares maps of equal shape, but {models[i].name} has {a.grid ** 2 + 1} tokens "
                             f"and {a.num_heads} heads, {models[j].name} {b.grid ** 2 + 1} and {b.num_heads}")
    sums = {pair: {l: 0.0 for l in layers} for pair in pairs}
    for batch in images.split(batch_size):
        qk = [attention_qk(m, batch, layers) for m in models]
        for i, j in pairs:
            for l in layers:
                sums[(i, j)][l] = sums[(i, j)][l] + head_jsd(qk[i][l], qk[j][l]).double().cpu()
    rows = images.shape[0] * (models[0].net.grid ** 2 + 1)  # images x query rows
    return {f"{i}-{j}": {l: summarize(s / rows) for l, s in per.items()} for (i, j), per in sums.items()}


def summarize(matrix):
    """(H, H) mean JSD of every head pair -> index-matched and best-matched means, which heads matched, per head."""
    best = matrix.min(1)  # each head of the first model with its closest head of the second
    return dict(index=matrix.diagonal().mean().item(), best=best.values.mean().item(),
                best_heads=best.indices.tolist(), per_head=matrix.diagonal().tolist())


def hot(x):
    """Maps in 0..1 (..., H, W) -> RGB (..., 3, H, W) on the 'hot' ramp: black, red, yellow, white."""
    return torch.stack([(3 * x - i).clamp(0, 1) for i in range(3)], dim=-3)


@torch.no_grad()
def pictures(models, images, layers, path):
    """Writes the PNG grid (module docstring) for images (B, 3, S, S); returns its layout."""
    S, H = images.shape[-1], max(m.net.num_heads for m in models)
    shown = (images.cpu() * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)).clamp(0, 1)
    qks = [attention_qk(m, images, layers) for m in models]
    cells, rows = [], []
    for b in range(images.shape[0]):
        for l in layers:
            for m, qk in zip(models, qks):
                q, k = qk[l]
                cls = vit.attention_map(q[b:b + 1, :, :1], k[b:b + 1])[0, :, 0, 1:]  # (h, N - 1): CLS query, patches
                lo, hi = cls.min(1, keepdim=True).values, cls.max(1, keepdim=True).values
                maps = ((cls - lo) / (hi - lo).clamp_min(1e-12)).view(1, -1, m.net.grid, m.net.grid)
                maps = F.interpolate(maps, size=(S, S), mode="nearest")[0]  # (h, S, S)
                cells += [shown[b:b + 1], hot(maps).cpu(), torch.zeros(H - maps.shape[0], 3, S, S)]
                rows.append(f"image {b}, layer {l}, {m.name}")
    torchvision.utils.save_image(torch.cat(cells), path, nrow=1 + H, padding=2, pad_value=1.0)
    return dict(path=path, rows=rows, columns=["image"] + [f"head {h}" for h in range(H)])


def analysis_images(models, args):
    """The same --analysis_images val images (class-balanced, fixed by --seed) for every model, on args.device."""
    sizes = {m.net.arch["img_size"] for m in models}
    if len(sizes) > 1:
        raise ValueError(f"--jsd / --pictures show the models the same images, but their input sizes differ {sizes}")
    ds, _ = data.build_dataset(args.dataset, args.data_path, "val", sizes.pop(), seed=args.seed)
    keep = data.balanced_subset(ds.labels, min(args.analysis_images, len(ds)), args.seed)
    return torch.stack([ds[i][0] for i in keep.tolist()]).to(args.device)


# ------------------------------------------------------------------------------------------------ the script
def parse_layers(flag, spec, depth):
    try:
        return copy_attention.parse_layers(spec, depth)
    except ValueError as e:
        raise ValueError(str(e).replace("--layers", flag)) from None


def table(result):
    """Side-by-side text tables of the accuracy and the JSD, for stderr."""
    lines = []
    acc = result.get("accuracy", {})
    if acc:
        lines.append(f"{'top-1 / top-5 (%)':40s}" + "".join(f"{s + ' (' + str(r['images']) + ')':>18s}"
                                                          for s, r in acc.items()))
        rows = [(m["name"], [r["models"][i] for r in acc.values()]) for i, m in enumerate(result["models"])]
        if all("ensemble" in r for r in acc.values()):
            rows.append((f"ensemble ({result['ensemble']})", [r["ensemble"] for r in acc.values()]))
        lines += [f"{n[-40:]:40s}" + "".join(f"{s['acc1']:>11.2f} /{s['acc5']:>5.1f}" for s in row) for n, row in rows]
    if "jsd" in result:
        names = ", ".join(f"{i} {n}" for i, n in enumerate(result["jsd"]["models"]))
        lines.append(f"\nattention JSD (nats, 0..{math.log(2):.3f}) on {result['jsd']['images']} images, "
                     f"heads matched by index / best match; models: {names}")
        pairs = result["jsd"]["pairs"]
        lines.append("layer" + "".join(f"{p:>18s}" for p in pairs))
        for l in next(iter(pairs.values())):
            lines.append(f"{l:<5d}" + "".join(f"{p[l]['index']:>10.4f}/{p[l]['best']:.4f}" for p in pairs.values()))
    return "\n".join(lines)


def read_wnids(args):
    """The 1000 ImageNet classes in the models' output order: a text file (one wnid a line) or a folder whose sorted
    sub-folders are the classes; default <data_path>/train, the ImageFolder order train.py trained with."""
    source = args.wnids or os.path.join(args.data_path, "train")
    if os.path.isfile(source):
        return open(source).read().split()
    if os.path.isdir(source):
        return sorted(e.name for e in os.scandir(source) if e.is_dir())
    raise FileNotFoundError(f"--ood needs the models' ImageNet classes: no {source}; pass --wnids FILE (one wnid a "
                            "line, in output order) or --data_path holding the ImageNet train/ folder")


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate checkpoints: accuracy, ensembles, distribution shift, and "
                                "attention analysis.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (this repository's, MAE, timm) or teacher names")
    p.add_argument("--ema", action="store_true", help="EMA weights where a checkpoint has them (raw otherwise)")
    p.add_argument("--teacher", help="the teacher file for copy checkpoints / --with_teacher, instead of the recorded")
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
    p.add_argument("--layers", default=":", help="layers for --jsd, a slice or list as in copy_attention.py")
    p.add_argument("--pictures", metavar="PNG", help="write the attention picture grid here")
    p.add_argument("--picture_layers", help="layers to draw (default: first, middle, last)")
    p.add_argument("--picture_images", type=int, default=2, help="draw this many of the analysis images")
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
    args.amp = ("bf16" if args.device.startswith("cuda") else "none") if args.amp == "auto" else args.amp
    args.progress = not args.no_progress and sys.stderr.isatty()
    ood = [s.split("=", 1) for s in args.ood]
    if any(len(s) != 2 or s[0] not in ("v2", "a", "r", "sketch") for s in ood):
        raise ValueError(f"--ood takes KIND=PATH with KIND v2, a, r or sketch, not {' '.join(args.ood)}")
    args.ood = dict(ood)
    if args.with_teacher and not (args.jsd or args.pictures):
        raise ValueError("--with_teacher adds the teacher to --jsd / --pictures: pass one of them")

    models = [load_model(c, args.ema, args.teacher) for c in args.checkpoints]
    config = models[0].config
    args.dataset = args.dataset or config.get("dataset") or "folder"
    args.data_path = args.data_path if args.data_path is not None else config.get("data_path", "")
    if args.ood:
        args.wnids = read_wnids(args)
    k = {m.net.arch["num_classes"] for m in models}
    if len(models) > 1 and args.ensemble != "none" and len(k) > 1:
        counts = ", ".join(f"{m.name}: {m.net.arch['num_classes']}" for m in models)
        raise ValueError(f"models with different class counts cannot be ensembled ({counts}): pass --ensemble none")
    for m in models:
        print(f"{m.name}: {m.info['method']}, {m.info['weights']} weights" + (f", teacher {m.info['teacher']}"
              if m.info.get("teacher") else ""), file=sys.stderr)
        if (m.fresh or not m.net.arch["num_classes"]) and (not args.no_val or args.ood):
            raise ValueError(f"{m.name} has no trained classifier (untrained: {', '.join(m.fresh) or 'no head'}): "
                             "it is a pre-trained encoder; fine-tune it, or only analyse it (--no_val --jsd)")
        m.method.to(args.device)

    result = dict(models=[dict(name=m.name, **m.info, arch=m.net.arch) for m in models], ensemble=args.ensemble)
    if not args.no_val or args.ood:
        result["accuracy"] = accuracy(models, args)
    if args.jsd or args.pictures:
        analysed = ([load_teacher(models, args.teacher)] if args.with_teacher else []) + models
        analysed[0].method.to(args.device)
        images, depth = analysis_images(analysed, args), min(m.net.depth for m in analysed)
        if args.jsd:
            if len(analysed) < 2:
                raise ValueError("--jsd compares models: give two checkpoints, or one with --with_teacher")
            layers = parse_layers("--layers", args.layers, depth)
            result["jsd"] = dict(images=len(images), models=[m.name for m in analysed],
                                 pairs=attention_jsd(analysed, images, layers, args.batch_size))
        if args.pictures:
            layers = parse_layers("--picture_layers", args.picture_layers or f"0,{depth // 2},{depth - 1}", depth)
            result["pictures"] = pictures(analysed, images[:args.picture_images], layers, args.pictures)
    print(table(result), file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return result


if __name__ == "__main__":
    train.cli(main)

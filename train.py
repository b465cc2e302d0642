"""train.py: the training recipe every method shares, and the scratch / fine-tune baselines.

The paper compares each attention-transfer method with training the same ViT from scratch and with fine-tuning the
pre-trained weights, under one recipe (method.md, "Recipes"): AdamW, layer-wise lr decay, warmup + cosine,
lr = blr * effective batch / 256, MixUp/CutMix with label smoothing, EMA, bf16 on GPU, DDP under torchrun.

A method plugs in as a small nn.Module, `Baseline` below: forward(images, targets) -> (loss, logs) for training and
predict(model, images) -> logits for evaluation. copy_attention.py and distill_attention.py subclass it; the loop here
knows nothing of attention.

    python train.py --preset cifar --data_path ../shared/data/cifar10                   # scratch, CPU-sized
    python train.py --preset cifar --data_path ../shared/data/cifar10 --finetune mae_tiny_cifar10
    torchrun --nproc_per_node=8 train.py --model vit_base_patch16 --finetune mae_vit_b --data_path /imagenet
"""
import argparse
import builtins
import contextlib
import copy
import glob
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import vit


class Baseline(nn.Module):
    """Scratch / fine-tune training: logits = model(images), loss = soft-target cross-entropy.

    The method hook. A method holds the model being trained as `self.model` (only its weights are saved) and may
    hold other modules (a frozen teacher). The whole module is what DDP and torch.compile wrap, so everything a
    training step computes lives in forward().
    """

    classifies = True  # evaluate top-1/top-5 every epoch (MAE pre-training has nothing to classify)

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, targets):
        """-> (loss, {name: scalar tensor to log})."""
        return soft_cross_entropy(self.model(images), targets), {}

    def predict(self, model, images):
        """Logits of `model` (self.model or its EMA) for evaluation."""
        return model(images)

    def describe(self):
        """Plain values saved in the checkpoint next to the weights (copy records its teacher here)."""
        return {}


def soft_cross_entropy(logits, targets):
    """Cross-entropy with soft targets (MixUp/CutMix + label smoothing), computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ------------------------------------------------------------------------------------------------ the recipe
# MAE fine-tune recipe for ViT-B (He et al. 2022, Table 9), the baseline's defaults.
FINETUNE = dict(model="vit_base_patch16", epochs=100, warmup_epochs=5, blr=5e-4, min_lr=1e-6, weight_decay=0.05,
                layer_decay=0.65, beta2=0.999, drop_path=0.1, ema=0.0, batch_size=64)
# CPU-sized CIFAR-10 preset (32 px, patch 4, 65 tokens), shared by every script; see README for timings.
CIFAR = dict(model="vit_tiny_cifar", input_size=32, batch_size=128, epochs=30, warmup_epochs=3, blr=1e-3,
             min_lr=1e-5, weight_decay=0.05, layer_decay=1.0, drop_path=0.1, ema=0.0, mixup=0.8, cutmix=1.0)


def get_args_parser(description, recipe, presets):
    """The shared flags (MAE / the authors' names), with `recipe` as defaults and `--preset` choosing an override."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), help="override the defaults with a small recipe")
    p.add_argument("--model", help="student preset from vit.PRESETS")
    p.add_argument("--finetune", default="", help="initialise from a checkpoint file or name (vit.TEACHERS)")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--drop_path", type=float)
    p.add_argument("--global_pool", action=argparse.BooleanOptionalAction, default=True,
                   help="global average pool + fc_norm (MAE fine-tune); --no-global_pool uses the CLS token")
    # data
    p.add_argument("--dataset", default="folder", choices=["folder", "cifar10", "cifar100", "fake"])
    p.add_argument("--data_path", default="", help="folder with train/ and val/ (or test/), or torchvision's root")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data_path")
    p.add_argument("--subset", type=int, help="train on this many images (class-balanced, fixed by --seed)")
    p.add_argument("--val_subset", type=int, help="evaluate on this many images")
    p.add_argument("--aug", default="randaug", choices=["randaug", "crop"],
                   help="randaug: crop, flip, RandAugment m9, random erasing (fine-tuning); crop: crop + flip (MAE)")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (with --aug randaug)")
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--num_workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    # optimisation
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup_epochs", type=float)
    p.add_argument("--batch_size", type=int, help="per process; effective = batch_size * accum_iter * processes")
    p.add_argument("--accum_iter", type=int, default=1)
    p.add_argument("--blr", type=float, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--layer_decay", type=float)
    p.add_argument("--beta2", type=float, help="AdamW betas = (0.9, beta2)")
    p.add_argument("--clip_grad", type=float, help="clip the gradient norm to this")
    p.add_argument("--ema", type=float, help="EMA decay per step; 0 turns EMA off")
    p.add_argument("--epoch_steps", type=int, help="cap the steps of each epoch (smoke runs)")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype; auto = bf16 on GPU, none (fp32) on CPU; fp16 adds a GradScaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="output")
    p.add_argument("--resume", default="", help="checkpoint to resume from; default: output_dir/checkpoint.pth")
    p.add_argument("--eval", action="store_true", help="only evaluate (the --resume or --finetune weights)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    p.set_defaults(**recipe)
    p.presets = presets
    return p


def parse_args(parser, argv=None):
    """Parse twice: first --preset, whose values become defaults that explicit flags still override."""
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**parser.presets[known.preset])
    args = parser.parse_args(argv)
    if args.amp == "auto":
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    return args


# ------------------------------------------------------------------------------------------------ the pieces
def init_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nccl on GPU, gloo on CPU. Returns (rank, world_size)."""
    if "RANK" not in os.environ:
        return 0, 1
    if args.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if dist.get_rank() != 0:
        builtins.print = lambda *args, **kwargs: None  # one log, from rank 0 (errors still reach stderr)
    return dist.get_rank(), dist.get_world_size()


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups with MAE's layer-wise lr decay: patch/pos/cls are layer 0, block i is layer i+1, the rest
    (norms, head) layer depth+1 with scale 1, layer l gets decay^(depth+1-l). No weight decay on 1-D tensors,
    pos_embed and cls_token. (The authors' copy of this counts depth instead of depth+1 layers for their dual
    model, so every student block is decayed one step less than here; with layer_decay 1, as in distill, the two
    agree.)"""
    top = model.depth + 1
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = top
        decay = 0.0 if p.ndim == 1 or name in ("pos_embed", "cls_token") else weight_decay
        g = groups.setdefault((layer, decay), dict(params=[], weight_decay=decay, lr_scale=layer_decay ** (top - layer)))
        g["params"].append(p)
    return list(groups.values())


def lr_at(step, args, steps_per_epoch):
    """Per-iteration schedule: linear warmup from 0 to args.lr, then half-cosine to args.min_lr."""
    e = step / steps_per_epoch
    if e < args.warmup_epochs:
        return args.lr * e / args.warmup_epochs
    t = (e - args.warmup_epochs) / max(1e-8, args.epochs - args.warmup_epochs)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def build_model(args, num_classes):
    model = vit.create_model(args.model, num_classes=num_classes, drop_path=args.drop_path,
                             global_pool=args.global_pool, img_size=args.input_size)
    if args.finetune:
        print(f"fine-tuning from {args.finetune}: " + vit.describe(vit.load_state(model, vit.resolve(args.finetune))))
    return model


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a reader sees the old file or the new."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(method, model, loader, args, world_size, progress=False):
    """Top-1, top-5 and loss of method.predict(model, .) over the loader (each process its own shard, summed)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=args.device)  # loss sum, top-1, top-5, count
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, labels = images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
        with autocast(args):
            logits = method.predict(model, images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               (top5[:, 0] == labels).sum().double(),
                               (top5 == labels[:, None]).any(1).sum().double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=args.device)])
    if world_size > 1:
        dist.all_reduce(totals)
    loss, c1, c5, n = totals.tolist()
    return dict(loss=loss / n, acc1=100 * c1 / n, acc5=100 * c5 / n)


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def build_loaders(args, rank, world_size):
    """Datasets from data.py; the train sampler shards and shuffles per epoch, evaluation shards without padding so
    every image is counted exactly once."""
    train_set, num_classes = data.build_dataset(args.dataset, args.data_path, "train", args.input_size,
                                                subset=args.subset, seed=args.seed, download=args.download,
                                                aug=args.aug, reprob=args.reprob)
    val_set, _ = data.build_dataset(args.dataset, args.data_path, "val", args.input_size, subset=args.val_subset,
                                    seed=args.seed, download=args.download)
    if args.batch_size * world_size > len(train_set):
        raise ValueError(f"--batch_size {args.batch_size} x {world_size} processes is larger than the {len(train_set)} "
                         "training images: lower --batch_size")
    sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed,
                                                  drop_last=True)
    # Workers are started afresh each epoch (not persistent) so their random streams depend on the epoch alone.
    common = dict(num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"))
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True,
                                               generator=torch.Generator(), **common)
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, args.batch_size, **common)
    return train_loader, val_loader, num_classes


# ------------------------------------------------------------------------------------------------ the loop
def run(args, make_method, make_model=build_model):
    """Everything a training script does: data, model (make_model(args, num_classes)), method
    (make_method(model, num_classes) -> Baseline), optimiser, resume, the epochs, evaluation, checkpoints, logs."""
    rank, world_size = init_distributed(args)
    torch.manual_seed(args.seed)
    train_loader, val_loader, num_classes = build_loaders(args, rank, world_size)
    model = make_model(args, num_classes).to(args.device)
    method = make_method(model, num_classes).to(args.device)
    eff_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    steps_per_epoch = len(train_loader) // args.accum_iter
    if args.epoch_steps:
        steps_per_epoch = min(steps_per_epoch, args.epoch_steps)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr,
                            betas=(0.9, args.beta2))
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    mix = data.MixupCutmix(args.mixup, args.cutmix, args.smoothing, num_classes)

    start_epoch, step = 0, 0
    resume = args.resume or os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.exists(resume):
        ckpt = vit.load_file(resume)
        held = ckpt.get("arch") if isinstance(ckpt, dict) and "optimizer" in ckpt else None
        if held != model.arch:
            diff = ", ".join(f"{k} {(held or {}).get(k)} there, {v} here" for k, v in model.arch.items()
                             if (held or {}).get(k) != v)
            raise ValueError(f"{resume} is not a checkpoint of this run ({diff}): use another --output_dir, or the "
                             "command that wrote it")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] or ckpt["model"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        if rank == 0:
            print(f"resumed from {resume} at epoch {start_epoch}, step {step}")
    elif args.resume:
        raise FileNotFoundError(f"--resume {args.resume} does not exist")

    progress = rank == 0 and not args.no_progress and sys.stderr.isatty()
    if rank == 0:
        print(f"{type(method).__name__}: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
              f"{len(train_loader.dataset)} train / {len(val_loader.dataset) * world_size} val images, "
              f"{num_classes} classes; lr {args.lr:.3g} = blr {args.blr} x {eff_batch} / 256; {steps_per_epoch} "
              f"steps/epoch x {args.epochs} epochs; {world_size} process(es) on {args.device}, amp {args.amp}")
    if args.eval:
        for name, m in [("model", model), ("ema", ema)]:
            if m is not None:
                result = evaluate(method, m, val_loader, args, world_size, progress)
                if rank == 0:
                    print(json.dumps({name: result}))
        return None

    runner = method
    if world_size > 1:
        runner = DistributedDataParallel(method, device_ids=[torch.device(args.device).index] if
                                         args.device.startswith("cuda") else None)
    no_sync = runner.no_sync if world_size > 1 else contextlib.nullcontext
    if args.compile:
        runner = torch.compile(runner)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(args.output_dir, "checkpoint.pth.tmp*")):  # a save killed mid-write
            os.remove(stale)

    stats = {}
    for epoch in range(start_epoch, args.epochs):
        # Every random draw of an epoch (order, augmentation, mixup, drop path) follows from (seed, epoch, rank), so
        # a run resumed at an epoch boundary draws exactly what an uninterrupted run would.
        torch.manual_seed(args.seed + 1000 * epoch + rank)
        train_loader.sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(args.seed + 1000 * epoch)
        method.train()
        sums, t0 = {}, time.time()
        batches = iter(train_loader)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", disable=not progress)
        for _ in bar:
            lr = lr_at(step, args, steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            for micro in range(args.accum_iter):
                images, labels = next(batches)
                images, labels = images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
                images, targets = mix(images, labels)
                with no_sync() if micro < args.accum_iter - 1 else contextlib.nullcontext(), autocast(args):
                    loss, logs = runner(images, targets)
                    scaler.scale(loss / args.accum_iter).backward()
                logs = {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}
                values = {k: v.item() for k, v in logs.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(
                        f"non-finite loss ({', '.join(f'{k} {v:.4g}' for k, v in values.items())}) at epoch {epoch}, "
                        f"step {step}: stopped; {resume} still holds the last good epoch (lower --blr, add "
                        "--clip_grad, or use --amp bf16 instead of fp16)")
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v / args.accum_iter
            if args.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - args.ema)
            step += 1
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")

        stats = dict(epoch=epoch, step=step, lr=lr, time=round(time.time() - t0, 2),
                     **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()})
        if method.classifies:
            stats.update({f"val_{k}": v for k, v in evaluate(method, model, val_loader, args, world_size, progress).items()})
        if ema is not None and method.classifies:
            stats.update({f"ema_{k}": v for k, v in evaluate(method, ema, val_loader, args, world_size, progress).items()})
        if rank == 0:
            save_atomic(dict(model=model.state_dict(), ema=ema.state_dict() if ema is not None else None,
                             optimizer=opt.state_dict(), scaler=scaler.state_dict(), epoch=epoch + 1, step=step,
                             arch=model.arch, config=vars(args), method=method.describe()),
                        os.path.join(args.output_dir, "checkpoint.pth"))
            with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(stats) + "\n")
            print(json.dumps(stats))
    if world_size > 1:
        dist.destroy_process_group()
    return stats


def cli(main):
    """Run main(); bad input (ValueError, FileNotFoundError) and a non-finite loss end with one line, exit code 2."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    parser = get_args_parser("Train a ViT from scratch, or fine-tune one with --finetune.", FINETUNE,
                             {"cifar": CIFAR})
    args = parse_args(parser, argv)
    return run(args, lambda model, num_classes: Baseline(model))


if __name__ == "__main__":
    cli(main)

"""train.py: the training recipe every method shares, and the scratch / fine-tune baselines.

The paper compares each attention-transfer method with training the same ViT from scratch and with fine-tuning the
pre-trained weights, under one recipe (Li et al. 2024, Sec. 3 and Appendix A; README "The methods"): AdamW, layer-wise
lr decay, warmup + cosine, lr = blr * effective batch / 256, MixUp/CutMix with label smoothing, EMA, bf16 on GPU, DDP
under torchrun.

A method plugs in as a small nn.Module, `Method` below: forward(images, targets) -> (loss, logs) for training and
predict(model, images) -> logits for evaluation. Training from scratch or fine-tuning is its plain case;
copy_attention.py and distill_attention.py subclass it. The loop here (train_epochs) knows nothing of attention.

A run can be stopped at any time and rerun to continue exactly where it stopped; run_safety.py holds that machinery
(README "Runs you cannot lose").

    python train.py --preset cifar                                          # scratch, CPU-sized CIFAR-10
    python train.py --preset cifar --finetune mae_tiny_cifar10              # fine-tune the shipped teacher
    torchrun --nproc_per_node=8 train.py --model vit_base_patch16 --finetune mae_vit_b --data_path /imagenet
"""
import argparse
import contextlib
import copy
import dataclasses
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
import run_safety
import vit


class Method(nn.Module):
    """A training method. This base class is plain supervised training (from scratch, or fine-tuning with
    --finetune): logits = model(images), loss = soft-target cross-entropy.

    A method holds the model being trained as `self.model` (only its weights are saved) and may hold other modules
    (a frozen teacher). The whole module is what DDP and torch.compile wrap, so everything a training step computes
    lives in forward().
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

    def tensors(self):
        """{name: tensor} the method computed once for its run and needs at inference (copy's map averaged over
        training images, --average images), saved in the checkpoint as 'method_tensors': its script reads them back
        when it resumes, and evaluate.py when it rebuilds the method. Not compared on resume (the config that made
        them is)."""
        return {}


def soft_cross_entropy(logits, targets):
    """Cross-entropy with soft targets (MixUp/CutMix + label smoothing), computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ------------------------------------------------------------------------------------------------ the recipe
# MAE's fine-tuning recipe for ViT-B (He et al. 2022, Table 9; blr and layer decay for ViT-B from the MAE repository's
# FINETUNE.md): effective batch 1024 = 64 per GPU x 16 GPUs.
FINETUNE = dict(
    model="vit_base_patch16", input_size=224, epochs=100, warmup_epochs=5, batch_size=64,
    blr=5e-4, min_lr=1e-6, min_lr_ratio=None, beta2=0.999, weight_decay=0.05, layer_decay=0.65,
    drop_path=0.1, ema=0.0,  # MAE fine-tunes without EMA
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,  # RandAugment m9, erasing, MixUp/CutMix
)
# CPU-sized CIFAR-10 (this repository's, README "Results"): 32 px, patch 4, 65 tokens; the data is found without
# --data_path (./data/cifar10, ../shared/data/cifar10, or downloaded, data.build_dataset).
CIFAR = dict(
    model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="", epochs=30, warmup_epochs=3,
    batch_size=128, blr=1e-3, min_lr=1e-5, min_lr_ratio=None, beta2=0.999, weight_decay=0.05, layer_decay=1.0,
    drop_path=0.1, ema=0.0, aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
)
# Config values that do not change what a run computes: a resume may differ in these.
NOT_RESULTS = {"output_dir", "resume", "num_workers", "no_progress", "eval", "device", "save_every_min", "compile",
               "download", "preset", "keep_epochs", "explicit_map"}


# ------------------------------------------------------------------------------------------------ the flags
def in_range(low, high, kind=float, low_open=False, high_open=True):
    """An argparse type: a number of `kind` in [low, high) (low_open: (low, ...; high_open=False: ..., high]).
    NaN is never in range."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def number(text):
        value = kind(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be in {interval}")
        return value

    number.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return number


COUNT = in_range(1, math.inf, int)                    # 1, 2, ...
NON_NEGATIVE_INT = in_range(0, math.inf, int)         # 0, 1, ...
POSITIVE = in_range(0, math.inf, low_open=True)       # (0, inf)
NON_NEGATIVE = in_range(0, math.inf)                  # [0, inf)
BELOW_ONE = in_range(0, 1)                            # [0, 1): decays, rates
UNIT = in_range(0, 1, high_open=False)                # [0, 1]: probabilities, shares


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through run_safety.cli(), not argparse's usage block
        raise ValueError(f"{message} (see --help)")


def get_args_parser(description, recipe, presets):
    """The shared flags (MAE / the authors' names), with `recipe` as defaults and `--preset` choosing an override."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), help="override the defaults with a small recipe")
    p.add_argument("--model", help="student preset from vit.PRESETS")
    p.add_argument("--finetune", default="", help="initialise from a checkpoint file or name (vit.TEACHERS)")
    p.add_argument("--input_size", type=COUNT, default=224)
    p.add_argument("--drop_path", type=BELOW_ONE)
    p.add_argument("--global_pool", action=argparse.BooleanOptionalAction, default=True,
                   help="global average pool + fc_norm (MAE fine-tune); --no-global_pool uses the CLS token")
    # data
    p.add_argument("--dataset", default="folder", choices=["folder", "cifar10", "cifar100", "fake"])
    p.add_argument("--data_path", default="", help="folder with train/ and val/ (or test/), or torchvision's root")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data_path")
    p.add_argument("--subset", type=COUNT, help="train on this many images (class-balanced; the same for every --seed)")
    p.add_argument("--val_subset", type=COUNT, help="evaluate on this many images")
    p.add_argument("--aug", default="randaug", choices=["randaug", "crop"],
                   help="randaug: crop, flip, RandAugment m9, random erasing (fine-tuning); crop: crop + flip (MAE)")
    p.add_argument("--reprob", type=UNIT, default=0.25, help="random erasing probability (after either --aug)")
    p.add_argument("--mixup", type=NON_NEGATIVE, default=0.8)
    p.add_argument("--cutmix", type=NON_NEGATIVE, default=1.0)
    p.add_argument("--smoothing", type=BELOW_ONE, default=0.1)
    p.add_argument("--num_workers", type=NON_NEGATIVE_INT,
                   help="loader processes per process (default: its share of the cores, at most 8)")
    # optimisation
    p.add_argument("--epochs", type=COUNT)
    p.add_argument("--warmup_epochs", type=NON_NEGATIVE)
    p.add_argument("--batch_size", type=COUNT, help="per process; effective = batch_size * accum_iter * processes")
    p.add_argument("--accum_iter", type=COUNT, default=1)
    p.add_argument("--blr", type=POSITIVE, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--lr", type=POSITIVE, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=NON_NEGATIVE, help="where the cosine ends")
    p.add_argument("--min_lr_ratio", type=UNIT, help="min_lr as a fraction of the peak lr; overrides --min_lr")
    p.add_argument("--weight_decay", type=NON_NEGATIVE)
    p.add_argument("--layer_decay", type=in_range(0, 1, low_open=True, high_open=False))
    p.add_argument("--beta2", type=BELOW_ONE, help="AdamW betas = (0.9, beta2)")
    p.add_argument("--clip_grad", type=POSITIVE, help="clip the gradient norm to this")
    p.add_argument("--ema", type=BELOW_ONE, help="EMA decay per step; 0 turns EMA off")
    p.add_argument("--epoch_steps", type=COUNT, help="cap the steps of each epoch (smoke runs)")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype; auto = bf16 on a GPU that has it, else fp16 (+ GradScaler); none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
    p.add_argument("--output_dir", default="output")
    p.add_argument("--resume", default="", help="checkpoint to resume from; default: output_dir/checkpoint.pth")
    p.add_argument("--save_every_min", type=POSITIVE, default=10.0, help="also checkpoint inside an epoch this often")
    p.add_argument("--keep_epochs", type=COUNT, nargs="+", default=[], metavar="E",
                   help="also keep the checkpoint after epoch E as checkpoint-epE.pth (a teacher curve's points)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    p.set_defaults(**recipe)
    p.presets = presets
    return p


def parse_args(parser, argv=None):
    """Parse twice: first --preset, whose values become defaults that explicit flags still override. Resolves
    --amp auto and the worker count, and checks what the types cannot before any work."""
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**parser.presets[known.preset])
    args = parser.parse_args(argv)
    check_device(args.device)
    cuda = args.device.startswith("cuda")
    if args.amp == "auto":
        args.amp = "none" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if args.num_workers is None:  # the cores this process may use, shared with the other processes of its node
        args.num_workers = min(8, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if any(not 1 <= e <= args.epochs for e in args.keep_epochs):
        raise ValueError(f"--keep_epochs {args.keep_epochs}: every E must be in [1, --epochs {args.epochs}]")
    if args.model not in vit.PRESETS:
        raise ValueError(f"unknown model {args.model!r}; presets: {', '.join(vit.PRESETS)}")
    patch = vit.PRESETS[args.model][1]
    if args.input_size < patch or args.input_size % patch:
        raise ValueError(f"--input_size {args.input_size} must be a multiple of {args.model}'s patch size {patch}")
    return args


def check_device(device):
    """--device names a device torch has here: cpu, or cuda / cuda:N with a GPU visible."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device torch knows: use cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no GPU on this machine (torch.cuda.is_available() is False): "
                         "use --device cpu, or a torch built for your GPU")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def print0(*args, **kwargs):
    """print() on rank 0 only: one log per run. (Errors are printed by run_safety.cli.)"""
    if run_safety.is_rank0():
        print(*args, **kwargs)


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
    """Per-iteration schedule: linear warmup from 0 to args.lr, then half-cosine to args.min_lr. Never above the
    peak: a min_lr above lr (an absolute min_lr at a small batch) is clamped to lr."""
    e = step / steps_per_epoch
    if e < args.warmup_epochs:
        return args.lr * e / args.warmup_epochs
    low = min(args.min_lr, args.lr)
    t = (e - args.warmup_epochs) / max(1e-8, args.epochs - args.warmup_epochs)
    return low + (args.lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def build_model(args, num_classes):
    model = vit.create_model(args.model, num_classes=num_classes, drop_path=args.drop_path,
                             global_pool=args.global_pool, img_size=args.input_size)
    if args.finetune:
        report = vit.load_state(model, vit.resolve(args.finetune))
        if "head.weight" in {f.split(" ")[0] for f in report["fresh"]}:
            nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE's fine-tuning starts from a near-zero head
        print0(f"fine-tuning from {args.finetune}: " + vit.describe(report))
    return model


def build_loaders(args, rank, world_size):
    """Datasets from data.py; training batches from data.EpochBatches, evaluation shards without padding so that every
    image is counted exactly once. Workers persist across epochs (seeding does not depend on them)."""
    # --subset and --val_subset choose the same images for every --seed: a seed changes the initialisation, the
    # data order and the augmentation, not the data (README "Results": seeds compare methods on the same images)
    train_set, num_classes = data.build_dataset(args.dataset, args.data_path, "train", args.input_size,
                                                subset=args.subset, seed=0, download=args.download,
                                                aug=args.aug, reprob=args.reprob)
    val_set, _ = data.build_dataset(args.dataset, args.data_path, "val", args.input_size, subset=args.val_subset,
                                    seed=0, download=args.download)
    if args.batch_size * world_size > len(train_set):
        raise ValueError(f"--batch_size {args.batch_size} x {world_size} processes is larger than the {len(train_set)} "
                         "training images: lower --batch_size")
    common = dict(num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                  persistent_workers=args.num_workers > 0, worker_init_fn=data.quiet_worker)
    batches = data.EpochBatches(len(train_set), args.batch_size, rank, world_size, args.seed)
    train_loader = torch.utils.data.DataLoader(data.Seeded(train_set, args.seed), batch_sampler=batches, **common)
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, args.batch_size, **common)
    return train_loader, val_loader, num_classes


def cast_frozen(method, dtype):
    """Cast once to the autocast dtype every child of the method whose parameters are all frozen (a teacher), so
    that autocast does not cast its weights again on every forward."""
    for child in method.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.to(dtype)


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def validate(method, model, loader, args, world_size, progress=False, ema=None, interrupts=None):
    """Top-1, top-5 and loss of method.predict(model, .) over the loader (each process its own shard, summed); with
    `ema`, the EMA's too (keys ema_*) in the same pass over the data. None when `interrupts` caught a signal on any
    process: the run saves at once and validates after its resume."""
    models = {"": model}
    if ema is not None:
        models["ema_"] = ema
    totals = torch.zeros(len(models), 4, dtype=torch.float64, device=args.device)  # loss sum, top-1, top-5, count
    stopped = torch.zeros(1, dtype=torch.float64, device=args.device)
    for m in models.values():
        m.eval()
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        if interrupts is not None and interrupts.caught:
            stopped += 1
            break
        images = images.to(args.device, non_blocking=True)
        labels = labels.to(args.device, non_blocking=True)
        for i, m in enumerate(models.values()):
            with autocast(args):
                logits = method.predict(m, images).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals[i] += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                      (top5[:, 0] == labels).sum().double(),
                                      (top5 == labels[:, None]).any(1).sum().double(),
                                      torch.tensor(len(labels), dtype=torch.float64, device=args.device)])
    if world_size > 1:
        dist.all_reduce(totals)
        dist.all_reduce(stopped)
    if stopped.item():
        return None
    results = {}
    for prefix, (loss, top1, top5, n) in zip(models, totals.tolist()):
        results[f"{prefix}loss"] = loss / n
        results[f"{prefix}acc1"] = 100 * top1 / n
        results[f"{prefix}acc5"] = 100 * top5 / n
    return results


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Training:
    """Everything a training run holds between setup() and train_epochs()."""
    args: argparse.Namespace
    rank: int
    world_size: int
    model: nn.Module          # the student: what is trained and saved
    method: Method            # the model inside its method (a teacher, a loss)
    runner: nn.Module         # the method as the step calls it: wrap()'s, DDP and/or torch.compile
    ema: nn.Module | None
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mix: data.MixupCutmix
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    steps: int                # optimizer steps per epoch
    record: dict              # arch, method, config: saved with every checkpoint, compared on resume
    start_epoch: int = 0
    start_step: int = 0
    epoch_sums: dict | None = None  # the resumed epoch's sums of logged values so far (None: not recorded)
    epoch_time: float = 0.0         # and its seconds so far

    def batches(self, epoch, first):
        """An iterator over this process's batches of `epoch`, starting at step `first` (None when none are left)."""
        self.train_loader.batch_sampler.epoch = epoch
        self.train_loader.batch_sampler.skip = first * self.args.accum_iter
        return iter(self.train_loader) if first < self.steps else None

    def no_sync(self, last_micro_batch):
        """DDP all-reduces the gradients on the last micro-batch of a step only."""
        if self.world_size == 1 or last_micro_batch:
            return contextlib.nullcontext()
        return self.runner.no_sync()

    @property
    def checkpoint(self):
        return os.path.join(self.args.output_dir, "checkpoint.pth")

    def save(self, epoch, step, sums, seconds, stats=None):
        """Checkpoint (rank 0 writes; a full disk stops every process) and, at the end of an epoch, its log line."""
        with run_safety.together(self.world_size, self.args.device):
            if self.rank == 0:
                state = dict(model=self.model.state_dict(), ema=self.ema.state_dict() if self.ema is not None else None,
                             optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(), epoch=epoch, step=step,
                             epoch_sums=sums, epoch_time=seconds, method_tensors=self.method.tensors(),
                             **self.record)
                run_safety.save_atomic(state, self.checkpoint)
                if stats and epoch in self.args.keep_epochs:
                    run_safety.save_atomic(state, os.path.join(self.args.output_dir, f"checkpoint-ep{epoch}.pth"))
                if stats:
                    with open(os.path.join(self.args.output_dir, "log.jsonl"), "a") as f:
                        f.write(json.dumps(stats) + "\n")


def wrap(method, args, world_size):
    """The method as the training step calls it: in DDP across processes (its constructor is the processes' first
    collective, so it comes after every process's checks: one that failed a check never reaches it), compiled with
    --compile."""
    runner = method
    if world_size > 1:
        cuda = args.device.startswith("cuda")
        runner = DistributedDataParallel(method, device_ids=[torch.device(args.device).index] if cuda else None)
    if args.compile:
        runner = torch.compile(runner)
    return runner


def setup(args, make_method, make_model, rank, world_size):
    """Data, model (make_model(args, num_classes)), method (make_method(model) -> Method), optimiser, EMA, and the
    resume: every check every process makes before the first step. -> Training."""
    cuda = args.device.startswith("cuda")
    torch.manual_seed(args.seed)
    train_loader, val_loader, num_classes = build_loaders(args, rank, world_size)
    model = make_model(args, num_classes).to(args.device)
    method = make_method(model).to(args.device)
    if cuda and args.amp != "none":
        cast_frozen(method, torch.bfloat16 if args.amp == "bf16" else torch.float16)
    eff_batch = args.batch_size * args.accum_iter * world_size
    args.lr = args.lr or args.blr * eff_batch / 256
    if args.min_lr_ratio is not None:
        args.min_lr = args.min_lr_ratio * args.lr
    steps = min(len(train_loader) // args.accum_iter, args.epoch_steps or math.inf)
    if steps < 1:
        raise ValueError(f"--accum_iter {args.accum_iter} is more than the {len(train_loader)} batches of an epoch")
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr,
                            betas=(0.9, args.beta2), fused=cuda)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    record = dict(arch=model.arch, method=dict(method.describe(), method=type(method).__name__), config=vars(args))
    mix = data.MixupCutmix(args.mixup, args.cutmix, args.smoothing, num_classes)
    training = Training(args, rank, world_size, model, method, method, ema, opt, scaler, mix, train_loader, val_loader,
                        steps, record)
    resume(training)
    print0(f"{type(method).__name__}: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
           f"{len(train_loader.dataset)} train / {len(val_loader.dataset) * world_size} val images, {num_classes} "
           f"classes; lr {args.lr:.3g} = blr {args.blr} x {eff_batch} / 256, cosine to {args.min_lr:.3g}; {steps} "
           f"steps/epoch x {args.epochs} epochs; {world_size} process(es) on {args.device}, amp {args.amp}, "
           f"{args.num_workers} loader workers each")
    return training


def resume(training):
    """Continue from --resume or output_dir/checkpoint.pth when there is one: weights, optimizer, EMA, where it
    stopped, and the stopped epoch's running sums. Refuses another run's checkpoint and a damaged one."""
    args = training.args
    path = args.resume or training.checkpoint
    if not os.path.exists(path):
        if args.resume:
            raise FileNotFoundError(f"--resume {args.resume} does not exist")
        return
    ckpt = vit.load_file(path)
    run_safety.check_resume(path, ckpt, training.record, NOT_RESULTS)
    try:
        training.model.load_state_dict(ckpt["model"])
        training.opt.load_state_dict(ckpt["optimizer"])
        training.scaler.load_state_dict(ckpt["scaler"])
        if training.ema is not None:
            training.ema.load_state_dict(ckpt["ema"] or ckpt["model"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
        sums = ckpt.get("epoch_sums")  # absent in checkpoints written before it was recorded
        sums = None if sums is None else {str(k): float(v) for k, v in sums.items()}
        seconds = float(ckpt.get("epoch_time") or 0.0)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        problem = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise ValueError(f"{path} is damaged or was edited ({problem}): use another --output_dir, or delete the file "
                         "to start over") from None
    # an epoch-boundary checkpoint (every one written before mid-epoch saves existed) starts its epoch afresh
    if not 0 <= start_step - start_epoch * training.steps <= training.steps:
        raise ValueError(f"{path}: step {start_step} is not in epoch {start_epoch} of {training.steps} steps")
    if start_epoch >= args.epochs:
        print0(f"{os.path.dirname(path) or '.'} has finished all {args.epochs} epochs: nothing to do (evaluate it "
               f"with evaluate.py; to train further, start a new --output_dir with --finetune {path})")
    else:
        print0(f"resumed {os.path.dirname(path) or '.'} at epoch {start_epoch}, step {start_step}")
    training.start_epoch, training.start_step = start_epoch, start_step
    training.epoch_sums, training.epoch_time = sums, seconds


def run(args, make_method, make_model=build_model):
    """Everything a training script does: hold the output folder, set up, train every epoch. -> the last epoch's
    log line (a dict), or {} when the run had already finished."""
    rank, world_size = init_distributed(args)
    if args.device.startswith("cuda"):  # the attention loss runs in float32 by design: let its matmuls use TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        with run_safety.output_folder(args.output_dir, rank, world_size, args.device):
            with run_safety.Interrupts() as interrupts:
                with run_safety.together(world_size, args.device):
                    training = setup(args, make_method, make_model, rank, world_size)
                training.runner = wrap(training.method, args, world_size)
                if rank == 0:
                    run_safety.remove_stale_temporaries(args.output_dir)  # left by a save that was killed mid-write
                return train_epochs(training, interrupts)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train_epochs(training, interrupts):
    """The loop: every epoch's steps, then its evaluation, checkpoint and log line."""
    args, steps = training.args, training.steps
    progress = training.rank == 0 and not args.no_progress and sys.stderr.isatty()
    stats, last_save = {}, time.monotonic()
    for epoch in range(training.start_epoch, args.epochs):
        resumed = epoch == training.start_epoch
        first = training.start_step - epoch * steps if resumed else 0  # steps of this epoch done before a resume
        sums = dict(training.epoch_sums or {}) if resumed else {}      # of each logged value over the epoch's steps
        seconds_before = training.epoch_time if resumed else 0.0
        t0 = time.time()
        batches = training.batches(epoch, first)
        training.method.train()
        for i in tqdm(range(first, steps), desc=f"epoch {epoch}", disable=not progress):
            step = epoch * steps + i
            # load, forward, backward, optimizer step, EMA
            logs = train_step(training, batches, step)
            # log: the losses, and whether to save or stop, agreed by every process
            want_save = training.rank == 0 and time.monotonic() - last_save > 60 * args.save_every_min
            values, save_now, stop = run_safety.agree_at_step_end(logs, want_save, interrupts, training.world_size,
                                                                  args.device)
            check_finite(values, epoch, step, training.rank)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            # checkpoint inside the epoch (a resume continues at step + 1), and stop if interrupted
            if save_now or stop:
                training.save(epoch, step + 1, sums, seconds_before + time.time() - t0)
                last_save = time.monotonic()
            if stop:
                print0(f"interrupted at epoch {epoch}, step {step + 1}; rerun the same command to resume",
                       file=sys.stderr)
                raise run_safety.Stop(stop, quiet=training.rank != 0)
        # evaluate, checkpoint, and the epoch's log line
        partial = resumed and first > 0 and training.epoch_sums is None  # an older checkpoint: sums began at `first`
        stats = end_epoch(training, epoch, sums, seconds_before + time.time() - t0, first if partial else 0,
                          interrupts, progress)
        last_save = time.monotonic()
    return stats


def train_step(training, batches, step):
    """One optimizer step: accum_iter micro-batches forward and backward (DDP's gradient all-reduce on the last only),
    the update, the EMA. -> {name: the step's value as a tensor} (no host synchronisation here)."""
    args = training.args
    # random draws (mixup, drop path, MAE's masks) follow from (seed, process, step), as in an uninterrupted run
    torch.manual_seed(data.seed_of(args.seed, training.rank, step))
    lr = lr_at(step, args, training.steps)
    for g in training.opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    logs = {}
    for micro in range(args.accum_iter):
        images, labels = next(batches)
        images = images.to(args.device, non_blocking=True)
        labels = labels.to(args.device, non_blocking=True)
        images, targets = training.mix(images, labels)
        last = micro == args.accum_iter - 1
        with training.no_sync(last), autocast(args):
            loss, extra = training.runner(images, targets)
            training.scaler.scale(loss / args.accum_iter).backward()
        for k, v in {"loss": loss, **extra}.items():
            logs[k] = logs.get(k, 0.0) + v.detach().float() / args.accum_iter
    if args.clip_grad:
        training.scaler.unscale_(training.opt)
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), args.clip_grad)
    training.scaler.step(training.opt)
    training.scaler.update()
    training.opt.zero_grad(set_to_none=True)
    if training.ema is not None:
        torch._foreach_lerp_(list(training.ema.parameters()), list(training.model.parameters()), 1.0 - args.ema)
    return logs


def end_epoch(training, epoch, sums, seconds, partial_from, interrupts, progress):
    """Evaluate, write the checkpoint and the epoch's log line (its whole steps, also across a resume). Interrupted
    during the evaluation, it saves the epoch's training instead and stops: the resume evaluates. -> the log line."""
    args, steps = training.args, training.steps
    stats = dict(epoch=epoch, step=(epoch + 1) * steps, lr=lr_at((epoch + 1) * steps - 1, args, steps),
                 time=round(seconds, 2), **{f"train_{k}": v / (steps - partial_from) for k, v in sums.items()})
    if partial_from:
        stats["partial"] = f"train_* and time cover steps {partial_from}-{steps} (resumed from an older checkpoint)"
    if training.method.classifies:
        result = validate(training.method, training.model, training.val_loader, args, training.world_size, progress,
                          training.ema, interrupts)
        if result is None:
            training.save(epoch, (epoch + 1) * steps, sums, seconds)
            print0(f"interrupted at epoch {epoch}, step {(epoch + 1) * steps} (before its evaluation); rerun the same "
                   "command to resume", file=sys.stderr)
            raise run_safety.Stop(interrupts.exit_code(), quiet=training.rank != 0)
        stats.update({(k if k.startswith("ema_") else f"val_{k}"): v for k, v in result.items()})
    training.save(epoch + 1, (epoch + 1) * steps, {}, 0.0, stats)
    print0(json.dumps(stats))
    return stats


def check_finite(values, epoch, step, rank):
    """Stop every process at the first non-finite loss; rank 0 says it, with what to try."""
    if all(map(math.isfinite, values.values())):
        return
    if rank:
        raise run_safety.Stop(2, quiet=True)
    raise FloatingPointError(f"non-finite loss ({', '.join(f'{k} {v:.4g}' for k, v in values.items())}) at epoch "
                             f"{epoch}, step {step}: stopped, the last checkpoint (if any) intact (lower --blr, add "
                             "--clip_grad, or use --amp bf16 instead of fp16)")


def main(argv=None):
    parser = get_args_parser("Train a ViT from scratch, or fine-tune one with --finetune.", FINETUNE,
                             {"cifar": CIFAR})
    args = parse_args(parser, argv)
    return run(args, Method)


if __name__ == "__main__":
    run_safety.cli(main)

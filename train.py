"""train.py: the training recipe every method shares, and the scratch / fine-tune baselines.

The paper compares each attention-transfer method with training the same ViT from scratch and with fine-tuning the
pre-trained weights, under one recipe (Li et al. 2024, Sec. 3 and Appendix A; README "The methods"): AdamW, layer-wise lr decay,
warmup + cosine, lr = blr * effective batch / 256, MixUp/CutMix with label smoothing, EMA, bf16 on GPU, DDP under
torchrun.

A method plugs in as a small nn.Module, `Baseline` below: forward(images, targets) -> (loss, logs) for training and
predict(model, images) -> logits for evaluation. copy_attention.py and distill_attention.py subclass it; the loop here
knows nothing of attention.

A run can be stopped at any time: Ctrl-C (SIGINT) or SIGTERM finishes the step, saves and exits (130 / 143), and the
same command resumes at exactly that step with the same data order and random draws (every draw follows from the
seed, the epoch, the image, the process and the step). Checkpoints are written atomically at the end of each epoch and
every --save_every_min minutes. One run per output folder (a lock file holding pid and host).

    python train.py --preset cifar                                          # scratch, CPU-sized CIFAR-10
    python train.py --preset cifar --finetune mae_tiny_cifar10              # fine-tune the shipped teacher
    torchrun --nproc_per_node=8 train.py --model vit_base_patch16 --finetune mae_vit_b --data_path /imagenet
"""
import argparse
import contextlib
import copy
import glob
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
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
# Valid range of each numeric flag ('[' includes the bound, '(' excludes it); a flag left unset is not checked.
RANGES = dict(epochs="[1, inf)", warmup_epochs="[0, inf)", batch_size="[1, inf)", accum_iter="[1, inf)",
              epoch_steps="[1, inf)", blr="(0, inf)", lr="(0, inf)", min_lr="[0, inf)", min_lr_ratio="[0, 1]",
              weight_decay="[0, inf)", layer_decay="(0, 1]", beta2="[0, 1)", clip_grad="(0, inf)", ema="[0, 1)",
              drop_path="[0, 1)", smoothing="[0, 1)", mixup="[0, inf)", cutmix="[0, inf)", reprob="[0, 1]",
              subset="[1, inf)", val_subset="[1, inf)", num_workers="[0, inf)", save_every_min="(0, inf)",
              mask_ratio="(0, 1)", atd_weight="[0, inf)", decoder_dim="[1, inf)", decoder_depth="[1, inf)",
              decoder_heads="[1, inf)", heads="[1, inf)", teacher_heads="[1, inf)")
# Config values that do not change what a run computes: a resume may differ in these.
NOT_RESULTS = {"output_dir", "resume", "num_workers", "no_progress", "eval", "device", "save_every_min", "compile",
               "download", "preset", "keep_epochs"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through cli(), not argparse's usage block
        raise ValueError(f"{message} (see --help)")


def get_args_parser(description, recipe, presets):
    """The shared flags (MAE / the authors' names), with `recipe` as defaults and `--preset` choosing an override."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (after either --aug)")
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--num_workers", type=int, help="loader processes per process (default: its share of the cores, "
                                                   "at most 8)")
    # optimisation
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup_epochs", type=float)
    p.add_argument("--batch_size", type=int, help="per process; effective = batch_size * accum_iter * processes")
    p.add_argument("--accum_iter", type=int, default=1)
    p.add_argument("--blr", type=float, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float, help="where the cosine ends")
    p.add_argument("--min_lr_ratio", type=float, help="min_lr as a fraction of the peak lr; overrides --min_lr")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--layer_decay", type=float)
    p.add_argument("--beta2", type=float, help="AdamW betas = (0.9, beta2)")
    p.add_argument("--clip_grad", type=float, help="clip the gradient norm to this")
    p.add_argument("--ema", type=float, help="EMA decay per step; 0 turns EMA off")
    p.add_argument("--epoch_steps", type=int, help="cap the steps of each epoch (smoke runs)")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype; auto = bf16 on a GPU that has it, else fp16 (+ GradScaler); none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="output")
    p.add_argument("--resume", default="", help="checkpoint to resume from; default: output_dir/checkpoint.pth")
    p.add_argument("--save_every_min", type=float, default=10.0, help="also checkpoint inside an epoch this often")
    p.add_argument("--keep_epochs", type=int, nargs="+", default=[], metavar="E",
                   help="also keep the checkpoint after epoch E as checkpoint-epE.pth (a teacher curve's points)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    p.set_defaults(**recipe)
    p.presets = presets
    return p


def parse_args(parser, argv=None):
    """Parse twice: first --preset, whose values become defaults that explicit flags still override. Resolves
    --amp auto and the worker count, and checks every range before any work."""
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**parser.presets[known.preset])
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.amp == "auto":
        args.amp = "none" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if args.num_workers is None:  # the cores this process may use, shared with the other processes of its node
        args.num_workers = min(8, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    for name, spec in RANGES.items():
        v = getattr(args, name, None)
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        if v is not None and not ((lo <= v if spec[0] == "[" else lo < v) and (v <= hi if spec[-1] == "]" else v < hi)):
            raise ValueError(f"--{name} {v} is out of range: it must be in {spec}")
    if any(not 1 <= e <= args.epochs for e in args.keep_epochs):
        raise ValueError(f"--keep_epochs {args.keep_epochs}: every E must be in [1, --epochs {args.epochs}]")
    if args.model not in vit.PRESETS:
        raise ValueError(f"unknown model {args.model!r}; presets: {', '.join(vit.PRESETS)}")
    patch = vit.PRESETS[args.model][1]
    if args.input_size < patch or args.input_size % patch:
        raise ValueError(f"--input_size {args.input_size} must be a multiple of {args.model}'s patch size {patch}")
    return args


def print0(*args, **kwargs):
    """print() on rank 0 only: one log per run. (Errors are printed by cli() on whichever rank meets them.)"""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def seed_of(*ints):
    """A 63-bit seed that follows from the integers alone (the same in every process and Python version)."""
    return int.from_bytes(hashlib.sha256(repr(ints).encode()).digest()[:8], "little") >> 1


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


def cast_frozen(method, dtype):
    """Cast once to the autocast dtype every child of the method whose parameters are all frozen (a teacher), so
    that autocast does not cast its weights again on every forward."""
    for child in method.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.to(dtype)


def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, fsync, rename: `path` is always the old file or the new one.
    A failed write (a full disk) removes the temporary file and raises ValueError; the old file is kept."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ValueError(f"cannot write {path} ({e.strerror or e}): free some space or use another --output_dir; "
                         "the previous checkpoint is intact") from None


def lock_output(folder):
    """Create `folder` and take its lock file (holding 'pid host'), which also proves the folder writable. A second
    run on the folder is refused while the first runs; a lock left by a dead process of this host is taken over."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output_dir {folder} is a file: give a folder")
    path = os.path.join(folder, "run.lock")
    for _ in range(2):
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, _, host = open(path).read().partition(" ")
            if not pid.isdigit() or host == socket.gethostname() and not alive(int(pid)):  # (or cut short)
                print0(f"taking over {path}: its process {pid} is no longer running")
                os.remove(path)
                continue
            raise ValueError(f"{folder} is in use by process {pid} on {host} ({path}): wait for that run to end, use "
                             "another --output_dir, or delete the lock file if that run is over") from None
        except OSError as e:
            raise ValueError(f"cannot write in --output_dir {folder} ({e.strerror}): choose a folder you can write "
                             "to") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}")
        return path
    raise ValueError(f"cannot take the lock {path}: another run is starting on the same folder")


def alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def check_resume(path, ckpt, record):
    """Refuse a checkpoint another run wrote: a key of arch, method (its name and teacher) or config (minus
    NOT_RESULTS) that differs is named. Keys the checkpoint lacks (written before they existed) are not compared."""
    if not (isinstance(ckpt, dict) and "optimizer" in ckpt):
        raise ValueError(f"{path} is not a training checkpoint (no optimizer state): use --finetune to start from it")
    diff = [f"{k} {there[k]!r} there, {here.get(k, 'unset')!r} here" for part, here in record.items()
            for there in [ckpt.get(part) or {}] for k in sorted(there)
            if not (part == "config" and k in NOT_RESULTS) and (k not in here or here[k] != there[k])]
    if diff:
        raise ValueError(f"{path} is not a checkpoint of this run ({'; '.join(diff)}): use another --output_dir, or "
                         "the command that wrote it")


@torch.no_grad()
def evaluate(method, model, loader, args, world_size, progress=False, ema=None):
    """Top-1, top-5 and loss of method.predict(model, .) over the loader (each process its own shard, summed); with
    `ema`, the EMA's too (keys ema_*) in the same pass over the data."""
    models = {"": model, **({"ema_": ema} if ema is not None else {})}
    totals = torch.zeros(len(models), 4, dtype=torch.float64, device=args.device)  # loss sum, top-1, top-5, count
    for m in models.values():
        m.eval()
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, labels = images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
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
    return {f"{prefix}{k}": v for prefix, (loss, c1, c5, n) in zip(models, totals.tolist())
            for k, v in dict(loss=loss / n, acc1=100 * c1 / n, acc5=100 * c5 / n).items()}


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


class Seeded(torch.utils.data.Dataset):
    """dataset[(epoch, i)] is dataset[i] drawn with torch's generator seeded from (seed, epoch, i): an image's
    augmentation follows from these alone, whichever worker or process loads it, so workers persist across epochs
    and a resumed run draws what an uninterrupted one would."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

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
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.epoch, self.skip = 0, 0

    def __len__(self):
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_of(self.seed, self.epoch)))
        mine = order[self.rank::self.world_size].tolist()
        for b in range(self.skip, len(self)):
            yield [(self.epoch, i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]


def quiet_worker(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it finishes the step


def build_loaders(args, rank, world_size):
    """Datasets from data.py; training batches from EpochBatches, evaluation shards without padding so that every
    image is counted exactly once. Workers persist across epochs (seeding does not depend on them)."""
    train_set, num_classes = data.build_dataset(args.dataset, args.data_path, "train", args.input_size,
                                                subset=args.subset, seed=args.seed, download=args.download,
                                                aug=args.aug, reprob=args.reprob)
    val_set, _ = data.build_dataset(args.dataset, args.data_path, "val", args.input_size, subset=args.val_subset,
                                    seed=args.seed, download=args.download)
    if args.batch_size * world_size > len(train_set):
        raise ValueError(f"--batch_size {args.batch_size} x {world_size} processes is larger than the {len(train_set)} "
                         "training images: lower --batch_size")
    common = dict(num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                  persistent_workers=args.num_workers > 0, worker_init_fn=quiet_worker)
    batches = EpochBatches(len(train_set), args.batch_size, rank, world_size, args.seed)
    train_loader = torch.utils.data.DataLoader(Seeded(train_set, args.seed), batch_sampler=batches, **common)
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, args.batch_size, **common)
    return train_loader, val_loader, num_classes


class Stop(Exception):
    """End the run with exit code `code`; what there was to say has been printed."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def together(world_size, device):
    """A block every process runs; a bad input met in it stops them all: the first process that met one raises it
    (cli prints it), the others raise Stop(2) and exit quietly. One all-reduce, at the end of the block."""
    error = None
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        error = e
    if world_size > 1:
        first = torch.tensor(dist.get_rank() if error else world_size, device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() < world_size and first.item() != dist.get_rank():
            raise Stop(2)
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------------------ the loop
def run(args, make_method, make_model=build_model):
    """Everything a training script does: data, model (make_model(args, num_classes)), method
    (make_method(model, num_classes) -> Baseline), optimiser, resume, the epochs, evaluation, checkpoints, logs."""
    rank, world_size = init_distributed(args)
    if args.device.startswith("cuda"):  # the attention loss runs in float32 by design: let its matmuls use TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with together(world_size, args.device):
        lock = lock_output(args.output_dir) if rank == 0 else None
    caught, previous = [], {}  # SIGINT / SIGTERM: noted, acted on at the end of the step; a second one acts at once
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda s, _: caught.append(s) or signal.signal(s, previous[s]))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(args, make_method, make_model, rank, world_size, caught)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if lock:
            os.remove(lock)
        if world_size > 1:
            dist.destroy_process_group()


def train(args, make_method, make_model, rank, world_size, caught):
    cuda = args.device.startswith("cuda")
    with together(world_size, args.device):  # every check before the first step
        torch.manual_seed(args.seed)
        train_loader, val_loader, num_classes = build_loaders(args, rank, world_size)
        model = make_model(args, num_classes).to(args.device)
        method = make_method(model, num_classes).to(args.device)
        if cuda and args.amp != "none":
            cast_frozen(method, torch.bfloat16 if args.amp == "bf16" else torch.float16)
        eff_batch = args.batch_size * args.accum_iter * world_size
        args.lr = args.lr or args.blr * eff_batch / 256
        if args.min_lr_ratio is not None:
            args.min_lr = args.min_lr_ratio * args.lr
        steps = min(len(train_loader) // args.accum_iter, args.epoch_steps or math.inf)  # per epoch
        if steps < 1:
            raise ValueError(f"--accum_iter {args.accum_iter} is more than the {len(train_loader)} batches of an epoch")
        opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr,
                                betas=(0.9, args.beta2), fused=cuda)
        scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
        ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
        mix = data.MixupCutmix(args.mixup, args.cutmix, args.smoothing, num_classes)
        record = dict(arch=model.arch, method=dict(method.describe(), method=type(method).__name__), config=vars(args))
        ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
        resume, start_epoch, start_step = args.resume or ckpt_path, 0, 0
        if os.path.exists(resume):
            ckpt = vit.load_file(resume)
            check_resume(resume, ckpt, record)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"] or ckpt["model"])
            # an epoch-boundary checkpoint (every one written before mid-epoch saves existed) starts its epoch afresh
            start_epoch, start_step = ckpt["epoch"], ckpt["step"]
            if not 0 <= start_step - start_epoch * steps <= steps:
                raise ValueError(f"{resume}: step {start_step} is not in epoch {start_epoch} of {steps} steps")
            print0(f"resumed {os.path.dirname(resume) or '.'} at epoch {start_epoch}, step {start_step}")
        elif args.resume:
            raise FileNotFoundError(f"--resume {args.resume} does not exist")
    progress = rank == 0 and not args.no_progress and sys.stderr.isatty()
    print0(f"{type(method).__name__}: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
           f"{len(train_loader.dataset)} train / {len(val_loader.dataset) * world_size} val images, {num_classes} "
           f"classes; lr {args.lr:.3g} = blr {args.blr} x {eff_batch} / 256, cosine to {args.min_lr:.3g}; {steps} "
           f"steps/epoch x {args.epochs} epochs; {world_size} process(es) on {args.device}, amp {args.amp}, "
           f"{args.num_workers} loader workers each")

    def save(epoch, step, stats=None):
        with together(world_size, args.device):  # rank 0 writes; a full disk stops every process
            if rank == 0:
                state = dict(model=model.state_dict(), ema=ema.state_dict() if ema is not None else None,
                             optimizer=opt.state_dict(), scaler=scaler.state_dict(), epoch=epoch, step=step, **record)
                save_atomic(state, ckpt_path)
                if stats and epoch in args.keep_epochs:
                    save_atomic(state, os.path.join(args.output_dir, f"checkpoint-ep{epoch}.pth"))
                if stats:
                    with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                        f.write(json.dumps(stats) + "\n")

    runner = method
    if world_size > 1:
        runner = DistributedDataParallel(method, device_ids=[torch.device(args.device).index] if cuda else None)
    no_sync = runner.no_sync if world_size > 1 else contextlib.nullcontext
    if args.compile:
        runner = torch.compile(runner)
    if rank == 0:
        for stale in glob.glob(os.path.join(args.output_dir, "checkpoint.pth.tmp*")):  # a save killed mid-write
            os.remove(stale)

    stats, last_save = {}, time.monotonic()
    for epoch in range(start_epoch, args.epochs):
        first = start_step - epoch * steps if epoch == start_epoch else 0  # steps of this epoch already done
        train_loader.batch_sampler.epoch, train_loader.batch_sampler.skip = epoch, first * args.accum_iter
        batches = iter(train_loader)
        method.train()
        sums, t0 = {}, time.time()
        bar = tqdm(range(first, steps), desc=f"epoch {epoch}", disable=not progress)
        for i in bar:
            step = epoch * steps + i
            # mixup, drop path, MAE's masks: drawn from (seed, process, step), as an uninterrupted run draws them
            torch.manual_seed(seed_of(args.seed, rank, step))
            lr = lr_at(step, args, steps)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            logs = {}
            for micro in range(args.accum_iter):
                images, labels = next(batches)
                images, labels = images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
                images, targets = mix(images, labels)
                with no_sync() if micro < args.accum_iter - 1 else contextlib.nullcontext(), autocast(args):
                    loss, extra = runner(images, targets)
                    scaler.scale(loss / args.accum_iter).backward()
                for k, v in {"loss": loss, **extra}.items():  # tensors: no host synchronisation per micro-step
                    logs[k] = logs.get(k, 0.0) + v.detach().float() / args.accum_iter
            if args.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - args.ema)
            # The step's one host synchronisation: the losses (summed over processes), and whether any process wants
            # a save (rank 0's clock) or was interrupted, so that all of them stop or save at the same step.
            flags = [rank == 0 and time.monotonic() - last_save > 60 * args.save_every_min,
                     signal.SIGINT in caught, signal.SIGTERM in caught]
            flags = torch.tensor(flags, dtype=torch.float32).to(args.device, non_blocking=True)
            reduced = torch.cat([torch.stack(list(logs.values())), flags])
            if world_size > 1:
                dist.all_reduce(reduced)
            *values, save_now, sigint, sigterm = reduced.tolist()
            values = {k: v / world_size for k, v in zip(logs, values)}
            if not all(map(math.isfinite, values.values())):
                if rank:
                    raise Stop(2)  # rank 0 says it
                raise FloatingPointError(
                    f"non-finite loss ({', '.join(f'{k} {v:.4g}' for k, v in values.items())}) at epoch {epoch}, "
                    f"step {step}: stopped, the last checkpoint (if any) intact (lower --blr, add --clip_grad, or use "
                    "--amp bf16 instead of fp16)")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
            if save_now or sigint or sigterm:
                save(epoch, step + 1)  # inside the epoch: a resume continues at step + 1
                last_save = time.monotonic()
            if sigint or sigterm:
                print0(f"interrupted at epoch {epoch}, step {step + 1}; rerun the same command to resume",
                       file=sys.stderr)
                raise Stop(143 if sigterm else 130)

        stats = dict(epoch=epoch, step=(epoch + 1) * steps, lr=lr_at((epoch + 1) * steps - 1, args, steps),
                     time=round(time.time() - t0, 2), **{f"train_{k}": v / (steps - first) for k, v in sums.items()})
        if method.classifies:
            result = evaluate(method, model, val_loader, args, world_size, progress, ema)
            stats.update({(k if k.startswith("ema_") else f"val_{k}"): v for k, v in result.items()})
        save(epoch + 1, (epoch + 1) * steps, stats)
        last_save = time.monotonic()
        print0(json.dumps(stats))
    return stats


def cli(main):
    """Run main(). A bad input (ValueError, FileNotFoundError) or a non-finite loss ends with one line `error: ...`
    on stderr and exit code 2, printed by whichever process met it; an interrupt exits 130 (SIGINT) / 143 (SIGTERM)."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except Stop as e:
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C, which does not wait for the step to end
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    parser = get_args_parser("Train a ViT from scratch, or fine-tune one with --finetune.", FINETUNE,
                             {"cifar": CIFAR})
    args = parse_args(parser, argv)
    return run(args, lambda model, num_classes: Baseline(model))


if __name__ == "__main__":
    cli(main)

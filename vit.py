"""vit.py: the Vision Transformer, its presets, checkpoint loading and the teacher table.

The ViT of Dosovitskiy et al. with timm/MAE parameter names (patch_embed.proj, cls_token, reg_token, dist_token,
pos_embed, blocks.i.norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, norm, fc_norm, head, head_dist), so timm,
MAE, DeiT and DINO checkpoints load without renaming, their architecture read from the weights. Attention runs
through F.scaled_dot_product_attention; a caller may take each block's own q, k, v or replace that one call, which is
all attention transfer needs (Li et al. 2024, arXiv 2411.09702, Sec. 3):

    tokens, qkv = model.forward_features(x, collect=[0, 1])  # qkv[l] = (q, k, v) of block l, each (B, H, N, D)
    tokens, _ = model.forward_features(x, attention_fns={0: fn})  # block 0 computes fn(q, k, v) instead of SDPA
    logits = model.forward_head(tokens)

This file knows nothing of teachers or students; copy_attention.py and distill_attention.py decide what to pass.
Run `python vit.py` to list the presets with their parameter counts.
"""
import argparse
import math
import os
import pickle
import time
import urllib.parse
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x):
        """x (B, N, C) -> the block's own q, k, v, each (B, H, N, D)."""
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, attention_fn=None):
        """x (B, N, C) -> (output (B, N, C), the block's own (q, k, v), each (B, H, N, D)).

        attention_fn(q, k, v) -> (B, H, N, D), when given, is computed in place of SDPA(q, k, v)."""
        B, N, C = x.shape
        q, k, v = self.heads(x)
        # scale 1/sqrt(D), and never an N x N map in memory
        if attention_fn is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        else:
            out = attention_fn(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), (q, k, v)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))  # round, not int: a ratio read from fc1 gives back its width

    def forward(self, x, attention_fn=None, keep=None):
        """keep: (2, B) per-sample stochastic-depth multipliers (0 or 1/keep_prob) for the attention and MLP
        branches, or None for no drop. Returns (x, (q, k, v)) with the block's own q, k, v."""
        a, qkv = self.attn(self.norm1(x), attention_fn)
        if keep is not None:
            a = a * keep[0].view(-1, 1, 1).to(a.dtype)
        x = x + a
        m = self.mlp(self.norm2(x))
        if keep is not None:
            m = m * keep[1].view(-1, 1, 1).to(m.dtype)
        return x + m, qkv


class VisionTransformer(nn.Module):
    """A ViT; the students are the presets below (class token, no registers). class_token=False, reg_tokens,
    dist_token (DeiT) and no_embed_class (position embeddings for the patches only) are timm's, so that any
    checkpoint loads and attends as the model that wrote it."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, global_pool=True, class_token=True,
                 reg_tokens=0, dist_token=False, no_embed_class=False):
        super().__init__()
        if not (class_token or global_pool):
            raise ValueError("a ViT without a class token must pool its patch tokens (global_pool=True)")
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, global_pool=global_pool, class_token=class_token, reg_tokens=reg_tokens,
                         dist_token=dist_token, no_embed_class=no_embed_class)  # plain types: saved in checkpoints
        self.num_heads, self.depth, self.drop_path, self.global_pool = num_heads, depth, drop_path, global_pool
        self.grid = img_size // patch_size
        self.num_prefix_tokens = class_token + dist_token + reg_tokens  # in this order before the patches
        self.no_embed_class = no_embed_class
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        rows = self.grid ** 2 + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, rows, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        # MAE fine-tune convention: global pool -> fc_norm on the pooled patch tokens and no final norm;
        # CLS pool -> final norm and no fc_norm. The state_dict keys follow, as in timm and MAE.
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        if dist_token:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.apply(init_weights)
        for p in (self.pos_embed, self.cls_token, self.dist_token, self.reg_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def sample_drop_masks(self, batch, device=None):
        """Stochastic-depth multipliers (depth, 2, B): rate rises linearly from 0 to drop_path over the blocks."""
        keep = 1 - torch.linspace(0, self.drop_path, self.depth, device=device).view(-1, 1, 1)
        return torch.bernoulli(keep.expand(self.depth, 2, batch)) / keep

    def embed(self, x):
        """(B, C, H, W) -> tokens (B, prefix + N, D): class, distillation and register tokens first, then the
        patches, with position embeddings added."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + self.pos_embed[:, self.pos_embed.shape[1] - x.shape[1]:]  # the patches' rows come last
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if not prefix:
            return x
        prefix = torch.cat(prefix, dim=1)
        if not self.no_embed_class:  # timm's default layout: the prefix tokens have position embeddings too
            prefix = prefix + self.pos_embed[:, :self.num_prefix_tokens]
        return torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)

    def forward_features(self, x, attention_fns=None, collect=(), drop_masks=None, depth=None):
        """Run the first `depth` blocks (all by default) on images x.

        attention_fns: {layer: fn}: fn(q, k, v) -> (B, H, N, D) replaces SDPA(q, k, v) in that block (Attention).
        collect:    layers whose own (q, k, v) to return.
        drop_masks: (depth, 2, B) stochastic-depth multipliers to use (e.g. shared with another model); when None
                    they are sampled in training mode and not used in eval mode.
        Returns the tokens (B, prefix + N, D) after the last block run, un-normed, and {layer: (q, k, v)}.
        The caller checks layers and shapes once, when it plans a run; nothing is checked here.
        """
        attention_fns = attention_fns or {}
        if drop_masks is None and self.training and self.drop_path > 0:
            drop_masks = self.sample_drop_masks(x.shape[0], x.device)
        x = self.embed(x)
        out = {}
        for i, block in enumerate(self.blocks[:depth]):
            keep = drop_masks[i] if drop_masks is not None and i < len(drop_masks) else None
            x, qkv = block(x, attention_fns.get(i), keep)
            if i in collect:
                out[i] = qkv
        return x, out

    def forward_head(self, x):
        """Tokens (B, prefix + N, D) -> logits (B, num_classes)."""
        if self.global_pool:
            return self.head(self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1)))
        x = self.norm(x)
        if self.dist_token is not None:  # DeiT at inference: the mean of its class and distillation heads
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])

    def forward(self, x, attention_fns=None, drop_masks=None):
        return self.forward_head(self.forward_features(x, attention_fns=attention_fns, drop_masks=drop_masks)[0])


def init_weights(m):
    """timm/MAE initialisation of one module (use with model.apply)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def attention_map(q, k):
    """The explicit map softmax(q k^T * scale), (B, H, N, N), for analysis and pictures only."""
    return torch.softmax((q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)


# ------------------------------------------------------------------------------------------------------ presets
# name: (img_size, patch_size, embed_dim, depth, num_heads). The CIFAR presets (32 px, patch 4, 65 tokens) are sized
# for a 2-core CPU (`python vit.py` prints their parameter counts); vit_nano_cifar, the student's depth and heads at
# half its width, is the supervised teacher's shape (whole maps fit any head width).
PRESETS = {
    "vit_tiny_patch16": (224, 16, 192, 12, 3),
    "vit_small_patch16": (224, 16, 384, 12, 6),
    "vit_base_patch16": (224, 16, 768, 12, 12),
    "vit_large_patch16": (224, 16, 1024, 24, 16),
    "vit_huge_patch14": (224, 14, 1280, 32, 16),
    "vit_micro_cifar": (32, 4, 128, 6, 4),
    "vit_tiny_cifar": (32, 4, 192, 6, 3),
    "vit_nano_cifar": (32, 4, 96, 6, 3),
    "vit_small_cifar": (32, 4, 384, 12, 6),
}


def create_model(name, **kwargs):
    """A preset by name; keyword arguments override it (num_classes, drop_path, global_pool, img_size, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    img, patch, dim, depth, heads = PRESETS[name]
    arch = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
    return VisionTransformer(**{**arch, **kwargs})


# ------------------------------------------------------------------------------------------------ teacher table
HERE = os.path.dirname(os.path.abspath(__file__))
MAE_URL = "https://dl.fbaipublicfiles.com/mae/"
# name: where the weights are, the heads (which no tensor shape holds) and the input statistics the model was trained
# with. The architecture itself is read from the weights. mae_tiny_cifar10, mae90_tiny_cifar10 and
# mae90_ep8_tiny_cifar10 (pretrain_mae.py: mask 0.75 for 48 epochs, mask 0.9 for 4 and 8) and sup_nano_cifar10
# (train.py, supervised) were trained on CIFAR-10 normalised with data.MEAN / data.STD, which are ImageNet's; a `mean` /
# `std` in a checkpoint wins over this table.
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
TEACHERS = {
    "mae_vit_b": dict(source=MAE_URL + "pretrain/mae_pretrain_vit_base.pth", num_heads=12, **IMAGENET),
    "mae_vit_l": dict(source=MAE_URL + "pretrain/mae_pretrain_vit_large.pth", num_heads=16, **IMAGENET),
    "mae_vit_h": dict(source=MAE_URL + "pretrain/mae_pretrain_vit_huge.pth", num_heads=16, **IMAGENET),
    "mae_vit_b_ft": dict(source=MAE_URL + "finetune/mae_finetuned_vit_base.pth", num_heads=12, **IMAGENET),
    "mae_vit_l_ft": dict(source=MAE_URL + "finetune/mae_finetuned_vit_large.pth", num_heads=16, **IMAGENET),
    "mae_vit_h_ft": dict(source=MAE_URL + "finetune/mae_finetuned_vit_huge.pth", num_heads=16, **IMAGENET),
    "mae_tiny_cifar10": dict(source=os.path.join(HERE, "teachers", "mae_tiny_cifar10.pth"), num_heads=3, **IMAGENET),
    "mae90_tiny_cifar10": dict(source=os.path.join(HERE, "teachers", "mae90_tiny_cifar10.pth"), num_heads=3,
                               **IMAGENET),
    "mae90_ep8_tiny_cifar10": dict(source=os.path.join(HERE, "teachers", "mae90_ep8_tiny_cifar10.pth"), num_heads=3,
                                   **IMAGENET),
    "sup_nano_cifar10": dict(source=os.path.join(HERE, "teachers", "sup_nano_cifar10.pth"), num_heads=3, **IMAGENET),
    # The other pre-training methods the paper compares, ViT-B/16 each (12 heads, ImageNet statistics in each repo's
    # Normalize). Addresses as the official repositories give them, direct downloads all three:
    # DINO, facebookresearch/dino README.md, table row "ViT-B/16", link "backbone only": a plain state dict, timm
    # names, no head (their hubconf.py dino_vitb16 loads it strictly into vit_base(num_classes=0)).
    "dino_vit_b": dict(source="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
                       num_heads=12, **IMAGENET),
    # MoCo v3, facebookresearch/moco-v3 CONFIG.md (README.md: "Pre-trained models ... can be found at CONFIG.md"),
    # row "ViT-Base", "pretrain files" link: main_moco.py's {'state_dict': DDP(MoCo).state_dict(), ...}, the encoder
    # under module.base_encoder. (read_state_dict).
    "mocov3_vit_b": dict(source="https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
                         num_heads=12, **IMAGENET),
    # DeiT (supervised on ImageNet-1k), facebookresearch/deit README_deit.md (linked from README.md), row "DeiT-base":
    # {'model': ...}, timm names, with its 1000-class head; not the distilled variant (no dist_token).
    "deit_vit_b": dict(source="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
                       num_heads=12, **IMAGENET),
}


def resolve(name_or_path):
    """A teacher name or a file path -> a local file path. A name's URL is downloaded once into torch.hub's cache;
    under torchrun local rank 0 downloads while the other ranks wait, then all read the same file."""
    if name_or_path not in TEACHERS:
        if os.path.isfile(name_or_path):
            return name_or_path
        raise ValueError(f"unknown model {name_or_path!r}: not a file and not a known name ({', '.join(TEACHERS)})")
    src = TEACHERS[name_or_path]["source"]
    if not src.startswith("https://"):
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{name_or_path!r} should be at {src} but is not: restore it from git or "
                                    "make it with pretrain_mae.py (README)")
        return src
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(src).path))
    local_rank, error = int(os.environ.get("LOCAL_RANK", 0)), "local rank 0 could not"
    if local_rank == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(src, path)  # writes a temporary file, then renames: never half a file
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # then every rank sees the file, or every rank stops with the error below
    else:  # torchrun before init_process_group: torchrun ends this rank if rank 0 fails
        while local_rank and not os.path.exists(path):
            time.sleep(1)
    if not os.path.exists(path):
        raise ValueError(f"cannot download {name_or_path!r} from {src} ({error}); download it on a machine that can "
                         f"and pass the file's path instead of {name_or_path!r}")
    return path


def load_file(path):
    """A checkpoint file -> its contents: .safetensors, or .pth through torch.load(weights_only=True) only (plus the
    argparse.Namespace of training arguments that MAE, DeiT, DINO and timm save beside the weights). A file that is
    not one torch wrote (torch_file_problem) is refused before torch.load reads anything."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise ValueError(f"cannot read {path} as safetensors ({e}); is the file complete?") from e
    try:
        problem = torch_file_problem(path)
    except Exception as e:  # zipfile.BadZipFile: the archive is cut short
        raise cannot_read(path, e) from e
    if problem:
        raise ValueError(f"{path} is not a checkpoint torch wrote ({problem}): pass a file torch.save wrote, such as "
                         "an --output_dir's checkpoint.pth, or a teacher name")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects that need arbitrary unpickling, which is refused for safety; "
                         "re-save only its tensors with torch.save(model.state_dict(), path)") from e
    except Exception as e:
        raise cannot_read(path, e) from e


def cannot_read(path, e):
    return ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {oneline(e)}); it is truncated or not a "
                      "PyTorch file: download or write it again")


def oneline(e):  # an exception's first line: error messages stay one line
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells its zip format from its legacy pickle (serialization._is_zipfile)


def torch_file_problem(path):
    """Why the file at path is not one torch.save wrote, as a phrase, or None when torch.load may read it.

    torch.save writes a zip archive whose every record is STORED (uncompressed); torch.load inflates a compressed one
    into memory of the size the archive declares, before any check of ours. So a 2 MB file whose record claims 2 GiB
    of deflated zeros would take 2 GiB: the archive's central directory (zipfile reads nothing else) is checked first,
    and a compressed record, or one claiming more bytes than the file holds, refused. A file of torch's legacy format
    (a pickle, before torch 1.6) is left to torch.load; a text file (a log.jsonl, a config) is named as one, where
    torch.load would call it a pickle that needs arbitrary unpickling. Raises zipfile.BadZipFile for an archive that
    is cut short."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        return "it is empty"
    if head.startswith(b"\x80"):  # a pickle, protocol 2 or later: torch's legacy format
        return None
    if not head.startswith(ZIP_MAGIC):
        return describe_start(head)
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive:  # zipfile.BadZipFile for an archive cut short
        records = archive.infolist()
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            return (f"record {r.filename} is compressed to inflate to {r.file_size} bytes, and torch stores every "
                    "record uncompressed: refusing to inflate it")
        if r.compress_size != r.file_size or r.header_offset + r.file_size > size:
            return f"record {r.filename} claims {r.file_size} bytes where the file has {size}: it is corrupt"
    claimed = sum(r.file_size for r in records)
    if claimed > size:
        return f"its records claim {claimed} bytes where the file has {size}: it is corrupt"
    return None


def describe_start(head):
    """The first bytes of a file that is neither a zip archive nor a pickle -> what it is, as a phrase."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        text = head[:e.start].decode("utf-8") if e.start > len(head) - 4 else None  # a character cut at the end
    if text is None or "\x00" in text:
        return f"it starts with the bytes {head[:8]!r}, neither a zip archive nor a pickle"
    start = " ".join(text.split())[:40]
    kind = "a JSON file" if start.startswith(("{", "[")) else "a text file"
    return f"it is {kind}, starting {start!r}"


RECORDS = ("arch", "args", "model_args", "pretrained_cfg")  # what checkpoints record beside their weights


def read_state_dict(path):
    """A checkpoint file -> (state_dict, metadata); unwraps {'model': ...} (MAE, DeiT, this repository) and
    {'state_dict': ...} (timm's train.py, MoCo v3), strips DDP's 'module.' prefix, keeps only MoCo v3's base encoder
    and refuses NaN or Inf weights."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    meta = {k: v for k, v in ckpt.items() if k in RECORDS or not isinstance(v, (dict, torch.Tensor))}
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("base_encoder.") for k in state):
        # MoCo v3 (moco/builder.py): base_encoder.* is a timm ViT whose head.* is their projector MLP, beside a
        # momentum_encoder.* and a predictor.*. Keep the base encoder without its head, as their main_lincls.py and
        # convert_to_deit.py do.
        state = {k.removeprefix("base_encoder."): v for k, v in state.items()
                 if k.startswith("base_encoder.") and not k.startswith("base_encoder.head.")}
        meta.pop("arch", None)  # their 'vit_small' has 12 heads (moco-v3 vits.py), not the 6 the name says elsewhere
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{path}: tensor {key} holds NaN or Inf: the file is corrupt or its training diverged; "
                             "use another checkpoint")
    return state, meta


def arch_of(state, name="checkpoint"):
    """The constructor arguments, all but num_heads, of the ViT that wrote a state dict, read from its shapes; name:
    the file, for the errors."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        held = f"its {len(state)} tensors start {', '.join(list(state)[:3])}" if state else "it holds no tensors"
        raise ValueError(f"{name} has no patch_embed.proj.weight / pos_embed ({held}): not a ViT with timm/MAE names; "
                         "pass a ViT checkpoint")
    dim, chans, patch, _ = state["patch_embed.proj.weight"].shape
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = ("cls_token" in state) + ("dist_token" in state) + regs
    rows = state["pos_embed"].shape[1]
    # timm's default layout has a position row per prefix token; no_embed_class (DeiT III, registers) has none
    no_embed_class = prefix > 0 and (rows < prefix or math.isqrt(rows - prefix) ** 2 != rows - prefix)
    grid = math.isqrt(rows if no_embed_class else rows - prefix)
    if grid * grid != (rows if no_embed_class else rows - prefix):
        raise ValueError(f"{name}: pos_embed has {rows} rows, not a square patch grid with or without {prefix} prefix "
                         "rows: pass a ViT checkpoint")
    return dict(img_size=grid * patch, patch_size=patch, in_chans=chans,
                num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0, embed_dim=dim,
                depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim, qkv_bias="blocks.0.attn.qkv.bias" in state,
                global_pool="fc_norm.weight" in state, class_token="cls_token" in state, reg_tokens=regs,
                dist_token="dist_token" in state, no_embed_class=no_embed_class)


# The standard ViT sizes (ViT, DeiT, MAE, DINO names): width, heads. A model name recorded in a checkpoint gives the
# heads only when the weights have that size's width.
SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16), "huge": (1280, 16)}


def recorded_heads(meta, width):
    """The heads a checkpoint records: num_heads in this repository's `arch`, in `args` or timm's `model_args`, or a
    model name (timm's pretrained_cfg['architecture'], MAE's and DeiT's args.model, DINO's args.arch). None if none."""
    for key in RECORDS:
        record = meta.get(key)
        record = vars(record) if isinstance(record, argparse.Namespace) else record
        if isinstance(record, dict) and record.get("num_heads"):
            return int(record["num_heads"])
        names = [record] if isinstance(record, str) else [
            record.get(k) for k in ("model", "arch", "architecture")] if isinstance(record, dict) else []
        for name in filter(lambda n: isinstance(n, str), names):
            for size, (w, heads) in SIZES.items():
                if size in name.lower() and w == width:
                    return heads
    return None


def load_pretrained(name_or_path, num_heads=None, **overrides):
    """A teacher name (TEACHERS) or a checkpoint file -> (model, report).

    The architecture is read from the weights (arch_of); the heads, which no shape holds, from the checkpoint's
    record, the TEACHERS table or num_heads (--teacher_heads); overrides (img_size, num_classes, ...) win. The
    report is load_state's plus `mean`, `std`: the input statistics the checkpoint or the table records, else None."""
    path = resolve(name_or_path)
    state, meta = read_state_dict(path)
    table = TEACHERS.get(name_or_path, {})
    arch = arch_of(state, path)
    known = recorded_heads(meta, arch["embed_dim"]) or table.get("num_heads")
    if num_heads and known and num_heads != known:
        raise ValueError(f"{path} records {known} heads but --teacher_heads is {num_heads}: drop --teacher_heads")
    heads = num_heads or known
    if not heads:
        raise ValueError(f"the number of heads of {path} cannot be read from the weights and the file records none: "
                         "pass it with --teacher_heads")
    if arch["embed_dim"] % heads:
        raise ValueError(f"{path} has width {arch['embed_dim']}, which {heads} heads do not divide: "
                         "pass the right --teacher_heads")
    model = VisionTransformer(**{**arch, "num_heads": heads, **overrides})
    report = load_state(model, state)
    stats = next((r for r in (meta, meta.get("pretrained_cfg") or {}, table) if r.get("mean")), {})
    report.update(mean=tuple(stats["mean"]) if stats else None, std=tuple(stats["std"]) if stats else None)
    return model, report


# Keys a pre-trained checkpoint may carry that a ViT classifier does not use (MAE's decoder and mask token; the heads
# and momentum copy of pretrain_moco.py), and keys a classifier may lack in a checkpoint (a new head, a new fc_norm
# when fine-tuning with global pooling).
DROPPABLE = ("decoder_", "mask_token", "projector.", "predictor.", "momentum_")
FRESH = ("head.", "head_dist.", "fc_norm.")


def load_state(model, source):
    """Load a file or state dict into `model` and say what happened.

    Dropped without complaint: MAE decoder keys and mask_token, pretrain_moco.py's heads and momentum copy; `norm.*` when the model pools with fc_norm (as MAE
    fine-tuning does). Left freshly initialised: head.*, head_dist.* and fc_norm.* when absent, and the heads when
    the class count differs. pos_embed is resized (bicubic) to the model's patch grid. Anything else missing, unexpected or of
    another shape is a ValueError naming the key and both shapes. Returns a dict report.
    """
    from_file = isinstance(source, (str, os.PathLike))
    state = read_state_dict(source)[0] if from_file else dict(source)
    named = f"{os.fspath(source)}: " if from_file else ""  # errors name the file
    own = model.state_dict()
    report = dict(loaded=[], dropped=[], fresh=[], resized=[])
    for key in list(state):
        if key.startswith(DROPPABLE) or (key.startswith("norm.") and model.global_pool):
            report["dropped"].append(key)
            del state[key]
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        report["resized"].append(f"pos_embed {tuple(state['pos_embed'].shape)} -> {tuple(own['pos_embed'].shape)}")
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.grid, prefix)
    for key in list(state):
        if key.startswith(("head.", "head_dist.")) and key in own and state[key].shape != own[key].shape:
            report["fresh"].append(f"{key} (checkpoint {tuple(state[key].shape)}, model {tuple(own[key].shape)})")
            del state[key]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(FRESH))
    if unexpected or missing:
        raise ValueError(f"{named}checkpoint does not fit the model: unexpected keys {unexpected[:5]}, missing keys "
                         f"{missing[:5]} (of {len(unexpected)} and {len(missing)}); build the model the checkpoint "
                         "was trained as (preset, global_pool)")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{named}{key}: checkpoint has shape {tuple(value.shape)}, model has "
                             f"{tuple(own[key].shape)}; build the model the checkpoint was trained as")
    reported = {f.split(" ")[0] for f in report["fresh"]}
    report["fresh"] += sorted(k for k in own if k not in state and k not in reported and k.startswith(FRESH))
    model.load_state_dict(state, strict=False)
    report["loaded"] = sorted(state)
    return report


def describe(report):
    """One line for the log, from load_state's report."""
    return (f"loaded {len(report['loaded'])} tensors; dropped {len(report['dropped'])} "
            f"({', '.join(sorted({k.split('.')[0] for k in report['dropped']})) or '-'}); "
            f"fresh: {', '.join(report['fresh']) or '-'}; resized: {', '.join(report['resized']) or '-'}")


def resize_pos_embed(pos_embed, grid, num_prefix=1):
    """(1, prefix + g*g, D) -> (1, prefix + grid*grid, D): the prefix tokens' rows are kept, the patch grid resized
    bicubically."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    g = math.isqrt(patches.shape[1])
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


if __name__ == "__main__":
    for name in PRESETS:
        n = sum(p.numel() for p in create_model(name, num_classes=10 if "cifar" in name else 1000).parameters())
        print(f"{name:20s} {n / 1e6:7.2f} M parameters")

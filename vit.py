"""vit.py: the Vision Transformer, its presets, checkpoint loading and the teacher table.

The ViT of Dosovitskiy et al. with timm/MAE parameter names (patch_embed.proj, cls_token, pos_embed, blocks.i.norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, norm, fc_norm, head), so MAE, timm, DeiT and DINO checkpoints load
without renaming. Attention always runs through F.scaled_dot_product_attention, and a caller can steer it
(method.md, "Attention copy" / "Attention distillation"):

    tokens, qkv = model.forward_features(x, collect=[0, 1])         # qkv[l] = (q, k, v) of block l, each (B, H, N, D)
    tokens, _ = model.forward_features(x, inject={0: (q_t, k_t)})   # block 0 uses SDPA(q_t, k_t, v_own)
    logits = model.forward_head(tokens)

This file knows nothing of teachers or students; copy_attention.py and distill_attention.py decide what to pass.
Run `python vit.py` to list the presets with their parameter counts.
"""
import math
import os
import pickle
import urllib.parse

import torch
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

    def forward(self, x, q_ext=None, k_ext=None):
        """x: (B, N, C). q_ext / k_ext: (B, h, N, D) with h <= heads replace the first h heads of the block's own q / k.

        Returns the output (B, N, C) and the block's OWN (q, k, v), each (B, H, N, D), before any replacement.
        External q/k are detached: they come from a frozen model and never receive a gradient.
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        own = (q, k, v)
        if q_ext is not None:
            q = _replace_heads(q, q_ext, "q")
        if k_ext is not None:
            k = _replace_heads(k, k_ext, "k")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q has head dim {q.shape[-1]} but k has {k.shape[-1]}: replacing only q or only k needs "
                             "both models to have the same head dim (width / heads)")
        if q_ext is not None or k_ext is not None:
            # SDPA keeps its inputs for backward; as views they would keep alive the whole qkv tensor of both models
            # (twice what a plain block keeps). Compact copies keep exactly q, k, v: no more memory than scratch.
            # Laid out (B, N, H, D) in memory like the views, so SDPA's output is too and the reshape below is free.
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D); scale 1/sqrt(q's head dim), never an N x N map
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), own


def _replace_heads(own, ext, what):
    """The first ext.shape[1] heads of `own` (B, H, N, D) replaced by `ext` (B, h, N, D')."""
    if ext.shape[0] != own.shape[0] or ext.shape[2] != own.shape[2]:
        raise ValueError(f"external {what} has batch x tokens {ext.shape[0]} x {ext.shape[2]} but the block has "
                         f"{own.shape[0]} x {own.shape[2]}: both models must see the same images at the same "
                         "image size and patch size")
    h, H = ext.shape[1], own.shape[1]
    if h > H:
        raise ValueError(f"external {what} has {h} heads but the block has {H}: transfer at most {H} heads")
    ext = ext.detach().to(own.dtype)
    if h == H:
        return ext  # all heads: the head dim may differ from the block's (a wider teacher)
    if ext.shape[3] != own.shape[3]:
        raise ValueError(f"external {what} has head dim {ext.shape[3]} but the block has {own.shape[3]}: a head "
                         "subset needs equal head dims")
    return torch.cat([ext, own[:, h:]], dim=1)


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
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, q_ext=None, k_ext=None, keep=None):
        """keep: (2, B) per-sample stochastic-depth multipliers (0 or 1/keep_prob) for the attention and MLP
        branches, or None for no drop. Returns (x, (q, k, v)) with the block's own q, k, v."""
        a, qkv = self.attn(self.norm1(x), q_ext, k_ext)
        if keep is not None:
            a = a * keep[0].view(-1, 1, 1).to(a.dtype)
        x = x + a
        m = self.mlp(self.norm2(x))
        if keep is not None:
            m = m * keep[1].view(-1, 1, 1).to(m.dtype)
        return x + m, qkv


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, global_pool=True):
        super().__init__()
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, global_pool=global_pool)  # plain types: saved with every checkpoint
        self.num_heads, self.depth, self.drop_path, self.global_pool = num_heads, depth, drop_path, global_pool
        self.grid = img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        # MAE fine-tune convention: global pool -> fc_norm on the pooled patch tokens and no final norm;
        # CLS pool -> final norm and no fc_norm. The state_dict keys follow, as in timm and MAE.
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def sample_drop_masks(self, batch, device=None):
        """Stochastic-depth multipliers (depth, 2, B): rate rises linearly from 0 to drop_path over the blocks."""
        keep = 1 - torch.linspace(0, self.drop_path, self.depth, device=device).view(-1, 1, 1)
        return torch.bernoulli(keep.expand(self.depth, 2, batch)) / keep

    def embed(self, x):
        """(B, C, H, W) -> tokens (B, 1 + N, D) with the CLS token first and position embeddings added."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_features(self, x, inject=None, collect=(), drop_masks=None, depth=None):
        """Run the first `depth` blocks (all by default) on images x.

        inject:     {layer: (q or None, k or None)}: external q/k that replace the block's own (see Attention).
        collect:    layers whose own (q, k, v) to return.
        drop_masks: (depth, 2, B) stochastic-depth multipliers to use (e.g. shared with another model); when None
                    they are sampled in training mode and not used in eval mode.
        Returns the tokens (B, 1 + N, D) after the last block run, un-normed, and {layer: (q, k, v)}.
        """
        inject = inject or {}
        depth = self.depth if depth is None else depth
        for layer in list(inject) + list(collect):
            if not 0 <= layer < depth:
                raise ValueError(f"layer {layer} is out of range for a model run through {depth} of its "
                                 f"{self.depth} blocks")
        if drop_masks is None and self.training and self.drop_path > 0:
            drop_masks = self.sample_drop_masks(x.shape[0], x.device)
        x = self.embed(x)
        out = {}
        for i in range(depth):
            q_ext, k_ext = inject.get(i, (None, None))
            keep = drop_masks[i] if drop_masks is not None and i < len(drop_masks) else None
            x, qkv = self.blocks[i](x, q_ext, k_ext, keep)
            if i in collect:
                out[i] = qkv
        return x, out

    def forward_head(self, x):
        """Tokens (B, 1 + N, D) -> logits (B, num_classes)."""
        x = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else self.norm(x)[:, 0]
        return self.head(x)

    def forward(self, x, inject=None, drop_masks=None):
        return self.forward_head(self.forward_features(x, inject=inject, drop_masks=drop_masks)[0])


def _init_weights(m):
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
# for a 2-core CPU; README "Models" lists their parameter counts and CPU throughput.
PRESETS = {
    "vit_tiny_patch16": (224, 16, 192, 12, 3),
    "vit_small_patch16": (224, 16, 384, 12, 6),
    "vit_base_patch16": (224, 16, 768, 12, 12),
    "vit_large_patch16": (224, 16, 1024, 24, 16),
    "vit_huge_patch14": (224, 14, 1280, 32, 16),
    "vit_micro_cifar": (32, 4, 128, 6, 4),
    "vit_tiny_cifar": (32, 4, 192, 6, 3),
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
# name: (preset, url or file in this repository, model kwargs). Pre-trained MAE encoders carry a final `norm` and no
# head; the fine-tuned ones pool globally with fc_norm and a 1000-class head.
TEACHERS = {
    "mae_vit_b": ("vit_base_patch16", MAE_URL + "pretrain/mae_pretrain_vit_base.pth", dict(global_pool=False)),
    "mae_vit_l": ("vit_large_patch16", MAE_URL + "pretrain/mae_pretrain_vit_large.pth", dict(global_pool=False)),
    "mae_vit_h": ("vit_huge_patch14", MAE_URL + "pretrain/mae_pretrain_vit_huge.pth", dict(global_pool=False)),
    "mae_vit_b_ft": ("vit_base_patch16", MAE_URL + "finetune/mae_finetuned_vit_base.pth", dict(num_classes=1000)),
    "mae_vit_l_ft": ("vit_large_patch16", MAE_URL + "finetune/mae_finetuned_vit_large.pth", dict(num_classes=1000)),
    "mae_vit_h_ft": ("vit_huge_patch14", MAE_URL + "finetune/mae_finetuned_vit_huge.pth", dict(num_classes=1000)),
    "mae_tiny_cifar10": ("vit_tiny_cifar", os.path.join(HERE, "teachers", "mae_tiny_cifar10.pth"),
                         dict(global_pool=False)),
}


def resolve(name_or_path):
    """A teacher name or a file path -> a local file path; a name's URL is downloaded once into torch.hub's cache."""
    if name_or_path in TEACHERS:
        src = TEACHERS[name_or_path][1]
        if not src.startswith("https://"):
            if not os.path.isfile(src):
                raise FileNotFoundError(f"{name_or_path!r} should be at {src} but is not: restore it from git or "
                                        "make it with pretrain_mae.py (README)")
            return src
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(src).path))
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                torch.hub.download_url_to_file(src, path)  # writes a temporary file, then renames: never half a file
            except Exception as e:
                raise ValueError(f"cannot download {name_or_path!r} from {src} ({type(e).__name__}: {e}); download it "
                                 f"on a machine that can and pass the file's path instead of {name_or_path!r}") from e
        return path
    if os.path.isfile(name_or_path):
        return name_or_path
    raise ValueError(f"unknown model {name_or_path!r}: not a file and not a known name ({', '.join(TEACHERS)})")


def load_file(path):
    """A checkpoint file -> its contents: .safetensors, or .pth through torch.load(weights_only=True) only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise ValueError(f"cannot read {path} as safetensors ({e}); is the file complete?") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects that need arbitrary unpickling, which is refused for safety; "
                         "re-save only its tensors with torch.save(model.state_dict(), path)") from e
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); it is truncated or not a "
                         "PyTorch file: download or write it again") from e


def read_state_dict(path):
    """A checkpoint file -> (state_dict, metadata); unwraps {'model': ...} (MAE, DeiT, this repository) and strips
    DDP's 'module.' prefix."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    meta = {k: v for k, v in ckpt.items() if not isinstance(v, (dict, torch.Tensor))}
    if "arch" in ckpt:
        meta["arch"] = ckpt["arch"]
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    return {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}, meta


def arch_of(state_dict, meta=None):
    """The constructor kwargs a checkpoint was trained with: recorded by this repository, else inferred from shapes
    by matching a preset's width, depth and patch size."""
    if meta and "arch" in meta:
        return dict(meta["arch"])
    sd = state_dict
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise ValueError("checkpoint has no patch_embed.proj.weight / pos_embed: not a ViT with timm/MAE names")
    dim, chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    for img, p, d, n, heads in PRESETS.values():
        if (p, d, n) == (patch, dim, depth):
            return dict(img_size=grid * patch, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth,
                        num_heads=heads, num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                        global_pool="fc_norm.weight" in sd)
    raise ValueError(f"no preset has width {dim}, depth {depth} and patch {patch}; add one to vit.PRESETS")


def load_pretrained(name_or_path, **kwargs):
    """A teacher name (TEACHERS) or a checkpoint file -> (model, report). kwargs override the architecture."""
    state, meta = read_state_dict(resolve(name_or_path))
    if name_or_path in TEACHERS:
        preset, _, defaults = TEACHERS[name_or_path]
        model = create_model(preset, **{**defaults, **kwargs})
    else:
        model = VisionTransformer(**{**arch_of(state, meta), **kwargs})
    return model, load_state(model, state)


# Keys a pre-trained checkpoint may carry that a ViT classifier does not use (MAE's decoder and mask token), and
# keys a classifier may lack in a checkpoint (a new head, a new fc_norm when fine-tuning with global pooling).
_DROPPABLE = ("decoder_", "mask_token")
_FRESH = ("head.", "fc_norm.")


def load_state(model, source):
    """Load a file or state dict into `model` and say what happened.

    Dropped without complaint: MAE decoder keys and mask_token; `norm.*` when the model pools with fc_norm (as MAE
    fine-tuning does). Left freshly initialised: head.* and fc_norm.* when absent, and head.* when the class count
    differs. pos_embed is resized (bicubic) to the model's patch grid. Anything else missing, unexpected or of
    another shape is a ValueError naming the key and both shapes. Returns a dict report.
    """
    state = read_state_dict(source)[0] if isinstance(source, (str, os.PathLike)) else dict(source)
    own = model.state_dict()
    report = dict(loaded=[], dropped=[], fresh=[], resized=[])
    for key in list(state):
        if key.startswith(_DROPPABLE) or (key.startswith("norm.") and model.global_pool):
            report["dropped"].append(key)
            del state[key]
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        report["resized"].append(f"pos_embed {tuple(state['pos_embed'].shape)} -> {tuple(own['pos_embed'].shape)}")
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.grid)
    for key in list(state):
        if key.startswith("head.") and key in own and state[key].shape != own[key].shape:
            report["fresh"].append(f"{key} (checkpoint {tuple(state[key].shape)}, model {tuple(own[key].shape)})")
            del state[key]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(_FRESH))
    if unexpected or missing:
        raise ValueError(f"checkpoint does not fit the model: unexpected keys {unexpected[:5]}, missing keys "
                         f"{missing[:5]} (of {len(unexpected)} and {len(missing)}); build the model the checkpoint "
                         "was trained as (preset, global_pool)")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{key}: checkpoint has shape {tuple(value.shape)}, model has {tuple(own[key].shape)}; "
                             "build the model the checkpoint was trained as")
    reported = {f.split(" ")[0] for f in report["fresh"]}
    report["fresh"] += sorted(k for k in own if k not in state and k not in reported and k.startswith(_FRESH))
    model.load_state_dict(state, strict=False)
    report["loaded"] = sorted(state)
    return report


def describe(report):
    """One line for the log, from load_state's report."""
    return (f"loaded {len(report['loaded'])} tensors; dropped {len(report['dropped'])} "
            f"({', '.join(sorted({k.split('.')[0] for k in report['dropped']})) or '-'}); "
            f"fresh: {', '.join(report['fresh']) or '-'}; resized: {', '.join(report['resized']) or '-'}")


def resize_pos_embed(pos_embed, grid):
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the CLS embedding is kept, the patch grid resized bicubically."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    g = math.isqrt(patches.shape[1])
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


if __name__ == "__main__":
    for name in PRESETS:
        n = sum(p.numel() for p in create_model(name, num_classes=10 if "cifar" in name else 1000).parameters())
        print(f"{name:20s} {n / 1e6:7.2f} M parameters")

"""pretrain_mae.py: masked-autoencoder pre-training of a teacher (He et al. 2022), for datasets with no teacher.

75% of the patches are masked at random; the encoder (vit.py's ViT, same names) sees only the visible ones; a light
decoder with its own position embeddings predicts the pixels of the masked ones, normalised per patch, and the loss is
the MSE over masked patches only. Position embeddings are fixed 2-D sin-cos, as in MAE. The training loop is
train.py's (AdamW betas (0.9, 0.95), blr 1.5e-4, weight decay 0.05, warmup + cosine, AMP, compile, DDP, resume).

At the end it writes, in output_dir (export_encoder does the same for any checkpoint.pth of this script):
  mae_encoder.pth     the encoder in the official MAE checkpoint format {'model': state_dict} with timm names, stored
                      in float16 (half the size; cast back on load) with its arch and input mean/std recorded, ready
                      for --teacher / --finetune
  reconstruction.png  rows of validation images: original, masked input, reconstruction

    python pretrain_mae.py --preset cifar --output_dir runs/mae_cifar    # the 48-epoch CIFAR-10 teacher (README)
    torchrun --nproc_per_node=8 pretrain_mae.py --model vit_large_patch16 --data_path /imagenet
"""
import os

import torch
import torch.nn as nn
import torchvision

import data
import run_safety
import train
import vit


class MAE(vit.VisionTransformer):
    """The ViT encoder (norm, no head) plus MAE's decoder; parameter names are the MAE repository's."""

    def __init__(self, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75, **kwargs):
        super().__init__(num_classes=0, global_pool=False, **kwargs)
        D, N, p = self.arch["embed_dim"], self.grid ** 2, self.arch["patch_size"]
        self.mask_ratio = mask_ratio
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + N, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(vit.Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * self.arch["in_chans"])
        for m in [self.decoder_embed, *self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(vit.init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():  # fixed sin-cos position embeddings (MAE); fine-tuning later learns from them
            self.pos_embed.copy_(sincos_pos_embed(D, self.grid))
            self.decoder_pos_embed.copy_(sincos_pos_embed(decoder_dim, self.grid))
        self.pos_embed.requires_grad_(False)

    def forward_loss(self, images):
        """-> (loss, pred (B, N, p*p*C), mask (B, N) with 1 = masked)."""
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]  # (B, N, D)
        B, N, D = x.shape
        keep = int(N * (1 - self.mask_ratio))
        shuffle = torch.rand(B, N, device=x.device).argsort(dim=1)  # a random permutation per image
        restore = shuffle.argsort(dim=1)
        x = x.gather(1, shuffle[:, :keep, None].expand(-1, -1, D))  # the visible patches only
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)[0]
        x = self.decoder_embed(self.norm(x))
        # back to image order, mask tokens where the encoder saw nothing
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, N - keep, -1)], dim=1)
        x_ = x_.gather(1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)[0]
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        mask = (restore >= keep).float()
        target = self.patchify(images)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask

    def patchify(self, images):
        """(B, C, H, W) -> (B, N, p*p*C), MAE's patch layout."""
        p, g = self.arch["patch_size"], self.grid
        x = images.reshape(images.shape[0], -1, g, p, g, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(images.shape[0], g * g, -1)

    def unpatchify(self, x):
        p, g = self.arch["patch_size"], self.grid
        x = x.reshape(x.shape[0], g, g, p, p, -1)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], -1, g * p, g * p)


def sincos_pos_embed(dim, grid):
    """(1, 1 + grid^2, dim) fixed 2-D sin-cos embeddings, zero for the CLS token (MAE's layout: half the channels
    encode the column, half the row)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = [torch.cat([(c.reshape(-1, 1) * omega).sin(), (c.reshape(-1, 1) * omega).cos()], 1) for c in (xs, ys)]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat(parts, 1)]).float()[None]


class MAEPretrain(train.Method):
    classifies = False

    def forward(self, images, targets):
        return self.model.forward_loss(images)[0], {}


@torch.no_grad()
def save_picture(model, val_set, path, count=8):
    """Rows of `count` validation images: original, masked input, reconstruction."""
    model.eval()
    images = torch.stack([val_set[i][0] for i in range(min(count, len(val_set)))]).to(next(model.parameters()).device)
    _, pred, mask = model.forward_loss(images)
    target = model.patchify(images)  # undo the per-patch normalisation with the true patch statistics, for display
    pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    masked = model.unpatchify(target * (1 - mask[:, :, None]))
    recon = model.unpatchify(pred * mask[:, :, None] + target * (1 - mask[:, :, None]))
    mean, std = torch.tensor(data.MEAN).view(3, 1, 1), torch.tensor(data.STD).view(3, 1, 1)
    rows = [(t.cpu() * std + mean).clamp(0, 1) for t in (images, masked, recon)]
    torchvision.utils.save_image(torch.cat(rows), path, nrow=len(images))


# MAE's pre-training recipe for ViT-B (He et al. 2022, Appendix A.1): 800 epochs (1600 in its best runs), batch 4096.
PRETRAIN = dict(
    model="vit_base_patch16", input_size=224, epochs=800, warmup_epochs=40, batch_size=64,  # per GPU; x 64 = 4096
    blr=1.5e-4, min_lr=0.0, min_lr_ratio=None, beta2=0.95, weight_decay=0.05, layer_decay=1.0,
    drop_path=0.0, ema=0.0, aug="crop", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,  # crop + flip only
    mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16,
)
# The shipped CIFAR-10 teacher (README "The shipped teachers"): the student's shape, a 1-block decoder (MAE's Table 1a:
# depth 1 costs little for fine-tuning) and a higher lr than MAE's for a 48-epoch schedule on a 2-core CPU.
PRETRAIN_CIFAR = dict(
    model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="", epochs=48, warmup_epochs=2,
    batch_size=256, blr=1e-3, min_lr=0.0, min_lr_ratio=None, beta2=0.95, weight_decay=0.05, layer_decay=1.0,
    drop_path=0.0, ema=0.0, aug="crop", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
    mask_ratio=0.75, decoder_dim=128, decoder_depth=1, decoder_heads=4,
)


def export_encoder(checkpoint, path, mean=None, std=None, drop=("decoder_", "mask_token")):
    """A checkpoint.pth of this script, train.py or pretrain_moco.py -> the encoder (and any trained head) in MAE's
    format {'model': ...} with timm names, float16 (half the size; cast back on load), with its architecture and input
    statistics recorded. `drop`: the prefixes of what is not the encoder (here MAE's decoder)."""
    ckpt = vit.load_file(checkpoint)
    encoder = {k: v.half() for k, v in ckpt["model"].items() if not k.startswith(drop)}
    arch = {k: v for k, v in ckpt["arch"].items() if k not in ("drop_path",)}
    run_safety.save_atomic({"model": encoder, "arch": arch, "epoch": ckpt["epoch"], "mean": list(mean or data.MEAN),
                       "std": list(std or data.STD)}, path)


def main(argv=None):
    parser = train.get_args_parser("MAE pre-training of a ViT encoder.", PRETRAIN, {"cifar": PRETRAIN_CIFAR})
    parser.add_argument("--mask_ratio", type=train.in_range(0, 1, low_open=True), help="share of the patches masked")
    parser.add_argument("--decoder_dim", type=train.COUNT, help="decoder width")
    parser.add_argument("--decoder_depth", type=train.COUNT, help="decoder blocks")
    parser.add_argument("--decoder_heads", type=train.COUNT, help="decoder heads")
    args = train.parse_args(parser, argv)

    def make_model(args, _):
        img, patch, dim, depth, heads = vit.PRESETS[args.model]
        return MAE(args.decoder_dim, args.decoder_depth, args.decoder_heads, args.mask_ratio, img_size=args.input_size,
                   patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)

    train.run(args, MAEPretrain, make_model)
    if run_safety.is_rank0():
        checkpoint = os.path.join(args.output_dir, "checkpoint.pth")
        export_encoder(checkpoint, os.path.join(args.output_dir, "mae_encoder.pth"))
        model = make_model(args, 0)
        model.load_state_dict(vit.load_file(checkpoint)["model"])
        val_set, _ = data.build_dataset(args.dataset, args.data_path, "val", args.input_size, subset=8, seed=args.seed)
        save_picture(model, val_set, os.path.join(args.output_dir, "reconstruction.png"))
        train.print0(f"wrote {args.output_dir}/mae_encoder.pth and reconstruction.png")


if __name__ == "__main__":
    run_safety.cli(main)

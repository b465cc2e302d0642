"""pretrain_moco.py: contrastive pre-training of a teacher, MoCo v3 for ViTs (Chen, Xie & He 2021), without labels.

Why it is here: MAE on CIFAR-10 at this repository's scale learns attention that is nearly the same for every image,
so copying it transfers little (README "When attention transfer works at this scale"). A contrastive encoder has to
tell every image from the others in its batch from its class token, which rewards attention that depends on the
image. The paper compares teachers from several pre-training methods, MoCo v3 among them; this script is MoCo v3's
recipe, shrunk for a CPU screen.

One step, for a batch of images:
  1. two views of each image (`two_views`: a random crop and flip, colour jitter, grey; MoCo v3's blur and
     solarisation are left out at 32 px), made on the batch inside the step so that the data loading stays
     train.py's (the loader's own --aug crop comes first);
  2. the encoder (vit.py's ViT, class token after the final norm) + a projection MLP + a prediction MLP map each
     view to q1, q2; a momentum copy of encoder + projection (an exponential moving average of their weights,
     momentum 0.99, no gradient; MoCo v3 raises it to 1 along a cosine, constant here) maps them to k1, k2;
  3. loss = infonce(q1, k2) + infonce(q2, k1): each q must pick its own image's k among the batch's, temperature
     0.2, scaled by 2 x temperature as in MoCo v3.
The patch embedding stays at its random initialisation and the position embeddings are fixed 2-D sin-cos (MoCo v3's
recipe for a stable ViT). Negatives and the MLPs' batch-norm statistics are each process's own batch (MoCo v3 gathers
keys from every GPU and uses SyncBatchNorm); the runs in the README use one process.

At the end it writes output_dir/moco_encoder.pth: the encoder alone, in the same format as pretrain_mae.py's
mae_encoder.pth, ready for --teacher, --finetune and evaluate.py --specificity.

    python pretrain_moco.py --preset cifar --epochs 4 --warmup_epochs 1 --output_dir runs/moco_cifar
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import pretrain_mae
import run_safety
import train
import vit

MOMENTUM = 0.99
TEMPERATURE = 0.2
HEADS = ("projector.", "predictor.", "momentum_")  # what the exported encoder leaves out (vit.DROPPABLE too)


def mlp(dim_in, hidden, dim_out, layers):
    """MoCo v3's heads: Linear + BatchNorm + ReLU between layers, a last Linear + affine-free BatchNorm."""
    parts, width = [], dim_in
    for _ in range(layers - 1):
        parts += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    parts += [nn.Linear(width, dim_out, bias=False), nn.BatchNorm1d(dim_out, affine=False)]
    return nn.Sequential(*parts)


class MoCo(vit.VisionTransformer):
    """The ViT encoder (class token, final norm, no head) plus MoCo v3's heads and the momentum copy."""

    def __init__(self, hidden=512, dim_out=128, **kwargs):
        super().__init__(num_classes=0, global_pool=False, **kwargs)
        D = self.arch["embed_dim"]
        self.projector = mlp(D, hidden, dim_out, layers=3)
        self.predictor = mlp(dim_out, hidden, dim_out, layers=2)
        with torch.no_grad():
            self.pos_embed.copy_(pretrain_mae.sincos_pos_embed(D, self.grid))
        self.pos_embed.requires_grad_(False)
        self.patch_embed.requires_grad_(False)
        self.momentum_encoder = vit.VisionTransformer(num_classes=0, global_pool=False, **kwargs)
        self.momentum_projector = mlp(D, hidden, dim_out, layers=3)
        for online, momentum in self.pairs():
            momentum.data.copy_(online.data)
            momentum.requires_grad_(False)

    def pairs(self):
        """(online tensor, its momentum copy) for every weight and batch-norm statistic of encoder + projector."""
        online = {name: t for name, t in self.state_dict(keep_vars=True).items() if not name.startswith(HEADS)}
        momentum = dict(self.momentum_encoder.state_dict(keep_vars=True))
        for name, t in self.projector.state_dict(keep_vars=True).items():
            online["projector." + name] = t
        for name, t in self.momentum_projector.state_dict(keep_vars=True).items():
            momentum["projector." + name] = t
        assert online.keys() == momentum.keys()
        return [(online[name], momentum[name]) for name in momentum]

    @torch.compiler.disable
    @torch.no_grad()
    def update_momentum(self):
        """Move the momentum copy towards the weights the last optimizer step produced (run before each step's
        forward pass, which is the same as after the previous step)."""
        for online, momentum in self.pairs():
            if momentum.dtype.is_floating_point:
                momentum.lerp_(online, 1 - MOMENTUM)

    def forward_loss(self, images):
        if self.training:
            self.update_momentum()
        view1, view2 = two_views(images)
        q1, q2 = (self.predictor(self.projector(self(v))) for v in (view1, view2))
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(self.momentum_encoder(v)) for v in (view1, view2))
        return infonce(q1, k2) + infonce(q2, k1)


def infonce(q, k):
    """Cross-entropy of picking, for each q, its own image's k among the batch's (cosine similarity / temperature)."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * 2 * TEMPERATURE


def two_views(images):
    """Two random views of a normalised batch (B, 3, H, W), each image with its own random draws."""
    return augment(images), augment(images)


def augment(images):
    """A crop of 25-100% of the area (resized back, bilinear) and a horizontal flip; then with probability 0.8
    colour jitter (brightness and contrast x0.6-1.4, saturation x0.8-1.2), with probability 0.2 grey."""
    B, device = images.shape[0], images.device
    side = torch.empty(B, device=device).uniform_(0.5, 1.0)  # the crop's side, as a share of the image's
    flip = torch.where(torch.rand(B, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = (1 - side)[:, None] * (2 * torch.rand(B, 2, device=device) - 1)  # where the crop sits
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images.float(), grid, align_corners=False)
    mean = torch.tensor(data.MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.STD, device=device).view(1, 3, 1, 1)
    x = x * std + mean  # pixels in [0, 1] for the colour changes

    def factor(low, high):
        return torch.empty(B, 1, 1, 1, device=device).uniform_(low, high)

    def grey(x):
        return (x * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)

    jittered = x * factor(0.6, 1.4)
    level = grey(jittered).mean((2, 3), keepdim=True)
    jittered = (jittered - level) * factor(0.6, 1.4) + level
    jittered = grey(jittered) + (jittered - grey(jittered)) * factor(0.8, 1.2)
    x = torch.where(torch.rand(B, 1, 1, 1, device=device) < 0.8, jittered.clamp(0, 1), x)
    x = torch.where(torch.rand(B, 1, 1, 1, device=device) < 0.2, grey(x).expand_as(x), x)
    return ((x - mean) / std).to(images.dtype)


class MoCoPretrain(train.Method):
    classifies = False

    def forward(self, images, targets):
        return self.model.forward_loss(images), {}


# MoCo v3's ViT-B recipe (Chen et al. 2021; their repository's README): 300 epochs, batch 4096, lr 1.5e-4 x batch / 256,
# weight decay 0.1, 40 warmup epochs, AdamW (0.9, 0.999); heads 4096 wide, 256 out.
PRETRAIN = dict(
    model="vit_base_patch16", input_size=224, epochs=300, warmup_epochs=40, batch_size=64,  # per GPU; x 64 = 4096
    blr=1.5e-4, min_lr=0.0, min_lr_ratio=None, beta2=0.999, weight_decay=0.1, layer_decay=1.0,
    drop_path=0.0, ema=0.0, aug="crop", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, hidden=4096, dim_out=256,
)
# The CIFAR-10 screen (README "When attention transfer works at this scale"): the student's shape, MAE's CIFAR
# settings where they are shared (batch 256, blr 1e-3), heads shrunk to the tiny width.
PRETRAIN_CIFAR = dict(
    model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="", epochs=48, warmup_epochs=2,
    batch_size=256, blr=1e-3, min_lr=0.0, min_lr_ratio=None, beta2=0.999, weight_decay=0.1, layer_decay=1.0,
    drop_path=0.0, ema=0.0, aug="crop", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, hidden=512, dim_out=128,
)


def main(argv=None):
    parser = train.get_args_parser("MoCo v3 pre-training of a ViT encoder.", PRETRAIN, {"cifar": PRETRAIN_CIFAR})
    parser.add_argument("--hidden", type=train.COUNT, help="width of the projection and prediction MLPs")
    parser.add_argument("--dim_out", type=train.COUNT, help="width of the vectors compared")
    args = train.parse_args(parser, argv)

    def make_model(args, _):
        img, patch, dim, depth, heads = vit.PRESETS[args.model]
        return MoCo(args.hidden, args.dim_out, img_size=args.input_size, patch_size=patch, embed_dim=dim, depth=depth,
                    num_heads=heads)

    train.run(args, MoCoPretrain, make_model)
    if run_safety.is_rank0():
        path = os.path.join(args.output_dir, "moco_encoder.pth")
        pretrain_mae.export_encoder(os.path.join(args.output_dir, "checkpoint.pth"), path, drop=HEADS)
        train.print0(f"wrote {path}")


if __name__ == "__main__":
    run_safety.cli(main)

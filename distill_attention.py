"""distill_attention.py: attention distillation (Li et al. 2024, Sec. 3.2, Table 1; README "Attention distillation").

The student computes its own attention; an extra loss pulls its attention rows towards a frozen teacher's in each
transferred layer, and only the student is needed at inference. Loss = task CE + atd_weight * sum over layers of the
attention cross-entropy (atd_weight = lambda = 3, no temperature).

    python distill_attention.py --preset cifar                           # CPU, CIFAR-10, the shipped teacher
    torchrun --nproc_per_node=8 distill_attention.py --teacher mae_vit_l --data_path /imagenet
"""
import math

import torch
import torch.nn.functional as F

import teacher as teachers
import train


def attention_ce_reference(q_s, k_s, q_t, k_t):
    """The paper's loss for one layer: cross-entropy from the teacher's attention rows to the student's, averaged over
    batch, heads and query rows as the authors' code does. q, k: (B, H, N, D); D may differ between the models."""
    p_t = torch.softmax(q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5, dim=-1)        # (B, H, N, N)
    log_p_s = torch.log_softmax(q_s @ k_s.transpose(-2, -1) * q_s.shape[-1] ** -0.5, dim=-1)
    return -(p_t * log_p_s).sum(-1).mean()


def attention_ce(q_s, k_s, q_t, k_t, rows=None):
    """The same, without keeping a map: computed in blocks of query rows and recomputed in backward (tested equal).
    rows: query rows per block; by default as many as keep one block under 2^26 elements."""
    B, H, N, _ = q_s.shape
    rows = rows or max(1, min(N, 2 ** 26 // (B * H * N)))
    return AttentionCE.apply(q_s, k_s, q_t.detach(), k_t.detach(), rows) / (B * H * N)


class AttentionCE(torch.autograd.Function):
    """Sum over (batch, head, query) of CE(softmax(t), softmax(s)), s = q_s k_s^T * scale_s, t = q_t k_t^T * scale_t.
    Per query row CE = logsumexp(s) - sum_j p_t(j) s_j and dCE/ds = softmax(s) - p_t, in float32 whatever the
    autocast dtype; only q and k (O(N)) are saved for backward."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, rows):
        ctx.save_for_backward(q_s, k_s, q_t, k_t)
        ctx.rows = rows
        with torch.autocast(q_s.device.type, enabled=False):
            return sum((torch.logsumexp(s, -1) - (p_t * s).sum(-1)).sum() for s, p_t, _ in _blocks(q_s, k_s, q_t, k_t,
                                                                                                  rows))

    @staticmethod
    def backward(ctx, grad):
        q_s, k_s, q_t, k_t = ctx.saved_tensors
        dq, dk = torch.empty_like(q_s, dtype=torch.float32), torch.zeros_like(k_s, dtype=torch.float32)
        with torch.autocast(q_s.device.type, enabled=False):
            for s, p_t, r in _blocks(q_s, k_s, q_t, k_t, ctx.rows):
                ds = (torch.softmax(s, -1) - p_t) * (grad / math.sqrt(q_s.shape[-1]))  # (B, H, rows, N): dCE/d(q k^T)
                dq[:, :, r] = ds @ k_s.float()
                dk += ds.transpose(-2, -1) @ q_s[:, :, r].float()
        return dq.to(q_s.dtype), dk.to(k_s.dtype), None, None, None


def _blocks(q_s, k_s, q_t, k_t, rows):
    """(student logits, teacher probabilities, row slice) for consecutive blocks of query rows, in float32."""
    kst, ktt = k_s.float().transpose(-2, -1), k_t.float().transpose(-2, -1)
    for i in range(0, q_s.shape[2], rows):
        r = slice(i, i + rows)
        yield ((q_s[:, :, r].float() @ kst) / math.sqrt(q_s.shape[-1]),
               torch.softmax((q_t[:, :, r].float() @ ktt) / math.sqrt(q_t.shape[-1]), -1), r)


# ------------------------------------------------------------------------------------------ the student's attention
class DistillAttention(train.Baseline):
    """The student runs on its own attention; in the teacher's layers its first h heads are pulled towards the
    teacher's: the map by cross-entropy (--mode distill), or q, k or v by MSE (distill_q/_k/_v, the authors')."""

    def __init__(self, model, teacher, mode="distill", atd_weight=3.0):
        super().__init__(model)
        self.teacher, self.mode, self.atd_weight = teacher, mode, atd_weight

    def forward(self, images, targets):
        masks = self.teacher.drop_masks(self.model, images)
        t = self.teacher(images, masks)
        tokens, s = self.model.forward_features(images, collect=self.teacher.layers, drop_masks=masks)
        task = train.soft_cross_entropy(self.model.forward_head(tokens), targets)
        h = self.teacher.heads
        if self.mode == "distill":
            atd = sum(attention_ce(s[l][0][:, :h], s[l][1][:, :h], t[l][0], t[l][1]) for l in t)
        else:
            i = "qkv".index(self.mode[-1])
            atd = sum(F.mse_loss(s[l][i][:, :h].float(), t[l][i].float()) for l in t)
        return task + self.atd_weight * atd, {"task": task, "atd": atd}

    def describe(self):
        return dict(self.teacher.describe(), mode=self.mode, atd_weight=self.atd_weight)


# ------------------------------------------------------------------------------------------------------- recipes
# The authors' ViT-L attention-distillation recipe (their README; paper Appendix A): effective batch 2048, 64 GPUs.
DISTILL = dict(
    model="vit_large_patch16", input_size=224, teacher="mae_vit_l",
    layers=":-6",          # the first 18 of 24 layers, as their README says (their code ignored it and used 21)
    atd_weight=3.0,        # lambda
    epochs=200, warmup_epochs=20, batch_size=32,  # per GPU; x 64 GPUs = 2048
    blr=1e-4, min_lr=1e-6, min_lr_ratio=None,  # min_lr: MAE's fine-tuning default
    beta2=0.95, weight_decay=0.3, layer_decay=1.0, drop_path=0.2, ema=0.9999,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,  # MAE's fine-tune augmentation
)
# CPU-sized CIFAR-10 (this repository's, README "Results"): the shipped teacher's shape, every layer distilled.
DISTILL_CIFAR = dict(
    model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="", teacher="mae_tiny_cifar10", layers=":",
    atd_weight=3.0, epochs=30, warmup_epochs=3, batch_size=128, blr=1e-3, min_lr=1e-5, min_lr_ratio=None,
    beta2=0.95, weight_decay=0.05, layer_decay=1.0, drop_path=0.1, ema=0.0,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
)
EXCHANGE = {"distill": "qk", "distill_q": "qkv", "distill_k": "qkv", "distill_v": "qkv"}  # what the teacher hands over


def main(argv=None):
    parser = train.get_args_parser("Attention distillation: a student whose attention imitates a frozen teacher's.",
                                   DISTILL, {"cifar": DISTILL_CIFAR})
    teachers.add_args(parser)
    parser.add_argument("--mode", choices=list(EXCHANGE), default="distill", help="what is distilled")
    parser.add_argument("--atd_weight", type=float, help="lambda: the weight of the attention loss")
    args = train.parse_args(parser, argv)
    return train.run(args, lambda model, _: DistillAttention(
        model, teachers.from_args(args, model, EXCHANGE[args.mode]), args.mode, args.atd_weight))


if __name__ == "__main__":
    train.cli(main)

"""distill_attention.py: attention distillation (method.md, "Attention distillation"; Li et al. 2024, Sec. 3.2).

The student computes its own attention; an extra loss pulls its attention distributions towards a frozen teacher's
in each transferred layer l:

    CE_l = mean over (batch, head, query i) of  -sum_j softmax(T_l)[i, j] * log_softmax(S_l)[i, j]
    loss = task CE + atd_weight * sum_l CE_l                       (atd_weight = lambda = 3; no temperature)

with T_l, S_l the scaled logits q k^T / sqrt(d) of teacher and student (CLS row and column included). Only the student
is needed at inference. AttentionCE computes CE_l from (q_s, k_s, q_t, k_t) in blocks of query rows and recomputes
them in backward, so no N x N map of any layer is kept for backward (the authors' code keeps two per layer).
--mode distill_q / distill_k / distill_v replace the map loss with an MSE on q, k or v (the authors' variants).

    python distill_attention.py --preset cifar --data_path ../shared/data/cifar10
    torchrun --nproc_per_node=8 distill_attention.py --teacher mae_vit_l --data_path /imagenet
"""
import math

import torch
import torch.nn.functional as F

import copy_attention
import train


class DistillAttention(copy_attention.CopyAttention):
    """Teacher setup as in copy (frozen, run up to the last transferred layer, shared drop-path masks); the student
    runs on its own attention and is trained with task CE + atd_weight * sum over layers of the attention loss."""

    def __init__(self, model, teacher, layers, heads=None, mode="distill", share_drop_path=True, atd_weight=3.0):
        super().__init__(model, teacher, layers, heads, mode, share_drop_path)
        self.atd_weight = atd_weight

    def forward(self, images, targets):
        masks = self.drop_masks(images)
        teacher = self.teacher_qkv(images, masks)
        tokens, student = self.model.forward_features(images, collect=self.layers, drop_masks=masks)
        task = train.soft_cross_entropy(self.model.forward_head(tokens), targets)
        h = self.heads
        if self.mode == "distill":
            atd = sum(attention_ce(student[l][0][:, :h], student[l][1][:, :h], teacher[l][0][:, :h],
                                   teacher[l][1][:, :h]) for l in self.layers)
        else:  # distill_q / _k / _v: MSE between the student's and the teacher's tensor, as the authors' code
            i = "qkv".index(self.mode[-1])
            atd = sum(F.mse_loss(student[l][i][:, :h].float(), teacher[l][i][:, :h].float()) for l in self.layers)
        return task + self.atd_weight * atd, {"task": task, "atd": atd}

    def predict(self, model, images):
        return model(images)  # the teacher is not needed at inference

    def describe(self):
        return dict(super().describe(), atd_weight=self.atd_weight)


class AttentionCE(torch.autograd.Function):
    """sum over (batch, head, query) of CE(softmax(t), softmax(s)) for s = q_s k_s^T * scale_s, t = q_t k_t^T * scale_t.

    Per query row: CE = logsumexp(s) - sum_j p_t(j) s_j and dCE/ds = softmax(s) - p_t. Both are computed over blocks
    of `rows` query rows in float32; backward recomputes them, so only q and k (O(N)) are saved, never a map.
    """

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, rows):
        ctx.save_for_backward(q_s, k_s, q_t, k_t)
        ctx.rows = rows
        total = q_s.new_zeros((), dtype=torch.float32)
        with torch.autocast(q_s.device.type, enabled=False):  # float32 whatever the autocast dtype
            for s, p_t, _ in _blocks(q_s, k_s, q_t, k_t, rows):
                total = total + (torch.logsumexp(s, dim=-1) - (p_t * s).sum(-1)).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        q_s, k_s, q_t, k_t = ctx.saved_tensors
        kf = k_s.float()
        scale = 1.0 / math.sqrt(q_s.shape[-1])
        dq = torch.empty_like(q_s, dtype=torch.float32)
        dk = torch.zeros_like(k_s, dtype=torch.float32)
        with torch.autocast(q_s.device.type, enabled=False):
            for s, p_t, rows in _blocks(q_s, k_s, q_t, k_t, ctx.rows):
                ds = (torch.softmax(s, dim=-1) - p_t) * (grad * scale)  # (B, H, R, N): dCE/d(q k^T) for these rows
                dq[:, :, rows] = ds @ kf
                dk += ds.transpose(-2, -1) @ q_s[:, :, rows].float()
        return dq.to(q_s.dtype), dk.to(k_s.dtype), None, None, None


def _blocks(q_s, k_s, q_t, k_t, rows):
    """Yields (student logits, teacher probabilities, row slice) for consecutive blocks of query rows, in float32."""
    kst, ktt = k_s.float().transpose(-2, -1), k_t.float().transpose(-2, -1)
    scale_s, scale_t = 1.0 / math.sqrt(q_s.shape[-1]), 1.0 / math.sqrt(q_t.shape[-1])
    for i in range(0, q_s.shape[2], rows):
        r = slice(i, i + rows)
        yield (q_s[:, :, r].float() @ kst) * scale_s, torch.softmax((q_t[:, :, r].float() @ ktt) * scale_t, -1), r


def attention_ce(q_s, k_s, q_t, k_t, rows=None):
    """Mean over (batch, head, query) of the attention cross-entropy; q, k are (B, H, N, D) (D may differ between
    the models). rows: query rows per block; by default as many as keep one block's map under 2^26 elements."""
    B, H, N, _ = q_s.shape
    rows = rows or max(1, min(N, 2 ** 26 // (B * H * N)))
    # the teacher's q, k compacted: as views they would keep its whole qkv tensor (v too) alive until backward
    return AttentionCE.apply(q_s, k_s, q_t.detach().contiguous(), k_t.detach().contiguous(), rows) / (B * H * N)


# The authors' ViT-L distillation recipe (method.md): their README meant the first 18 of 24 layers (--end_layer -6).
DISTILL = dict(train.FINETUNE, model="vit_large_patch16", teacher="mae_vit_l", layers=":-6", atd_weight=3.0,
               epochs=200, warmup_epochs=20, blr=1e-4, min_lr=1e-6, beta2=0.95, weight_decay=0.3, layer_decay=1.0,
               drop_path=0.2, ema=0.9999, batch_size=32)
DISTILL_CIFAR = dict(train.CIFAR, teacher="mae_tiny_cifar10", layers=":", atd_weight=3.0, layer_decay=1.0)


def main(argv=None):
    parser = train.get_args_parser("Attention distillation: train a student whose attention imitates a teacher's.",
                                   DISTILL, {"cifar": DISTILL_CIFAR})
    copy_attention.add_transfer_args(parser, ["distill", "distill_q", "distill_k", "distill_v"])
    parser.add_argument("--atd_weight", type=float, help="lambda: weight of the attention loss")
    args = train.parse_args(parser, argv)
    return train.run(args, lambda model, _: DistillAttention(model, args.teacher, args.layers, args.heads, args.mode,
                                                             args.share_drop_path, args.atd_weight))


if __name__ == "__main__":
    train.cli(main)

"""distill_attention.py: attention distillation (Li et al. 2024, Sec. 3.2, Table 1; README "The methods").

A randomly initialised student computes its own attention; an extra loss pulls its attention rows towards a frozen
pre-trained teacher's in every transferred layer:

    loss = task cross-entropy + atd_weight * sum over layers of CE(teacher's attention rows, student's rows)

with atd_weight (the paper's lambda) = 3 and no temperature. Only the student runs at test time.

Measured (README "Results"; CIFAR-10, a 6-block ViT-Tiny student, 10,000 training images, 5 epochs, 2-core CPU): from
the shipped MAE teacher 37.56 ± 0.23% top-1 over 3 seeds (scratch 30.38, fine-tuning that teacher 52.22: 33% of the
gap; the paper, ImageNet ViT-L: 85.7, all of the gap); from the shipped supervised teacher 57.78 ± 0.27.

    python distill_attention.py --preset cifar --subset 10000 --epochs 5 --warmup_epochs 1 --val_subset 2000
    torchrun --nproc_per_node=8 distill_attention.py --teacher mae_vit_l --data_path /imagenet
"""
import torch
import torch.nn.functional as F

import run_safety
import train
from attention_kernels import attention_ce_fast, compute_dtype
from teacher import add_transfer_args, teacher_from_args


# ------------------------------------------------------------------------------------------------ the definition
def attention_ce_reference(q_s, k_s, q_t, k_t):
    """The paper's loss for one layer: the cross-entropy from the teacher's attention rows to the student's, averaged
    over batch, heads and query rows as the authors' code does. q, k: (B, H, N, D); D may differ between the models.

    Both maps are materialised, (B, H, N, N), and autograd keeps them for backward. Training runs
    attention_kernels.attention_ce_fast, the same value and gradients without keeping them (tests/test_fast_paths.py),
    unless --explicit_map asks for this definition."""
    p_t = torch.softmax(q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5, dim=-1)        # (B, H, N, N)
    log_p_s = torch.log_softmax(q_s @ k_s.transpose(-2, -1) * q_s.shape[-1] ** -0.5, dim=-1)
    return -(p_t * log_p_s).sum(-1).mean()


# ------------------------------------------------------------------------------------------------- the method
class DistillAttention(train.Method):
    """The student runs on its own attention. In the teacher's layers its first h heads are pulled towards the
    teacher's:

        distill     CE(softmax(q_t k_t^T), softmax(q_s k_s^T))   the maps (the paper's method)
        distill_q   MSE(q_s, q_t)                                  the authors' variants: one of q, k, v
        distill_k   MSE(k_s, k_t)
        distill_v   MSE(v_s, v_t)
    """

    def __init__(self, model, teacher, mode="distill", atd_weight=3.0, explicit_map=False):
        super().__init__(model)
        self.teacher = teacher
        self.mode = mode
        self.atd_weight = atd_weight
        self.explicit_map = explicit_map

    def forward(self, images, targets):
        drop_masks = self.teacher.drop_masks(self.model, images)  # stochastic depth shared with the teacher
        from_teacher = self.teacher(images, drop_masks)            # {layer: (q_t, k_t, v_t)}
        tokens, from_student = self.model.forward_features(images, collect=self.teacher.layers, drop_masks=drop_masks)
        task = train.soft_cross_entropy(self.model.forward_head(tokens), targets)
        atd = sum(self.layer_loss(from_student[layer], from_teacher[layer]) for layer in self.teacher.layers)
        return task + self.atd_weight * atd, {"task": task, "atd": atd}

    def layer_loss(self, student_qkv, teacher_qkv):
        """The attention loss of one layer, over the first h heads of the student."""
        h = self.teacher.heads
        q_s, k_s, v_s = student_qkv
        q_t, k_t, v_t = teacher_qkv
        q_s, k_s, v_s = q_s[:, :h], k_s[:, :h], v_s[:, :h]
        if self.mode == "distill":
            return self.attention_ce(q_s, k_s, q_t, k_t)
        if self.mode == "distill_q":
            return F.mse_loss(q_s.float(), q_t.float())
        if self.mode == "distill_k":
            return F.mse_loss(k_s.float(), k_t.float())
        return F.mse_loss(v_s.float(), v_t.float())  # distill_v

    def attention_ce(self, q_s, k_s, q_t, k_t):
        if self.explicit_map:  # in the kernel's dtype: float32 under autocast too
            dtype = compute_dtype(q_s)
            return attention_ce_reference(q_s.to(dtype), k_s.to(dtype), q_t.to(dtype), k_t.to(dtype))
        return attention_ce_fast(q_s, k_s, q_t, k_t)

    def describe(self):
        return dict(self.teacher.describe(), mode=self.mode, atd_weight=self.atd_weight)


# ------------------------------------------------------------------------------------------------------- recipes
# The authors' ViT-L attention-distillation recipe (their README; paper Appendix A): effective batch 2048, 64 GPUs.
DISTILL = dict(
    model="vit_large_patch16", input_size=224, teacher="mae_vit_l",
    layers=":-6",  # the first 18 of 24 layers, as their README says (their code ignored it and used 21)
    atd_weight=3.0,  # lambda
    epochs=200, warmup_epochs=20,
    batch_size=32,  # per GPU; x 64 GPUs = 2048
    blr=1e-4, min_lr=1e-6, min_lr_ratio=None,  # min_lr: MAE's fine-tuning default
    beta2=0.95, weight_decay=0.3, layer_decay=1.0, drop_path=0.2, ema=0.9999,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,  # MAE's fine-tune augmentation
)
# CPU-sized CIFAR-10 (this repository's, README "Results"): the shipped teacher's shape, every layer distilled.
DISTILL_CIFAR = dict(
    model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="",
    teacher="mae_tiny_cifar10",  # README "The shipped teachers"
    layers=":", atd_weight=3.0,
    epochs=30, warmup_epochs=3, batch_size=128, blr=1e-3, min_lr=1e-5, min_lr_ratio=None,
    beta2=0.95, weight_decay=0.05, layer_decay=1.0, drop_path=0.1, ema=0.0,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
)
# mode: which of the teacher's q, k, v the student takes (Teacher's `exchange`)
FROM_TEACHER = {"distill": "qk", "distill_q": "q", "distill_k": "k", "distill_v": "v"}


def main(argv=None):
    parser = train.get_args_parser("Attention distillation: a student imitating a teacher's maps.", DISTILL,
                                   {"cifar": DISTILL_CIFAR})
    parser.add_argument("--atd_weight", type=train.in_range(0, float("inf")),
                        help="lambda: the weight of the attention loss")
    add_transfer_args(parser, FROM_TEACHER)
    args = train.parse_args(parser, argv)

    def make_method(student):
        teacher = teacher_from_args(args, student, FROM_TEACHER[args.mode])
        return DistillAttention(student, teacher, args.mode, args.atd_weight, args.explicit_map)

    return train.run(args, make_method)


if __name__ == "__main__":
    run_safety.cli(main)

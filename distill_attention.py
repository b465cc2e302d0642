"""distill_attention.py: attention distillation (Li et al. 2024, Sec. 3.2, Table 1; README "Attention distillation").

The student computes its own attention; an extra loss pulls its attention rows towards a frozen teacher's in each
transferred layer. Loss = task CE + atd_weight (lambda = 3) * the sum over layers of the attention cross-entropy, no
temperature. Only the student runs at test.

    python distill_attention.py --preset cifar                           # CPU, CIFAR-10, the shipped teacher
    torchrun --nproc_per_node=8 distill_attention.py --teacher mae_vit_l --data_path /imagenet
"""
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


# ------------------------------------------------------------------- the same, without the map (what training runs)
# Per query row i, with s = q_s k_s^T * a_s, p = softmax(s) and p_t the teacher's row: CE_i = lse_i - sum_j p_t(i, j)
# s_ij, where lse_i = max_j s_ij - log max_j p_ij, and dCE_i/ds_ij = p_ij - p_t(i, j); so dq_s = a_s (p - p_t) k_s and
# dk_s = a_s (p - p_t)^T q_s. The loss is a scalar, so one pass over blocks of heads forms s, p_t, the loss and both
# gradients (four matmuls per block; recomputing in backward takes six), and backward only scales the two saved
# (B, H, N, D_s) gradients. A torch.library custom op, opaque to torch.compile: nothing N x N is saved, compiled or
# eager. Float32 inside (float64 stays float64) whatever the input dtype.
@torch.library.custom_op("distill_attention::attention_ce", mutates_args=())
def _attention_ce(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, grads: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (mean CE, its gradients for q_s and k_s in their dtypes; empty tensors when not `grads`)."""
    dt = teachers.compute_dtype(q_s)
    a, a_t, n = q_s.shape[-1] ** -0.5, q_t.shape[-1] ** -0.5, q_s.shape[:3].numel()
    scaled = lambda t, c: teachers.flat_heads(torch.mul(t.to(dt), c, out=t.new_empty(t.shape, dtype=dt)))  # one pass
    qa, qa_t, k, k_t = scaled(q_s, a), scaled(q_t, a_t), scaled(k_s, 1), teachers.flat_heads(k_t.to(dt))  # (B*H, N, D)
    loss = qa.new_zeros(())
    dq, dk = (torch.empty_like(qa), torch.empty_like(k)) if grads else (None, None)
    with torch.autocast(qa.device.type, enabled=False):
        for h in teachers.head_blocks(qa.shape[0], qa.shape[1], qa.device):
            s = torch.bmm(qa[h], k[h].transpose(1, 2))  # (heads, N, N), the student's logits
            p, p_t = torch.softmax(s, -1), torch.softmax(torch.bmm(qa_t[h], k_t[h].transpose(1, 2)), -1)
            loss += (s.amax(-1) - p.amax(-1).log_()).sum() - torch.dot(p_t.view(-1), s.view(-1))
            if grads:
                ds = p.sub_(p_t)  # dCE/ds, in place of p
                torch.baddbmm(dq[h], ds, k[h], beta=0, alpha=a / n, out=dq[h])  # dq = a/n ds k
                torch.baddbmm(dk[h], ds.transpose(1, 2), qa[h], beta=0, alpha=1 / n, out=dk[h])  # dk = 1/n ds^T (a q)
    if not grads:
        return loss / n, q_s.new_empty(0), k_s.new_empty(0)
    return loss / n, dq.view(q_s.shape).to(q_s.dtype), dk.view(k_s.shape).to(k_s.dtype)


_attention_ce.register_fake(lambda q_s, k_s, q_t, k_t, grads: (  # the gradients come contiguous, whatever q_s is
    q_s.new_empty((), dtype=teachers.compute_dtype(q_s)), q_s.new_empty(q_s.shape if grads else 0),
    k_s.new_empty(k_s.shape if grads else 0)))
_attention_ce.register_autograd(  # saves dq, dk: (B, H, N, D_s) each, all that backward needs
    lambda ctx, grad, *_: (*((grad * d).to(d.dtype) for d in ctx.saved_tensors), None, None, None),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(output[1], output[2]))


def attention_ce(q_s, k_s, q_t, k_t):
    """Mean over (batch, head, query) of CE(softmax(q_t k_t^T * scale_t), softmax(q_s k_s^T * scale_s)) without
    keeping the maps; gradients for q_s and k_s only. (B, H, N, D_s) x 2, (B, H, N, D_t) x 2 -> float32 scalar."""
    grads = torch.is_grad_enabled() and (q_s.requires_grad or k_s.requires_grad)
    return _attention_ce(q_s, k_s, q_t.detach(), k_t.detach(), grads)[0]


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
DISTILL = dict(model="vit_large_patch16", input_size=224, teacher="mae_vit_l",
    layers=":-6",          # the first 18 of 24 layers, as their README says (their code ignored it and used 21)
    atd_weight=3.0,        # lambda
    epochs=200, warmup_epochs=20, batch_size=32,  # per GPU; x 64 GPUs = 2048
    blr=1e-4, min_lr=1e-6, min_lr_ratio=None,  # min_lr: MAE's fine-tuning default
    beta2=0.95, weight_decay=0.3, layer_decay=1.0, drop_path=0.2, ema=0.9999,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1)  # MAE's fine-tune augmentation
# CPU-sized CIFAR-10 (this repository's, README "Results"): the shipped teacher's shape, every layer distilled.
DISTILL_CIFAR = dict(model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="", layers=":",
    teacher="mae_tiny_cifar10",  # the shipped teacher (README "The shipped teacher")
    atd_weight=3.0, epochs=30, warmup_epochs=3, batch_size=128, blr=1e-3, min_lr=1e-5, min_lr_ratio=None,
    beta2=0.95, weight_decay=0.05, layer_decay=1.0, drop_path=0.1, ema=0.0,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1)
EXCHANGE = {"distill": "qk", "distill_q": "qkv", "distill_k": "qkv", "distill_v": "qkv"}  # what the teacher hands over


def main(argv=None):
    parser = train.get_args_parser("Attention distillation: a student imitating a teacher's maps.", DISTILL,
                                   {"cifar": DISTILL_CIFAR})
    parser.add_argument("--atd_weight", type=float, help="lambda: the weight of the attention loss")
    args = train.parse_args(teachers.add_args(parser, EXCHANGE), argv)
    teacher = lambda net: teachers.from_args(args, net, EXCHANGE[args.mode])
    return train.run(args, lambda net, _: DistillAttention(net, teacher(net), args.mode, args.atd_weight))


if __name__ == "__main__":
    train.cli(main)

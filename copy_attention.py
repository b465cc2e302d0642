"""copy_attention.py: attention copy (Li et al. 2024, Sec. 3.1, Table 1; README "Attention copy").

A randomly initialised student and a frozen pre-trained teacher see the same image; in every transferred layer the
student routes its own values with the teacher's attention map and learns all else itself. The teacher runs at test.

    python copy_attention.py --preset cifar                              # CPU, CIFAR-10, the shipped teacher
    torchrun --nproc_per_node=8 copy_attention.py --teacher mae_vit_l --data_path /imagenet
"""
import torch
import torch.nn.functional as F

import teacher as teachers
import train


def copy_reference(q_t, k_t, v_s):
    """Attention copy as the paper writes it: the teacher's map applied to the student's values. (B, H, N, D)."""
    attn = torch.softmax(q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    return attn @ v_s


# ------------------------------------------------------------------- the same, without the map (what training runs)
# A torch.library custom op with its own backward (opaque to torch.compile; saves O(N) per head). The teacher is frozen,
# so backward is only dv_s = P^T dout (SDPA's would also form dq and dk). The forward keeps each row's log-sum-exp,
# free from the softmax it forms anyway (lse_i = max_j s_ij - log max_j P_ij), so backward recomputes P as exp(s - lse):
# one matmul and one exp per block of heads. On GPUs the forward is SDPA's fused kernel, and backward a softmax again.
SDPA_FORWARD = ("cuda",)  # devices whose forward is SDPA (tests add "cpu" to run that path on CPU)


@torch.library.custom_op("copy_attention::copy_forward", mutates_args=())
def _copy_forward(q_t: torch.Tensor, k_t: torch.Tensor, v_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (output laid out (B, N, H, D) as a block wants it, the map's row lse (B, H, N) or, after SDPA, empty)."""
    dt = teachers.compute_dtype(v_s)
    with torch.autocast(q_t.device.type, enabled=False):
        if q_t.device.type in SDPA_FORWARD:
            return teachers.compact(F.scaled_dot_product_attention(q_t, k_t, v_s)), q_t.new_empty(0, dtype=dt)
        q, k, v = (teachers.flat_heads(t.to(dt)) for t in (q_t, k_t, v_s))  # (B * H, N, D)
        q, out, lse = q * q_t.shape[-1] ** -0.5, torch.empty_like(v), q.new_empty(q.shape[:2])
        for h in teachers.head_blocks(q.shape[0], q.shape[1], q.device):
            s = torch.bmm(q[h], k[h].transpose(1, 2))  # (heads, N, N)
            p = torch.softmax(s, -1)
            lse[h] = s.amax(-1) - p.amax(-1).log_()
            torch.bmm(p, v[h], out=out[h])
    return teachers.compact(out.view(v_s.shape).to(v_s.dtype)), lse.view(q_t.shape[:3])


_copy_forward.register_fake(lambda q_t, k_t, v_s: (
    teachers.compact(v_s.new_empty(*q_t.shape[:3], v_s.shape[-1])),
    q_t.new_empty(0 if q_t.device.type in SDPA_FORWARD else q_t.shape[:3], dtype=teachers.compute_dtype(v_s))))


@torch.library.custom_op("copy_attention::copy_backward", mutates_args=())
def _copy_backward(q_t: torch.Tensor, k_t: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dv = P^T grad, (B, H, N, D_s) in grad's dtype; float32 products whatever the forward ran in."""
    dt = teachers.compute_dtype(grad)
    q, k, g = (teachers.flat_heads(t.to(dt)) for t in (q_t, k_t, grad))  # (B * H, N, D)
    q, dv = q * q_t.shape[-1] ** -0.5, torch.empty_like(g)
    lse = lse.to(dt).view(*q.shape[:2], 1) if lse.numel() else None
    with torch.autocast(q.device.type, enabled=False):
        for h in teachers.head_blocks(q.shape[0], q.shape[1], q.device):
            s = torch.bmm(q[h], k[h].transpose(1, 2))  # (heads, N, N), recomputed
            p = torch.softmax(s, -1) if lse is None else s.sub_(lse[h]).exp_()
            torch.bmm(p.transpose(1, 2), g[h], out=dv[h])
    return dv.view(grad.shape).to(grad.dtype)


_copy_backward.register_fake(lambda q_t, k_t, lse, grad: grad.new_empty(*k_t.shape[:3], grad.shape[-1]))
_copy_forward.register_autograd(  # saves q_t, k_t (B, H, N, D_t) and lse (B, H, N); no v_s, nothing N x N
    lambda ctx, grad, _: (None, None, _copy_backward(*ctx.saved_tensors, grad)),  # q_t, k_t: frozen
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0], inputs[1], output[1]))


def copy_fast(q_t, k_t, v_s):
    """softmax(q_t k_t^T * scale) v_s without keeping the map; gradient for v_s only (q_t, k_t: a frozen teacher's).
    (B, H, N, D_t), (B, H, N, D_t), (B, H, N, D_s) -> (B, H, N, D_s); under autocast in its dtype, as SDPA runs."""
    on = v_s.device.type
    dtype = torch.get_autocast_dtype(on) if torch.is_autocast_enabled(on) else v_s.dtype
    return _copy_forward(q_t.detach().to(dtype), k_t.detach().to(dtype), v_s.to(dtype))[0]


# ------------------------------------------------------------------------------------------ the student's attention
class CopyAttention(train.Baseline):
    """In the teacher's layers the student's attention is the teacher's (--mode copy), or one side of it: copy_q
    softmax(q_t k_s^T) v_s (the paper's best variant), copy_k softmax(q_s k_t^T) v_s, copy_v softmax(q_s k_s^T) v_t.
    --heads K replaces the first K heads; the others keep the student's own attention."""

    def __init__(self, model, teacher, mode="copy"):
        super().__init__(model)
        self.teacher, self.mode = teacher, mode

    def forward(self, images, targets):
        masks = self.teacher.drop_masks(self.model, images)
        return train.soft_cross_entropy(self.predict(self.model, images, masks), targets), {}

    def predict(self, model, images, masks=None):
        qkv = self.teacher(images, masks)
        attend = {l: (lambda q, k, v, t=qkv[l]: self.attend(q, k, v, *t)) for l in self.teacher.layers}
        return model.forward_head(model.forward_features(images, attend=attend, drop_masks=masks)[0])

    def attend(self, q, k, v, q_t, k_t, v_t):
        """The student's own q, k, v (B, H, N, D) and the teacher's first h heads -> the block's attention output."""
        h = self.teacher.heads
        if self.mode == "copy":
            out = copy_fast(q_t, k_t, v[:, :h])
        else:  # the one of q, k, v the teacher handed over in place of the student's
            qkv = [own[:, :h] if t is None else t for own, t in zip((q, k, v), (q_t, k_t, v_t))]
            out = F.scaled_dot_product_attention(*map(teachers.compact, qkv))
        if h == q.shape[1]:
            return out
        return torch.cat([out, F.scaled_dot_product_attention(q[:, h:], k[:, h:], v[:, h:])], dim=1)

    def describe(self):
        return dict(self.teacher.describe(), mode=self.mode)


# ------------------------------------------------------------------------------------------------------- recipes
# The authors' ViT-L attention-copy recipe (their README; paper Appendix A): effective batch 2048 on 64 GPUs.
COPY = dict(model="vit_large_patch16", input_size=224, teacher="mae_vit_l",
    layers=":-3",  # their code copies the first depth-3 layers in every run (--end_layer -3, never passed on)
    epochs=100, warmup_epochs=5, batch_size=32, blr=1e-3,  # per GPU x 64 = 2048; lr = blr * 2048 / 256 = 8e-3
    min_lr=0.0, min_lr_ratio=0.25,  # their min_lr 2e-3 is absolute at batch 2048: the cosine ends at 25% of the peak
    beta2=0.999, weight_decay=0.05, layer_decay=0.75, drop_path=0.0, ema=0.9999,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1)  # MAE's fine-tune augmentation
# CPU-sized CIFAR-10 (this repository's, README "Results"): the shipped teacher's shape, every layer copied.
COPY_CIFAR = dict(model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="", layers=":",
    teacher="mae_tiny_cifar10",  # the shipped teacher (README "The shipped teacher")
    epochs=30, warmup_epochs=3, batch_size=128, blr=1e-3, min_lr=1e-5, min_lr_ratio=None, beta2=0.999, ema=0.0,
    weight_decay=0.05, layer_decay=0.75, drop_path=0.0, aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1)
EXCHANGE = {"copy": "qk", "copy_q": "q", "copy_k": "k", "copy_v": "v"}  # what the teacher hands over


def main(argv=None):
    parser = train.get_args_parser("Attention copy: a student routed by a teacher's maps.", COPY, {"cifar": COPY_CIFAR})
    args = train.parse_args(teachers.add_args(parser, EXCHANGE), argv)
    teacher = lambda net: teachers.from_args(args, net, EXCHANGE[args.mode])
    return train.run(args, lambda net, _: CopyAttention(net, teacher(net), args.mode))


if __name__ == "__main__":
    train.cli(main)

"""copy_attention.py: attention copy (Li et al. 2024, Sec. 3.1, Table 1; README "Attention copy").

A frozen pre-trained teacher and a randomly initialised student see the same augmented image. In every transferred
layer the student routes its own values with the teacher's attention map; everything else (values, projections, MLPs,
norms, head) it learns itself. The teacher is needed at inference too.

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
# A torch.library custom op with its own backward, so torch.compile treats it as opaque and saves O(N) per head. The
# teacher is frozen, so backward is only dv_s = P^T dout (SDPA's own backward would also form dq and dk). On CPU both
# directions are one call of the flash kernel SDPA runs there, which also returns the row log-sum-exp lse:
#     P^T x = attend(k_t, q_t, x, bias -lse_i on key i) * exp(lse'),
# since the softmax over i of (s_ij - lse_i) is P_ij / Z_j and that call's own lse' is log Z_j. Elsewhere the forward
# is SDPA and backward recomputes P in blocks of heads.
FLASH_CPU = True  # the CPU flash kernel where it applies (tests switch it off to run the portable path on CPU)


def _flash_cpu(q, k, v, scale, bias=None):
    """softmax(q k^T * scale + bias) v and its row log-sum-exp by the CPU flash kernel, (B, H, Nq, Dv), (B, H, Nq).
    bias: None or (B, H, 1, Nk), added to every query row. The kernel needs equal head widths: zero columns change
    no logit and add zero output columns."""
    d = max(q.shape[-1], v.shape[-1])
    pad = lambda t: t if t.shape[-1] == d else F.pad(t, (0, d - t.shape[-1]))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(pad(q), pad(k), pad(v), attn_mask=bias,
                                                                          scale=scale)
    return out[..., :v.shape[-1]], lse.contiguous()  # lse comes (B, N, H)-strided


@torch.library.custom_op("copy_attention::copy_forward", mutates_args=())
def _copy_forward(q_t: torch.Tensor, k_t: torch.Tensor, v_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (output, row log-sum-exp of the map, or an empty tensor where backward recomputes the map instead)."""
    with torch.autocast(q_t.device.type, enabled=False):
        if q_t.device.type == "cpu" and FLASH_CPU:
            out, lse = _flash_cpu(q_t, k_t, v_s, q_t.shape[-1] ** -0.5)
        else:
            out = F.scaled_dot_product_attention(q_t, k_t, v_s)
            lse = q_t.new_empty(0, dtype=teachers.compute_dtype(q_t))
    # laid out (B, N, H, D) in memory, as SDPA's output on a block's qkv is: the block's out.transpose(1, 2)
    # .reshape(B, N, C) is then a view, not one more copy
    return out.transpose(1, 2).contiguous().transpose(1, 2), lse


@_copy_forward.register_fake
def _(q_t, k_t, v_s):
    B, H, N, _ = q_t.shape
    lse = (B, H, N) if q_t.device.type == "cpu" and FLASH_CPU else (0,)
    lse = q_t.new_empty(lse, dtype=teachers.compute_dtype(q_t))
    return v_s.new_empty(B, N, H, v_s.shape[-1]).transpose(1, 2), lse


@torch.library.custom_op("copy_attention::copy_backward", mutates_args=())
def _copy_backward(q_t: torch.Tensor, k_t: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dv = P^T grad, (B, H, N, D_s) in grad's dtype; float32 products whatever the forward ran in."""
    dt, a = teachers.compute_dtype(grad), q_t.shape[-1] ** -0.5
    q_t, k_t, g = q_t.to(dt), k_t.to(dt), grad.to(dt)
    with torch.autocast(q_t.device.type, enabled=False):
        if lse.numel():  # CPU flash: the transposed attention, the map's lse as a bias on its keys
            out, lse_t = _flash_cpu(k_t, q_t, g, a, -lse[:, :, None, :].to(dt))
            return (out * lse_t.exp()[..., None]).to(grad.dtype).contiguous()
        q, k, g = (teachers.flat_heads(t) for t in (q_t, k_t, g))  # (B * H, N, D)
        dv = torch.empty_like(g)
        for h in teachers.head_blocks(q.shape[0], q.shape[1], q.device):
            p = torch.softmax(torch.bmm(q[h], k[h].transpose(1, 2)) * a, -1)  # (heads, N, N), recomputed
            torch.bmm(p.transpose(1, 2), g[h], out=dv[h])
        return dv.view(grad.shape).to(grad.dtype)


@_copy_backward.register_fake
def _(q_t, k_t, lse, grad):
    return grad.new_empty(*k_t.shape[:3], grad.shape[-1])


def _copy_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])  # q_t, k_t: (B, H, N, D_t); lse (B, H, N); no v_s


def _copy_grad(ctx, grad_out, _grad_lse):
    q_t, k_t, lse = ctx.saved_tensors
    return None, None, _copy_backward(q_t, k_t, lse, grad_out)  # the teacher's q and k are frozen


_copy_forward.register_autograd(_copy_grad, setup_context=_copy_setup)


def copy_fast(q_t, k_t, v_s):
    """softmax(q_t k_t^T * scale) v_s without keeping the map; gradient for v_s only (q_t, k_t: a frozen teacher's).
    (B, H, N, D_t), (B, H, N, D_t), (B, H, N, D_s) -> (B, H, N, D_s); under autocast in its dtype, as SDPA runs."""
    device = v_s.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(torch.promote_types(q_t.dtype, k_t.dtype), v_s.dtype))
    return _copy_forward(q_t.detach().to(dtype), k_t.detach().to(dtype), v_s.to(dtype))[0]


def compact(t):
    """A (B, H, N, D) view of a block's qkv tensor as its own (B, N, H, D)-laid-out copy: what attention saves for
    backward then holds exactly q, k, v, not the whole qkv output of both models (so copy saves what scratch does)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


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
        return train.soft_cross_entropy(self.logits(self.model, images, masks), targets), {}

    def predict(self, model, images):
        return self.logits(model, images, None)

    def logits(self, model, images, masks):
        qkv = self.teacher(images, masks)
        attend = {l: (lambda q, k, v, t=qkv[l]: self.attend(q, k, v, *t)) for l in self.teacher.layers}
        return model.forward_head(model.forward_features(images, attend=attend, drop_masks=masks)[0])

    def attend(self, q, k, v, q_t, k_t, v_t):
        """The student's own q, k, v (B, H, N, D) and the teacher's first h heads -> the block's attention output."""
        h = q_t.shape[1]
        if self.mode == "copy":
            out = copy_fast(q_t, k_t, compact(v[:, :h]))
        else:  # one of the three replaced by the teacher's
            q_, k_, v_ = (q_t if self.mode == "copy_q" else q[:, :h], k_t if self.mode == "copy_k" else k[:, :h],
                          v_t if self.mode == "copy_v" else v[:, :h])
            out = F.scaled_dot_product_attention(compact(q_), compact(k_), compact(v_))
        if h == q.shape[1]:
            return out
        return torch.cat([out, F.scaled_dot_product_attention(q[:, h:], k[:, h:], v[:, h:])], dim=1)

    def describe(self):
        return dict(self.teacher.describe(), mode=self.mode)


# ------------------------------------------------------------------------------------------------------- recipes
# The authors' ViT-L attention-copy recipe (their README; paper Appendix A): effective batch 2048 on 64 GPUs.
COPY = dict(
    model="vit_large_patch16", input_size=224, teacher="mae_vit_l",
    layers=":-3",          # their code copies the first depth-3 layers in every run (--end_layer -3, never passed on)
    epochs=100, warmup_epochs=5, batch_size=32,  # per GPU; x 64 GPUs = 2048
    blr=1e-3,              # lr = blr * effective batch / 256 = 8e-3 at 2048
    min_lr=0.0, min_lr_ratio=0.25,  # their min_lr 2e-3 is absolute at batch 2048: the cosine ends at 25% of the peak
    beta2=0.999, weight_decay=0.05, layer_decay=0.75, drop_path=0.0, ema=0.9999,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,  # MAE's fine-tune augmentation
)
# CPU-sized CIFAR-10 (this repository's, README "Results"): the shipped teacher's shape, every layer copied.
COPY_CIFAR = dict(
    model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="", teacher="mae_tiny_cifar10", layers=":",
    epochs=30, warmup_epochs=3, batch_size=128, blr=1e-3, min_lr=1e-5, min_lr_ratio=None, beta2=0.999,
    weight_decay=0.05, layer_decay=0.75, drop_path=0.0, ema=0.0,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
)
EXCHANGE = {"copy": "qk", "copy_q": "q", "copy_k": "k", "copy_v": "v"}  # what the teacher hands over


def main(argv=None):
    parser = train.get_args_parser("Attention copy: a student that uses a frozen teacher's attention maps.",
                                   COPY, {"cifar": COPY_CIFAR})
    teachers.add_args(parser)
    parser.add_argument("--mode", choices=list(EXCHANGE), default="copy", help="what is copied (see CopyAttention)")
    args = train.parse_args(parser, argv)
    return train.run(args, lambda model, _: CopyAttention(model, teachers.from_args(args, model, EXCHANGE[args.mode]),
                                                          args.mode))


if __name__ == "__main__":
    train.cli(main)

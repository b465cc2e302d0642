"""attention_kernels.py: attention copy and attention distillation without the N x N map (README "Speed and memory").

The two methods are defined in copy_attention.py (`copy_reference`) and distill_attention.py
(`attention_ce_reference`) exactly as the paper writes them (Li et al. 2024, Sec. 3.1 and 3.2): each forms the
attention map softmax(q k^T * scale), (B, H, N, N), and keeps it for backward. Training runs the two functions below
instead. They give the same values and gradients (tests/test_fast_paths.py, float64, eager and compiled) but keep only
O(N) per head between forward and backward:

    copy_fast(q_t, k_t, v_s)             = softmax(q_t k_t^T * scale) v_s
    attention_ce_fast(q_s, k_s, q_t, k_t) = mean over (batch, head, row) of CE(teacher's row, student's row)

Each is a torch.library custom op with its own backward, so that torch.compile treats it as one opaque call and cannot
turn its insides into saved N x N tensors. Inside, the map is formed a block of heads at a time (BLOCK elements),
used, and dropped. Nothing here is needed to understand the method; it is what makes it cheap.
"""
import torch
import torch.nn.functional as F

# Elements of one (heads, N, N) block. CPU: 1 MiB in float32 stays in cache, and no large block is freed (freeing a
# 32 MiB one makes glibc raise its mmap threshold to 32 MiB and keep later frees in its heap: peak RSS 1.6x scratch).
BLOCK = {"cpu": 2 ** 18}
BLOCK_DEFAULT = 2 ** 26  # elsewhere (GPUs) 256 MiB in float32: fewer kernel launches
SDPA_FORWARD = ("cuda",)  # devices whose copy forward is SDPA's fused kernel (tests add "cpu" to run that path here)


# ----------------------------------------------------------------------------------------------- shared helpers
def compute_dtype(t):
    """The dtype the kernels compute in: float64 stays float64, anything else float32."""
    if t.dtype == torch.float64:
        return torch.float64
    return torch.float32


def head_blocks(bh, n, device):
    """Slices of the flattened (batch * heads) dimension, each a block of at most BLOCK elements of (n, n)."""
    step = max(1, BLOCK.get(device.type, BLOCK_DEFAULT) // (n * n))
    return [slice(i, i + step) for i in range(0, bh, step)]


def flat_heads(t):
    """(B, H, N, D) -> (B * H, N, D): batch and heads become one dimension for torch.bmm."""
    return t.reshape(-1, *t.shape[2:])


def scaled_flat_heads(t, scale, dtype):
    """flat_heads(t) * scale in `dtype`: the cast and the product write one new tensor, in one pass."""
    out = t.new_empty(t.shape, dtype=dtype)
    torch.mul(t.to(dtype), scale, out=out)
    return flat_heads(out)


def compact(t):
    """(B, H, N, D) laid out (B, N, H, D) in a tensor of its own: SDPA then saves exactly q, k, v for backward, not a
    block's whole qkv output, and a block's out.transpose(1, 2).reshape(B, N, C) is a view, not one more copy."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


# ------------------------------------------------------------------------------------------- attention copy
# out = P v_s with P = softmax(q_t k_t^T * scale). The teacher is frozen, so backward needs only dv_s = P^T dout
# (SDPA's own backward would also form dq and dk). Forward keeps each row's log-sum-exp, lse_i = log sum_j
# exp(s_ij); backward then recomputes P as exp(s - lse), one matmul and one exp per block, and saves nothing N x N.
# On GPUs the forward is SDPA's fused kernel, which does not hand out lse: backward takes a softmax again there.
@torch.library.custom_op("attention_kernels::copy_forward", mutates_args=())
def copy_forward(q_t: torch.Tensor, k_t: torch.Tensor, v_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (P v_s laid out (B, N, H, D) as a block wants it, each row's lse (B, H, N); after SDPA an empty lse)."""
    dtype = compute_dtype(v_s)
    with torch.autocast(q_t.device.type, enabled=False):
        if q_t.device.type in SDPA_FORWARD:
            out = F.scaled_dot_product_attention(q_t, k_t, v_s)
            return compact(out), q_t.new_empty(0, dtype=dtype)
        scale = q_t.shape[-1] ** -0.5
        q = scaled_flat_heads(q_t, scale, dtype)  # (B * H, N, D_t)
        k = flat_heads(k_t.to(dtype))
        v = flat_heads(v_s.to(dtype))             # (B * H, N, D_s)
        out = torch.empty_like(v)
        lse = q.new_empty(q.shape[:2])            # (B * H, N)
        for h in head_blocks(q.shape[0], q.shape[1], q.device):
            s = torch.bmm(q[h], k[h].transpose(1, 2))  # (heads, N, N): the teacher's logits
            p = torch.softmax(s, -1)
            # log-sum-exp read off the softmax just formed: max_j p_ij = exp(max_j s_ij - lse_i)
            lse[h] = s.amax(-1) - p.amax(-1).log_()
            torch.bmm(p, v[h], out=out[h])
    return compact(out.view(v_s.shape).to(v_s.dtype)), lse.view(q_t.shape[:3])


def copy_forward_shapes(q_t, k_t, v_s):
    """What copy_forward returns, as shapes and dtypes only (torch.compile plans with this)."""
    out = compact(v_s.new_empty(*q_t.shape[:3], v_s.shape[-1]))
    lse_shape = 0 if q_t.device.type in SDPA_FORWARD else q_t.shape[:3]
    return out, q_t.new_empty(lse_shape, dtype=compute_dtype(v_s))


@torch.library.custom_op("attention_kernels::copy_backward", mutates_args=())
def copy_backward(q_t: torch.Tensor, k_t: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dv_s = P^T grad, (B, H, N, D_s) in grad's dtype; float32 products whatever the forward ran in."""
    dtype = compute_dtype(grad)
    scale = q_t.shape[-1] ** -0.5
    q = scaled_flat_heads(q_t, scale, dtype)  # (B * H, N, D_t)
    k = flat_heads(k_t.to(dtype))
    g = flat_heads(grad.to(dtype))            # (B * H, N, D_s)
    dv = torch.empty_like(g)
    have_lse = lse.numel() > 0
    if have_lse:
        lse = lse.to(dtype).view(*q.shape[:2], 1)
    with torch.autocast(q.device.type, enabled=False):
        for h in head_blocks(q.shape[0], q.shape[1], q.device):
            s = torch.bmm(q[h], k[h].transpose(1, 2))  # (heads, N, N), recomputed
            if have_lse:
                p = s.sub_(lse[h]).exp_()  # P = exp(s - lse), in place of s
            else:
                p = torch.softmax(s, -1)
            torch.bmm(p.transpose(1, 2), g[h], out=dv[h])
    return dv.view(grad.shape).to(grad.dtype)


def copy_backward_shapes(q_t, k_t, lse, grad):
    return grad.new_empty(*k_t.shape[:3], grad.shape[-1])


def copy_save_for_backward(ctx, inputs, output):
    q_t, k_t, _ = inputs
    _, lse = output
    ctx.save_for_backward(q_t, k_t, lse)  # (B, H, N, D_t) x 2 and (B, H, N): no v_s, nothing N x N


def copy_gradients(ctx, grad_out, grad_lse):
    q_t, k_t, lse = ctx.saved_tensors
    return None, None, copy_backward(q_t, k_t, lse, grad_out)  # no gradient for the frozen teacher's q_t, k_t


copy_forward.register_fake(copy_forward_shapes)
copy_backward.register_fake(copy_backward_shapes)
copy_forward.register_autograd(copy_gradients, setup_context=copy_save_for_backward)


def copy_fast(q_t, k_t, v_s):
    """softmax(q_t k_t^T * scale) v_s without keeping the map; gradient for v_s only (q_t, k_t: a frozen teacher's).
    (B, H, N, D_t), (B, H, N, D_t), (B, H, N, D_s) -> (B, H, N, D_s); under autocast in its dtype, as SDPA runs."""
    device = v_s.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v_s.dtype
    out, _ = copy_forward(q_t.detach().to(dtype), k_t.detach().to(dtype), v_s.to(dtype))
    return out


# ------------------------------------------------------------------------------------- attention distillation
# Per query row i, with the student's logits s_ij = a q_i . k_j (a = 1 / sqrt(D_s)), p = softmax(s) and the teacher's
# row p_t:
#     CE_i = -sum_j p_t(i, j) log p_ij = lse_i - sum_j p_t(i, j) s_ij        (log p_ij = s_ij - lse_i; rows sum to 1)
#     dCE_i / ds_ij = p_ij - p_t(i, j)
# so, with ds = p - p_t, dq = a ds k and dk = a ds^T q. The loss is a scalar, so one pass over blocks of heads forms
# s, p_t, the loss and both gradients (four matmuls per block; recomputing them in backward would take six), and
# backward only scales the two saved (B, H, N, D_s) gradients by the incoming scalar. Float32 inside (float64 stays
# float64) whatever the input dtype.
@torch.library.custom_op("attention_kernels::attention_ce", mutates_args=())
def attention_ce_forward(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, grads: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (mean CE, its gradients for q_s and k_s in their dtypes; empty tensors when not `grads`)."""
    dtype = compute_dtype(q_s)
    a = q_s.shape[-1] ** -0.5
    a_t = q_t.shape[-1] ** -0.5
    rows = q_s.shape[:3].numel()  # B * H * N: the CE is averaged over them
    qa = scaled_flat_heads(q_s, a, dtype)        # (B * H, N, D_s), the student's queries times a
    k = scaled_flat_heads(k_s, 1, dtype)         # (B * H, N, D_s), a copy: q_s and k_s may share a storage
    qa_t = scaled_flat_heads(q_t, a_t, dtype)    # (B * H, N, D_t)
    k_t = flat_heads(k_t.to(dtype))
    loss = qa.new_zeros(())
    if grads:
        dq = torch.empty_like(qa)
        dk = torch.empty_like(k)
    with torch.autocast(qa.device.type, enabled=False):
        for h in head_blocks(qa.shape[0], qa.shape[1], qa.device):
            s = torch.bmm(qa[h], k[h].transpose(1, 2))                     # (heads, N, N): the student's logits
            p = torch.softmax(s, -1)
            p_t = torch.softmax(torch.bmm(qa_t[h], k_t[h].transpose(1, 2)), -1)  # the teacher's map
            # lse read off the softmax just formed (max_j p_ij = exp(max_j s_ij - lse_i)): no second exp pass
            lse = s.amax(-1) - p.amax(-1).log_()
            teacher_weighted = torch.dot(p_t.view(-1), s.view(-1))        # sum over i, j of p_t(i, j) s_ij
            loss += lse.sum() - teacher_weighted
            if grads:
                ds = p.sub_(p_t)  # dCE/ds = p - p_t, in place of p
                torch.baddbmm(dq[h], ds, k[h], beta=0, alpha=a / rows, out=dq[h])               # a ds k / rows
                torch.baddbmm(dk[h], ds.transpose(1, 2), qa[h], beta=0, alpha=1 / rows, out=dk[h])  # ds^T (a q) / rows
    if not grads:
        return loss / rows, q_s.new_empty(0), k_s.new_empty(0)
    return loss / rows, dq.view(q_s.shape).to(q_s.dtype), dk.view(k_s.shape).to(k_s.dtype)


def attention_ce_shapes(q_s, k_s, q_t, k_t, grads):
    """What attention_ce_forward returns, as shapes and dtypes only; the gradients come contiguous."""
    loss = q_s.new_empty((), dtype=compute_dtype(q_s))
    if not grads:
        return loss, q_s.new_empty(0), k_s.new_empty(0)
    return loss, q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)


def attention_ce_save_for_backward(ctx, inputs, output):
    _, dq, dk = output
    ctx.save_for_backward(dq, dk)  # (B, H, N, D_s) each: all that backward needs


def attention_ce_gradients(ctx, grad_loss, grad_dq, grad_dk):
    dq, dk = ctx.saved_tensors
    dq_s = (grad_loss * dq).to(dq.dtype)
    dk_s = (grad_loss * dk).to(dk.dtype)
    return dq_s, dk_s, None, None, None  # nothing for the teacher's q_t, k_t or the flag


attention_ce_forward.register_fake(attention_ce_shapes)
attention_ce_forward.register_autograd(attention_ce_gradients, setup_context=attention_ce_save_for_backward)


def attention_ce_fast(q_s, k_s, q_t, k_t):
    """Mean over (batch, head, query) of CE(softmax(q_t k_t^T * scale_t), softmax(q_s k_s^T * scale_s)) without
    keeping the maps; gradients for q_s and k_s only. (B, H, N, D_s) x 2, (B, H, N, D_t) x 2 -> float32 scalar."""
    grads = torch.is_grad_enabled() and (q_s.requires_grad or k_s.requires_grad)
    loss, _, _ = attention_ce_forward(q_s, k_s, q_t.detach(), k_t.detach(), grads)
    return loss

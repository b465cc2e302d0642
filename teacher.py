"""teacher.py: the frozen pre-trained ViT that hands its attention to a student (Li et al. 2024, Sec. 3).

Both attention-transfer methods need the same thing from a teacher: load it by name or file, freeze it, run it on the
student's batch up to the last transferred layer, and hand over q, k (and v) of the chosen layers and heads. Whether
the two models can exchange attention (layers, heads, tokens, head widths) is checked once, here, when a run is
planned, so that the models' forward passes read like the equations.

    teacher = Teacher("mae_tiny_cifar10", student, layers=":", exchange="qk")
    qkv = teacher(images)            # {layer: (q, k, v)}, each (B, heads, N, D_teacher)

The student's images arrive normalised with its own statistics (data.MEAN / data.STD); a teacher trained with other
statistics (README, "Bring your own teacher") sees the same pixels re-normalised by one affine map on the batch.
The end of the file holds the flags both method scripts share.
"""
import argparse
import hashlib
import math

import torch
import torch.nn as nn

import data
import train
import vit


class Teacher(nn.Module):
    """A frozen ViT serving (q, k, v) of `layers` (a spec like ':-6' or '0,3,5'), first `heads` heads of each.

    exchange says what the student will take: 'qk' a whole map (copy, distillation); 'q' or 'k' one side of the
    student's own map (copy_q, copy_k) or the tensor an MSE compares (distill_q, distill_k); 'v' the values (copy_v,
    distill_v). The methods' FROM_TEACHER tables say which mode takes what."""

    def __init__(self, name_or_path, student, layers=":", heads=None, exchange="qk", num_heads=None, mean=None,
                 std=None, share_drop_path=True):
        super().__init__()
        path = vit.resolve(name_or_path)
        self.model, report = vit.load_pretrained(path if name_or_path not in vit.TEACHERS else name_or_path,
                                                 num_heads=num_heads, img_size=student.arch["img_size"])
        self.model.requires_grad_(False).eval()
        self.name, self.sha256, self.report = name_or_path, sha256(path), report
        self.mean = tuple(mean or report.get("mean") or data.MEAN)
        self.std = tuple(std or report.get("std") or data.STD)
        # x_teacher = (x - m_t) / s_t with x = x_student * s_s + m_s: one per-channel affine map
        s_s, m_s = torch.tensor(data.STD), torch.tensor(data.MEAN)
        s_t, m_t = torch.tensor(self.std), torch.tensor(self.mean)
        self.register_buffer("scale", (s_s / s_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((m_s - m_t) / s_t).view(1, 3, 1, 1), persistent=False)
        self.layers = parse_layers(layers, student.depth, self.model.depth)
        self.heads = check_exchange(student, self.model, heads, exchange)
        self.exchange, self.share_drop_path = exchange, share_drop_path

    def drop_masks(self, student, images):
        """Stochastic-depth masks the student samples once and both models use, as in the authors' code; None when
        not shared (the student then samples its own in forward) or when nothing is dropped."""
        if not (student.training and student.drop_path > 0 and self.share_drop_path):
            return None
        return student.sample_drop_masks(images.shape[0], images.device)

    @torch.no_grad()
    def forward(self, images, drop_masks=None):
        """-> {layer: (q, k, v)}, first `heads` heads, compact (a view would keep the teacher's whole qkv alive); None
        in place of what the exchange does not use (distillation and copy use no v)."""
        images, last = images * self.scale + self.shift, self.layers[-1]
        x, qkv = self.model.forward_features(images, collect=self.layers, drop_masks=drop_masks, depth=last)
        block = self.model.blocks[last]  # of the last transferred block only q, k, v are needed: no attention or MLP
        qkv[last] = block.attn.heads(block.norm1(x))
        handed = {}
        for layer in self.layers:
            q, k, v = qkv[layer]
            handed[layer] = (self.hand_over(q, "q"), self.hand_over(k, "k"), self.hand_over(v, "v"))
        return handed

    def hand_over(self, t, name):
        """The first `heads` heads of t (B, H, N, D), compact (a view would keep the teacher's whole qkv alive); None
        when the exchange does not use it."""
        if name not in self.exchange:
            return None
        return t[:, :self.heads].contiguous()

    def train(self, mode=True):
        return super().train(False)  # frozen: always in eval mode (no dropout, no stochastic depth of its own)

    def summary(self):
        """One line for the log."""
        return (f"teacher {self.name}: {vit.describe(self.report)}; layers {format_layers(self.layers)} of "
                f"{self.model.depth}, heads {self.heads}/{self.model.num_heads}, runs {self.layers[-1]} of its blocks, "
                f"then block {self.layers[-1]}'s q, k, v; mean {self.mean} std {self.std}")

    def describe(self):
        """Plain values for the student's checkpoint (copy needs its teacher at inference)."""
        return dict(teacher=self.name, teacher_sha256=self.sha256, teacher_arch=self.model.arch, layers=self.layers,
                    heads=self.heads, exchange=self.exchange, share_drop_path=self.share_drop_path,
                    teacher_mean=list(self.mean), teacher_std=list(self.std))


def parse_layers(spec, student_depth, teacher_depth):
    """'a:b' is Python's slice of the layers both models have (':' all, ':-6' all but the last 6 -- the authors'
    --end_layer -6, '-6:' the last 6); '0,3,5' an explicit list."""
    depth = min(student_depth, teacher_depth)
    try:
        if ":" in spec:
            start, stop = (int(s) if s.strip() else None for s in spec.split(":"))
            layers = list(range(depth))[start:stop]
        else:
            layers = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise ValueError(f"--layers {spec!r} is neither a slice like ':-6' nor a list like '0,3,5'") from None
    bad = [l for l in layers if not 0 <= l < depth]
    if bad:
        raise ValueError(f"--layers {spec}: layer {bad[0]} is out of range: the student has {student_depth} layers "
                         f"and the teacher {teacher_depth}, so layers 0-{depth - 1} can be transferred")
    if not layers:
        raise ValueError(f"--layers {spec!r} selects none of the {depth} layers both models have; try ':' for all")
    return layers


def format_layers(layers):
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


def check_exchange(student, teacher, heads, exchange):
    """-> the number of heads transferred, or ValueError saying why the two models cannot exchange attention."""
    s, t = student.arch, teacher.arch
    n_s, n_t = student.grid ** 2 + student.num_prefix_tokens, teacher.grid ** 2 + teacher.num_prefix_tokens
    if n_s != n_t:
        raise ValueError(f"the student has {n_s} tokens ({student.grid}x{student.grid} patches + "
                         f"{student.num_prefix_tokens}) but the teacher has {n_t} ({teacher.grid}x{teacher.grid} + "
                         f"{teacher.num_prefix_tokens}): give the student the teacher's patch size and prefix tokens")
    if heads is None:
        if student.num_heads != teacher.num_heads:
            raise ValueError(f"the student has {student.num_heads} heads per layer and the teacher "
                             f"{teacher.num_heads}: give the student the teacher's head count, or pass --heads")
        heads = student.num_heads
    if not 1 <= heads <= min(student.num_heads, teacher.num_heads):
        raise ValueError(f"--heads {heads} is out of range: the student has {student.num_heads} heads per layer and "
                         f"the teacher {teacher.num_heads}")
    d_s, d_t = s["embed_dim"] // student.num_heads, t["embed_dim"] // teacher.num_heads
    # A whole map of all heads (q and k both the teacher's, or compared map to map) fits any head width; anything
    # mixed into the student's own tensors (one of q/k, v, a subset of heads, an MSE) needs the same head width.
    whole_map = exchange == "qk" and heads == student.num_heads
    if d_s != d_t and not whole_map:
        raise ValueError(f"the student's heads are {d_s} wide and the teacher's {d_t}: exchanging {exchange!r} of "
                         f"{heads} heads needs equal head widths (width / heads); match the teacher's width and heads")
    return heads


def sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def add_transfer_args(parser, modes):
    """The flags both method scripts share; --mode chooses among `modes` (the first is the default). -> parser."""
    parser.add_argument("--mode", choices=list(modes), default=next(iter(modes)),
                        help="what is transferred (the method class's docstring)")
    parser.add_argument("--teacher",
                        help="teacher name (vit.TEACHERS) or checkpoint file (README \"Bring your own teacher\")")
    parser.add_argument("--teacher_heads", type=train.COUNT,
                        help="the teacher's heads per layer, where its file does not say")
    parser.add_argument("--teacher_mean", type=finite, nargs=3, help="the teacher's input mean (default: its record)")
    parser.add_argument("--teacher_std", type=train.in_range(0, math.inf, low_open=True), nargs=3,
                        help="the teacher's input std (default: its record)")
    parser.add_argument("--layers", help="transferred layers: a slice of range(depth) like ':', ':18', ':-6', "
                                         "'-6:', or a list '0,3,5'")
    parser.add_argument("--heads", type=train.COUNT, help="transfer the first this many heads of each layer "
                                                          "(default all)")
    parser.add_argument("--share_drop_path", action=argparse.BooleanOptionalAction, default=True,
                        help="the teacher uses the student's stochastic-depth masks (the authors' code)")
    parser.add_argument("--explicit_map", action="store_true",
                        help="train with the method's definition itself, the N x N attention map materialised (the "
                             "same numbers, slower, more memory; README \"The methods\")")
    return parser


def finite(text):
    """An argparse type: a float that is neither NaN nor infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def teacher_from_args(args, student, exchange):
    """The Teacher the method scripts' shared flags describe, handing over `exchange` ('qk', 'q', ...)."""
    teacher = Teacher(args.teacher, student, args.layers, args.heads, exchange, args.teacher_heads, args.teacher_mean,
                      args.teacher_std, args.share_drop_path)
    train.print0(teacher.summary())
    return teacher

"""copy_attention.py: attention copy (method.md, "Attention copy"; Li et al. 2024, Sec. 3.1).

A frozen pre-trained teacher and a randomly initialised student see the same augmented image. In every transferred
layer the student does not use its own attention: it routes its own values with the teacher's,

    out = proj(softmax(q_t k_t^T * scale) v_s) = proj(SDPA(q_t, k_t, v_s)),

so the teacher hands over q and k, never an N x N map (the authors' code materialises softmax(logits) per layer).
Variants (--mode): copy (q and k), copy_q (softmax(q_t k_s^T) v_s, the paper's best), copy_k (softmax(q_s k_t^T) v_s);
--layers picks the layers, --heads how many heads of each (the first ones; the rest keep the student's attention).
The teacher is needed at inference too.

    python copy_attention.py --preset cifar --data_path ../shared/data/cifar10
    torchrun --nproc_per_node=8 copy_attention.py --teacher mae_vit_l --data_path /imagenet
"""
import argparse
import hashlib

import torch

import train
import vit


class CopyAttention(train.Baseline):
    """The student's attention in `layers` is the teacher's (all of it, or only its q or k, in the first `heads`)."""

    def __init__(self, model, teacher, layers=":", heads=None, mode="copy", share_drop_path=True):
        super().__init__(model)
        self.teacher_name, self.teacher_sha256 = teacher, sha256(vit.resolve(teacher))
        self.teacher, report = vit.load_pretrained(teacher, img_size=model.arch["img_size"])
        self.teacher.requires_grad_(False).eval()
        self.layers = parse_layers(layers, min(model.depth, self.teacher.depth))
        self.heads = check_exchange(model, self.teacher, heads, whole_map=mode in ("copy", "distill"))
        self.mode, self.share_drop_path = mode, share_drop_path
        print(f"teacher {teacher}: {vit.describe(report)}")
        print(f"{mode}: {'q,k' if mode in ('copy', 'distill') else mode.split('_')[1]} of layers "
              f"{format_layers(self.layers)} of {model.depth}, heads {self.heads}/{model.num_heads}, teacher runs "
              f"{self.layers[-1] + 1} of its {self.teacher.depth} blocks, drop-path masks "
              f"{'shared' if share_drop_path else 'independent'}")

    def forward(self, images, targets):
        masks = self.drop_masks(images)
        logits = self.model(images, inject=self.inject(self.teacher_qkv(images, masks)), drop_masks=masks)
        return train.soft_cross_entropy(logits, targets), {}

    def predict(self, model, images):
        return model(images, inject=self.inject(self.teacher_qkv(images, None)))

    def inject(self, qkv):
        """{layer: (q_t, k_t, v_t)} -> {layer: (q or None, k or None)} for the student, first `heads` heads only."""
        h = self.heads
        return {l: (q[:, :h] if self.mode in ("copy", "copy_q") else None,
                    k[:, :h] if self.mode in ("copy", "copy_k") else None) for l, (q, k, _) in qkv.items()}

    @torch.no_grad()
    def teacher_qkv(self, images, masks):
        """The teacher's own (q, k, v) of the transferred layers, running only the blocks up to the last of them."""
        return self.teacher.forward_features(images, collect=self.layers, drop_masks=masks,
                                             depth=self.layers[-1] + 1)[1]

    def drop_masks(self, images):
        """Stochastic-depth masks sampled once and used by both models (as the authors' code does), or None."""
        if not (self.training and self.model.drop_path > 0 and self.share_drop_path):
            return None  # the student samples its own in training mode; the teacher drops nothing
        return self.model.sample_drop_masks(images.shape[0], images.device)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # frozen: always in eval mode
        return self

    def describe(self):
        return dict(teacher=self.teacher_name, teacher_sha256=self.teacher_sha256,
                    teacher_arch=self.teacher.arch, layers=self.layers, heads=self.heads, mode=self.mode)


def parse_layers(spec, depth):
    """'a:b' is Python's slice of range(depth) (':' all, ':-6' all but the last 6 -- the authors' --end_layer -6,
    '-6:' the last 6); '0,3,5' an explicit list."""
    try:
        if ":" in spec:
            start, stop = (int(s) if s.strip() else None for s in spec.split(":"))
        else:
            layers = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise ValueError(f"--layers {spec!r} is neither a slice like ':-6' nor a list like '0,3,5'") from None
    if ":" in spec:
        layers = list(range(depth))[start:stop]
    else:
        bad = [l for l in layers if not 0 <= l < depth]
        if bad:
            raise ValueError(f"--layers {spec}: layer {bad[0]} is out of range; the models share {depth} layers (0-{depth - 1})")
    if not layers:
        raise ValueError(f"--layers {spec!r} selects no layer of {depth}; try ':' for all")
    return layers


def format_layers(layers):
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


def check_exchange(student, teacher, heads, whole_map):
    """Both models must have the same token count and head count (and head dim, unless whole maps of all heads are
    exchanged); returns the number of heads transferred."""
    s, t = student.arch, teacher.arch
    if student.grid != teacher.grid:
        raise ValueError(f"student has {student.grid}x{student.grid} patches (img {s['img_size']}, patch "
                         f"{s['patch_size']}) but the teacher has {teacher.grid}x{teacher.grid}: use the teacher's "
                         "patch size so both have the same tokens")
    if student.num_heads != teacher.num_heads:
        raise ValueError(f"student has {student.num_heads} heads per layer but the teacher has {teacher.num_heads}: "
                         "give the student the teacher's head count")
    heads = student.num_heads if heads is None else heads
    if not 1 <= heads <= student.num_heads:
        raise ValueError(f"--heads {heads} is out of range: the models have {student.num_heads} heads per layer")
    if (heads < student.num_heads or not whole_map) and s["embed_dim"] != t["embed_dim"]:
        raise ValueError(f"the student is {s['embed_dim']} wide and the teacher {t['embed_dim']}: only whole maps of "
                         "all heads can be exchanged between different widths; match the teacher's width")
    return heads


def sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def add_transfer_args(parser, modes):
    parser.add_argument("--teacher", help="teacher name (vit.TEACHERS) or checkpoint file")
    parser.add_argument("--mode", choices=modes, default=modes[0], help="what is transferred")
    parser.add_argument("--layers", help="transferred layers: a slice of range(depth) like ':', ':18', ':-6', "
                                         "'-6:', or a list '0,3,5'")
    parser.add_argument("--heads", type=int, help="transfer the first this many heads of each layer (default all)")
    parser.add_argument("--share_drop_path", action=argparse.BooleanOptionalAction, default=True,
                        help="the teacher uses the student's stochastic-depth masks")


# The authors' ViT-L copy recipe (method.md). Their code copies the first depth-3 layers in every run (its
# --end_layer default of -3, never overridden), so that is the default here too.
COPY = dict(train.FINETUNE, model="vit_large_patch16", teacher="mae_vit_l", layers=":-3", epochs=100,
            warmup_epochs=5, blr=1e-3, min_lr=2e-3, beta2=0.999, weight_decay=0.05, layer_decay=0.75, drop_path=0.0,
            ema=0.9999, batch_size=32)
COPY_CIFAR = dict(train.CIFAR, teacher="mae_tiny_cifar10", layers=":", drop_path=0.0, layer_decay=0.75)


def main(argv=None):
    parser = train.get_args_parser("Attention copy: train a student that uses a frozen teacher's attention.",
                                   COPY, {"cifar": COPY_CIFAR})
    add_transfer_args(parser, ["copy", "copy_q", "copy_k"])
    args = train.parse_args(parser, argv)
    return train.run(args, lambda model, _: CopyAttention(model, args.teacher, args.layers, args.heads, args.mode,
                                                          args.share_drop_path))


if __name__ == "__main__":
    train.cli(main)

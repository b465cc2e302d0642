"""copy_attention.py: attention copy (Li et al. 2024, Sec. 3.1, Table 1; README "The methods").

A randomly initialised student and a frozen pre-trained teacher see the same image. In every transferred layer the
student does not use its own queries and keys: its attention map is the teacher's, and it routes its own values with
it, out = softmax(q_t k_t^T / sqrt(d)) v_s. Everything else (values, projections, MLPs, norms, the head) the student
learns itself. The teacher runs at test time too.

Measured (README "Results"; CIFAR-10, a 6-block ViT-Tiny student, 10,000 training images, 5 epochs, 2-core CPU): from
the shipped MAE teacher 34.67 ± 0.61% top-1 over 3 seeds (scratch 30.38, fine-tuning that teacher 52.22: 20% of the
gap; the paper, ImageNet ViT-L: 85.1, 78% of the scratch-to-fine-tune gap); from the shipped supervised teacher
52.94 ± 0.30.

    python copy_attention.py --preset cifar --subset 10000 --epochs 5 --warmup_epochs 1 --val_subset 2000
    python copy_attention.py --preset cifar --mode copy_q           # the paper's best variant: the teacher's queries
    torchrun --nproc_per_node=8 copy_attention.py --teacher mae_vit_l --data_path /imagenet

The paper's averaged-map ablation (README "The methods"; the paper reports that both averages significantly reduce
accuracy): --average images copies the teacher's map averaged over --average_images training images, one map for
every image, computed once before training and saved in the checkpoint (the teacher then runs neither in training nor
at test); --average queries copies each image's map with every query row replaced by that image's mean row. Both need
--mode copy.

    python copy_attention.py --preset cifar --average images --output_dir runs/cifar10/copy_avg_images
"""
import functools
import os
import time

import torch
import torch.nn.functional as F

import data
import run_safety
import train
import vit
from attention_kernels import compact, copy_fast
from teacher import add_transfer_args, teacher_from_args


# ------------------------------------------------------------------------------------------------ the definition
def copy_reference(q_t, k_t, v_s):
    """Attention copy as the paper writes it: the teacher's map routes the student's values. (B, H, N, D) each.

    The map is materialised, (B, H, N, N), and autograd keeps it for backward. Training runs
    attention_kernels.copy_fast, the same values and gradients without keeping the map (tests/test_fast_paths.py),
    unless --explicit_map asks for this definition."""
    attn = torch.softmax(q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    return attn @ v_s


# The averaged-map ablation keeps these maps explicit: its maps are (H, N, N) or one N x N map per image and head,
# small at the sizes it runs (65 tokens on CIFAR), so it needs no map-free kernel.
def copy_mean_map(mean_map, v_s):
    """--average images: one map for every image, the teacher's averaged over training images,

        out = P_mean v_s,   P_mean = mean over training images x of softmax(q_t(x) k_t(x)^T / sqrt(d)),

    mean_map P_mean (H, N, N) (mean_teacher_map), broadcast over the batch of v_s (B, H, N, D)."""
    return mean_map @ v_s


def copy_mean_query(q_t, k_t, v_s):
    """--average queries: each image's map with every query row replaced by that image's mean row,

        out_i = (1/N sum_i' P[i', :]) v_s for every query i,   P = softmax(q_t k_t^T / sqrt(d)).

    (B, H, N, D) each; every output row of an image and head is the same."""
    attn = torch.softmax(q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    mean_row = attn.mean(dim=-2, keepdim=True)  # (B, H, 1, N): the mean over the query rows
    return (mean_row @ v_s).expand_as(v_s)  # (B, H, 1, D) repeated for the N queries


# ------------------------------------------------------------------------------------------ the student's attention
class CopyAttention(train.Method):
    """The student, its attention replaced by the teacher's in the teacher's layers (--mode copy), or one side of it:

        copy     softmax(q_t k_t^T) v_s   the teacher's whole map
        copy_q   softmax(q_t k_s^T) v_s   the teacher's queries (the paper's best variant)
        copy_k   softmax(q_s k_t^T) v_s   the teacher's keys
        copy_v   softmax(q_s k_s^T) v_t   the teacher's values (the student keeps its own map)

    --heads K replaces the first K heads of each layer; the others keep the student's own attention.

    The averaged-map ablation of --mode copy (`average`), each its own branch:

        images   P_mean v_s                 the map averaged over training images (mean_map): no teacher pass
        queries  (mean_i' P[i', :]) v_s     each image's map, every query row replaced by its mean row
    """

    def __init__(self, model, teacher, mode="copy", explicit_map=False, average="none", mean_map=None):
        super().__init__(model)
        self.teacher = teacher
        self.mode = mode
        self.explicit_map = explicit_map
        self.average = average
        check_average(mode, average)
        check_mean_map(average, mean_map, teacher, model)
        # (layers, heads, N, N) with --average images (None otherwise): a buffer, so that it moves with the method to
        # its device; tensors() saves it in the checkpoint, from which a resume and evaluate.py read it back
        self.register_buffer("mean_map", mean_map)

    def forward(self, images, targets):
        drop_masks = self.teacher.drop_masks(self.model, images)  # stochastic depth shared with the teacher
        logits = self.predict(self.model, images, drop_masks)
        return train.soft_cross_entropy(logits, targets), {}

    def predict(self, model, images, drop_masks=None):
        if self.average == "images":  # one map for every image, computed before training: the teacher does not run
            attention_fns = {layer: functools.partial(self.attention_mean_map, mean_map=self.mean_map[i])
                             for i, layer in enumerate(self.teacher.layers)}
        else:
            # {layer: (q_t, k_t, v_t)}, None for what the mode does not use
            from_teacher = self.teacher(images, drop_masks)
            attention_fns = {layer: functools.partial(self.attention, teacher_qkv=qkv)
                             for layer, qkv in from_teacher.items()}
        tokens, _ = model.forward_features(images, attention_fns=attention_fns, drop_masks=drop_masks)
        return model.forward_head(tokens)

    def attention(self, q_s, k_s, v_s, teacher_qkv):
        """One transferred layer: the student's own q, k, v (B, H, N, D) and the teacher's (its first h heads)
        -> the attention output the student's block continues with, (B, H, N, D)."""
        q_t, k_t, v_t = teacher_qkv
        h = self.teacher.heads
        q, k, v = q_s[:, :h], k_s[:, :h], v_s[:, :h]  # the student's heads that take the teacher's attention
        if self.mode == "copy":
            out = self.copy(q_t, k_t, v)
        elif self.mode == "copy_q":
            out = self.attend(q_t, k, v)
        elif self.mode == "copy_k":
            out = self.attend(q, k_t, v)
        else:  # copy_v
            out = self.attend(q, k, v_t)
        return self.with_own_heads(out, q_s, k_s, v_s)

    def attention_mean_map(self, q_s, k_s, v_s, mean_map):
        """One transferred layer with --average images: the student's own q, k, v (B, H, N, D) and the layer's mean
        map (h, N, N) -> the attention output the student's block continues with, (B, H, N, D)."""
        h = self.teacher.heads
        out = copy_mean_map(mean_map, v_s[:, :h])  # gradients reach v_s only: the map is a constant
        return self.with_own_heads(out, q_s, k_s, v_s)

    def with_own_heads(self, out, q_s, k_s, v_s):
        """out (B, h, N, D) of the first h heads, followed by the student's own attention in the heads after them."""
        h = self.teacher.heads
        if h == q_s.shape[1]:
            return out
        own = F.scaled_dot_product_attention(q_s[:, h:], k_s[:, h:], v_s[:, h:])  # the heads that stay the student's
        return torch.cat([out, own], dim=1)

    def copy(self, q_t, k_t, v_s):
        """softmax(q_t k_t^T) v_s: gradients reach v_s only, the teacher being frozen."""
        if self.average == "queries":
            return copy_mean_query(q_t, k_t, v_s)
        if self.explicit_map:
            return copy_reference(q_t, k_t, v_s)
        return copy_fast(q_t, k_t, v_s)

    def attend(self, q, k, v):
        """softmax(q k^T) v for the one-sided variants, where the student's own q or k also learns."""
        if self.explicit_map:
            return copy_reference(q, k, v)
        # compact: SDPA then saves exactly these q, k, v for backward, not the block's whole qkv output
        return F.scaled_dot_product_attention(compact(q), compact(k), compact(v))

    def describe(self):
        return dict(self.teacher.describe(), mode=self.mode, average=self.average)

    def tensors(self):
        """The mean map of --average images, saved in the checkpoint: a resume and evaluate.py compute nothing."""
        if self.average == "images":
            return {"mean_map": self.mean_map}
        return {}


AVERAGES = ["none", "images", "queries"]  # --average


def check_average(mode, average):
    """The averaged-map ablation averages the teacher's whole map: --mode copy only."""
    if average not in AVERAGES:
        raise ValueError(f"--average {average!r}: one of {', '.join(AVERAGES)}")
    if average != "none" and mode != "copy":
        raise ValueError(f"--average {average} averages the teacher's whole map: it needs --mode copy, not "
                         f"--mode {mode}")


def check_mean_map(average, mean_map, teacher, student):
    """With --average images a mean map of shape (layers, heads, N, N); without it, none."""
    tokens = student.grid ** 2 + student.num_prefix_tokens
    expected = (len(teacher.layers), teacher.heads, tokens, tokens)
    if average == "images" and (mean_map is None or tuple(mean_map.shape) != expected):
        got = "none" if mean_map is None else tuple(mean_map.shape)
        raise ValueError(f"--average images needs the teacher's mean map (layers, heads, N, N) = {expected}, got {got}")
    if average != "images" and mean_map is not None:
        raise ValueError(f"a mean map is given, but --average is {average}: it is used with --average images only")


# ------------------------------------------------------------------------------------- the mean map, once per run
@torch.no_grad()
def mean_teacher_map(teacher, dataset, n_images, batch_size, device):
    """--average images: the teacher's map averaged over n_images of `dataset` (class-balanced, seed 0; all of them
    when there are fewer), each image seen as the copy sees it (teacher.Teacher: its layers and heads, the input
    re-normalised), summed in float64:

        P_mean = 1/n sum over the n images x of softmax(q_t(x) k_t(x)^T / sqrt(d))

    -> {layer: (heads, N, N)}, float64. Batches are taken in index order without a DataLoader: no random draw."""
    chosen = data.balanced_subset(dataset.labels, min(n_images, len(dataset)), seed=0).tolist()
    sums = {layer: 0.0 for layer in teacher.layers}  # becomes (heads, N, N) float64 per layer
    for start in range(0, len(chosen), batch_size):
        images = torch.stack([dataset[i][0] for i in chosen[start:start + batch_size]]).to(device)
        for layer, (q_t, k_t, _) in teacher(images).items():
            attn = torch.softmax(q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5, dim=-1)  # (B, heads, N, N)
            sums[layer] = sums[layer] + attn.double().sum(dim=0)
    return {layer: total / len(chosen) for layer, total in sums.items()}


def unaugmented_training_set(args):
    """The student's training images (--dataset, --data_path, --subset, chosen as train.build_loaders chooses them)
    without augmentation: evaluation's transform, normalised as the student sees them."""
    dataset, _ = data.build_dataset(args.dataset, args.data_path, "train", args.input_size, subset=args.subset,
                                    seed=0, download=args.download)
    # build_dataset holds images of up to 64 px in memory at their final size; larger ones are resized per item
    dataset.transform = data.eval_transform(args.input_size, resize=args.input_size > 64)
    return dataset


def training_mean_map(args, teacher):
    """mean_teacher_map over --average_images training images, on every process alike (the same images, the same
    numbers) -> (layers, heads, N, N), float32 as the student trains."""
    t0 = time.time()
    dataset = unaugmented_training_set(args)
    maps = mean_teacher_map(teacher.to(args.device), dataset, args.average_images, args.batch_size, args.device)
    train.print0(f"--average images: the teacher's maps averaged over {min(args.average_images, len(dataset))} "
                 f"training images in {time.time() - t0:.1f} s")
    return torch.stack([maps[layer] for layer in teacher.layers]).float()


def saved_mean_map(args):
    """The mean map in the checkpoint this run resumes (train.resume's: --resume, else output_dir/checkpoint.pth), or
    None when there is none yet: a resume does not compute it again."""
    path = args.resume or os.path.join(args.output_dir, "checkpoint.pth")
    if not os.path.exists(path):
        return None
    ckpt = vit.load_file(path)
    saved = ckpt.get("method_tensors") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict) or "mean_map" not in saved:
        raise ValueError(f"{path} holds no mean map: it is not a checkpoint of an --average images run; use another "
                         "--output_dir, or the command that wrote it")
    return saved["mean_map"]


# ------------------------------------------------------------------------------------------------------- recipes
# The authors' ViT-L attention-copy recipe (their README; paper Appendix A): effective batch 2048 on 64 GPUs.
COPY = dict(
    model="vit_large_patch16", input_size=224, teacher="mae_vit_l",
    layers=":-3",  # their code copies the first depth-3 layers in every run (--end_layer -3, never passed on)
    epochs=100, warmup_epochs=5,
    batch_size=32,  # per GPU x 64 = 2048; lr = blr * 2048 / 256 = 8e-3
    blr=1e-3,
    min_lr=0.0, min_lr_ratio=0.25,  # their min_lr 2e-3 is absolute at batch 2048: the cosine ends at 25% of the peak
    beta2=0.999, weight_decay=0.05, layer_decay=0.75, drop_path=0.0, ema=0.9999,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,  # MAE's fine-tune augmentation
)
# CPU-sized CIFAR-10 (this repository's, README "Results"): the shipped teacher's shape, every layer copied.
COPY_CIFAR = dict(
    model="vit_tiny_cifar", input_size=32, dataset="cifar10", data_path="",
    teacher="mae_tiny_cifar10",  # README "The shipped teachers"
    layers=":",
    epochs=30, warmup_epochs=3, batch_size=128, blr=1e-3, min_lr=1e-5, min_lr_ratio=None,
    beta2=0.999, weight_decay=0.05, layer_decay=0.75, drop_path=0.0, ema=0.0,
    aug="randaug", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
)
# mode: which of the teacher's q, k, v the student takes (Teacher's `exchange`)
FROM_TEACHER = {"copy": "qk", "copy_q": "q", "copy_k": "k", "copy_v": "v"}


def main(argv=None):
    parser = train.get_args_parser("Attention copy: a student routed by a teacher's maps.", COPY, {"cifar": COPY_CIFAR})
    add_transfer_args(parser, FROM_TEACHER)
    parser.add_argument("--average", choices=AVERAGES, default="none",
                        help="the paper's ablation, with --mode copy: copy the teacher's map averaged over training "
                             "images (images), or each image's map with every query row replaced by its mean row "
                             "(queries)")
    parser.add_argument("--average_images", type=train.COUNT, default=2048,
                        help="with --average images: average over this many unaugmented training images "
                             "(class-balanced)")
    args = train.parse_args(parser, argv)
    check_average(args.mode, args.average)  # before any work

    def make_method(student):
        teacher = teacher_from_args(args, student, FROM_TEACHER[args.mode])
        mean_map = None
        if args.average == "images":
            mean_map = saved_mean_map(args)  # a resume reads it back
        if args.average == "images" and mean_map is None:
            mean_map = training_mean_map(args, teacher)  # once per run, before its first step
        return CopyAttention(student, teacher, args.mode, args.explicit_map, args.average, mean_map)

    return train.run(args, make_method)


if __name__ == "__main__":
    run_safety.cli(main)

"""bench.py: speed and memory of every method, side by side with the authors' way of computing it.

The repository's claim (README, method.md "Attention copy" / "Attention distillation"): transferring attention costs
little more than training from scratch, because no N x N attention map is ever kept. This measures it in one run, as
ratios, for the same student, batch and weights under

    scratch        train.Baseline: the student alone
    copy           copy_attention.CopyAttention: SDPA(q_t, k_t, v_s); the teacher hands over q and k, never a map
    distill        distill_attention.DistillAttention: blocked attention CE, recomputed in backward
    naive_copy     the authors' way: every map softmax(q k^T * scale) materialised, the teacher's used as attn @ v_s
    naive_distill  the authors' way: teacher and student logits materialised, CE = -(softmax(T) log_softmax(S))

All layers and all heads are transferred, by ours and by the naive references alike, so both run the whole teacher.
The naive references run in fp32 and eager mode whatever --amp / --compile say (the authors trained in fp32).
Per configuration: the median step time (forward + backward + AdamW, after warm-up; the methods take turns step by
step so machine noise hits them alike) and a teacher forward alone for scale; the bytes saved for backward in one step
(saved_tensors_hooks; each storage counted once with its full size, parameters excluded); and the peak memory of a
fresh process running that method alone for a few steps (peak RSS on CPU, torch.cuda.max_memory_allocated on GPU).

    python bench.py                                      # CPU, fp32: ViT-S and ViT-B widths at N = 65, 197, 577
    python bench.py --device cuda --amp bf16 --compile   # GPU: adds ViT-L; img/s of ViT-B/16 and ViT-L/16 at 224 px
README "Speed and memory" has the table this printed on a 2-core CPU and which targets it meets.
"""
import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import copy_attention
import distill_attention
import train
import vit

METHODS = ["scratch", "copy", "distill", "naive_copy", "naive_distill"]
NAIVE_OF = {"naive_copy": "copy", "naive_distill": "distill"}
# name: (embed_dim, num_heads, depth), with patch 16 (ViT-S/16, ViT-B/16, ViT-L/16).
WIDTHS = {"s": (384, 6, 12), "b": (768, 12, 12), "l": (1024, 16, 24)}
# Images per step for the ViT-S width (the wider ones take half, ViT-L a quarter). On CPU they keep the default run
# near 10 minutes on 2 cores (batch 4 at N = 577 as in the reference numbers); on a GPU they fill it decently.
BATCH = {"cpu": {65: 16, 197: 8, 577: 4}, "cuda": {65: 512, 197: 256, 577: 64}}


# ------------------------------------------------------------------------------------------ the naive references
def naive_features(model, images, maps=None):
    """Run every block of a vit.VisionTransformer (its own weights) as the authors' timm-style code does: logits
    q k^T * scale materialised, softmax, then attn @ v. maps: per-layer probabilities (B, H, N, N) used instead of
    the block's own (naive copy); the block's own logits are then not formed. Returns the tokens after the last block,
    the logits of each block (empty when maps are given) and the probabilities each block used."""
    assert not model.drop_path, "the naive references do no stochastic depth; benchmark with drop_path 0"
    x = model.embed(images)
    logits, probs = [], []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        B, N, C = x.shape
        q, k, v = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        if maps is None:
            s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
            p = s.softmax(dim=-1)  # kept for backward by softmax and by p @ v: one map per layer
            logits.append(s)
        else:
            p = maps[i]  # the teacher's map, kept for backward by p @ v (the gradient of v needs it)
        probs.append(p)
        x = x + attn.proj((p @ v).transpose(1, 2).reshape(B, N, C))
        x = x + block.mlp(block.norm2(x))
    return x, logits, probs


def naive_attention_ce(s, t):
    """The authors' attention loss on materialised logits (B, H, N, N): mean over (batch, head, query) of the CE."""
    return -(t.softmax(dim=-1) * s.log_softmax(dim=-1)).sum(dim=-1).mean()


class NaiveCopy(train.Baseline):
    """Attention copy computed like the authors' code: the full teacher, all its softmax maps, attn @ v_s."""

    def __init__(self, model, teacher):
        super().__init__(model)
        self.teacher = teacher.requires_grad_(False).eval()

    def forward(self, images, targets):
        with torch.autocast(images.device.type, enabled=False):  # fp32, as the authors trained
            images = images.float()
            with torch.no_grad():
                maps = naive_features(self.teacher, images)[2]
            tokens = naive_features(self.model, images, maps)[0]
            return train.soft_cross_entropy(self.model.forward_head(tokens), targets), {}


class NaiveDistill(NaiveCopy):
    """Attention distillation computed like the authors' code: teacher and student logits of every layer
    materialised, loss = task CE + atd_weight * sum over layers of naive_attention_ce."""

    def __init__(self, model, teacher, atd_weight=3.0):
        super().__init__(model, teacher)
        self.atd_weight = atd_weight

    def forward(self, images, targets):
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            with torch.no_grad():
                teacher = naive_features(self.teacher, images)[1]
            tokens, student, _ = naive_features(self.model, images)
            task = train.soft_cross_entropy(self.model.forward_head(tokens), targets)
            atd = sum(naive_attention_ce(s, t) for s, t in zip(student, teacher))
            return task + self.atd_weight * atd, {"task": task, "atd": atd}


# ------------------------------------------------------------------------------------------------ building
def arch_for(width, tokens, depth=None, num_classes=1000):
    """vit.VisionTransformer kwargs for a width name and a token count N = (img / 16)^2 + 1."""
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise ValueError(f"{tokens} tokens is not (img / patch)^2 + 1: use 65, 197, 577, ...")
    dim, heads, layers = WIDTHS[width]
    return dict(img_size=16 * grid, patch_size=16, embed_dim=dim, depth=depth or layers, num_heads=heads,
                num_classes=num_classes)


def write_teacher(arch, folder, seed=1):
    """A randomly initialised teacher of the student's shape, saved as this repository's checkpoints are."""
    torch.manual_seed(seed)
    teacher = vit.VisionTransformer(**arch)
    path = os.path.join(folder, "teacher.pth")
    torch.save({"model": teacher.state_dict(), "arch": teacher.arch}, path)
    return path


def build(name, student, teacher_path, device):
    """One method around a copy of `student`, on `device`, with an AdamW over the student's parameters."""
    student = copy.deepcopy(student)
    with contextlib.redirect_stdout(io.StringIO()):  # the methods print their plan; the table is the output here
        if name == "scratch":
            method = train.Baseline(student)
        elif name == "copy":
            method = copy_attention.CopyAttention(student, teacher_path, layers=":")
        elif name == "distill":
            method = distill_attention.DistillAttention(student, teacher_path, layers=":", atd_weight=3.0)
        elif name in NAIVE_OF:
            teacher = vit.load_pretrained(teacher_path)[0]
            method = NaiveCopy(student, teacher) if name == "naive_copy" else NaiveDistill(student, teacher, 3.0)
        else:
            raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    method = method.to(device).train()
    return method, torch.optim.AdamW(method.model.parameters(), lr=1e-4)


def make_inputs(arch, batch, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, arch["img_size"], arch["img_size"], generator=g)
    targets = torch.softmax(torch.randn(batch, arch["num_classes"], generator=g), dim=-1)  # soft, like MixUp's
    return images.to(device), targets.to(device)


def autocast(device, amp):
    return train.autocast(argparse.Namespace(device=str(device), amp=amp))


# ------------------------------------------------------------------------------------------------ measuring
def train_step(runner, opt, images, targets, amp):
    with autocast(images.device, amp):
        loss, _ = runner(images, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def saved_for_backward(method, images, targets, amp):
    """Forward under saved_tensors_hooks, then backward (no optimizer step). Returns a dict: `bytes`, each storage
    kept for backward counted once with its full size (a view such as q = qkv[..., :D] keeps all of its storage
    alive), storages of parameters excluded (they exist anyway; autocast's low-precision weight copies do count);
    `shapes`; `loss`."""
    params = {p.untyped_storage().data_ptr() for p in method.parameters()}
    storages, shapes = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(images.device, amp):
        loss, _ = method(images, targets)
    loss.backward()
    method.zero_grad(set_to_none=True)
    return dict(bytes=sum(storages.values()), shapes=shapes, loss=loss.item())


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(steps, device, warmup, repeats):
    """steps: {name: callable doing one step}. Warm each up, then time `repeats` rounds in which every callable runs
    once in turn (so drifting machine load spreads over all). Returns {name: [seconds per round]}."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def run_one(cfg):
    """A fresh process's job (`bench.py --one CONFIG_JSON`): build one method (the teacher read from the file
    cfg['teacher']), run cfg['steps'] training steps, report the process's peak memory."""
    torch.set_num_threads(cfg["threads"])
    device, arch = cfg["device"], cfg["arch"]
    torch.manual_seed(0)
    method, opt = build(cfg["method"], vit.VisionTransformer(**arch), cfg["teacher"], device)
    runner = torch.compile(method) if cfg["compile"] and cfg["method"] not in NAIVE_OF else method
    images, targets = make_inputs(arch, cfg["batch"], device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss()
    for _ in range(cfg["steps"]):
        train_step(runner, opt, images, targets, cfg["amp"])
    sync(device)
    out = dict(peak_rss=peak_rss(), rss_before_steps=rss_before)
    if device.startswith("cuda"):
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def peak_rss():
    """This process's peak resident set size in bytes. On Linux /proc's VmHWM: getrusage's ru_maxrss would do, but a
    child started by fork + exec inherits its parent's peak there (the kernel keeps the larger of the two across exec),
    so every configuration would report at least the parent's size."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(cfg):
    """run_one(cfg) in a fresh Python process, so no other configuration's memory is in its peak."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench.py --one {cfg['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_config(arch, batch, device="cpu", amp="none", compile=False, methods=METHODS, warmup=1, repeats=5,
                 memory_steps=0, threads=1, label=""):
    """Everything measured for one (student shape, batch): per method the step times, the median, the bytes saved
    for backward and the first loss (same weights and images for all: ours and naive must agree), optionally the
    peak memory of a fresh process (memory_steps > 0), and the ratios."""
    torch.manual_seed(0)
    student = vit.VisionTransformer(**arch)
    images, targets = make_inputs(arch, batch, device)
    N = (arch["img_size"] // arch["patch_size"]) ** 2 + 1
    result = dict(label=label, arch=arch, tokens=N, batch=batch, methods={})
    with tempfile.TemporaryDirectory() as folder:
        path = write_teacher(arch, folder)
        built = {name: build(name, student, path, device) for name in methods}
        steps = {}
        for name, (method, opt) in built.items():
            saved = saved_for_backward(method, images, targets, amp)
            result["methods"][name] = dict(saved_bytes=saved["bytes"], loss=saved["loss"],
                                           saves_n_by_n=any(s[-2:] == (N, N) for s in saved["shapes"]))
            runner = torch.compile(method) if compile and name not in NAIVE_OF else method
            steps[name] = (lambda r=runner, o=opt: train_step(r, o, images, targets, amp))
        teacher = next((built[n][0].teacher for n in ("copy", "distill") if n in built), None)
        if teacher is not None:  # for scale: the least that our copy and distillation add to a scratch step
            @torch.no_grad()
            def teacher_forward():
                with autocast(images.device, amp):
                    teacher.forward_features(images)
            steps["teacher_fwd"] = teacher_forward
        times = time_steps(steps, device, warmup, repeats)
        result["teacher_fwd_s"] = statistics.median(times.pop("teacher_fwd")) if teacher is not None else None
        for name, ts in times.items():
            m = result["methods"][name]
            m.update(times_s=ts, step_s=statistics.median(ts), img_per_s=batch / statistics.median(ts))
        del built, steps, teacher
        for name in methods if memory_steps else ():
            result["methods"][name].update(peak_memory(dict(
                method=name, arch=arch, teacher=path, batch=batch, device=device, amp=amp, compile=compile,
                steps=memory_steps, threads=threads)))
    result["ratios"] = ratios(result["methods"])
    return result


def ratios(methods):
    """copy/scratch, distill/scratch and naive/ours of every measured quantity present in both."""
    pairs = [("copy", "scratch"), ("distill", "scratch")] + [(n, o) for n, o in NAIVE_OF.items()]
    out = {}
    for a, b in pairs:
        if a in methods and b in methods:
            out[f"{a}/{b}"] = {k: methods[a][k] / methods[b][k] for k in
                               ("step_s", "saved_bytes", "peak_rss", "cuda_max_allocated")
                               if methods[a].get(k) and methods[b].get(k)}
    return out


# ------------------------------------------------------------------------------------------------ reporting
def table(results, device):
    """One markdown table: a row per (configuration, method); ratios to scratch for ours, to ours for naive."""
    mem = "peak alloc MiB" if device.startswith("cuda") else "peak RSS MiB"
    head = ["width", "N", "batch", "method", "step ms", "img/s", "time vs ref", "saved MiB", "saved vs ref", mem,
            "mem vs ref"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    key = "cuda_max_allocated" if device.startswith("cuda") else "peak_rss"
    for r in results:
        for name, m in r["methods"].items():
            ref = NAIVE_OF.get(name, "scratch" if name != "scratch" else None)
            ratio = r["ratios"].get(f"{name}/{ref}", {})
            fmt = lambda k: f"{ratio[k]:.2f}x {ref}" if k in ratio else ""
            rows.append("| " + " | ".join([
                r["label"], str(r["tokens"]), str(r["batch"]), name, f"{1000 * m['step_s']:.0f}",
                f"{m['img_per_s']:.1f}", fmt("step_s"), f"{m['saved_bytes'] / 2 ** 20:.0f}", fmt("saved_bytes"),
                f"{m[key] / 2 ** 20:.0f}" if key in m else "", fmt(key)]) + " |")
        if r.get("teacher_fwd_s") and "scratch" in r["methods"]:
            rows.append(f"| {r['label']} | {r['tokens']} | {r['batch']} | (teacher forward alone) | "
                        f"{1000 * r['teacher_fwd_s']:.0f} | | "
                        f"{r['teacher_fwd_s'] / r['methods']['scratch']['step_s']:.2f}x scratch | | | | |")
    return "\n".join(rows)


def targets(results):
    """The issue's targets (ViT-S width, CPU, fp32) that the measured configurations can check:
    [(what, measured, limit, '<=' or '>=', met)]."""
    out = []

    def check(what, value, op, limit):
        out.append((what, value, limit, op, value <= limit if op == "<=" else value >= limit))

    for r in results:
        R, N, s = r["ratios"], r["tokens"], r["label"] == "S"
        get = lambda pair, k: R.get(pair, {}).get(k)
        if s and N == 577 and get("distill/scratch", "saved_bytes"):
            check(f"S N={N} saved: distill / scratch", get("distill/scratch", "saved_bytes"), "<=", 1.3)
        if s and N == 577 and get("naive_distill/distill", "saved_bytes"):
            check(f"S N={N} saved: naive distill / distill", get("naive_distill/distill", "saved_bytes"), ">=", 2.5)
        if s and get("copy/scratch", "saved_bytes"):
            check(f"S N={N} saved: copy / scratch", get("copy/scratch", "saved_bytes"), "<=", 1.0)
        if s and N == 197 and get("copy/scratch", "step_s"):
            check(f"S N={N} time: copy / scratch", get("copy/scratch", "step_s"), "<=", 1.4)
        if s and N == 197 and get("distill/scratch", "step_s"):
            check(f"S N={N} time: distill / scratch", get("distill/scratch", "step_s"), "<=", 1.5)
        for naive, ours in NAIVE_OF.items():
            if get(f"{naive}/{ours}", "step_s"):
                check(f"{r['label']} N={N} time: {ours} / {naive}", 1 / get(f"{naive}/{ours}", "step_s"), "<=", 1.1)
    return out


def environment(device):
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, python=platform.python_version(), device=device,
                threads=torch.get_num_threads(), cpu=platform.processor())
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast for our methods "
                   "(the naive references stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile our methods (the naive ones stay eager)")
    p.add_argument("--widths", default=None, help="comma list of " + ", ".join(f"{k} {v}" for k, v in WIDTHS.items())
                   + " (embed_dim, heads, depth); default s,b on CPU, s,b,l on GPU")
    p.add_argument("--tokens", default="65,197,577", help="token counts N = (img/16)^2 + 1: 65 = 128 px, "
                   "197 = 224 px, 577 = 384 px")
    p.add_argument("--batch", type=int, help="images per step for every configuration; unset: bench.BATCH")
    p.add_argument("--depth", type=int, help="override the depth of every width (smoke runs)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list; ratios need both members of a pair")
    p.add_argument("--warmup", type=int, help="untimed steps per method before timing; default 1, 3 with --compile "
                   "(the first calls compile)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method, ViT-S width")
    p.add_argument("--wide_repeats", type=int, default=3, help="timed steps per method, wider widths")
    p.add_argument("--memory_steps", type=int, default=2, help="steps in the fresh process measuring peak memory "
                   "(2: the second has AdamW's state resident); 0 skips it")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on CPU")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run_one(json) in this fresh process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return None
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if args.warmup is None:
        args.warmup = 3 if args.compile else 1
    widths = (args.widths or ("s,b,l" if cuda else "s,b")).split(",")
    tokens = [int(n) for n in args.tokens.split(",")]
    methods = args.methods.split(",")
    env = environment(args.device)
    print(f"bench: {env}; amp {args.amp}, compile {args.compile}; all layers and heads transferred")
    results = []
    for w in widths:
        for N in tokens:
            arch = arch_for(w, N, args.depth)
            sizes = BATCH["cuda" if cuda else "cpu"]
            batch = args.batch or max(1, sizes.get(N, sizes[197] * 197 // N) // {"s": 1, "b": 2, "l": 4}[w])
            repeats = args.repeats if w == "s" else args.wide_repeats
            t0 = time.time()
            r = bench_config(arch, batch, args.device, args.amp, args.compile, methods, args.warmup, repeats,
                             args.memory_steps, args.threads, label=w.upper())
            results.append(r)
            print(f"  {w.upper()} N={N} batch {batch}: {time.time() - t0:.0f} s; " + ", ".join(
                f"{k} {v['step_s'] * 1000:.0f} ms" for k, v in r["methods"].items()), flush=True)
            for naive, ours in NAIVE_OF.items():  # same weights and images: the two must compute the same loss
                if naive in r["methods"] and ours in r["methods"]:
                    a, b = r["methods"][naive]["loss"], r["methods"][ours]["loss"]
                    if abs(a - b) > 1e-3 * max(1.0, abs(b)):
                        print(f"  WARNING: {naive} loss {a:.6f} != {ours} loss {b:.6f}")
    print(table(results, args.device))
    checks = targets(results)
    for what, value, limit, op, met in checks:
        print(f"target {what} = {value:.2f} ({op} {limit}): {'met' if met else 'MISSED'}")
    with open(args.out, "w") as f:
        json.dump(dict(env=env, args=vars(args), results=results,
                       targets=[dict(what=w, value=v, limit=l, op=o, met=m) for w, v, l, o, m in checks]), f, indent=1)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

"""bench.py: speed and memory of every method, side by side with the naive way of computing it.

The repository's claim (README "Speed and memory"): transferring attention costs little more than training from
scratch, because no N x N attention map is ever kept. This measures it in one run, as ratios, for the same student,
batch and weights, every layer and head transferred:

    scratch        train.Method: the student alone
    copy, distill  copy_attention.CopyAttention (copy_fast), distill_attention.DistillAttention (attention_ce_fast)
    naive_copy     CopyAttention(explicit_map=True), as --explicit_map trains: copy_reference, the teacher's map
                   materialised and kept for backward, as the authors' code computes it
    naive_distill  DistillAttention(explicit_map=True): attention_ce_reference, both maps materialised

Only the transfer differs between a method and its naive twin (the teacher and the student's own attention run
SDPA in both), so their ratio is what computing the transfer without maps buys. --amp and --compile apply to all.
Per configuration: the median step time (forward + backward + AdamW, after warm-up; the variants take turns step by
step, so drifting machine load hits them alike), a teacher forward alone for scale; the bytes saved for backward in
one step (saved_tensors_hooks; each storage once, at full size, parameters excluded); and the peak memory: on CPU
the peak RSS of a fresh process running that variant alone, on GPU torch.cuda.max_memory_allocated over one step.

    python benchmarks/bench.py                                      # CPU, fp32, ViT-S width at N = 65, 197, 577
    python benchmarks/bench.py --compile                            # the same, every variant eager and compiled
    python benchmarks/bench.py --device cuda --amp bf16 --compile   # GPU: ViT-B and ViT-L widths at N = 197, 577
    python benchmarks/bench.py --quick                              # seconds: a 1-layer configuration (tests)
    python -m benchmarks.bench --quick                              # the same, run as a module
README "Speed and memory" has the table this printed and which targets it meets.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# The modules measured here live in the repository root, one folder up. `python benchmarks/bench.py` puts only this
# folder on sys.path (and so does the fresh process peak_memory starts), so the root goes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import copy_attention
import distill_attention
import run_safety
import train
import vit
from teacher import Teacher

# variant: (method, trains with the explicit map, the definition itself)
VARIANTS = {
    "scratch": ("scratch", False),
    "copy": ("copy", False),
    "distill": ("distill", False),
    "naive_copy": ("copy", True),
    "naive_distill": ("distill", True),
}
METHODS = list(VARIANTS)
NAIVE = {"copy": "naive_copy", "distill": "naive_distill"}  # each method's naive twin
# name: (embed_dim, num_heads, depth), with patch 16 (ViT-S/16, ViT-B/16, ViT-L/16).
WIDTHS = {"s": (384, 6, 12), "b": (768, 12, 12), "l": (1024, 16, 24)}
# Images per step at ViT-S width (ViT-B takes half, ViT-L a quarter): on 2 CPU cores a default run takes about
# 15 minutes (batch 4 at N = 577); on a GPU they fill it decently.
BATCH = {"cpu": {65: 16, 197: 8, 577: 4}, "cuda": {65: 512, 197: 256, 577: 64}}


# ------------------------------------------------------------------------------------------------ building
def arch_for(width, tokens, depth=None, num_classes=1000):
    """vit.VisionTransformer kwargs for a width name and a token count N = (img / 16)^2 + 1."""
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise ValueError(f"{tokens} tokens is not (img / patch)^2 + 1: use 65, 197, 577, ...")
    if width not in WIDTHS:
        raise ValueError(f"--widths {width!r}: use {', '.join(WIDTHS)}")
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


def build(name, student, teacher):
    """Variant `name` of a method around `student` (not copied: the variants of one configuration share the student,
    its optimizer and the teacher, so they hold one set of weights between them)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    method, explicit_map = VARIANTS[name]
    if method == "scratch":
        return train.Method(student)
    if method == "copy":
        return copy_attention.CopyAttention(student, teacher, "copy", explicit_map)
    return distill_attention.DistillAttention(student, teacher, "distill", 3.0, explicit_map)


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


def saved_for_backward(runner, images, targets, amp):
    """Forward under saved_tensors_hooks, then backward (no optimizer step). Returns a dict: `bytes`, each storage
    kept for backward counted once with its full size (a view such as q = qkv[..., :D] keeps all of its storage
    alive), storages of parameters excluded (they exist anyway; autocast's low-precision weight copies do count);
    `shapes`; `loss`. runner: a method or its torch.compile wrapper (whose saved tensors the hooks see too)."""
    params = {p.untyped_storage().data_ptr() for p in runner.parameters()}
    storages, shapes = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(images.device, amp):
        loss, _ = runner(images, targets)
    loss.backward()
    runner.zero_grad(set_to_none=True)
    return dict(bytes=sum(storages.values()), shapes=shapes, loss=loss.item())


def time_steps(steps, device, repeats):
    """steps: {name: (callable doing one step, warm-up steps)}. Warm each up, then time `repeats` rounds in which
    every callable runs once in turn (so drifting machine load spreads over all). Returns {name: [seconds]}."""
    for fn, n in steps.values():
        for _ in range(n):
            fn()
    times, cuda = {name: [] for name in steps}, torch.device(device).type == "cuda"
    for _ in range(repeats):
        for name, (fn, _) in steps.items():
            torch.cuda.synchronize() if cuda else None
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize() if cuda else None
            times[name].append(time.perf_counter() - t0)
    return times


def run_one(cfg):
    """A fresh process's job (`bench.py --one CONFIG_JSON`, CPU): build one variant (the teacher read from the file
    cfg['teacher']), run cfg['steps'] training steps, report the process's peak RSS."""
    torch.set_num_threads(cfg["threads"])
    device, arch, name = cfg["device"], cfg["arch"], cfg["method"]
    torch.manual_seed(0)
    student = vit.VisionTransformer(**arch)
    method = build(name.split()[0], student, Teacher(cfg["teacher"], student, ":")).to(device).train()
    runner = torch.compile(method) if name.endswith("compiled") else method
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    images, targets = make_inputs(arch, cfg["batch"], device)
    rss_before = peak_rss()
    for _ in range(cfg["steps"]):
        train_step(runner, opt, images, targets, cfg["amp"])
    return dict(peak_rss=peak_rss(), rss_before_steps=rss_before)


def peak_rss():
    """This process's peak resident set size in bytes: /proc's VmHWM on Linux (ru_maxrss would give a child started by
    fork + exec at least its parent's peak). It counts what malloc keeps after frees, not only live tensors."""
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


def bench_config(arch, batch, device="cpu", amp="none", modes=("eager",), methods=METHODS, warmup=1, repeats=5,
                 memory_steps=0, threads=1, label=""):
    """Everything measured for one (student shape, batch): per variant ('copy', 'copy compiled', ...) the step
    times, their median, the bytes saved for backward and the first loss (same weights and images for all: a method
    and its naive twin must agree), optionally the peak memory of a fresh process (memory_steps > 0); the ratios."""
    torch.manual_seed(0)
    student = vit.VisionTransformer(**arch).to(device)
    images, targets = make_inputs(arch, batch, device)
    N = (arch["img_size"] // arch["patch_size"]) ** 2 + 1
    result = dict(label=label, arch=arch, tokens=N, batch=batch, methods={})
    with tempfile.TemporaryDirectory() as folder:
        path = write_teacher(arch, folder)
        teacher = Teacher(path, student, ":").to(device)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        steps = {}
        for name in methods:  # every loss and saved set first, on the same weights; then the timed steps
            for mode in modes:
                key = name if mode == "eager" else f"{name} compiled"
                method = build(name, student, teacher).train()
                runner = torch.compile(method) if mode == "compiled" else method
                saved = saved_for_backward(runner, images, targets, amp)  # compiles, for compiled variants
                result["methods"][key] = dict(saved_bytes=saved["bytes"], loss=saved["loss"],
                                              saves_n_by_n=any(sum(d == N for d in s) >= 2 for s in saved["shapes"]))

                def step(runner=runner):
                    train_step(runner, opt, images, targets, amp)

                steps[key] = (step, warmup + 2 * (mode == "compiled"))  # a compiled step warms up twice more

        def teacher_forward():
            with autocast(device, amp):
                teacher(images)

        steps["teacher forward"] = (teacher_forward, warmup)
        times = time_steps(steps, device, repeats)
        result["teacher_fwd_s"] = statistics.median(times.pop("teacher forward"))
        for key, ts in times.items():
            step_s = statistics.median(ts)
            result["methods"][key].update(times_s=ts, step_s=step_s, img_per_s=batch / step_s)
        for key, (fn, _) in steps.items() if memory_steps and device.startswith("cuda") else ():
            torch.cuda.reset_peak_memory_stats()  # exact per step on a GPU, so no fresh process (nor compile)
            fn()
            result["methods"].get(key, {})["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        del steps, teacher, opt
        for key in result["methods"] if memory_steps and not device.startswith("cuda") else ():
            result["methods"][key].update(peak_memory(dict(
                method=key, arch=arch, teacher=path, batch=batch, device=device, amp=amp, steps=memory_steps,
                threads=threads)))
    result["ratios"] = ratios(result["methods"])
    return result


def same_mode(key, name):
    """`name`'s variant in the mode of variant `key`: same_mode('copy compiled', 'scratch') == 'scratch compiled'."""
    return name and name + key[len(key.split()[0]):]


def ratios(methods):
    """Every variant over scratch, and each fused one over its naive twin, in the same mode (eager or compiled), of
    every measured quantity present in both: {'copy/scratch': {'step_s': ..}, 'copy compiled/naive_copy compiled'}.
    A time ratio is the median over rounds of the two steps' ratio in one round (time_steps), so that the machine's
    load, which drifts between rounds, cancels."""
    out = {}
    for key in methods:
        for ref in (same_mode(key, "scratch"), same_mode(key, NAIVE.get(key.split()[0]))):
            if ref in methods and ref != key:
                a, b = methods[key], methods[ref]
                out[f"{key}/{ref}"] = {k: a[k] / b[k] for k in ("step_s", "saved_bytes", "peak_rss",
                                                                "cuda_max_allocated") if a.get(k) and b.get(k)}
                if a.get("times_s") and b.get("times_s"):
                    out[f"{key}/{ref}"]["step_s"] = statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"]))
    return out


# ------------------------------------------------------------------------------------------------ reporting
def table(results, device):
    """One markdown table: a row per (configuration, variant), with its ratios to scratch and to its naive twin."""
    key = "cuda_max_allocated" if device.startswith("cuda") else "peak_rss"
    head = ["width", "N", "batch", "method", "step ms", "img/s", "time / scratch", "time / naive", "saved MiB",
            "saved / scratch", "peak MiB" if key == "peak_rss" else "peak alloc MiB", "peak / scratch"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    for r in results:
        for name, m in r["methods"].items():
            ratio = lambda ref, k: r["ratios"].get(f"{name}/{same_mode(name, ref)}", {}).get(k)
            rows.append("| " + " | ".join([
                r["label"], str(r["tokens"]), str(r["batch"]), name, f"{1000 * m['step_s']:.0f}",
                f"{m['img_per_s']:.1f}", fmt(ratio("scratch", "step_s")),
                fmt(ratio(NAIVE.get(name.split()[0]), "step_s")), f"{m['saved_bytes'] / 2 ** 20:.0f}",
                fmt(ratio("scratch", "saved_bytes")), f"{m[key] / 2 ** 20:.0f}" if key in m else "",
                fmt(ratio("scratch", key))]) + " |")
        scratch = r["methods"].get("scratch", {}).get("step_s")
        rows.append(f"| {r['label']} | {r['tokens']} | {r['batch']} | (teacher forward alone) | "
                    f"{1000 * r['teacher_fwd_s']:.0f} | | {fmt(scratch and r['teacher_fwd_s'] / scratch)} |" + " |" * 5)
    return "\n".join(rows)


def targets(results, device="cpu"):
    """The speed and memory targets that the measured configurations can check: [(what, measured, limit, met)],
    every one a ratio that must be <= its limit. CPU: at ViT-S width, in each mode measured. GPU: each fused method at
    least 1.3x faster than its naive twin at N = 577 (time ratio <= 1 / 1.3)."""
    rules = [("", "naive", "step_s", 577, 1 / 1.3)] if device.startswith("cuda") else [
        ("copy", "naive", "step_s", None, 1.05), ("copy", "scratch", "saved_bytes", None, 1.0),
        ("distill", "scratch", "step_s", 197, 1.40), ("distill", "scratch", "step_s", 577, 1.55),
        ("distill", "scratch", "saved_bytes", None, 1.15), ("distill", "scratch", "peak_rss", 577, 1.3)]
    out = []
    for r in results:
        for pair, R in r["ratios"].items():
            a, b = pair.split("/")
            for method, ref, k, N, limit in rules if device.startswith("cuda") or r["label"] == "S" else ():
                if a.startswith(method) and b.startswith(ref) and N in (None, r["tokens"]) and k in R:
                    out.append((f"{r['label']} N={r['tokens']} {k}: {pair}", R[k], limit, R[k] <= limit))
    return out


def environment(device):
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, python=platform.python_version(), device=device,
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine())
    if os.path.exists("/proc/cpuinfo"):  # the model name, where platform names only the architecture
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                           info["cpu"])
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast, for every variant")
    p.add_argument("--compile", action="store_true", help="also every variant torch.compile'd, timed interleaved")
    p.add_argument("--widths", help="comma list of " + ", ".join(f"{k} {v}" for k, v in WIDTHS.items())
                   + " (embed_dim, heads, depth); default s on CPU, b,l on GPU")
    p.add_argument("--tokens", help="token counts N = (img/16)^2 + 1: 65 = 128 px, 197 = 224 px, 577 = 384 px; "
                                    "default 65,197,577 on CPU, 197,577 on GPU")
    p.add_argument("--batch", type=int, help="images per step for every configuration; unset: bench.BATCH")
    p.add_argument("--depth", type=int, help="override the depth of every width (smoke runs)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list; ratios need both members of a pair")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing (compiled: +2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (the median is reported)")
    p.add_argument("--memory_steps", type=int, default=2, help="CPU: steps in the fresh process measuring peak RSS "
                   "(2: the second has AdamW's state resident); GPU: any > 0 measures one step in place; 0 skips")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on CPU")
    p.add_argument("--quick", action="store_true", help="seconds, not minutes: ViT-S width, 1 layer, N = 17, "
                   "batch 1, 1 repeat, no warm-up, no peak memory, 1 thread (smoke test)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run_one(json) in this fresh process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return None
    if args.quick:
        args.widths, args.tokens, args.depth, args.batch = "s", "17", 1, 1
        args.warmup, args.repeats, args.memory_steps, args.threads = 0, 1, 0, 1
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    widths = (args.widths or ("b,l" if cuda else "s")).split(",")
    tokens = [int(n) for n in (args.tokens or ("197,577" if cuda else "65,197,577")).split(",")]
    methods, modes = args.methods.split(","), ("eager", "compiled") if args.compile else ("eager",)
    if set(methods) - set(VARIANTS):
        raise ValueError(f"--methods: unknown {', '.join(set(methods) - set(VARIANTS))}; use {', '.join(METHODS)}")
    configs = [(w, N, arch_for(w, N, args.depth)) for w in widths for N in tokens]  # bad ones fail here, not later
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")
    env = environment(args.device)
    header = (f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, {env['threads']} threads, amp {args.amp}, "
              f"{' and '.join(modes)}; all layers and heads transferred")
    print(f"bench.py: {header}", flush=True)
    results = []
    for w, N, arch in configs:
        sizes = BATCH["cuda" if cuda else "cpu"]
        batch = args.batch or max(1, sizes.get(N, sizes[197] * 197 // N) // {"s": 1, "b": 2, "l": 4}[w])
        t0 = time.time()
        r = bench_config(arch, batch, args.device, args.amp, modes, methods, args.warmup, args.repeats,
                         args.memory_steps, args.threads, label=w.upper())
        results.append(r)
        print(f"  {w.upper()} N={N} batch {batch}: {time.time() - t0:.0f} s; " + ", ".join(
            f"{k} {v['step_s'] * 1000:.0f} ms" for k, v in r["methods"].items()), flush=True)
        for key, m in r["methods"].items():  # same weights and images: a method and its twin compute one loss
            twin = r["methods"].get(same_mode(key, NAIVE.get(key.split()[0])), m)
            if abs(m["loss"] - twin["loss"]) > 1e-3 * max(1.0, abs(twin["loss"])):
                print(f"  WARNING: {key} loss {m['loss']:.6f} != naive {twin['loss']:.6f}")
    print(f"\n{header}\n")
    print(table(results, args.device))
    checks = targets(results, args.device)
    for what, value, limit, met in checks:
        print(f"target {what} = {value:.2f} (<= {limit:.2f}): {'met' if met else 'MISSED'}")
    with open(args.out, "w") as f:
        json.dump(dict(env=env, args=vars(args), results=results,
                       targets=[dict(what=w, value=v, limit=l, met=m) for w, v, l, m in checks]), f, indent=1)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_safety.cli(main)

#!/usr/bin/env bash
# gpu_check.sh: everything this repository measures on a GPU, in one go, on one H100/H200 machine in at most 9 minutes.
#
#   (a) tests/test_cuda.py: copy and the distillation loss against their definitions on CUDA (float32, bf16 autocast)
#       and one compiled distillation step that saves no N x N tensor for backward
#   (b) bench.py on CUDA, bf16: ViT-B and ViT-L widths at N = 197 and 577, ours against the naive way and scratch,
#       eager at full depth; then compiled (2 blocks of each width), one configuration at a time while time lasts
#   (c) MAE pre-training of a CIFAR-10 teacher (pretrain_mae.py --preset cifar) for as many epochs as fit its share:
#       a first epoch is timed, then the epochs are chosen
#   (d) the CIFAR-10 table of Li et al. 2024 (Table 1's rows at CIFAR scale, README "Results"): scratch, fine-tune,
#       copy and distillation (--preset cifar recipes, all 50,000 training images) run side by side on the one GPU
#       for as many epochs as fit, from (c)'s teacher (the shipped one if (c) failed), then the fine-tune +
#       distillation ensemble (evaluate.py); also the data loader's throughput against the GPU step's. Eager:
#       compiling (a minute a run) costs more than it saves in runs this short
#
# Each part has its own time budget and runs whatever happened before it; a failure is recorded, not fatal. Results go
# to $OUT (default gpu_results/), at most 8 files since that is what a device machine sends back: summary.txt (device,
# every number, the table), results.json, gpu_check.log (this console), bench.json, mae_encoder.pth,
# reconstruction.png and logs.tar.gz (every run's log.jsonl and output). Unpacked files stay in $GPU_CHECK_WORK.
#
#   python data.py pack ../shared/data/cifar10 data/cifar10.pack.pth      # once, on the CPU side (18.3 MiB)
#   bash gpu_check.sh                                                      # on the GPU machine (python3, no venv)
#   GPU_CHECK_DRY_RUN=1 bash gpu_check.sh     # the same parts on the CPU with tiny settings (tests/test_gpu_check.py)
#
# Settings (environment): OUT, GPU_CHECK_WORK (scratch folder), GPU_CHECK_DATA (packed CIFAR-10; the dry run falls
# back to --dataset fake without one), GPU_CHECK_BUDGET (total seconds, 540), GPU_CHECK_PYTHON.
set -uo pipefail
start=$(date +%s)
OUT=${OUT:-gpu_results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "error: cannot create OUT=$OUT" >&2; exit 2; }
cd "$(dirname "$0")" || exit 2
DRY=${GPU_CHECK_DRY_RUN:-0}
BENCH_METHODS=scratch,copy,distill,naive_copy,naive_distill  # ours, the naive way, and scratch
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu_check_work}
if [ -e "$WORK" ] && [ ! -e "$WORK/.gpu_check" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then
    echo "error: GPU_CHECK_WORK=$WORK holds files this script did not write: give an empty or new folder" >&2; exit 2
fi
rm -rf "$WORK" && mkdir -p "$WORK"/{a,b,c,d} && touch "$WORK/.gpu_check" || exit 2
rm -f "$OUT"/{summary.txt,results.json,gpu_check.log,bench.json,mae_encoder.pth,reconstruction.png,logs.tar.gz}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 WORK OUT DRY

# ----------------------------------------------------------------------------------------------------- settings
if [ "$DRY" = 1 ]; then  # CPU, tiny: every command line of the GPU run, a few steps each, in about a minute
    PY=${GPU_CHECK_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    DEVICE=cpu AMP=none BUDGET=${GPU_CHECK_BUDGET:-400} RESERVE=10
    BUDGET_A=60 BUDGET_B=60 BUDGET_C=60     # (d) gets what is left
    MAE_WORKERS=0 RUN_WORKERS=0             # no loader processes: their start-up would be most of a dry run
    export OMP_NUM_THREADS=1 RUN_THREADS=1  # 2 cores shared by 4 runs: with more threads each, steps take seconds
    MAE_MAX_EPOCHS=2 TABLE_MAX_EPOCHS=1
    TINY="--epoch_steps 2 --batch_size 8" TABLE_BATCH=8  # every training run: two steps an epoch
    PROBE_STEPS=1 TABLE_STEPS_PER_EPOCH=2 LOADER_BATCHES=2 GPU_STEPS=2
    SUBSET="--subset 64 --val_subset 32" EVAL_SUBSET="--val_subset 32" PROBE_EVAL="--val_subset 16"
    BENCH_EAGER="--quick --methods $BENCH_METHODS"  # 1 layer, N = 17, batch 1
    BENCH_COMPILED=("s:17")                 # the per-configuration loop, eager: compiling on 2 cores takes minutes
    BENCH_COMPILE_FLAGS="--quick --methods $BENCH_METHODS"
    DATA=${GPU_CHECK_DATA:-data/cifar10.pack.pth}
    [ -z "${GPU_CHECK_DATA:-}" ] && [ ! -f "$DATA" ] && DATA=""  # none given, none built: fake data
else
    PY=${GPU_CHECK_PYTHON:-python3}
    DEVICE=cuda AMP=bf16 BUDGET=${GPU_CHECK_BUDGET:-540} RESERVE=25
    BUDGET_A=60 BUDGET_B=120 BUDGET_C=150   # (d) gets what is left: 180 s or more
    MAE_WORKERS=12 RUN_WORKERS=3 RUN_THREADS=4  # 16 cores: 4 table runs x (3 loader processes + 1 main)
    MAE_MAX_EPOCHS=1600 TABLE_MAX_EPOCHS=300
    TINY="" TABLE_BATCH=128                 # --preset cifar's batch
    PROBE_STEPS=30 TABLE_STEPS_PER_EPOCH=$((50000 / 128)) LOADER_BATCHES=100 GPU_STEPS=30  # batch 128: --preset cifar
    SUBSET="" EVAL_SUBSET="" PROBE_EVAL="--val_subset 256"
    # Eager at full depth: every configuration in one process, seconds each. Then bench.py --compile (eager and
    # compiled, timed interleaved) of ours and scratch at 2 blocks of each width, a process per configuration, the
    # most telling first: compiling a full-depth ViT-L takes minutes per variant, while what compiling changes (the
    # bytes each layer saves for backward, N x N or not; time per layer) shows at any depth. Peak memory would take
    # a fresh process (and compilation) per variant: the bytes saved for backward stand for it here.
    BENCH_EAGER="--device cuda --amp bf16 --widths b,l --tokens 197,577 --memory_steps 0 --methods $BENCH_METHODS"
    BENCH_COMPILED=("l:577" "b:197" "b:577" "l:197")
    BENCH_COMPILE_FLAGS="--device cuda --amp bf16 --compile --depth 2 --memory_steps 0 --methods scratch,copy,distill"
    DATA=${GPU_CHECK_DATA:-data/cifar10.pack.pth}
fi
deadline=$((start + BUDGET - RESERVE))
export TABLE_BATCH DEVICE
if [ -n "$DATA" ]; then DATAFLAGS="--dataset cifar10 --data_path $DATA"; else DATAFLAGS="--dataset fake"; fi
echo "gpu_check.sh: dry run $DRY, device $DEVICE, amp $AMP, python $PY, data ${DATA:-fake}, budget ${BUDGET} s," \
     "work folder $WORK, results in $OUT"

# ------------------------------------------------------------------------------------------------------ helpers
now() { date +%s; }
part_left() { echo $((part_end - $(now))); }

begin() {  # begin NAME BUDGET_SECONDS: the part ends at the earlier of its budget and the whole script's deadline
    part=$1 part_t0=$(now) part_status=ok part_note=""
    part_end=$((part_t0 + $2)); [ "$part_end" -gt "$deadline" ] && part_end=$deadline
    echo; echo "=== part $part: up to $((part_end > part_t0 ? part_end - part_t0 : 0)) s"
}

note() { part_note="${part_note:+$part_note; }$*"; echo "  $*"; }

fail() { part_status=failed; note "$@"; }

partial() { [ "$part_status" = ok ] && part_status=partial; note "$@"; }  # done, with less than planned

run() {  # run [--foreground] LOG COMMAND...: the command under the part's time left; 0 ok, else its exit code (124:
    # time ran out). --foreground: the time-out's SIGTERM goes to the command alone, not to its loader processes as
    # well, so that a training script finishes its step, saves and exits (143) while its loader still serves it.
    local fg=() log t rc
    [ "$1" = --foreground ] && fg=(--foreground) && shift
    log=$1; shift
    t=$(part_left)
    if [ "$t" -le 1 ]; then echo "  skipped (no time left): $*" | tee -a "$log"; return 124; fi
    echo "  \$ $*  (up to ${t} s, output in ${log#"$WORK"/})"
    timeout "${fg[@]}" -k 15 "$t" "$@" >>"$log" 2>&1; rc=$?
    [ $rc -ne 0 ] && echo "  exit code $rc$([ $rc -eq 124 ] && echo ' (time ran out)'): see ${log#"$WORK"/}"
    return $rc
}

end() {  # record the part, then rewrite the summary and the bundle so that a killed script still leaves them
    printf '%s\t%s\t%s\t%s\n' "$part" "$part_status" $(($(now) - part_t0)) "$part_note" >>"$WORK/parts.tsv"
    echo "=== part $part: $part_status in $(($(now) - part_t0)) s"
    summarize
}

# --------------------------------------------------------------------------------------------------- reporting
summarize() {  # $WORK -> $OUT/summary.txt, results.json, bench.json, logs.tar.gz (plain Python, no torch)
    "$PY" - <<'EOF' || echo "  (summary failed)"
import glob, json, os, shutil, tarfile
W, O = os.environ["WORK"], os.environ["OUT"]

def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default

def log_lines(path):  # a run's log.jsonl: one dict per finished epoch
    try:
        return [json.loads(l) for l in open(path) if l.strip()]
    except (OSError, ValueError):
        return []

parts = [dict(zip(("part", "status", "seconds", "note"), l.rstrip("\n").split("\t")))
         for l in open(os.path.join(W, "parts.tsv"))] if os.path.exists(os.path.join(W, "parts.tsv")) else []
env = load(os.path.join(W, "env.json"), {})
res = dict(env=env, parts=parts, dry_run=os.environ["DRY"] == "1")
lines = [f"gpu_check.sh on {env.get('device_name', '?')} ({env.get('nvidia_smi', 'no nvidia-smi')}); torch "
         f"{env.get('torch', '?')}, {env.get('date', '?')}; dry run: {res['dry_run']}", "", "parts:"]
lines += [f"  {p['part']:<8} {p['status']:<8} {p['seconds']:>4} s  {p['note']}" for p in parts]

# (a) tests
tail = open(os.path.join(W, "a", "pytest.txt")).read().strip().splitlines()[-1:] if os.path.exists(
    os.path.join(W, "a", "pytest.txt")) else []
res["tests"] = tail[0] if tail else None
lines += ["", f"(a) tests/test_cuda.py: {res['tests']}"]

# (b) bench: every JSON bench.py wrote, merged into bench.json
bench = {os.path.basename(p)[:-5]: load(p) for p in sorted(glob.glob(os.path.join(W, "b", "*.json")),
                                                             key=os.path.getmtime)}  # in the order they ran
res["bench"] = bench
with open(os.path.join(O, "bench.json"), "w") as f:
    json.dump(bench, f, indent=1)
lines += ["", "(b) bench.py (a step: forward + backward + AdamW; saved: bytes kept for backward; ratios a/b of both):",
          "  run          width     N  batch  method          step ms    img/s  saved MiB  N x N saved"]
for name, b in bench.items():
    for r in (b or {}).get("results", []):
        for m, v in r.get("methods", {}).items():
            nan = float("nan")
            lines.append(f"  {name:<12} {r.get('label', '?'):<5} {r.get('tokens', '?'):>5} {r.get('batch', '?'):>6}  "
                         f"{m:<14} {1000 * v.get('step_s', nan):>8.1f} {v.get('img_per_s', nan):>8.1f}"
                         f" {v.get('saved_bytes', nan) / 2 ** 20:>10.1f}  {v.get('saves_n_by_n', '?')}")
        for pair, q in r.get("ratios", {}).items():
            lines.append(f"  {name:<12} {r.get('label', '?'):<5} {r.get('tokens', '?'):>5}         {pair}: "
                         + ", ".join(f"{k} {x:.2f}x" for k, x in q.items()))

# (c) MAE
mae = log_lines(os.path.join(W, "c", "mae", "log.jsonl"))
res["mae"] = dict(load(os.path.join(W, "c", "plan.json"), {}), epochs_done=len(mae), log=mae)
if mae:
    lines += ["", f"(c) MAE teacher: {len(mae)} epochs of {res['mae'].get('epochs', '?')} planned, "
                  f"{sum(e['time'] for e in mae) / len(mae):.1f} s/epoch, train loss {mae[0]['train_loss']:.4f} -> "
                  f"{mae[-1]['train_loss']:.4f}; teacher used in (d): {res['mae'].get('teacher_used', '?')}"]
else:
    lines += ["", f"(c) MAE teacher: no epoch finished ({res['mae'] or 'not run'})"]

# (d) throughput and the table
d = load(os.path.join(W, "d", "plan.json"), {})
tp = load(os.path.join(W, "d", "throughput.json"), {})
runs = {m: log_lines(os.path.join(W, "d", m, "log.jsonl")) for m in ("scratch", "finetune", "copy", "distill")}
ens = load(os.path.join(W, "d", "ensemble.json"), {})
top1 = {m: l[-1].get("val_acc1") for m, l in runs.items() if l}
try:
    top1["ensemble (finetune + distill)"] = ens["accuracy"]["val"]["ensemble"]["acc1"]
except (KeyError, TypeError):
    pass
res["table"] = dict(plan=d, throughput=tp, top1=top1, logs=runs)
lines += ["", f"(d) CIFAR-10 table: {d.get('epochs', '?')} epochs planned per method, 4 runs side by side, teacher "
              f"{res['mae'].get('teacher_used', '?')}"]
rates, batch = {}, int(os.environ["TABLE_BATCH"])
for m, l in runs.items():
    if l:
        t = sum(e["time"] for e in l) / len(l)
        rates[m] = (l[-1]["step"] / len(l)) * batch / t if t else 0.0  # log.jsonl's "step": steps since the start
        lines.append(f"  {m:<9} {len(l)} epochs, {t:.1f} s/epoch training, {rates[m]:.0f} img/s")
if tp:
    lines.append(f"  data loader alone ({tp.get('workers')} workers, as each run has): {tp.get('loader_img_s', 0):.0f} "
                 f"img/s; scratch's training step alone ({os.environ['DEVICE']}, eager, one batch kept there): "
                 f"{tp.get('step_img_s', 0):.0f} img/s")
    if rates and tp.get("loader_img_s"):
        bound = tp["loader_img_s"] < tp.get("step_img_s", 0) and rates.get("scratch", 0) > 0.8 * tp["loader_img_s"]
        res["table"]["data_bound"] = bound
        lines.append("  -> the data loader is the bottleneck: per-image CPU augmentation caps the runs near the "
                     "loader's rate; keeping CIFAR on the GPU and augmenting there would lift it" if bound else
                     "  -> the runs do not sit at the loader's rate: the GPU step (shared by the 4 runs), not data "
                     "loading, sets their pace")
ft, sc = top1.get("finetune"), top1.get("scratch")
lines += ["", "  method                         top-1 (%)   share of the scratch-to-fine-tune gap"]
for m, a in top1.items():
    share = f"{100 * (a - sc) / (ft - sc):.0f}%" if None not in (a, sc, ft) and ft != sc else ""
    lines.append(f"  {m:<30} {a:>9.2f}   {share}")
with open(os.path.join(O, "summary.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(O, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
for name in ("mae_encoder.pth", "reconstruction.png"):
    if os.path.exists(os.path.join(W, "c", "mae", name)):
        shutil.copy(os.path.join(W, "c", "mae", name), os.path.join(O, name))
with tarfile.open(os.path.join(O, "logs.tar.gz.tmp"), "w:gz") as tar:  # all but the checkpoints
    tar.add(W, "gpu_check_work", filter=lambda t: None if t.name.endswith((".pth", ".png", ".lock")) else t)
os.replace(os.path.join(O, "logs.tar.gz.tmp"), os.path.join(O, "logs.tar.gz"))
EOF
}

plan() {  # plan JSON AVAILABLE_S STARTUP_S MAX_EPOCHS STEPS_PER_EPOCH EVAL_SHARE LOG... -> how many epochs fit
    "$PY" - "$@" <<'EOF'
import json, sys
out, available, startup, most, steps, eval_share, *logs = sys.argv[1:]

def step_s(log):  # seconds a step in the last epoch a probe logged (the second one is warm), and its steps
    lines = [json.loads(l) for l in open(log) if l.strip()]
    done = lines[-1]["step"] - (lines[-2]["step"] if len(lines) > 1 else 0)
    return lines[-1]["time"] / done, done

slowest = max(step_s(log) for log in logs)  # every method gets the same epochs: the slowest one sets them
epoch_s = slowest[0] * (int(steps) or slowest[1]) * (1 + float(eval_share))  # STEPS_PER_EPOCH 0: the probe's
epochs = int(max(1, min(int(most), (float(available) - float(startup)) // epoch_s)))
json.dump(dict(epochs=epochs, step_s=slowest[0], epoch_s=epoch_s, available_s=float(available),
               startup_s=float(startup)), open(out, "w"))
print(epochs)
EOF
}

# ----------------------------------------------------------------------------------------------- the machine
begin env 30
"$PY" - <<'EOF' >"$WORK/env.out" 2>&1 || fail "python3 cannot import torch: see env.out"
import datetime, json, os, subprocess, torch
env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
           cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), cores=os.cpu_count(),
           device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20
                                       ).stdout.strip() or "nvidia-smi printed nothing"
except (OSError, subprocess.TimeoutExpired):
    env["nvidia_smi"] = "no nvidia-smi"
json.dump(env, open(os.path.join(os.environ["WORK"], "env.json"), "w"), indent=1)
print(env)
EOF
cat "$WORK/env.out"
if [ "$DRY" != 1 ] && ! grep -q '"cuda_available": true' "$WORK/env.json" 2>/dev/null; then
    fail "no CUDA device: the GPU parts will fail (for the CPU, run GPU_CHECK_DRY_RUN=1 bash gpu_check.sh)"
fi
if [ -n "$DATA" ] && [ ! -f "$DATA" ]; then
    fail "no packed CIFAR-10 at $DATA: build it on the CPU side with 'python data.py pack ../shared/data/cifar10" \
         "$DATA' and carry it to this machine (parts c and d need it)"
fi
end

# ----------------------------------------------------------------------------------------------- (a) the tests
begin a_tests "$BUDGET_A"
run "$WORK/a/pytest.txt" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py || fail "tests failed or" \
    "did not finish: $(tail -n 1 "$WORK/a/pytest.txt")"
[ "$part_status" = ok ] && note "$(tail -n 1 "$WORK/a/pytest.txt")"
end

# ---------------------------------------------------------------------------------------------- (b) bench.py
begin b_bench "$BUDGET_B"
# shellcheck disable=SC2086  # the flag lists are meant to split
run "$WORK/b/eager.txt" "$PY" bench.py $BENCH_EAGER --out "$WORK/b/eager.json" || fail "eager bench failed"
for cfg in "${BENCH_COMPILED[@]}"; do
    w=${cfg%:*} n=${cfg#*:}
    # shellcheck disable=SC2086
    run "$WORK/b/compiled_$w$n.txt" "$PY" bench.py $BENCH_COMPILE_FLAGS --widths "$w" --tokens "$n" \
        --out "$WORK/b/compiled_$w$n.json"
    rc=$?
    if [ $rc -eq 124 ]; then partial "compiled $w N=$n did not finish in the time left"
    elif [ $rc -ne 0 ]; then fail "compiled $w N=$n failed ($rc)"; fi
done
end

# ------------------------------------------------------------------------------------------- (c) MAE teacher
begin c_mae "$BUDGET_C"
teacher=teachers/mae_tiny_cifar10.pth
MAE="$PY pretrain_mae.py --preset cifar $DATAFLAGS $SUBSET --device $DEVICE --amp $AMP --num_workers $MAE_WORKERS
     --no_progress $TINY"
if [ -n "$DATA" ] && [ ! -f "$DATA" ]; then
    fail "skipped: no $DATA"
else
    t0=$(now)
    # shellcheck disable=SC2086
    # one timed epoch; then what is left, less its start-up (again) and 10 s for the encoder and the picture
    if run --foreground "$WORK/c/probe.txt" $MAE --epochs 1 --warmup_epochs 1 --output_dir "$WORK/c/probe" \
        && wall=$(($(now) - t0)) \
        && epochs=$(plan "$WORK/c/plan.json" "$(part_left)" $((wall + 10)) "$MAE_MAX_EPOCHS" 0 0 \
                         "$WORK/c/probe/log.jsonl"); then
        warmup=$(( (epochs * 2 + 47) / 48 ))  # the recipe's 2 of 48
        note "first epoch timed (${wall} s with start-up): $epochs epochs, warmup $warmup"
        # shellcheck disable=SC2086
        run --foreground "$WORK/c/mae.txt" $MAE --epochs "$epochs" --warmup_epochs "$warmup" --output_dir "$WORK/c/mae"
        rc=$?
        if [ $rc -ne 0 ] && [ -f "$WORK/c/mae/checkpoint.pth" ]; then  # stopped early: export what it has
            partial "pre-training stopped ($rc) before its last epoch: the encoder exported from its last checkpoint"
            "$PY" -c "import sys, pretrain_mae; pretrain_mae.export_encoder(sys.argv[1], sys.argv[2])" \
                "$WORK/c/mae/checkpoint.pth" "$WORK/c/mae/mae_encoder.pth" >>"$WORK/c/mae.txt" 2>&1 \
                || fail "export failed"
        elif [ $rc -ne 0 ]; then
            fail "pre-training failed ($rc)"
        fi
        [ -f "$WORK/c/mae/mae_encoder.pth" ] && teacher=$WORK/c/mae/mae_encoder.pth
    else
        fail "the timed epoch failed: see c/probe.txt"
    fi
fi
note "teacher for (d): $teacher"
"$PY" -c "import json,sys; p=sys.argv[1]; d=json.load(open(p)) if __import__('os').path.exists(p) else {};
d['teacher_used']=sys.argv[2]; json.dump(d, open(p,'w'))" "$WORK/c/plan.json" "$teacher"
end

# ------------------------------------------------------------------------------------------ (d) CIFAR-10 table
begin d_table $((deadline - $(now)))
methods=(scratch finetune copy distill)
cmd_of() {  # cmd_of METHOD -> its command line (without epochs and output folder)
    local base="--preset cifar $DATAFLAGS $SUBSET --device $DEVICE --amp $AMP --num_workers $RUN_WORKERS --no_progress"
    case $1 in
        scratch) echo "$PY train.py $base $TINY" ;;
        finetune) echo "$PY train.py $base --finetune $teacher $TINY" ;;
        copy) echo "$PY copy_attention.py $base --teacher $teacher $TINY" ;;
        distill) echo "$PY distill_attention.py $base --teacher $teacher $TINY" ;;
    esac
}
parallel() {  # parallel TAG EXTRA_FLAGS SPARE_S: the four methods side by side, each into $WORK/d/TAG$method, ending
    # SPARE_S seconds before the part does (SIGTERM to the script alone, as run --foreground does); 1 if any failed
    local tag=$1 extra=$2 m t pids=() bad=0
    t=$(($(part_left) - $3))
    if [ "$t" -le 1 ]; then fail "no time left for the runs ($tag)"; return 1; fi
    for m in "${methods[@]}"; do
        echo "  \$ $(cmd_of "$m") $extra --output_dir $WORK/d/$tag$m  (up to $t s)"
        # shellcheck disable=SC2046,SC2086
        OMP_NUM_THREADS=$RUN_THREADS timeout --foreground -k 15 "$t" $(cmd_of "$m") $extra \
            --output_dir "$WORK/d/$tag$m" >"$WORK/d/$tag$m.txt" 2>&1 &
        pids+=($!)
    done
    for i in "${!methods[@]}"; do
        wait "${pids[$i]}"; rc=$?
        if [ $rc -eq 124 ]; then partial "${methods[$i]}: stopped at the time limit ($tag)"; bad=1
        elif [ $rc -ne 0 ]; then fail "${methods[$i]}: exit $rc ($tag): $(tail -n 1 "$WORK/d/$tag${methods[$i]}.txt")"
            bad=1; fi
    done
    return $bad
}
if [ -n "$DATA" ] && [ ! -f "$DATA" ]; then
    fail "skipped: no $DATA"
else
    # 1. The loader alone (the workers each run has) and scratch's GPU step alone: which one sets the pace.
    # shellcheck disable=SC2046
    run "$WORK/d/throughput.txt" "$PY" - $(cmd_of scratch | cut -d' ' -f3-) --output_dir "$WORK/d/throughput" \
        <<EOF || fail "throughput probe failed: see d/throughput.txt"
import json, sys, time, torch, data, train
args = train.parse_args(train.get_args_parser("probe", train.FINETUNE, {"cifar": train.CIFAR}), sys.argv[1:])
loader, _, classes = train.build_loaders(args, 0, 1)
batches = iter(loader)
images, labels = next(batches)  # the workers are up
n, t = min($LOADER_BATCHES, len(loader) - 1), time.time()
for _ in range(n):
    images, labels = next(batches)
loader_img_s = n * args.batch_size / (time.time() - t)
model = train.build_model(args, classes).to(args.device)
method, mix = train.Baseline(model), data.MixupCutmix(args.mixup, args.cutmix, args.smoothing, classes)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
images, labels = images.to(args.device), labels.to(args.device)
sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
def step():
    with train.autocast(args):
        loss, _ = method(*mix(images, labels))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for i in range(2 * $GPU_STEPS):  # the first half warms up
    if i == $GPU_STEPS:
        sync()
        t = time.time()
    step()
sync()
out = dict(workers=args.num_workers, batch=args.batch_size, loader_img_s=loader_img_s,
           step_img_s=$GPU_STEPS * args.batch_size / (time.time() - t))
json.dump(out, open("$WORK/d/throughput.json", "w"))
print(out)
EOF
    # 2. Two short epochs of each method side by side; the second one's steps (warm) say how many epochs fit.
    t0=$(now)
    if parallel probe_ "--epochs 2 --warmup_epochs 1 --epoch_steps $PROBE_STEPS $PROBE_EVAL" 0 \
        && wall=$(($(now) - t0)) \
        && epochs=$(plan "$WORK/d/plan.json" $(($(part_left) - 30)) "$wall" "$TABLE_MAX_EPOCHS" \
                         "$TABLE_STEPS_PER_EPOCH" 0.1 "$WORK"/d/probe_*/log.jsonl); then  # 30 s: the ensemble
        # (an evaluation, 10,000 images forward only, is counted as 10% of an epoch's steps)
        warmup=$(( (epochs + 9) / 10 ))  # the recipe's 3 of 30
        note "probe: $wall s with start-up: $epochs epochs, warmup $warmup"
        # 3. The table's runs, 4. the ensemble of fine-tuning and distillation.
        parallel "" "--epochs $epochs --warmup_epochs $warmup" 30  # 30 s: the ensemble
        if [ -f "$WORK/d/finetune/checkpoint.pth" ] && [ -f "$WORK/d/distill/checkpoint.pth" ]; then
            # shellcheck disable=SC2086
            run "$WORK/d/ensemble.txt" "$PY" evaluate.py "$WORK/d/finetune/checkpoint.pth" \
                "$WORK/d/distill/checkpoint.pth" --device $DEVICE --amp $AMP --num_workers "$MAE_WORKERS" \
                $EVAL_SUBSET --no_progress --output "$WORK/d/ensemble.json" || fail "ensemble failed"
        else
            fail "no ensemble: fine-tune or distillation left no checkpoint"
        fi
    else
        fail "the probe runs failed: see d/probe_*.txt"
    fi
fi
end

echo; cat "$OUT/summary.txt"
echo "gpu_check.sh: $(($(now) - start)) s in all; results in $OUT"
! grep -q $'\tfailed\t' "$WORK/parts.tsv"

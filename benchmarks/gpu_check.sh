#!/usr/bin/env bash
# gpu_check.sh: what this repository measures on a GPU, as the commands a person with one H100/H200 runs, in order,
# then one summary (README "GPU check"). Every command has a time limit (timeout), and the limits add up to 9 minutes;
# no GPU has run it yet, so its epochs are estimates that leave each command room within its limit.
#
#   python data.py pack ../shared/data/cifar10 data/cifar10.pack.pth    # once, on the CPU side: CIFAR-10 in one file
#   bash benchmarks/gpu_check.sh                                         # on the GPU machine, python3, no venv
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # every command on the CPU, tiny (tests/test_gpu_check.py)
#
# Results in OUT (default gpu_results/): summary.txt (the device, every number, the CIFAR-10 table with each method's
# share of the scratch-to-fine-tune gap), results.json (the same numbers), bench.json, gpu_check.log (this console)
# and logs.tar.gz (every run's output and log.jsonl). The runs write into GPU_CHECK_WORK (default runs/gpu_check/),
# which is emptied first: the training scripts would resume from checkpoints left there.
# Settings (environment; paths from the repository root): OUT, GPU_CHECK_WORK, GPU_CHECK_DATA (the packed CIFAR-10,
# default data/cifar10.pack.pth), GPU_CHECK_PYTHON, GPU_CHECK_DRY_RUN.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-gpu_results}
WORK=${GPU_CHECK_WORK:-runs/gpu_check}
DATA=${GPU_CHECK_DATA:-data/cifar10.pack.pth}
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then  # the CPU: two steps an epoch, batch 8, a few images
    PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
    export OMP_NUM_THREADS=1  # the four table runs share the cores
    DEVICE="--device cpu --amp none"
    WORKERS=0  # no loader processes: their start-up would be most of a dry run
    TABLE_WORKERS=0
    TINY="--subset 64 --val_subset 32 --epoch_steps 2 --batch_size 8"
    EVAL_TINY="--val_subset 32"
    BENCH_EAGER="--quick"  # ViT-S width, 1 layer, N = 17, batch 1
    BENCH_COMPILED="--quick"  # eager: compiling takes minutes on 2 cores
    MAE_EPOCHS=1
    TABLE_EPOCHS=1
    SLACK=5  # the limits are a GPU's: a loaded 2-core CPU may take five times as long for these tiny runs
else  # one H100/H200, bf16, 16 cores
    PY=${GPU_CHECK_PYTHON:-python3}
    DEVICE="--device cuda --amp bf16"
    WORKERS=12  # loader processes of a command that has the machine to itself
    TABLE_WORKERS=3  # of each of the four table runs side by side: 4 x (3 + 1 main process) on 16 cores
    TINY=""
    EVAL_TINY=""
    BENCH_EAGER="--device cuda --amp bf16 --widths b,l --tokens 197,577 --memory_steps 0"
    BENCH_COMPILED="--device cuda --amp bf16 --compile --depth 2 --widths b,l --tokens 577 --memory_steps 0"
    MAE_EPOCHS=10
    TABLE_EPOCHS=5
    SLACK=1
fi
CIFAR="--preset cifar --dataset cifar10 --data_path $DATA $DEVICE --no_progress $TINY"
TEACHER=$WORK/mae/mae_encoder.pth

mkdir -p "$OUT" || exit 2
rm -f "$OUT/summary.txt" "$OUT/results.json" "$OUT/bench.json" "$OUT/logs.tar.gz"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if [ ! -f "$DATA" ]; then
    echo "error: no packed CIFAR-10 at $DATA: build it on the CPU side with" \
         "'python data.py pack ../shared/data/cifar10 data/cifar10.pack.pth' and bring it here (or set GPU_CHECK_DATA)"
    exit 2
fi
if [ -e "$WORK" ] && [ ! -e "$WORK/.gpu_check" ]; then
    echo "error: GPU_CHECK_WORK=$WORK holds files this script did not write: give an empty or new folder"
    exit 2
fi
rm -rf "$WORK" && mkdir -p "$WORK" && touch "$WORK/.gpu_check" || exit 2
export PYTHONUNBUFFERED=1
set -x

# (a) copy and the distillation loss against their definitions on CUDA, and a compiled step that saves no N x N map
timeout $((75 * SLACK)) $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py --junitxml="$WORK/tests.xml"

# (b) speed and memory, bf16: ours, the naive way and scratch, eager at full depth (ViT-B/L widths, N = 197 and 577)
timeout $((100 * SLACK)) $PY benchmarks/bench.py $BENCH_EAGER --out "$WORK/bench_eager.json"

# (b) the same eager and compiled, at 2 blocks of each width and N = 577 (a full-depth ViT-L compiles for minutes)
timeout $((120 * SLACK)) $PY benchmarks/bench.py $BENCH_COMPILED --methods scratch,copy,distill \
    --out "$WORK/bench_compiled.json"

# (c) a short MAE pre-training of the CIFAR-10 teacher (the 48-epoch recipe of pretrain_mae.py, cut short)
timeout $((100 * SLACK)) $PY pretrain_mae.py $CIFAR --num_workers $WORKERS --epochs $MAE_EPOCHS --warmup_epochs 1 \
    --output_dir "$WORK/mae"

# (d) the CIFAR-10 table (README "Results") on all 50,000 images from (c)'s teacher, the four runs side by side
TABLE="$CIFAR --num_workers $TABLE_WORKERS --epochs $TABLE_EPOCHS --warmup_epochs 1"
timeout $((120 * SLACK)) $PY train.py $TABLE --output_dir "$WORK/scratch" >"$WORK/scratch.txt" 2>&1 &
scratch=$!
timeout $((120 * SLACK)) $PY train.py $TABLE --finetune "$TEACHER" --layer_decay 0.75 --output_dir "$WORK/finetune" \
    >"$WORK/finetune.txt" 2>&1 &
finetune=$!
timeout $((120 * SLACK)) $PY copy_attention.py $TABLE --teacher "$TEACHER" --output_dir "$WORK/copy" \
    >"$WORK/copy.txt" 2>&1 &
copy=$!
timeout $((120 * SLACK)) $PY distill_attention.py $TABLE --teacher "$TEACHER" --output_dir "$WORK/distill" \
    >"$WORK/distill.txt" 2>&1 &
distill=$!
wait $scratch $finetune $copy $distill

# (d) the ensemble of fine-tuning and distillation (the mean of their softmax probabilities)
timeout $((30 * SLACK)) $PY evaluate.py "$WORK/finetune/checkpoint.pth" "$WORK/distill/checkpoint.pth" $DEVICE \
    $EVAL_TINY --num_workers $WORKERS --no_progress --output "$WORK/ensemble.json"

# every run's output and log.jsonl, without the checkpoints
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude="*.pth" .

# the summary: OUT/summary.txt, results.json and bench.json; exit code 1 if a part left less than it should
$PY benchmarks/gpu_summary.py "$OUT" --work "$WORK"

"""gpu_summary.py: what benchmarks/gpu_check.sh's commands left, as one page and one JSON (README "GPU check").

It reads the folder the commands wrote into (--work):
  tests.xml                   pytest's JUnit report of tests/test_cuda.py
  bench_eager.json            benchmarks/bench.py at full depth
  bench_compiled.json         benchmarks/bench.py --compile at 2 blocks
  mae/log.jsonl               pretrain_mae.py, one line per epoch (and mae/mae_encoder.pth, the teacher it exported)
  {scratch,finetune,copy,distill}/log.jsonl    the CIFAR-10 table's runs, one line per epoch (val_acc1: top-1, %)
  ensemble.json               evaluate.py on the fine-tuned and the distilled checkpoints
and writes into OUT: summary.txt (the device, every number, and Table 1 of Li et al. 2024, arXiv 2411.09702, at
CIFAR-10 scale, with each method's share of the scratch-to-fine-tune gap as in README "Results"), results.json (the
same numbers) and bench.json (both bench.py outputs). It exits 1 when a part left less than it should (problems()).

    python benchmarks/gpu_summary.py gpu_results --work runs/gpu_check
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import xml.etree.ElementTree as ET

# The modules bench.py imports live in the repository root, one folder up; `python benchmarks/gpu_summary.py` puts
# only this folder on sys.path, so the root goes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import bench

# The table's runs, in the README's order, and the name of each one's row.
RUNS = {
    "scratch": "from scratch",
    "finetune": "fine-tune (the teacher's weights)",
    "copy": "attention copy (q, k)",
    "distill": "attention distillation",
}
ENSEMBLE = "ensemble: fine-tune + distillation"


# ------------------------------------------------------------------------------------------------ reading
def read_json(path):
    """The JSON object in `path`; None where the command that writes it did not finish."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_log(path):
    """A run's log.jsonl: one dict per finished epoch; [] where no epoch finished."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def read_tests(path):
    """pytest's JUnit XML report -> {tests, passed, failed, errors, skipped}; None where pytest wrote none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    tests = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0))
    errors = int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return dict(tests=tests, passed=tests - failed - errors - skipped, failed=failed, errors=errors, skipped=skipped)


# ------------------------------------------------------------------------------------------------ the table
def gap_share(top1, scratch, finetune):
    """How far a method's top-1 goes from scratch's to fine-tuning's, in % (0: scratch, 100: fine-tune); None where
    the two ends are equal and there is no gap."""
    if finetune == scratch:
        return None
    return 100 * (top1 - scratch) / (finetune - scratch)


def table(top1):
    """{run: top-1} (RUNS' keys and 'ensemble') -> the table's rows [{run, method, top1, share}], for the runs that
    have a top-1; a share needs both scratch's and fine-tuning's top-1."""
    scratch = top1.get("scratch")
    finetune = top1.get("finetune")
    rows = []
    for run, acc in top1.items():
        share = None
        if scratch is not None and finetune is not None:
            share = gap_share(acc, scratch, finetune)
        rows.append(dict(run=run, method=RUNS.get(run, ENSEMBLE), top1=acc, share=share))
    return rows


def collect(work):
    """Everything the check's commands left in the folder `work`, as one dict of plain types."""
    runs = {run: read_log(os.path.join(work, run, "log.jsonl")) for run in RUNS}
    ensemble = read_json(os.path.join(work, "ensemble.json"))
    top1 = {run: log[-1]["val_acc1"] for run, log in runs.items() if log}  # the last epoch's, on the val set
    if ensemble is not None:
        top1["ensemble"] = ensemble["accuracy"]["val"]["ensemble"]["acc1"]
    return dict(
        tests=read_tests(os.path.join(work, "tests.xml")),
        bench={mode: read_json(os.path.join(work, f"bench_{mode}.json")) for mode in ("eager", "compiled")},
        mae=read_log(os.path.join(work, "mae", "log.jsonl")),
        teacher_exported=os.path.exists(os.path.join(work, "mae", "mae_encoder.pth")),
        runs=runs,
        ensemble=ensemble["accuracy"]["val"] if ensemble is not None else None,
        table=table(top1),
    )


def problems(results):
    """What the parts failed to leave, one sentence each; [] when every command ran to its end."""
    out = []
    tests = results["tests"]
    if tests is None:
        out.append("(a) no test report: pytest did not finish")
    elif tests["failed"] or tests["errors"]:
        out.append(f"(a) tests/test_cuda.py: {tests['failed']} failed, {tests['errors']} errors")
    for mode, b in results["bench"].items():
        if b is None:
            out.append(f"(b) bench.py {mode}: no results (it failed or ran out of time)")
    if not results["mae"] or not results["teacher_exported"]:
        out.append("(c) MAE pre-training: no encoder exported (it failed or ran out of time)")
    for run, log in results["runs"].items():
        if not log:
            out.append(f"(d) {run}: no epoch finished")
    epochs = {run: len(log) for run, log in results["runs"].items() if log}
    if len(set(epochs.values())) > 1:
        out.append(f"(d) the runs finished different numbers of epochs: {epochs}")
    if results["ensemble"] is None:
        out.append("(d) no ensemble: evaluate.py did not finish")
    return out


# ------------------------------------------------------------------------------------------------ the page
def format_bench(mode, b):
    """bench.py's own table and targets for one of its outputs."""
    env, args = b["env"], b["args"]
    modes = "eager and compiled" if args["compile"] else "eager"
    lines = [f"(b) bench.py, {mode}: {env.get('gpu', env['cpu'])}, amp {args['amp']}, {modes}, depth "
             f"{args['depth'] or 'full'} (a step: forward + backward + AdamW; saved: bytes kept for backward)",
             bench.table(b["results"], env["device"])]
    for t in b["targets"]:
        lines.append(f"target {t['what']} = {t['value']:.2f} (<= {t['limit']:.2f}): {'met' if t['met'] else 'MISSED'}")
    return lines


def format_summary(results):
    """The page summary.txt holds: the device, every number, the table, and what is missing."""
    cuda = f" (CUDA {results['cuda']})" if results["cuda"] else ""
    lines = [f"gpu_check.sh on {results['device']}, torch {results['torch']}{cuda}, {results['date']}", ""]
    tests = results["tests"]
    if tests is None:
        lines.append("(a) tests/test_cuda.py: no report")
    else:
        lines.append(f"(a) tests/test_cuda.py: {tests['tests']} tests, {tests['passed']} passed, {tests['failed']} "
                     f"failed, {tests['errors']} errors, {tests['skipped']} skipped")
    for mode, b in results["bench"].items():
        lines.append("")
        lines += format_bench(mode, b) if b is not None else [f"(b) bench.py, {mode}: no results"]
    mae = results["mae"]
    lines.append("")
    if mae:
        seconds = statistics.mean(e["time"] for e in mae)
        lines.append(f"(c) MAE teacher: epochs {len(mae)}, {seconds:.1f} s each, train loss "
                     f"{mae[0]['train_loss']:.4f} -> {mae[-1]['train_loss']:.4f}")
    else:
        lines.append("(c) MAE teacher: no epoch finished")
    lines += ["", "(d) CIFAR-10, from (c)'s teacher (top-1 in %, on the val set, after each epoch):"]
    for run, log in results["runs"].items():
        if log:
            seconds = statistics.mean(e["time"] for e in log)
            by_epoch = " ".join(f"{e['val_acc1']:.2f}" for e in log)
            lines.append(f"  {run:<9} epochs {len(log)}, {seconds:.1f} s each (training); top-1 {by_epoch}")
        else:
            lines.append(f"  {run:<9} no epoch finished")
    ensemble = results["ensemble"]
    if ensemble is not None:
        finetune, distill = (m["acc1"] for m in ensemble["models"])
        lines.append(f"  evaluate.py on {ensemble['images']} images: fine-tune {finetune:.2f}, distillation "
                     f"{distill:.2f}, their ensemble {ensemble['ensemble']['acc1']:.2f}")
    lines += ["", "| method | CIFAR-10 top-1 | share of the scratch-to-fine-tune gap |", "| --- | --- | --- |"]
    for row in results["table"]:
        share = "" if row["share"] is None else f"{row['share']:.0f}%"
        lines.append(f"| {row['method']} | {row['top1']:.2f} | {share} |")
    lines += ["", "missing or failed: " + ("; ".join(results["problems"]) or "nothing")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the results folder: summary.txt, results.json and bench.json go there")
    p.add_argument("--work", default="runs/gpu_check", help="the folder gpu_check.sh's commands wrote into")
    args = p.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda, date=date, **collect(args.work))
    results["problems"] = problems(results)
    summary = format_summary(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(summary)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(results["bench"], f, indent=1)
    print(summary, end="")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

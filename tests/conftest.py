import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10")


@pytest.fixture
def cifar10_root():
    """The real CIFAR-10 (ImageFolder layout) beside the repository; required when AT_REQUIRE_DATA=1 (CI)."""
    if not os.path.isdir(os.path.join(CIFAR10, "train")):
        if os.environ.get("AT_REQUIRE_DATA") == "1":
            pytest.fail(f"AT_REQUIRE_DATA=1 but the CIFAR-10 folder {CIFAR10} is missing")
        pytest.skip(f"no CIFAR-10 at {CIFAR10}")
    return CIFAR10


def run_here(script, args):
    """`python SCRIPT.py ARGS` run in this process as its `__main__` block runs it, without starting Python and
    importing torch again (seconds a command): -> subprocess.CompletedProcess with the exit code, stdout and stderr."""
    import run_safety
    module = importlib.import_module(script)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if script == "data":  # data.py prints its own errors
                module.main(args)
            else:
                run_safety.cli(lambda: module.main(args))
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    return subprocess.CompletedProcess([script] + args, code, out.getvalue(), err.getvalue())


def one_error_line(r, what=""):
    """A run_here result refused its input as the scripts do: exit 2 and one `error:` line on stderr: -> that line.
    `what` names the case in a failure message."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (what, r.stderr[-2000:])
    return lines[0]


ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=5)  # a tiny ViT, 17 tokens


@pytest.fixture
def teacher_file(tmp_path):
    """A tiny teacher of shape ARCH in this repository's checkpoint format (its heads recorded)."""
    import vit
    torch.manual_seed(0)
    teacher = vit.VisionTransformer(**ARCH, global_pool=False)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "arch": teacher.arch}, path)
    return str(path)

import os
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

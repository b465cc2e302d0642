import os
import sys

import pytest

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

"""Test-session settings: offline hub, Triton's CPU interpreter, fresh random seeds."""
import os

# A hub lookup otherwise hangs ~50 s before failing: tests never use the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton reads this when a kernel is decorated, so it must be set before any import of
# aosae.kernels; CI machines have no GPU, so Triton kernels run in its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure) so inputs differ from run to run."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    print(f"seed = {value}")
    return value


def pytest_collection_modifyitems(config, items):
    """Run the integration tests last: importing dictionary_learning imports nnsight, which
    patches torch's FakeTensor for the whole process and breaks torch.compile / opcheck in
    every test after it."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/integrations/"))

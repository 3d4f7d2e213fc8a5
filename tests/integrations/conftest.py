"""Fixtures shared by the integration tests: the optional packages, or a skip that says how to install them."""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

INSTALL_HINT = "run `bash .ci/install_integrations.sh` to install it"


def require(module: str):
    """Import an optional package or skip the test, saying why."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"optional package {module!r} is not installed: {INSTALL_HINT}")
    return importlib.import_module(module)


@pytest.fixture
def saelens():
    os.environ.setdefault("WANDB_MODE", "disabled")
    require("sae_lens")
    return importlib.import_module("aosae.integrations.saelens")


@pytest.fixture
def dictlearn():
    require("dictionary_learning")
    return importlib.import_module("aosae.integrations.dictionary_learning")

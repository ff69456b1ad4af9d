"""Shared test setup: offline, single-threaded, one small demo data set per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import DEMO_SIZES, tiny_overrides  # noqa: E402,F401


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small labelled demo data set (competition layout), built once per session."""
    from data_prep.demo import build_demo
    return build_demo(tmp_path_factory.mktemp("demo_session"), seed=0, **DEMO_SIZES)

"""Shared test setup: offline, single-threaded, one small demo data set per session.

The repository root and tests/ are importable through pyproject.toml (`pythonpath`).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json

import pytest
import torch

from helpers import DEMO_SIZES, tiny_overrides

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small labelled demo data set (competition layout), built once per session."""
    from data_prep.demo import build_demo
    return build_demo(tmp_path_factory.mktemp("demo_session"), seed=0, **DEMO_SIZES)


@pytest.fixture(scope="session")
def crop_cache(tmp_path_factory):
    """One face-crop cache for the session: keyed by file + settings, so sharing it is safe."""
    return tmp_path_factory.mktemp("crop_cache")


@pytest.fixture(scope="session")
def trained_ensemble(demo_root, tmp_path_factory, crop_cache):
    """convnext + dae trained for 2 epochs on the demo set, plus the fitted stacker; shared by
    the round-trip and the inference tests (read it, copy it before changing it)."""
    from ensemble import fit as ensemble_fit
    from experts import train as experts_train
    from experts.weights import MANIFEST

    tmp = tmp_path_factory.mktemp("roundtrip")
    overrides = tiny_overrides(tmp, epochs=2, experts="convnext,dae", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root)] + overrides) == 0
    manifest_before_fit = json.loads((tmp / "weights" / MANIFEST).read_text())
    assert ensemble_fit.main([str(demo_root)] + overrides) == 0
    return {"tmp": tmp, "weights": tmp / "weights", "runs": tmp / "runs", "overrides": overrides,
            "manifest_before_fit": manifest_before_fit}

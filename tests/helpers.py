"""Helpers shared by the tests (importable: pyproject.toml puts tests/ on pytest's pythonpath)."""
from __future__ import annotations

import csv
import re
from pathlib import Path

DEMO_SIZES = dict(n_train=64, n_val=32, n_test=16, size=96)

TINY_MODELS = {
    "convnext": "test_convnext",
    "efficientnet": "test_efficientnet",
    "clip": "test_vit",
    "dae": "test_resnet",
    "resnet": "test_resnet",
}
SIZED_EXPERTS = ("mesonet", "forensic")  # not timm models: their profile input size is reduced instead
# timm's tiny test models (what timm's own tests build), by the family of a profile's backbone
TINY_TIMM_FAMILIES = {"convnext": "test_convnext", "tf_efficientnet": "test_efficientnet",
                      "efficientnet": "test_efficientnet", "resnet": "test_resnet", "vit": "test_vit"}


def tiny_timm_model(model: str) -> str:
    """timm's tiny test model of `model`'s family (convnextv2_tiny.fcmae_ft_in1k -> test_convnext)."""
    for family, tiny in TINY_TIMM_FAMILIES.items():
        if model.startswith(family):
            return tiny
    raise KeyError(f"no tiny test model for timm model {model!r}: add its family to TINY_TIMM_FAMILIES")


def cpu_run_overrides(tmp_path, cache_dir=None) -> list[str]:
    """key=value overrides that run a profile in this test process: one CPU thread, no loader
    workers, no mixed precision, and everything the run writes under `tmp_path` (weights in
    tmp_path/weights, checkpoints in tmp_path/runs, face-crop cache in tmp_path/cache unless
    `cache_dir` is given). They change where and how it runs, not what it trains."""
    tmp = Path(tmp_path)
    return [
        "threads=1", "device=cpu", "data.num_workers=0", "train.amp=off",
        f"out={tmp / 'weights'}", f"run_dir={tmp / 'runs'}", f"reports={tmp / 'reports'}",
        f"data.cache_dir={cache_dir or tmp / 'cache'}",
    ]


def tiny_overrides(tmp_path, epochs: int = 2, experts: str | None = None, cache_dir=None) -> list[str]:
    """key=value overrides for fast training of the tiny timm test models on the CPU
    (outputs under `tmp_path`, as in `cpu_run_overrides`)."""
    out = cpu_run_overrides(tmp_path, cache_dir) + [
        "data.image_size=64", "face.crop_size=80", "train.batch_size=16", f"train.epochs={epochs}"]
    out += [f"expert.{name}.model={model}" for name, model in TINY_MODELS.items()]
    out += [f"expert.{name}.epochs={epochs}" for name in TINY_MODELS]  # profiles may set more
    out += [f"expert.{name}.image_size=64" for name in SIZED_EXPERTS]  # native-size experts: small here
    if experts:
        out.append(f"experts={experts}")
    return out


def settings_of(cfg, size: int, **own):
    """The resolved settings (configs.settings) of an expert added to `cfg` with input side
    `size` and its own ExpertConfig values `own`: what FaceCropDataset takes."""
    import dataclasses

    from configs import ExpertConfig
    from configs.settings import expert_settings
    return expert_settings(dataclasses.replace(cfg, expert={"test": ExpertConfig(image_size=size, **own)}), "test")


# infer.py's line per image, without --csv
PREDICTION_LINE = re.compile(r"^Prediction of \[(.+)\] being Deepfake: (\d\.\d{6})$")


def read_prediction_csv(path) -> list[tuple[str, float]]:
    """(img_name, y_pred) rows of an `infer.py --csv` file, after checking its header."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img_name", "y_pred"]
    return [(name, float(p)) for name, p in rows[1:]]

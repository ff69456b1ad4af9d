"""Helpers shared by the tests (importable because conftest puts tests/ on sys.path)."""
from __future__ import annotations

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


def tiny_overrides(tmp_path, epochs: int = 2, experts: str | None = None, cache_dir=None) -> list[str]:
    """key=value overrides for fast training of the tiny timm test models on the CPU.

    Everything the run writes goes under `tmp_path` (weights in tmp_path/weights, checkpoints
    in tmp_path/runs, face-crop cache in tmp_path/cache unless `cache_dir` is given)."""
    tmp = Path(tmp_path)
    out = [
        "threads=1", "device=cpu", "data.image_size=64", "data.num_workers=0", "face.crop_size=80",
        "train.batch_size=16", f"train.epochs={epochs}", "train.amp=off",
        f"out={tmp / 'weights'}", f"run_dir={tmp / 'runs'}", f"reports={tmp / 'reports'}",
        f"data.cache_dir={cache_dir or tmp / 'cache'}",
    ]
    out += [f"expert.{name}.model={model}" for name, model in TINY_MODELS.items()]
    out += [f"expert.{name}.epochs={epochs}" for name in TINY_MODELS]  # profiles may set more
    out += [f"expert.{name}.image_size=64" for name in SIZED_EXPERTS]  # native-size experts: small here
    if experts:
        out.append(f"experts={experts}")
    return out

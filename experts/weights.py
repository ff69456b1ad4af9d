"""Inference-ready weights: one `.safetensors` per model plus `manifest.json`.

The manifest records, per expert, the kind and config that built it, input size and
normalisation, the face-crop settings, the training data summary, validation metrics and
the sha256 of its file; plus library versions and the full training config. Loading checks
the hash and loads strictly, so a tampered, truncated or mismatched file is refused with a
one-line reason; a file name in the manifest must lie inside the weights folder. Nothing is
unpickled. Saving writes the weights and the manifest in full to temp files beside them before
either is renamed into place (`common.files`), so a killed run or a full disk leaves the
previous weights and manifest whole. A trained expert's entry also holds the settings it
trained with (`settings`: configs.settings.ExpertSettings).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from common.errors import UserError
from common.files import write_files_atomically
from configs import ExpertConfig, FaceConfig, without_removed
from configs.settings import ExpertSettings
from experts.base import Expert, create_expert
from experts.pretrained import weights_source

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class WeightsError(UserError, RuntimeError):
    """Weights that cannot be used; the message names the file and the reason."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict:
    import numpy
    import timm
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "timm": timm.__version__, "numpy": numpy.__version__}
    for name in ("lightgbm", "sklearn", "albumentations", "cv2"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def read_manifest(weights_dir) -> dict:
    path = Path(weights_dir) / MANIFEST
    if not path.is_file():
        raise WeightsError(f"{path}: no trained weights here; run `bash train.sh` first "
                           f"(or pass --weights DIR)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise WeightsError(f"{path}: manifest format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    return manifest


def _manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def write_manifest(weights_dir, manifest: dict) -> Path:
    """Atomic write, so a killed run or a full disk never leaves a half manifest."""
    path = Path(weights_dir) / MANIFEST
    write_files_atomically({path: _manifest_bytes(manifest)})
    return path


def updated_manifest(weights_dir: Path, section: str, name: str, entry: dict, config: dict | None) -> dict:
    """The manifest with one entry (`experts` or `ensemble`) added or replaced, the others kept."""
    try:
        manifest = read_manifest(weights_dir)
    except WeightsError:
        manifest = {"format": FORMAT_VERSION, "experts": {}}
    manifest.setdefault(section, {})[name] = entry
    manifest["versions"] = library_versions()
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if config is not None:
        manifest["config"] = config
    return manifest


def update_manifest(weights_dir, section: str, name: str, entry: dict, config: dict | None = None) -> Path:
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    return write_manifest(weights_dir, updated_manifest(weights_dir, section, name, entry, config))


def save_expert(model: Expert, weights_dir, name: str, face: FaceConfig, extra: dict,
                config: dict | None = None, settings: ExpertSettings | None = None) -> Path:
    """Write `<name>.safetensors` (the weights as they are: the caller bakes EMA in first)
    and its manifest entry, with the settings it trained with (`settings`, when given;
    entries written before have none). Both files are written in full to temp files first and only then
    renamed into place, the manifest last, so a full disk leaves the previous pair as it was
    (common.errors.WriteError, one line)."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{name}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = safetensors_bytes(state, metadata={"expert": name, "kind": model.kind})
    total, trainable = model.parameter_counts()
    entry = {
        "file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "kind": model.kind,
        "expert_config": dataclasses.asdict(model.cfg), "input_size": model.image_size,
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "face": dataclasses.asdict(face), "parameters": total, "trainable_parameters": trainable,
        **extra,
    }
    if settings is not None:
        entry["settings"] = dataclasses.asdict(settings)
    if "pretrained" in model.config_fields:  # the weights its backbone started from, and their sha256
        entry["pretrained"] = weights_source(model.cfg.pretrained, model.cfg.pretrained_file, model.cfg.model)
    manifest = updated_manifest(weights_dir, "experts", name, entry, config)
    write_files_atomically({path: data, weights_dir / MANIFEST: _manifest_bytes(manifest)})
    return path


def file_in_weights_dir(weights_dir: Path, name, what: str) -> Path:
    """The file a manifest entry names. It must lie inside the weights folder: an absolute
    path or a `..` in an edited manifest would make loading read any file on the machine."""
    manifest = weights_dir / MANIFEST
    if not isinstance(name, str) or not name.strip():
        raise WeightsError(f"{manifest}: {what} entry names no file")
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts):
        raise WeightsError(f"{manifest}: {what} file {name!r} is outside the weights folder; "
                           f"only names inside {weights_dir} are accepted")
    return weights_dir / name


def verified_file(weights_dir: Path, entry: dict, what: str) -> Path:
    path = file_in_weights_dir(weights_dir, entry.get("file"), what)
    if not path.is_file():
        raise WeightsError(f"{path}: {what} weights file is missing")
    if sha256_file(path) != entry["sha256"]:
        raise WeightsError(f"{path}: sha256 does not match the manifest (file changed or corrupt); "
                           f"retrain or restore it")
    return path


def load_expert(weights_dir, name: str, device="cpu") -> tuple[Expert, dict]:
    """Build the expert from its manifest entry and load its weights strictly."""
    weights_dir = Path(weights_dir)
    manifest = read_manifest(weights_dir)
    entry = manifest.get("experts", {}).get(name)
    if entry is None:
        raise WeightsError(f"{weights_dir / MANIFEST}: no expert {name!r}; "
                           f"available: {sorted(manifest.get('experts', {}))}")
    path = verified_file(weights_dir, entry, f"expert {name!r}")
    # An entry written before an option was removed holds it at its old default, dropped here;
    # at another value it is an error: that expert can no longer be built.
    ecfg = ExpertConfig(**without_removed(entry["expert_config"], f"expert.{name}.", str(weights_dir / MANIFEST)))
    # The architecture only: never fetch pretrained weights to then overwrite them.
    ecfg = dataclasses.replace(ecfg, pretrained="", pretrained_file="")
    model = create_expert(ecfg, entry["input_size"])
    try:
        state = load_file(str(path), device="cpu")
        model.load_state_dict(state, strict=True)
    except Exception as err:  # wrong keys or shapes, unreadable file
        raise WeightsError(f"{path}: cannot load into {entry['kind']} expert: {str(err).splitlines()[0]}") from None
    return model.to(device).eval(), entry


def face_config_of(entry: dict) -> FaceConfig:
    return FaceConfig(**entry["face"])

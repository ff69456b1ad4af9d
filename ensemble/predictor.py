"""The trained ensemble detector: the experts + their combiner, loaded once from `weights/`.

    detector = EnsembleDetector.from_weights("weights")
    batch = detector.batch_of_images([rgb, ...])   # face crop -> {(region, size): uint8 (B, 3, S, S)}
    p_fake, per_expert = detector.score_crops(batch)

Used by `infer.py`, `ensemble.fit`, `ensemble.evaluate` and the benchmarks, so every
caller crops, resizes and combines exactly as training did.

Precision (`EnsembleDetector(precision=...)`, `--precision` of infer.py and ensemble.evaluate):
`fp32`; `bf16`: the experts' forward passes run under bf16 autocast (scores stay float32;
the fixed statistics of the forensic expert opt out of autocast themselves); `auto`: bf16
where the device computes it natively (`common.runtime.native_bf16`, which `train.amp: auto`
follows too), else fp32. The default
is DEFAULT_PRECISION. bf16 on a CPU also lays the experts' weights and inputs out
channels-last, where oneDNN's bf16 convolutions run fastest.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import UsageError
from common.inputs import to_unit_float
from common.runtime import native_bf16, select_device
from configs import ConfigError, FaceConfig, without_removed
from data_prep.faces import crop_face
from data_prep.images import ImageDecodeError, decode_image
from data_prep.landmarks import detect_landmarks
from data_prep.regions import region_tensor
from experts.weights import MANIFEST, WeightsError, face_config_of, load_expert, read_manifest, verified_file

ENSEMBLE_FILE = "ensemble.json"

PRECISIONS = ("auto", "fp32", "bf16")
# bf16 where the hardware computes it natively: measured with the cpu profile's FF++ weights, it
# moved no AUC by more than 0.0007 (ensemble 0.7164 -> 0.7163 on the FF++ testset, 0.7189 ->
# 0.7188 on lfw_faceswap; README "Inference") once the fixed statistics stayed float32.
# This one constant is every command's default.
DEFAULT_PRECISION = "auto"


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`, `fp32` or `bf16` on `device` -> the precision it runs in: `fp32` or `bf16`."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp32")
    return precision


def precision_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The context the experts' forward passes run in: bf16 autocast for `bf16`, else none."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


InputKey = tuple[str, int]  # (region of the face crop, input size): what one expert reads


def input_key(model) -> InputKey:
    """The input an expert (torch or ONNX) reads: its region of the face crop at its size."""
    return model.region, model.image_size


def crop_to_inputs(crop: np.ndarray, keys) -> dict[InputKey, torch.Tensor]:
    """A face crop (H x W x 3 uint8) -> {(region, size): uint8 tensor (3, S, S)}, cut and
    resized as in training; the landmarks are found once, and only when a region needs them."""
    points = detect_landmarks(crop) if any(region != "face" for region, _ in keys) else None
    return {(region, size): region_tensor(crop, region, size, points) for region, size in keys}


@dataclass
class EnsembleDetector:
    """The whole trained ensemble: every expert, the face-crop settings they were trained
    with, and the stacker that combines their scores (None: their plain mean)."""
    experts: dict                      # name -> Expert (eval mode, on device)
    face: FaceConfig
    device: torch.device
    tta: list[str] = field(default_factory=list)
    stacker: object | None = None      # ensemble.stacking.StackingEnsemble, or None = mean
    precision: str = DEFAULT_PRECISION  # of PRECISIONS; after construction, what it runs in: fp32 or bf16

    def __post_init__(self):
        self.precision = resolve_precision(self.precision, self.device)
        # bf16 convolutions on a CPU run on oneDNN's kernels, which want channels-last tensors:
        # resnet10t's forward pass 1.6x faster here (BENCHMARKS.md, "bf16 and channels-last").
        self.channels_last = (self.precision == "bf16" and self.device.type == "cpu"
                              and all(isinstance(m, torch.nn.Module) for m in self.experts.values()))  # not ONNX
        if self.channels_last:
            for model in self.experts.values():
                model.to(memory_format=torch.channels_last)
        fitted = getattr(self.stacker, "feature_names", None)
        if fitted is not None and list(fitted) != self.feature_names():  # else a traceback at scoring
            raise WeightsError(f"the stacker was fitted on the columns {list(fitted)}, but these experts with "
                               f"TTA {self.tta} give "
                               f"{self.feature_names()}; use the settings it was fitted with, or refit it")

    @classmethod
    def from_weights(cls, weights_dir, experts: list[str] | None = None, device="auto",
                     tta: list[str] | None = None, use_stacker: bool = True,
                     precision: str = DEFAULT_PRECISION) -> "EnsembleDetector":
        """`use_stacker=False`: the experts alone (plain mean), without reading the stacker,
        as `ensemble.fit` needs when it is about to replace it. `tta` defaults to the stacker's."""
        weights_dir = Path(weights_dir)
        manifest = read_manifest(weights_dir)
        available = list(manifest.get("experts", {}))
        ens = manifest.get("ensemble", {}).get("stacker") if use_stacker else None
        names = experts or (ens["experts"] if ens else available)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise WeightsError(f"{weights_dir}: no expert(s) {unknown}; available: {available}")
        dev = select_device(device)
        loaded, faces = {}, set()
        for name in names:
            loaded[name], entry = load_expert(weights_dir, name, dev)
            faces.add(json.dumps(entry["face"], sort_keys=True))
        if len(faces) > 1:
            raise WeightsError(f"{weights_dir}: experts {names} were trained with different face-crop "
                               f"settings; score them separately")
        face = face_config_of(manifest["experts"][names[0]])
        stacker = None
        if ens and list(ens["experts"]) == list(names):  # a subset falls back to the plain mean
            from ensemble.stacking import StackingEnsemble
            without_removed(ens, "ensemble.", str(weights_dir / MANIFEST))  # fitted on removed inputs: an error
            path = verified_file(weights_dir, ens, "ensemble")
            stacker = StackingEnsemble.from_state(json.loads(path.read_text()))
            tta = ens.get("tta", []) if tta is None else tta
        return cls(loaded, face, dev, list(tta or []), stacker, precision=precision)

    @property
    def input_keys(self) -> list[InputKey]:
        return sorted({input_key(m) for m in self.experts.values()})

    def feature_names(self) -> list[str]:
        names = list(self.experts)
        if self.tta:
            names += [f"{n}_tta_spread" for n in self.experts]
        return names

    @torch.inference_mode()
    def expert_features(self, batch: dict[InputKey, torch.Tensor]) -> np.ndarray:
        """(B, n_features): each expert's P(fake), averaged over TTA views, then (with TTA)
        each expert's spread between views, a cue of uncertainty the stacker may use.
        Always float32, whatever `precision` the forward passes ran in."""
        inputs = {key: to_unit_float(t, self.device) for key, t in batch.items()}
        if self.channels_last:
            inputs = {key: x.contiguous(memory_format=torch.channels_last) for key, x in inputs.items()}
        means, spreads = [], []
        for model in self.experts.values():
            views = tta_views(inputs[input_key(model)], self.tta)
            with precision_autocast(self.precision, self.device):
                p_fake = torch.stack([model.predict_proba(v).float() for v in views]).cpu()
            means.append(p_fake.mean(0))
            spreads.append(p_fake.max(0).values - p_fake.min(0).values)
        cols = means + (spreads if self.tta else [])
        return torch.stack(cols, dim=1).numpy()

    def combine(self, features: np.ndarray) -> np.ndarray:
        if self.stacker is not None:
            return self.stacker.predict_proba(features)[:, 1]
        return features[:, : len(self.experts)].mean(axis=1)

    def score_crops(self, batch: dict[InputKey, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        features = self.expert_features(batch)
        return self.combine(features), features

    def face_crop(self, rgb: np.ndarray) -> np.ndarray:
        """One decoded image -> its face crop, as training cropped it."""
        return crop_face(rgb, self.face)[0]

    def batch_of_crops(self, crops: list[np.ndarray]) -> dict[InputKey, torch.Tensor]:
        """Face crops -> {(region, size): uint8 tensor (B, 3, S, S)}, ready for `score_crops`."""
        inputs = [crop_to_inputs(crop, self.input_keys) for crop in crops]
        return {key: torch.stack([one[key] for one in inputs]) for key in self.input_keys}

    def batch_of_images(self, images: list[np.ndarray]) -> dict[InputKey, torch.Tensor]:
        """Decoded images (video frames, say) -> face-cropped input batches."""
        return self.batch_of_crops([self.face_crop(rgb) for rgb in images])


TTA_VIEWS = ("hflip", "scale")


def tta_views(x: torch.Tensor, tta: list[str]) -> list[torch.Tensor]:
    """The original batch plus one view per TTA entry: `hflip` mirrors it; `scale` zooms in
    on the centre 7/8 and resizes back (area filter, like the training crops), a mild change
    of the face's apparent size."""
    unknown = set(tta) - set(TTA_VIEWS)
    if unknown:
        raise ConfigError(f"train.tta: unknown test-time augmentation {sorted(unknown)}; known: {list(TTA_VIEWS)}")
    views = [x]
    if "hflip" in tta:
        views.append(x.flip(3))
    if "scale" in tta:
        size = x.shape[-1]
        margin = size // 16
        centre = x[..., margin:size - margin, margin:size - margin]
        views.append(torch.nn.functional.interpolate(centre, size=(size, size), mode="bilinear",
                                                     antialias=True, align_corners=False))
    return views


class ImageFiles(Dataset):
    """Decode + face-crop in DataLoader workers, so it overlaps with the forward passes.
    Items: (index, {(region, size): tensor} or {}, error message or "")."""

    def __init__(self, paths: list[Path], detector: EnsembleDetector):
        self.paths, self.face, self.keys = paths, detector.face, detector.input_keys

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            crop = crop_face(decode_image(self.paths[i]), self.face)[0]
        except ImageDecodeError as err:
            return i, {}, str(err)
        return i, crop_to_inputs(crop, self.keys), ""


def collate_images(items):
    """Keep the failures out of the batch but remember them (their rows still get written)."""
    ok = [(i, t) for i, t, e in items if not e]
    failed = [(i, e) for i, _, e in items if e]
    batch = {key: torch.stack([t[key] for _, t in ok]) for key in (ok[0][1] if ok else {})}
    return [i for i, _ in ok], batch, failed


def default_decode_workers(device: torch.device) -> int:
    """Decode/crop worker processes when none are asked for. On a GPU the CPU has nothing
    else to do: all cores but one, up to 8 (the H100 run, BENCHMARKS.md, had 16 cores and
    waited on decoding). On the CPU the forward passes need the cores too: at most 3."""
    cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1)) if device.type == "cuda" else min(4, cores) - 1


def default_torch_threads(device: torch.device, workers: int) -> int | None:
    """torch's CPU threads for the forward passes beside `workers` decode workers, or None
    to keep torch's default (one per core). With 4 or more cores the workers get cores of
    their own: on 16 cores, 16 threads beside 3 workers ran 86 img/s end to end and 12
    beside 4 ran 131-156 (BENCHMARKS.md). On 2 or 3 cores a core less for the forward
    passes costs more than it hides: decoding and the face stage are about a tenth of the
    work, and on 2 cores 1 thread beside the worker ran 41 img/s, 2 threads 51."""
    cores = os.cpu_count() or 1
    if device.type != "cpu" or workers < 1 or cores < 4:
        return None
    return max(1, cores - workers)


def decode_loader(detector: EnsembleDetector, paths: list[Path], batch_size=32, workers=0):
    """Batches (indices, {size: crops}, failed) of the decoded, face-cropped files, from
    `workers` processes (none for a single batch, where starting them costs more)."""
    from torch.utils.data import DataLoader

    return DataLoader(ImageFiles(paths, detector), batch_size=batch_size, collate_fn=collate_images,
                      num_workers=workers if len(paths) > batch_size else 0,
                      pin_memory=detector.device.type == "cuda")


def score_files(detector: EnsembleDetector, paths: list[Path], batch_size=32, workers=0, progress=False):
    """Yield (indices, p_fake, features, failed [(index, message)]) batch by batch, with
    decoding and face cropping in `workers` processes overlapping the forward passes."""
    from tqdm import tqdm

    loader = decode_loader(detector, paths, batch_size, workers)
    with tqdm(total=len(paths), desc="scoring", unit="img", disable=not progress) as bar:
        for indices, batch, failed in loader:
            p, features = detector.score_crops(batch) if indices else (np.zeros(0), np.zeros((0, 0)))
            yield indices, p, features, failed
            bar.update(len(indices) + len(failed))


def score_samples(detector: EnsembleDetector, paths: list[Path], batch_size=32, workers=0, progress=False):
    """All at once: (p_fake (n,), features (n, f)) with NaN rows for unreadable files, and
    {index: message} of those."""
    n_features = len(detector.feature_names())
    p_all, f_all = np.full(len(paths), np.nan), np.full((len(paths), n_features), np.nan)
    errors = {}
    for indices, p, features, failed in score_files(detector, paths, batch_size, workers, progress):
        p_all[indices], f_all[indices] = p, features
        errors.update(dict(failed))
    return p_all, f_all, errors

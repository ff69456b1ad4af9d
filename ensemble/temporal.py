"""Train the temporal head (`ensemble.temporal_model`) on sequences of face crops.

    python -m ensemble.temporal VIDEO_ROOT --weights weights [--frames 16] [temporal.hidden=32 ...]
    python -m ensemble.temporal DATA_ROOT --weights weights [--frames 16] [temporal.max_distance=4 ...]

Like the stacker it is a second stage: the frame experts are trained first and stay frozen.
The frame expert is `temporal.expert`, by default the one with the largest coefficient of a
logistic stacker, else the stacker's (or the manifest's) first. Its embeddings of every
crop are computed once, without gradients; then the GRU trains for `temporal.steps` steps
on class-balanced batches, in seconds, seeded (`seed=N`): the same on every CPU run.

Where the sequences come from:

* a labelled video folder (`labels.csv`: video_name,target): `--frames` frames per video,
  decoded resolution capped and one face tracked through them, cropped with the face
  settings the frame expert was trained with (`data_prep.video.sample_face_crops`, as
  `infer.py --video-rule temporal` and `ensemble.evaluate --videos` crop them). The videos
  are split per class, seeded, into training and held-out (`temporal.val_fraction`), so a
  video's frames are on one side.
* an image data root (competition layout, or real/ + fake/): images carry no time, so the
  only honest sequences are frames of one clip. Within one split (trainset trains, valset is
  held out), one label and one method (when `<split>_methods.csv` names it), images whose
  64-bit perceptual hashes (`data_prep.audit`) lie within `temporal.max_distance` bits are
  chained into groups; exact pixel copies are dropped, each group is ordered by file name and
  cut into runs of 2 to `--frames` images. On FaceForensics++ such pairs are frames of one
  source video (README, the audit), but the file names there are hashes: the order within a
  run is arbitrary, so these runs teach how frames of one clip differ, not which way it moves.
  A real and its fakes are near duplicates too; the label rule keeps them apart. The held-out
  AUC is only as clean as the data set's split (the audit counts near duplicates across it).

It writes `<weights>/temporal.safetensors` and its manifest entry, with the held-out AUC of
the head and of the frame-only baseline (the mean of the frame expert's scores).

Then the head joins the ensemble for videos: a **video stacker** (`ensemble.stacking`, the
config's `ensemble.method`, monotone) combines two scores per sequence, the trained
ensemble's mean P(fake) over the frames and the head's P(fake) (`VIDEO_STACK_COLUMNS`). It
is fitted on the held-out sequences only, where neither the head nor the frame experts'
training saw the video, and needs `MIN_STACK_SEQUENCES` of each class there; its
cross-validated AUC is recorded. `temporal_stacker.json` beside the head; the manifest entry
records which experts, stacker and TTA views made the frame scores, so refitting the frame
ensemble makes it stale (`infer.py --video-rule temporal_stack`, `ensemble.evaluate --videos`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from common.cli import CommandLine, entry_point
from common.errors import DataLayoutError, UsageError
from common.files import write_files_atomically
from common.metrics import roc_auc
from common.runtime import select_device
from configs import Config, FaceConfig, TemporalConfig, config_from
from data_prep.audit import fingerprint, near_duplicate_pairs
from data_prep.dataset import Sample, load_splits, read_methods_file
from data_prep.faces import FaceCropCache
from data_prep.video import LABELS_FILE, VideoDecodeError, read_video_labels, sample_face_crops
from ensemble.predictor import EnsembleDetector
from ensemble.stacking import StackingEnsemble
from ensemble.temporal_model import (
    MANIFEST_NAME,
    MANIFEST_SECTION,
    TEMPORAL_FILE,
    VIDEO_STACK_COLUMNS,
    VIDEO_STACKER_FILE,
    TemporalHead,
    frame_ensemble_signature,
    padded,
    run_expert,
    video_stack_features,
)
from experts.base import Expert
from experts.weights import (
    MANIFEST,
    WeightsError,
    face_config_of,
    load_expert,
    read_manifest,
    update_manifest,
    verified_file,
)

log = logging.getLogger("ensemble.temporal")
MIN_SEQUENCES = 10   # per class; fewer still trains, with a warning
MIN_STACK_SEQUENCES = 4  # held-out sequences per class the video stacker needs; fewer: no stacker


# ============================================================================ sequences

@dataclass
class Clip:
    """One training or held-out sequence: its frame expert outputs and its label."""
    name: str
    target: int
    embeddings: torch.Tensor         # (frames, D)
    frame_scores: np.ndarray         # the frame expert's P(fake) per frame, for the frame-only baseline
    crops: list | None = None        # held-out clips: the face crops, until the frame ensemble scored them
    ensemble_scores: np.ndarray | None = None  # held-out clips: the whole ensemble's P(fake) per frame


def video_face_crops(path: Path, face: FaceConfig, n_frames: int) -> list[np.ndarray]:
    """The tracked face crops of `n_frames` evenly sampled frames of a video, with the default
    resolution cap and detection size: what the head is given at inference."""
    return sample_face_crops(path, face, n_frames).crops


def video_clips(root: Path, expert: Expert, face: FaceConfig, device, n_frames: int,
                cfg: Config) -> dict[str, list[Clip]]:
    """{'train': [...], 'held_out': [...]} of a labelled video folder, split by video: per
    class, a seeded `val_fraction` of the videos is held out when each class has two or more."""
    labels = read_video_labels(root)
    rng = np.random.default_rng(cfg.seed)
    held_out: set[str] = set()
    by_class = [[name for name, target in labels if target == t] for t in (0, 1)]
    if cfg.temporal.val_fraction > 0 and all(len(names) >= 2 for names in by_class):
        for names in by_class:
            held_out.update(rng.permutation(names)[:max(1, round(len(names) * cfg.temporal.val_fraction))].tolist())
    clips: dict[str, list[Clip]] = {"train": [], "held_out": []}
    for name, target in labels:
        try:
            crops = video_face_crops(root / name, face, n_frames)
        except VideoDecodeError as err:
            log.warning("skipped: %s", err)
            continue
        embeddings, scores = run_expert(expert, crops, device)
        side = "held_out" if name in held_out else "train"
        clips[side].append(Clip(name, target, embeddings, scores, crops if side == "held_out" else None))
    return clips


def methods_by_path(root: Path) -> dict[Path, str]:
    """image path -> manipulation method, from whichever `<split>_methods.csv` exist."""
    methods = {}
    for split in ("trainset", "valset"):
        if (root / f"{split}_methods.csv").is_file():
            methods.update({root / split / name: m for name, m in read_methods_file(root, split).items()})
    return methods


def near_duplicate_runs(samples: list[Sample], methods: dict[Path, str], max_distance: int,
                        max_length: int) -> list[list[Sample]]:
    """Runs of 2 to `max_length` images of one label (and method) chained by perceptual-hash
    distance <= `max_distance`, exact copies dropped, each run in file-name order."""
    kept, seen_pixels = [], set()
    for sample in samples:
        prints = fingerprint("", sample.path, sample.target)
        if prints.error:
            log.warning("skipped: %s", prints.error)
        elif prints.pixel_sha256 not in seen_pixels:
            seen_pixels.add(prints.pixel_sha256)
            kept.append((sample, prints.phash))
    hashes = np.array([h for _, h in kept], dtype=np.uint64)
    links = [(i, j) for i, j, _distance in near_duplicate_pairs(hashes, max_distance)
             if kept[i][0].target == kept[j][0].target
             and methods.get(kept[i][0].path) == methods.get(kept[j][0].path)]
    i, j = np.array(links, dtype=int).reshape(-1, 2).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(kept), len(kept)))
    _, group_of = connected_components(graph, directed=False)
    groups: dict[int, list[Sample]] = {}
    for (sample, _), group in zip(kept, group_of.tolist()):
        groups.setdefault(group, []).append(sample)
    runs = []
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda s: s.name)
        n_runs = -(-len(group) // max_length)    # ceil: runs as even as possible, none of one image
        runs += [list(run) for run in np.array_split(np.array(group, dtype=object), n_runs)]
    return runs


def image_clips(root: Path, expert: Expert, face: FaceConfig, device, n_frames: int,
                cfg: Config) -> dict[str, list[Clip]]:
    """{'train': runs of trainset, 'held_out': runs of valset} of an image data root."""
    splits = load_splits(root, seed=cfg.seed, methods=cfg.data.methods)
    methods = methods_by_path(root)
    crops = FaceCropCache(face, cfg.data.cache_dir)
    clips: dict[str, list[Clip]] = {}
    for split, side in (("trainset", "train"), ("valset", "held_out")):
        clips[side] = []
        for run in near_duplicate_runs(splits[split], methods, cfg.temporal.max_distance, n_frames):
            run_crops = [crops.load(s.path) for s in run]
            embeddings, scores = run_expert(expert, run_crops, device)
            clips[side].append(Clip(f"{split}/{run[0].name}+{len(run) - 1}", run[0].target, embeddings, scores,
                                    run_crops if side == "held_out" else None))
    return clips


# ============================================================================ training

def train_head(clips: list[Clip], cfg: TemporalConfig, seed: int) -> TemporalHead:
    """`cfg.steps` AdamW steps on class-balanced random batches of the clips; seeded, so on
    the CPU the same clips give the same head."""
    torch.manual_seed(seed)
    frames = torch.cat([c.embeddings for c in clips])
    head = TemporalHead(frames.shape[1], cfg.hidden)
    std = frames.std(dim=0)
    head.embed_mean.copy_(frames.mean(dim=0))
    head.embed_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # a constant unit stays 0
    targets = torch.tensor([float(c.target) for c in clips])
    draw_weights = 1.0 / torch.bincount(targets.long(), minlength=2).float()[targets.long()]  # balanced
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head.train()
    for _step in range(cfg.steps):
        chosen = torch.multinomial(draw_weights, cfg.batch_size, replacement=True, generator=generator)
        batch, lengths = padded([clips[i].embeddings for i in chosen.tolist()])
        loss = nn.functional.binary_cross_entropy_with_logits(head(batch, lengths), targets[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.inference_mode()
def predict_clips(head: TemporalHead, clips: list[Clip]) -> np.ndarray:
    batch, lengths = padded([c.embeddings for c in clips])
    return torch.sigmoid(head(batch, lengths)).numpy()


def held_out_auc(clips: list[Clip], head: TemporalHead) -> dict[str, float] | None:
    """AUC of the head and of the frame-only baseline (mean of the frame expert's scores) on
    the held-out clips; None when they do not hold both classes."""
    y = [c.target for c in clips]
    if len(set(y)) < 2:
        return None
    return {"temporal": round(roc_auc(y, predict_clips(head, clips)), 4),
            "frame_mean": round(roc_auc(y, [float(c.frame_scores.mean()) for c in clips]), 4)}


def frame_ensemble(weights_dir: Path, face: FaceConfig, device) -> EnsembleDetector | None:
    """The trained frame ensemble of `weights_dir` (the stacker's experts and TTA views, else
    all experts averaged), or None, with a log line, when it crops faces unlike the frame
    expert: the stacked score reads both off the same crops."""
    detector = EnsembleDetector.from_weights(weights_dir, device=device)
    if detector.face != face:
        log.warning("no video stacker: the ensemble's experts crop faces unlike the frame expert")
        return None
    return detector


def score_held_out_frames(clips: list[Clip], detector: EnsembleDetector) -> None:
    """Each held-out clip's `ensemble_scores`, from its crops (then dropped)."""
    for clip in clips:
        clip.ensemble_scores, _ = detector.score_crops(detector.batch_of_crops(clip.crops))
        clip.crops = None


def fit_video_stacker(clips: list[Clip], head: TemporalHead, cfg: Config) -> StackingEnsemble | None:
    """The video stacker (module doc) fitted on the held-out clips, or None, with a log line,
    when they lack the frame ensemble's scores or hold fewer than MIN_STACK_SEQUENCES of a class."""
    y = np.array([c.target for c in clips], dtype=int)
    counts = np.bincount(y, minlength=2)
    if not clips or any(c.ensemble_scores is None for c in clips) or counts.min() < MIN_STACK_SEQUENCES:
        log.warning("no video stacker: it needs the frame ensemble's scores of at least %d held-out "
                    "sequences per class (have %d real, %d fake)", MIN_STACK_SEQUENCES, *counts)
        return None
    X = video_stack_features([c.ensemble_scores for c in clips], predict_clips(head, clips))
    stacker = StackingEnsemble(method=cfg.ensemble.method, cv=cfg.ensemble.cv, random_state=cfg.seed,
                               feature_names=list(VIDEO_STACK_COLUMNS), monotone=[1] * len(VIDEO_STACK_COLUMNS),
                               calibrate=cfg.ensemble.calibrate)
    return stacker.fit(X, y)


def chosen_expert(weights_dir: Path, manifest: dict, name: str) -> str:
    """`name`, else the expert with the largest stacker coefficient (logistic stacker),
    else the stacker's first expert, else the manifest's first."""
    experts = list(manifest.get("experts", {}))
    if name:
        if name not in experts:
            raise WeightsError(f"{weights_dir / MANIFEST}: temporal.expert={name!r} is not trained "
                               f"there; available: {experts}")
        return name
    if not experts:
        raise WeightsError(f"{weights_dir / MANIFEST}: no trained experts; run experts.train first")
    stacker = manifest.get("ensemble", {}).get("stacker")
    if not stacker:
        return experts[0]
    state = json.loads(verified_file(weights_dir, stacker, "ensemble").read_text())
    if state["method_"] == "logreg":
        coefficients = state["combiner"]["coef"][: len(stacker["experts"])]
        return stacker["experts"][int(np.argmax(coefficients))]
    return stacker["experts"][0]


def train_temporal(root, weights_dir, cfg: Config, n_frames: int = 16) -> dict:
    """Train the head on the sequences of `root` (see the module docstring), save it beside
    the experts in `weights_dir`, and return its manifest entry."""
    if n_frames < 2:
        raise UsageError(f"--frames must be at least 2 (a sequence needs a change), got {n_frames}")
    root, weights_dir = Path(root), Path(weights_dir)
    if not root.is_dir():
        raise DataLayoutError(f"{root}: not a directory")
    manifest = read_manifest(weights_dir)
    name = chosen_expert(weights_dir, manifest, cfg.temporal.expert)
    device = select_device(cfg.device)
    expert, expert_entry = load_expert(weights_dir, name, device)
    is_video_root = (root / LABELS_FILE).is_file()
    clips = (video_clips if is_video_root else image_clips)(root, expert, face_config_of(expert_entry),
                                                            device, n_frames, cfg)
    counts = np.bincount([c.target for c in clips["train"]], minlength=2)
    if counts.min() < 1:
        raise DataLayoutError(f"{root}: the temporal head needs training sequences of both classes, found "
                              f"{counts[0]} real and {counts[1]} fake" + ("" if is_video_root else
                              " (runs of near-duplicate images; see python -m ensemble.temporal --help)"))
    if counts.min() < MIN_SEQUENCES:
        log.warning("only %d real and %d fake training sequences: expect a noisy head", *counts)
    head = train_head(clips["train"], cfg.temporal, cfg.seed)
    detector = frame_ensemble(weights_dir, face_config_of(expert_entry), device)
    if detector is not None:
        score_held_out_frames(clips["held_out"], detector)
    video_stacker = fit_video_stacker(clips["held_out"], head, cfg)

    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    path = weights_dir / TEMPORAL_FILE
    data = safetensors_bytes(state, metadata={"temporal_head_over": name})  # one key: a fixed header
    files = {path: data}
    entry = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "expert": name,
             "expert_sha256": manifest["experts"][name]["sha256"], "embed_dim": int(head.embed_mean.numel()),
             "config": dataclasses.asdict(cfg.temporal), "frames": n_frames, "seed": cfg.seed,
             "trained_on": f"{root} ({'videos' if is_video_root else 'near-duplicate image runs'})",
             "sequences": {side: len(c) for side, c in clips.items()},
             "held_out_auc": held_out_auc(clips["held_out"], head)}
    if video_stacker is not None:
        stacker_data = json.dumps(video_stacker.to_state()).encode()
        files[weights_dir / VIDEO_STACKER_FILE] = stacker_data
        entry["stacker"] = {"file": VIDEO_STACKER_FILE, "sha256": hashlib.sha256(stacker_data).hexdigest(),
                            "columns": list(VIDEO_STACK_COLUMNS), "method": video_stacker.method_,
                            "cv_auc": {k: round(v, 4) for k, v in video_stacker.cv_auc_.items()},
                            "fitted_on": f"{len(clips['held_out'])} held-out sequences",
                            "frame_ensemble": frame_ensemble_signature(detector, manifest)}
    write_files_atomically(files)
    update_manifest(weights_dir, MANIFEST_SECTION, MANIFEST_NAME, entry)
    return entry


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m ensemble.temporal", __doc__, positional="DATA_OR_VIDEO_ROOT")
    parser.add_argument("--weights", help="the trained experts' folder, where the head is saved "
                                          "(default: the config's out)")
    parser.add_argument("--frames", type=int, default=16,
                        help="frames sampled per video; the longest run of near-duplicate images")
    args = parser.parse_args(argv)
    cfg = config_from(args, data_root=args.positional)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    entry = train_temporal(args.positional, args.weights or cfg.out, cfg, args.frames)
    print(f"temporal head over {entry['expert']!r} embeddings: {entry['sequences']['train']} training, "
          f"{entry['sequences']['held_out']} held-out sequences; held-out AUC "
          f"{entry['held_out_auc'] or 'not measured (one class)'} -> {Path(args.weights or cfg.out) / entry['file']}")
    if "stacker" in entry:
        print(f"video stacker ({entry['stacker']['method']}) over {entry['stacker']['columns']}: cross-validated "
              f"AUC {entry['stacker']['cv_auc']} on {entry['stacker']['fitted_on']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Video-level evaluation for `python -m ensemble.evaluate ... --videos DIR`.

Each video of DIR/labels.csv (`video_name,target`) is sampled (`frames` frames, evenly,
decoded resolution capped to `max_side`), one face is tracked through the frames
(data_prep.tracking) and cropped, and every crop is scored by every expert, the ensemble
and the baselines. Reported:

* frame level: each frame labelled with its video's label, every model;
* video level: for every frame rule of `data_prep.video.aggregate_frame_scores` (mean,
  median, confidence, max, top-k), every model's frame scores combined per video;
* one more video-level table per entry of `extra_video_scores`: a scorer that sees the
  whole tracked sequence of a video rather than its frames one by one, and the ensemble's
  scores of its frames (ensemble.evaluate puts the weights folder's temporal head here as
  "temporal", and its video stacker as "temporal_stack");
* a row per video: label, frames sampled, frames where the tracked face was detected, and
  the ensemble's score under every rule.

Thresholds are the per-model image thresholds chosen on the validation split; an extra
scorer has no image threshold and is cut at 0.5. Which models there are and how a frame's
expert features become their scores is the caller's (`ensemble.evaluate.model_scores`),
passed in as `score_frames`: this module is a library of that command, not a second one.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from common.errors import UserError
from common.metrics import evaluate_scores
from data_prep.faces import DETECT_SIDE
from data_prep.tracking import TrackedCrops
from data_prep.video import (
    AGGREGATION_RULES,
    MAX_SIDE,
    VideoDecodeError,
    aggregate_frame_scores,
    read_video_labels,
    sample_face_crops,
)

log = logging.getLogger("ensemble.evaluate")

VIDEO_RULES = AGGREGATION_RULES
EXTRA_SCORE_THRESHOLD = 0.5
# One video's tracked face crops (in frame order) and the ensemble's P(fake) of each -> P(fake) of the video.
VideoScorer = Callable[[TrackedCrops, np.ndarray], float]


class VideoEvaluationError(UserError):
    """The video folder cannot be evaluated; the message says why in one line."""


def evaluate_videos(detector, video_dir, score_frames, thresholds: dict[str, float], n_frames: int,
                    summary_model: str, max_side: int | None = MAX_SIDE, detect_side: int = DETECT_SIDE,
                    extra_video_scores: dict[str, VideoScorer] | None = None) -> dict:
    """The "video" part of metrics.json (see the module doc).

    `score_frames(features)`: model name -> P(fake) of each frame, from the detector's expert
    features of a video's crops; `thresholds`: model name -> decision threshold;
    `summary_model`: the model whose scores the per-video rows show (the ensemble)."""
    extra_video_scores = extra_video_scores or {}
    clash = set(extra_video_scores) & set(VIDEO_RULES)
    if clash:
        raise ValueError(f"extra_video_scores: {sorted(clash)} would replace a frame rule of the same name")
    video_dir = Path(video_dir)
    rows = read_video_labels(video_dir)  # VideoLabelError: missing or malformed labels.csv
    if not rows:
        raise VideoEvaluationError(f"{video_dir / 'labels.csv'}: lists no videos")

    per_video, unreadable = [], []
    for name, target in rows:
        try:
            tracked = sample_face_crops(video_dir / name, detector.face, n_frames, max_side, detect_side)
        except VideoDecodeError as err:
            log.warning("skipped %s", err)
            unreadable.append({"file": name, "error": str(err)})
            continue
        features = detector.expert_features(detector.batch_of_crops(tracked.crops))
        frame_scores = {model: np.clip(p, 0.0, 1.0) for model, p in score_frames(features).items()}
        extra = {scorer_name: float(score(tracked, frame_scores[summary_model]))
                 for scorer_name, score in extra_video_scores.items()}
        per_video.append({"video": name, "target": target, "n_frames": len(tracked.crops),
                          "n_face_frames": tracked.n_detected,
                          **{f"p_{rule}": aggregate_frame_scores(frame_scores[summary_model], rule)
                             for rule in VIDEO_RULES},
                          **{f"p_{scorer_name}": p for scorer_name, p in extra.items()},
                          "_frame_scores": frame_scores})
    if unreadable:
        log.warning("%d of %d videos could not be read and are excluded from the metrics",
                    len(unreadable), len(rows))
    if not per_video:
        raise VideoEvaluationError(f"{video_dir}: none of the {len(rows)} videos could be read")

    models = list(per_video[0]["_frame_scores"])
    y_frames = np.concatenate([np.full(v["n_frames"], v["target"]) for v in per_video]).astype(int)
    frame_level = metrics_table(y_frames, {m: np.concatenate([v["_frame_scores"][m] for v in per_video])
                                           for m in models}, thresholds)
    y_videos = np.array([v["target"] for v in per_video], dtype=int)
    video_level = {}
    for rule in VIDEO_RULES:
        aggregated = {m: np.array([aggregate_frame_scores(v["_frame_scores"][m], rule) for v in per_video])
                      for m in models}
        video_level[rule] = metrics_table(y_videos, aggregated, thresholds)
    for scorer_name in extra_video_scores:
        scores = np.array([v[f"p_{scorer_name}"] for v in per_video])
        video_level[scorer_name] = metrics_table(y_videos, {scorer_name: scores},
                                                 {scorer_name: EXTRA_SCORE_THRESHOLD})
    for v in per_video:
        del v["_frame_scores"]
    return {"dir": str(video_dir), "n_videos": len(per_video), "n_fake_videos": int(y_videos.sum()),
            "n_frames": int(len(y_frames)), "frames_per_video": n_frames, "unreadable": unreadable,
            "max_side": max_side or None, "detect_side": detect_side,
            "threshold_note": "per-model image thresholds from the validation split"
                              + (f"; {', '.join(extra_video_scores)}: {EXTRA_SCORE_THRESHOLD}"
                                 if extra_video_scores else ""),
            "frame_level": frame_level, "video_level": video_level, "videos": per_video}


def metrics_table(y: np.ndarray, scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict:
    """model name -> every metric of its scores (as the image-level tables of ensemble.evaluate)."""
    return {name: evaluate_scores(y, p, thresholds[name]) for name, p in scores.items()}


def per_video_table(video: dict) -> str:
    """The per-video rows of `evaluate_videos` as a markdown table (the ensemble's scores)."""
    rules = [key[2:] for key in video["videos"][0] if key.startswith("p_")] if video["videos"] else []
    lines = ["| video | label | frames with a face | " + " | ".join(rules) + " |",
             "|---|---|---:|" + "---:|" * len(rules)]
    for v in video["videos"]:
        lines.append(f"| {v['video']} | {'fake' if v['target'] else 'real'} | {v['n_face_frames']} / {v['n_frames']} | "
                     + " | ".join(f"{v['p_' + rule]:.3f}" for rule in rules) + " |")
    return "\n".join(lines) + "\n"

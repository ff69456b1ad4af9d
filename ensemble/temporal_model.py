"""The temporal head and its scoring API: P(fake) of a video from the sequence of its face crops.

A small GRU over one trained frame expert's per-frame embeddings. A face manipulated frame
by frame also shows itself over time: its blend, colour and texture flicker from one frame
to the next, where a real face changes smoothly. `TemporalHead` reads, for each frame t, the
frozen frame expert's embedding e_t (standardised with the training frames' mean and std)
and its change e_t - e_{t-1}, runs a GRU over the sequence and gives P(fake) of the whole
sequence. `python -m ensemble.temporal` trains it (ensemble/temporal.py: where the sequences
come from); this module only loads and scores, so that any stage may import it.

    model = load_temporal("weights")               # None when no head was trained there
    model = require_temporal("weights")            # the same, but no head is an error naming the fix
    p = temporal_score(model, face_crops)           # one video's face crops, in frame order
    p = model.score_stacked(face_crops, ensemble_frame_scores)  # the video stacker: head + frame ensemble

Crop the frames with `model.face` (the frame expert's settings) and, for a video, track the
face through them (`data_prep.video.sample_face_crops`), as training did. `precision` (see
ensemble.predictor) applies to the frame expert's forward passes; the GRU runs in float32.

The head is `<weights>/temporal.safetensors`, listed in the manifest as `ensemble.temporal`
with its sha256, its config, the frame expert and that expert's sha256: a retrained frame
expert makes the head stale, and loading then refuses it with one line. The video stacker
(`temporal_stacker.json`, see ensemble/temporal.py) combines the head's score with the frame
ensemble's mean score. An ensemble refitted or retrained since it was fitted makes it stale:
the head still loads, and `check_frame_ensemble` refuses the stacker in one line; a head
trained without one has `video_stacker` None and `stacker_problem` says why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from common.inputs import to_unit_float
from common.runtime import select_device
from configs import FaceConfig
from data_prep.regions import region_tensor
from ensemble.predictor import DEFAULT_PRECISION, precision_autocast, resolve_precision
from experts.base import Expert
from experts.weights import MANIFEST, WeightsError, face_config_of, load_expert, read_manifest, verified_file

TEMPORAL_FILE = "temporal.safetensors"
MANIFEST_SECTION, MANIFEST_NAME = "ensemble", "temporal"   # manifest["ensemble"]["temporal"]
EMBED_BATCH = 64
VIDEO_STACKER_FILE = "temporal_stacker.json"
# The video stacker's columns: the frame ensemble's mean P(fake) over the frames, the head's P(fake).
VIDEO_STACK_COLUMNS = ("frames_mean", "temporal")


def video_stack_features(ensemble_frame_scores, temporal_scores) -> np.ndarray:
    """(n videos, 2) video-stacker inputs (VIDEO_STACK_COLUMNS) from each video's per-frame
    ensemble scores and the head's scores."""
    frames_mean = [float(np.mean(scores)) for scores in ensemble_frame_scores]
    return np.column_stack([frames_mean, np.asarray(temporal_scores, dtype=float)])


def frame_ensemble_signature(detector, manifest: dict) -> dict:
    """What makes the frame scores a video stacker was fitted on: the experts (by sha256),
    the frame stacker (its sha256, None for the plain mean) and the TTA views."""
    stacker = manifest.get("ensemble", {}).get("stacker") if detector.stacker is not None else None
    return {"experts": {name: manifest["experts"][name]["sha256"] for name in detector.experts},
            "stacker_sha256": stacker["sha256"] if stacker else None, "tta": list(detector.tta)}


class TemporalHead(nn.Module):
    """(B, T, D) frame embeddings + lengths (B,) -> logit of P(fake) per sequence (B,)."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        # The training frames' statistics, saved with the weights: embeddings of any expert
        # (16 values for MesoNet, hundreds for a timm backbone) reach the GRU on one scale.
        self.register_buffer("embed_mean", torch.zeros(embed_dim))
        self.register_buffer("embed_std", torch.ones(embed_dim))
        self.gru = nn.GRU(2 * embed_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = (embeddings - self.embed_mean) / self.embed_std
        change = torch.diff(x, dim=1, prepend=x[:, :1])   # 0 at the first frame
        packed = nn.utils.rnn.pack_padded_sequence(torch.cat([x, change], dim=2), lengths.cpu(),
                                                   batch_first=True, enforce_sorted=False)
        _, last_state = self.gru(packed)                    # the state after each sequence's last frame
        return self.out(last_state[-1]).squeeze(1)


def padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences (T_i, D) -> zero-padded (B, max T, D) and their lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sequences])
    return nn.utils.rnn.pad_sequence(sequences, batch_first=True), lengths


@torch.no_grad()
def run_expert(expert: Expert, crops: list[np.ndarray], device, precision: str = "fp32",
               with_scores: bool = True) -> tuple[torch.Tensor, np.ndarray | None]:
    """Face crops -> (embeddings (T, D) float32 on the CPU, the expert's P(fake) per crop (T,),
    or None without `with_scores`: scoring a video needs only the embeddings, and the scores
    are a second forward pass), the passes in `precision` (fp32 or bf16; training uses fp32)."""
    device = torch.device(device)
    embeddings, scores = [], []
    for start in range(0, len(crops), EMBED_BATCH):
        x = to_unit_float(torch.stack([region_tensor(c, expert.region, expert.image_size)
                                       for c in crops[start:start + EMBED_BATCH]]), device)
        with precision_autocast(precision, device):
            embeddings.append(expert.embed(x).float().cpu())
            if with_scores:
                scores.append(expert.predict_proba(x).float().cpu())
    return torch.cat(embeddings), (torch.cat(scores).numpy() if with_scores else None)


@dataclass
class TemporalModel:
    """A trained temporal head with the frozen frame expert whose embeddings it reads."""
    head: TemporalHead
    expert: Expert
    expert_name: str
    face: FaceConfig                 # the frame expert's face-crop settings: crop the frames with these
    device: torch.device
    precision: str = "fp32"          # of the frame expert's forward passes: fp32 or bf16
    video_stacker: object | None = None  # ensemble.stacking.StackingEnsemble over VIDEO_STACK_COLUMNS
    frame_ensemble: dict | None = None   # frame_ensemble_signature of the ensemble it was fitted with
    stacker_problem: str = ""        # why there is no usable video stacker, when there is none

    def check_frame_ensemble(self, detector, manifest: dict) -> None:
        """WeightsError (one line) unless the video stacker exists and `detector` gives the
        frame scores it was fitted on (same experts, frame stacker and TTA views), from crops
        made as the head's (the stacked score reads both off the same crops)."""
        if self.video_stacker is None:
            raise WeightsError(self.stacker_problem or "the temporal head has no video stacker")
        if detector.face != self.face:
            raise WeightsError("the temporal head's frame expert crops faces unlike the ensemble's experts")
        if frame_ensemble_signature(detector, manifest) != self.frame_ensemble:
            raise WeightsError("the video stacker was fitted on the frame scores of another ensemble (experts "
                               "retrained, stacker refitted, or other --experts/--tta); retrain it with "
                               "`python -m ensemble.temporal ROOT --weights WEIGHTS`")

    @torch.inference_mode()
    def score(self, crops: list[np.ndarray]) -> float:
        if not crops:
            raise ValueError("temporal_score: no face crops")
        embeddings, _ = run_expert(self.expert, list(crops), self.device, self.precision, with_scores=False)
        batch, lengths = padded([embeddings.to(self.device)])
        return float(torch.sigmoid(self.head(batch, lengths))[0])

    def score_stacked(self, crops: list[np.ndarray], ensemble_frame_scores) -> float:
        """P(fake) of one video by the video stacker: the head's score of `crops` with the
        frame ensemble's scores of the same crops (check_frame_ensemble says which ensemble)."""
        if self.video_stacker is None:
            raise WeightsError(self.stacker_problem or "the temporal head has no video stacker")
        features = video_stack_features([ensemble_frame_scores], [self.score(crops)])
        return float(self.video_stacker.predict_proba(features)[0, 1])


def temporal_score(temporal_or_weights, crops: list[np.ndarray]) -> float:
    """P(fake) of one video from its face crops (H x W x 3 uint8, in frame order), by a
    TemporalModel or the head in a weights folder (loaded on each call: to score many videos,
    `load_temporal` once)."""
    model = temporal_or_weights
    if not isinstance(model, TemporalModel):
        model = require_temporal(temporal_or_weights)
    return model.score(crops)


def require_temporal(weights_dir, device="cpu", precision: str = DEFAULT_PRECISION) -> TemporalModel:
    """`load_temporal`, with a weights folder that has no head as an error saying how to train one."""
    model = load_temporal(weights_dir, device, precision)
    if model is None:
        raise WeightsError(f"{Path(weights_dir) / TEMPORAL_FILE}: no temporal head here; train one with "
                           f"`python -m ensemble.temporal VIDEO_OR_DATA_ROOT --weights {weights_dir}`")
    return model


def load_temporal(weights_dir, device="cpu", precision: str = DEFAULT_PRECISION) -> TemporalModel | None:
    """The temporal head of a weights folder with its frame expert, loaded strictly from
    safetensors after checking the sha256 of both files; None when no head was trained there.
    `precision`: auto, fp32 or bf16 for the frame expert (ensemble.predictor.resolve_precision)."""
    weights_dir = Path(weights_dir)
    manifest = read_manifest(weights_dir)
    entry = manifest.get(MANIFEST_SECTION, {}).get(MANIFEST_NAME)
    if entry is None:
        if (weights_dir / TEMPORAL_FILE).exists():
            raise WeightsError(f"{weights_dir / TEMPORAL_FILE}: not listed in {MANIFEST}; "
                               f"retrain it with `python -m ensemble.temporal`")
        return None
    path = verified_file(weights_dir, entry, "temporal head")
    name = entry["expert"]
    expert_entry = manifest.get("experts", {}).get(name)
    if expert_entry is None or expert_entry["sha256"] != entry["expert_sha256"]:
        raise WeightsError(f"{path}: trained on the embeddings of expert {name!r} as it was, which "
                           f"has been {'removed' if expert_entry is None else 'retrained'} since; "
                           f"retrain it with `python -m ensemble.temporal ROOT --weights {weights_dir}`")
    dev = select_device(device)
    expert, _ = load_expert(weights_dir, name, dev)
    head = TemporalHead(entry["embed_dim"], entry["config"]["hidden"])
    try:
        head.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except Exception as err:  # wrong keys or shapes, unreadable file
        raise WeightsError(f"{path}: cannot load the temporal head: {str(err).splitlines()[0]}") from None
    model = TemporalModel(head.to(dev).eval(), expert, name, face_config_of(expert_entry), dev,
                          resolve_precision(precision, dev))
    stacker_entry = entry.get("stacker")
    if stacker_entry is None:
        model.stacker_problem = (f"{path}: trained without a video stacker (too few held-out sequences, or "
                                 f"no frame ensemble to score them); see `python -m ensemble.temporal --help`")
        return model
    from ensemble.stacking import StackingEnsemble
    stacker_path = verified_file(weights_dir, stacker_entry, "video stacker")
    model.video_stacker = StackingEnsemble.from_state(json.loads(stacker_path.read_text()))
    model.frame_ensemble = stacker_entry["frame_ensemble"]
    return model

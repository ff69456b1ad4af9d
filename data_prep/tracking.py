"""Face tracking across the sampled frames of one video: score the same person throughout.

Cropping the largest face of each frame independently can hop from one person to another
when a second face comes closer to the camera (or the detector finds a face-like patch in
the background), and then the frame scores of a video describe different faces. Instead:

* the track starts at the largest face of the first frame that has one;
* in each later frame, the face that continues the track is the detection nearest to the
  track's last box, by centre distance measured in that box's side, provided it is within
  MAX_CENTRE_SHIFT sides and its size within a factor MAX_SIZE_RATIO of the box; the box
  then moves to it. A larger face elsewhere does not take the track over.
* a frame where no detection continues the track keeps the track's last box (frames before
  the track starts take its first box): a missed detection is far more often the detector
  failing (blur, a turned head, the LBP cascade's frontal-only view) than the person
  leaving, and the face is then still about where it was, so the frame stays in the vote
  with a crop of the same person instead of a crop of something else. The frames where
  the face was really detected are counted (`TrackedCrops.n_detected`), so a clip scored
  mostly from held boxes is visible in the per-video table.
* a video where no frame has a face is cropped by the face config's fallback rule, as an
  image without a face is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from configs import FaceConfig
from data_prep.faces import DETECT_SIDE, crop_at_face, detect_faces

Box = tuple[int, int, int, int]  # (x, y, w, h) in frame pixels

# Sampled frames are far apart (16 frames of a 10 s clip: 0.6 s), so a moving head may shift
# by a large part of its width between them; one side still keeps the track off a second
# person, whose face is rarely less than about 1.5 face widths away, centre to centre.
MAX_CENTRE_SHIFT = 1.0
# The same face changes size slowly (walking towards the camera); twice or half the box
# between two samples is another face, or a false detection on a part of the face.
MAX_SIZE_RATIO = 2.0


def _side(box: Box) -> int:
    return max(box[2], box[3])


def _centre(box: Box) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def continuation(track: Box, candidates: list[Box]) -> Box | None:
    """The candidate that continues the track (see the module doc), or None."""
    side = _side(track)
    cx, cy = _centre(track)
    best, best_shift = None, MAX_CENTRE_SHIFT
    for box in candidates:
        ratio = _side(box) / side
        if not 1 / MAX_SIZE_RATIO <= ratio <= MAX_SIZE_RATIO:
            continue
        bx, by = _centre(box)
        shift = float(np.hypot(bx - cx, by - cy)) / side
        if shift <= best_shift:
            best, best_shift = box, shift
    return best


def follow_face(detections: list[list[Box]]) -> list[Box | None]:
    """The tracked face's box in each frame, from every frame's detections (largest first
    or in any order); None in a frame where the tracked face was not detected."""
    track: Box | None = None
    followed: list[Box | None] = []
    for boxes in detections:
        if track is None:
            found = max(boxes, key=lambda b: b[2] * b[3], default=None)
        else:
            found = continuation(track, boxes)
        if found is not None:
            track = found
        followed.append(found)
    return followed


def hold_gaps(followed: list[Box | None]) -> list[Box | None]:
    """Each frame's crop box: its own detection, else the last detected box, else (before
    the track starts) the first one; all None when no frame has a face."""
    first = next((box for box in followed if box is not None), None)
    held, last = [], first
    for box in followed:
        last = box if box is not None else last
        held.append(last)
    return held


@dataclass
class TrackedCrops:
    """The face crops of one video's frames, in frame order, all of one tracked face."""
    crops: list[np.ndarray]       # crop_size x crop_size RGB, one per frame
    detected: list[bool]          # whether the tracked face was detected in that frame

    @property
    def n_detected(self) -> int:
        return sum(self.detected)


def tracked_face_crops(frames: list[np.ndarray], cfg: FaceConfig, detect_side: int = DETECT_SIDE) -> TrackedCrops:
    """Face crops of one video's frames (RGB, in video order) following one face.

    Faces are detected on a copy of each frame whose longer side is at most `detect_side`
    (`faces.detect_faces`); the crops are taken from the frames themselves at their full
    resolution, by the same crop rule as images (`faces.crop_at_face`)."""
    if not cfg.enabled:
        return TrackedCrops([crop_at_face(rgb, None, cfg) for rgb in frames], [False] * len(frames))
    followed = follow_face([detect_faces(rgb, cfg, detect_side) for rgb in frames])
    boxes = hold_gaps(followed)
    return TrackedCrops([crop_at_face(rgb, box, cfg) for rgb, box in zip(frames, boxes)],
                        [box is not None for box in followed])

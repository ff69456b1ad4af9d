"""Face tracking through a video's frames (data_prep.tracking) and the resolution cap with
detection on a downscaled copy (data_prep.video, data_prep.faces)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from configs import FaceConfig
from data_prep.faces import crop_face, detect_faces, square_crop_box
from data_prep.tracking import follow_face, hold_gaps, tracked_face_crops
from data_prep.video import sample_face_crops, sample_frames

# min_face 0.1: both faces of the two-face frames stay above the detector's smallest size
TWO_FACES = FaceConfig(min_face=0.1, crop_size=64)


@pytest.fixture(scope="module")
def astronaut_face():
    import skimage.data
    return skimage.data.astronaut()[20:220, 120:320]  # her face with a margin, 200 x 200


# ---------------------------------------------------------------- the tracker on boxes

def test_track_starts_at_the_largest_face_and_keeps_it():
    detections = [
        [],                                            # no face yet
        [(300, 50, 40, 40), (100, 100, 60, 60)],       # the track starts at the larger (left) face
        [(110, 104, 58, 58), (290, 40, 80, 80)],       # the right face grows larger: ignored
        [(285, 30, 120, 120), (120, 110, 56, 56)],     # listed first (largest) in the frame
        [(280, 25, 140, 140)],                         # the tracked face is missed here
        [(125, 112, 60, 60), (280, 25, 140, 140)],
    ]
    followed = follow_face(detections)
    assert followed == [None, (100, 100, 60, 60), (110, 104, 58, 58), (120, 110, 56, 56), None,
                        (125, 112, 60, 60)]
    # a missed frame keeps the last box; frames before the track take its first box
    assert hold_gaps(followed) == [(100, 100, 60, 60), (100, 100, 60, 60), (110, 104, 58, 58),
                                   (120, 110, 56, 56), (120, 110, 56, 56), (125, 112, 60, 60)]


def test_track_refuses_a_jump_or_a_change_of_size():
    start = [(100, 100, 50, 50)]
    assert follow_face([start, [(200, 100, 50, 50)]])[1] is None      # two sides away: another face
    assert follow_face([start, [(140, 100, 50, 50)]])[1] == (140, 100, 50, 50)  # 0.8 side: a move
    assert follow_face([start, [(90, 90, 120, 120)]])[1] is None      # 2.4 x the size, same centre
    assert hold_gaps([None, None]) == [None, None]                    # no face at all: fallback crop


# ---------------------------------------------------------------- tracking on detected faces

def two_face_frame(face: np.ndarray, left: int, right: int) -> np.ndarray:
    """A 640 x 360 frame with the face at `left` px on the left and, channel-swapped (blue
    skin: another "person" the grayscale cascade still finds), at `right` px on the right."""
    frame = np.full((360, 640, 3), 120, np.uint8)
    frame[40:40 + left, 60:60 + left] = cv2.resize(face, (left, left), interpolation=cv2.INTER_AREA)
    frame[40:40 + right, 380:380 + right] = cv2.resize(face, (right, right), interpolation=cv2.INTER_AREA)[..., ::-1]
    return frame


def is_left_person(crop: np.ndarray) -> bool:
    red, _, blue = crop.reshape(-1, 3).mean(axis=0)
    return red > blue


def test_tracking_keeps_the_first_face_when_a_larger_one_appears(astronaut_face):
    # the left face shrinks while the right one grows past it: largest-per-frame would switch
    sizes = [(200, 120), (190, 140), (180, 160), (170, 180), (160, 200), (150, 220), (140, 240)]
    frames = [two_face_frame(astronaut_face, left, right) for left, right in sizes]
    assert all(len(detect_faces(frame, TWO_FACES)) == 2 for frame in frames)  # the premise

    largest = [is_left_person(crop_face(frame, TWO_FACES)[0]) for frame in frames]
    assert largest == [True, True, True, False, False, False, False]
    tracked = tracked_face_crops(frames, TWO_FACES)
    assert [is_left_person(crop) for crop in tracked.crops] == [True] * len(frames)
    assert tracked.n_detected == len(frames)
    assert all(crop.shape == (64, 64, 3) for crop in tracked.crops)


def test_tracking_without_faces_uses_the_fallback_crop():
    frames = [np.full((90, 160, 3), 40, np.uint8), np.full((90, 160, 3), 200, np.uint8)]
    tracked = tracked_face_crops(frames, FaceConfig(crop_size=32))
    assert tracked.n_detected == 0 and tracked.detected == [False, False]
    assert [int(crop.mean()) for crop in tracked.crops] == [40, 200]  # the centre crop of each frame


# ---------------------------------------------------------------- the resolution cap

def test_a_4k_frame_is_capped_and_its_face_box_maps_back(tmp_path, astronaut_face):
    """A 3840 x 2160 clip: frames come back at 1920 x 1080, the face detected on a 320 px copy
    maps back onto the face in the capped frame, and the crop is taken there."""
    face_4k = cv2.resize(astronaut_face, (1600, 1600), interpolation=cv2.INTER_AREA)
    frame_4k = np.full((2160, 3840, 3), 100, np.uint8)
    frame_4k[300:1900, 1800:3400] = face_4k
    path = tmp_path / "uhd.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (3840, 2160))
    for _ in range(2):
        writer.write(cv2.cvtColor(frame_4k, cv2.COLOR_RGB2BGR))
    writer.release()

    [(index, capped)] = sample_frames(path, 1, max_side=1920)
    assert index == 1
    assert capped.shape == (1080, 1920, 3)
    [(_, native)] = sample_frames(path, 1, max_side=None)
    assert native.shape == (2160, 3840, 3)
    assert sample_frames(path, 1, max_side=4096)[0][1].shape == (2160, 3840, 3)  # below the cap: untouched

    # Where the face is in the capped frame: detected on the 200 px face image itself, then
    # moved by the paste offset and halved by the cap (1600 / 200 = 8, then / 2).
    [reference] = detect_faces(astronaut_face, FaceConfig())
    expected = np.array([900 + reference[0] * 4, 150 + reference[1] * 4, reference[2] * 4, reference[3] * 4])
    cfg = FaceConfig(crop_size=64)
    small_copy_box = detect_faces(capped, cfg, detect_side=320)[0]
    larger_copy_box = detect_faces(capped, cfg, detect_side=640)[0]
    for box in (small_copy_box, larger_copy_box):
        assert np.abs(np.array(box) - expected).max() < 0.15 * expected[2], (box, expected)

    tracked = sample_face_crops(path, cfg, n_frames=2, max_side=1920, detect_side=320)
    assert tracked.n_detected == 2
    x0, y0, x1, y1 = square_crop_box(capped.shape[:2], small_copy_box, cfg)
    window = cv2.resize(capped[y0:y1, x0:x1], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(tracked.crops[1].astype(int) - window).mean() < 2  # frame 1's crop is that window

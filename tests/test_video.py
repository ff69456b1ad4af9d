"""Tests for data_prep.video on tiny synthetic videos written with cv2.VideoWriter."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_prep import video
from data_prep.video import (
    VideoDecodeError,
    VideoLabelError,
    aggregate_frame_scores,
    frame_indices,
    is_video_file,
    read_video_labels,
    sample_frames,
)

N_FRAMES, WIDTH, HEIGHT = 40, 64, 48
BITS, STRIPE = 6, 10  # the frame index, written as 6 black/white stripes 10 px wide


def index_frame(i: int) -> np.ndarray:
    """A BGR frame whose stripes spell i in binary (high contrast survives mp4v compression)."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(BITS):
        if i >> bit & 1:
            frame[:, bit * STRIPE:(bit + 1) * STRIPE] = 255
    return frame


def read_index(rgb: np.ndarray) -> int:
    # Only the stripe centres: edges blur under compression.
    centres = [rgb[:, bit * STRIPE + 2:(bit + 1) * STRIPE - 2].mean() for bit in range(BITS)]
    return sum(1 << bit for bit, value in enumerate(centres) if value > 128)


def write_video(path, n_frames=N_FRAMES):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(n_frames):
        writer.write(index_frame(i))
    writer.release()
    return path


@pytest.fixture
def clip(tmp_path):
    return write_video(tmp_path / "clip.mp4")


def test_is_video_file():
    assert is_video_file("a/b/clip.MP4") and is_video_file("x.webm")
    assert not is_video_file("face.jpg") and not is_video_file("mp4")


def test_frame_indices_are_segment_centres():
    assert frame_indices(40, 8) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frame_indices(3, 8) == [0, 1, 2]  # short video: each frame once
    assert frame_indices(10, 1) == [5]


@pytest.mark.parametrize("seek_min_gap", [video.SEEK_MIN_GAP, 1])  # forward decoding / seek every frame
def test_sample_frames_reads_the_expected_frames(clip, monkeypatch, seek_min_gap):
    monkeypatch.setattr(video, "SEEK_MIN_GAP", seek_min_gap)
    frames = sample_frames(clip, 8)
    assert [i for i, _ in frames] == [2, 7, 12, 17, 22, 27, 32, 37]
    for index, rgb in frames:
        assert rgb.shape == (HEIGHT, WIDTH, 3) and rgb.dtype == np.uint8
        assert read_index(rgb) == index


def test_sample_frames_falls_back_to_sequential_read(clip, monkeypatch):
    monkeypatch.setattr(video, "_read_by_seeking", lambda capture, indices, max_side: None)  # "seek failed"
    frames = sample_frames(clip, 5)
    assert [i for i, _ in frames] == [4, 12, 20, 28, 36]
    assert [read_index(rgb) for _, rgb in frames] == [4, 12, 20, 28, 36]


def test_sample_frames_more_than_available(tmp_path):
    frames = sample_frames(write_video(tmp_path / "short.mp4", n_frames=3), 16)
    assert [read_index(rgb) for _, rgb in frames] == [0, 1, 2]


def test_sample_frames_bad_files(tmp_path):
    with pytest.raises(VideoDecodeError, match="missing.mp4: no such file"):
        sample_frames(tmp_path / "missing.mp4")
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n")
    with pytest.raises(VideoDecodeError) as error:
        sample_frames(fake)
    assert str(error.value).startswith(f"{fake}: ")
    with pytest.raises(ValueError):
        sample_frames(fake, 0)


def test_aggregate_rules():
    scores = [0.1, 0.2, 0.9, 0.95]
    assert aggregate_frame_scores(scores) == pytest.approx(0.5375)
    assert aggregate_frame_scores(scores, "median") == pytest.approx(0.55)
    assert aggregate_frame_scores(scores, "max") == pytest.approx(0.95)
    # Confident frames dominate: two sure-fake frames outweigh three unsure-real ones.
    assert aggregate_frame_scores([0.45, 0.45, 0.45, 0.99, 0.99], "confidence") > 0.8
    assert aggregate_frame_scores([0.45, 0.45, 0.45, 0.99, 0.99], "mean") < 0.7
    assert aggregate_frame_scores([0.5, 0.5], "confidence") == pytest.approx(0.5)
    assert aggregate_frame_scores(np.array([0.3]), "confidence") == pytest.approx(0.3)


def test_top_k_rule_is_the_mean_of_the_most_fake_looking_frames():
    # default k: a quarter of the frames, rounded up, at least one
    assert aggregate_frame_scores([0.1, 0.2, 0.9, 0.95], "top-k") == pytest.approx(0.95)  # k = 1
    sixteen = [0.1] * 12 + [0.6, 0.7, 0.8, 0.9]
    assert aggregate_frame_scores(sixteen, "top-k") == pytest.approx(0.75)  # k = 4
    assert aggregate_frame_scores([0.2] * 4 + [0.9], "top-k") == pytest.approx(0.55)  # k = ceil(1.25) = 2
    assert aggregate_frame_scores([0.3], "top-k") == pytest.approx(0.3)
    assert aggregate_frame_scores([0.1, 0.2, 0.9, 0.95], "top-k", top_k=2) == pytest.approx(0.925)
    # between max and mean: one false alarm among 16 frames moves it by a quarter of max's error
    one_alarm = [0.1] * 15 + [0.9]
    assert aggregate_frame_scores(one_alarm, "top-k") == pytest.approx(0.3)
    assert aggregate_frame_scores(one_alarm, "mean") < 0.3 < aggregate_frame_scores(one_alarm, "max")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        aggregate_frame_scores([0.5], "top-k", top_k=0)


@pytest.mark.parametrize("scores, rule", [([], "mean"), ([0.5, 1.5], "mean"), ([float("nan")], "max"),
                                          ([0.5], "vote")])
def test_aggregate_rejects_bad_input(scores, rule):
    with pytest.raises(ValueError):
        aggregate_frame_scores(scores, rule)


def write_labels(root, text):
    (root / "labels.csv").write_text(text)


def test_read_video_labels(tmp_path):
    write_video(tmp_path / "a.mp4")
    write_video(tmp_path / "b.mp4", n_frames=10)
    write_labels(tmp_path, "video_name,target\na.mp4,1\n\nb.mp4,0\n")
    assert read_video_labels(tmp_path) == [("a.mp4", 1), ("b.mp4", 0)]
    frames = {name: sample_frames(tmp_path / name, 2) for name in ("a.mp4", "b.mp4")}
    assert {name: [index for index, _ in pairs] for name, pairs in frames.items()} == {"a.mp4": [10, 30],
                                                                                      "b.mp4": [2, 7]}
    assert all(read_index(frame) == index for pairs in frames.values() for index, frame in pairs)


@pytest.mark.parametrize("text, message", [
    (None, "labels.csv: missing label file"),
    ("name,label\na.mp4,1\n", "header 'video_name,target'"),
    ("video_name,target\na.mp4,fake\n", r"labels.csv:2: target of 'a.mp4' must be 0 or 1"),
    ("video_name,target\na.mp4,1\na.mp4,0\n", "labels.csv:3: 'a.mp4' is listed twice"),
    ("video_name,target\na.mp4,1\ngone.mp4,0\n", "labels.csv:3: listed video .*gone.mp4 is missing"),
])
def test_read_video_labels_errors(tmp_path, text, message):
    write_video(tmp_path / "a.mp4", n_frames=2)
    if text is not None:
        write_labels(tmp_path, text)
    with pytest.raises(VideoLabelError, match=message):
        read_video_labels(tmp_path)


def test_extract_frames_layout_splits_by_video(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    names = [f"v{i}.mp4" for i in range(4)]
    for name in names:
        write_video(root / name, n_frames=12)
    write_labels(root, "video_name,target\nv0.mp4,0\nv1.mp4,0\nv2.mp4,1\nv3.mp4,1\n")
    out = video.extract_frames_layout(root, tmp_path / "frames", n_frames=3, seed=0)

    from data_prep.dataset import load_splits
    splits = load_splits(out)
    videos_of = {split: {s.name.split("_f")[0] for s in splits[split]} for split in ("trainset", "valset")}
    assert not videos_of["trainset"] & videos_of["valset"]  # no video on both sides
    assert len(splits["trainset"]) + len(splits["valset"]) == 4 * 3
    for split in ("trainset", "valset"):
        assert {s.target for s in splits[split]} == {0, 1}
        for s in splits[split]:
            assert s.target == (1 if s.name.split("_f")[0] in ("v2", "v3") else 0)

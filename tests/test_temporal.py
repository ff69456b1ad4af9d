"""The temporal head (ensemble.temporal trains it, ensemble.temporal_model scores) on tiny
generated videos.

A "real" video's face changes smoothly: each appearance parameter (brightness, colour,
position, size, eyes and mouth) follows a slow sine with a random phase. A "fake" one
flickers: every frame draws each parameter as 0.5 + 0.5 sin(phase) with a fresh random
phase. At any one frame both are the same distribution (a uniform phase gives the same
arcsine law), so no single frame tells them apart; only the change over time does.
"""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

import infer
from common.metrics import roc_auc
from configs import ExpertConfig, FaceConfig, load_config
from data_prep.dataset import Sample
from data_prep.video import sample_face_crops
from ensemble import evaluate, temporal
from ensemble.predictor import EnsembleDetector
from ensemble.temporal_model import TEMPORAL_FILE, VIDEO_STACKER_FILE, load_temporal, run_expert, temporal_score
from experts.base import create_expert
from experts.weights import MANIFEST, WeightsError, save_expert

FRAMES, SIZE = 16, 64
N_TRAIN, N_HELD_OUT = 24, 40              # videos per class
FACE = FaceConfig(enabled=False, fallback="full", crop_size=SIZE)  # the whole frame is the face


def appearance(rng: np.random.Generator, fake: bool) -> np.ndarray:
    """(FRAMES, 6) parameters in [0, 1]: the same marginal per frame for both classes."""
    if fake:
        phases = rng.uniform(0, 2 * np.pi, (FRAMES, 6))
    else:
        speeds = rng.uniform(0.1, 0.25, 6)        # radians per frame: a smooth change
        phases = rng.uniform(0, 2 * np.pi, 6) + np.arange(FRAMES)[:, None] * speeds
    return 0.5 + 0.5 * np.sin(phases)


def draw_face(p: np.ndarray, grey: int, rng: np.random.Generator) -> np.ndarray:
    """One BGR frame: a skin-coloured ellipse with eyes and a mouth on a grey background."""
    frame = np.full((SIZE, SIZE, 3), grey, np.uint8)
    centre = (int(24 + 16 * p[2]), 32)
    skin = (int(90 + 60 * p[1]), int(110 + 80 * p[0]), int(150 + 100 * p[0]))
    cv2.ellipse(frame, centre, (int(12 + 8 * p[3]), 20), 0, 0, 360, skin, -1)
    eye = int(20 + 60 * p[4])
    for dx in (-6, 6):
        cv2.circle(frame, (centre[0] + dx, 26), 3, (eye, eye, eye), -1)
    cv2.ellipse(frame, (centre[0], 42), (int(3 + 5 * p[5]), 2), 0, 0, 360, (40, 40, 120), -1)
    noise = rng.normal(0, 3, frame.shape)
    return np.clip(frame + noise, 0, 255).astype(np.uint8)


def write_videos(folder, n_per_class: int, seed: int):
    """`n_per_class` real and fake .avi clips (MJPG: every frame coded on its own) + labels.csv."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(2 * n_per_class):
        fake = i % 2
        params, grey = appearance(rng, bool(fake)), int(rng.integers(60, 200))
        name = f"clip_{i:03d}.avi"
        writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*"MJPG"), 10, (SIZE, SIZE))
        for p in params:
            writer.write(draw_face(p, grey, rng))
        writer.release()
        rows.append((name, fake))
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("video_name", "target"), *rows])
    return rows


def video_crops(folder, name: str) -> list[np.ndarray]:
    """One video's face crops as training, infer.py and ensemble.evaluate take them."""
    return sample_face_crops(folder / name, FACE, FRAMES).crops


def train_frame_expert(train_root, rows, weights) -> None:
    """A MesoNet frame expert trained for a few steps on single frames labelled with their
    video's label (what a frame expert learns from), saved as training saves experts."""
    torch.manual_seed(0)
    expert = create_expert(ExpertConfig(kind="mesonet"), SIZE)
    frames = [(crop, target) for name, target in rows for crop in video_crops(train_root, name)]
    x = torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c, _ in frames]).float() / 255
    y = torch.tensor([t for _, t in frames])
    optimizer = torch.optim.AdamW(expert.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    expert.train()
    for _ in range(20):
        batch = torch.randint(len(y), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(expert(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_expert(expert.eval(), weights, "mesonet", FACE, extra={})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("temporal")
    train_rows = write_videos(tmp / "train", N_TRAIN, seed=1)
    held_out_rows = write_videos(tmp / "held_out", N_HELD_OUT, seed=2)
    train_frame_expert(tmp / "train", train_rows, tmp / "weights")
    assert temporal.main([str(tmp / "train"), "--weights", str(tmp / "weights"), "threads=1", "device=cpu"]) == 0
    return {"tmp": tmp, "weights": tmp / "weights", "train_rows": train_rows, "held_out_rows": held_out_rows}


def test_temporal_head_separates_flicker_that_no_frame_model_sees(trained):
    model = load_temporal(trained["weights"])
    held_out = trained["tmp"] / "held_out"
    y = [target for _, target in trained["held_out_rows"]]
    crops = {name: video_crops(held_out, name) for name, _ in trained["held_out_rows"]}
    temporal_auc = roc_auc(y, [temporal_score(model, crops[n]) for n, _ in trained["held_out_rows"]])
    assert temporal_auc >= 0.9

    # Frame-only models: the frame expert's mean score, and a logistic regression on the
    # single-frame embeddings of the training videos, averaged over each held-out video.
    def embeddings_and_scores(folder, name):
        return run_expert(model.expert, video_crops(folder, name), model.device)
    train_x, train_y = [], []
    for name, target in trained["train_rows"]:
        embeddings, _ = embeddings_and_scores(trained["tmp"] / "train", name)
        train_x.append(embeddings.numpy())
        train_y += [target] * len(embeddings)
    frame_model = LogisticRegression(max_iter=2000).fit(np.concatenate(train_x), train_y)
    mean_expert, mean_regression = [], []
    for name, _ in trained["held_out_rows"]:
        embeddings, scores = run_expert(model.expert, crops[name], model.device)
        mean_expert.append(scores.mean())
        mean_regression.append(frame_model.predict_proba(embeddings.numpy())[:, 1].mean())
    for frame_only in (mean_expert, mean_regression):
        assert abs(roc_auc(y, frame_only) - 0.5) <= 0.2, "a frame-only model should be near chance"


def test_manifest_entry_and_strict_reload(trained):
    weights = trained["weights"]
    manifest = json.loads((weights / MANIFEST).read_text())
    entry = manifest["ensemble"]["temporal"]
    assert entry["file"] == TEMPORAL_FILE and entry["expert"] == "mesonet"
    assert entry["expert_sha256"] == manifest["experts"]["mesonet"]["sha256"]
    assert entry["sequences"]["train"] + entry["sequences"]["held_out"] == 2 * N_TRAIN
    assert entry["held_out_auc"]["temporal"] >= 0.9   # its own split of the training videos
    crops = video_crops(trained["tmp"] / "held_out", trained["held_out_rows"][0][0])
    by_model = temporal_score(load_temporal(weights), crops)
    assert temporal_score(weights, crops) == pytest.approx(by_model, abs=1e-6)
    assert temporal_score(load_temporal(weights), crops[:3]) != by_model  # any length


def test_training_is_deterministic(trained, tmp_path):
    (tmp_path / "weights").mkdir()
    for name in ("mesonet.safetensors", MANIFEST):
        (tmp_path / "weights" / name).write_bytes((trained["weights"] / name).read_bytes())
    assert temporal.main([str(trained["tmp"] / "train"), "--weights", str(tmp_path / "weights"),
                          "threads=1", "device=cpu"]) == 0
    again, first = (load_file(str(w / TEMPORAL_FILE)) for w in (tmp_path / "weights", trained["weights"]))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def copy_of_weights(trained, dest, head: bool = True):
    """A copy of the trained weights folder, with or without the temporal head."""
    dest.mkdir()
    for name in ("mesonet.safetensors", MANIFEST, TEMPORAL_FILE, VIDEO_STACKER_FILE):
        (dest / name).write_bytes((trained["weights"] / name).read_bytes())
    if not head:
        manifest = json.loads((dest / MANIFEST).read_text())
        del manifest["ensemble"]
        (dest / TEMPORAL_FILE).unlink()
        (dest / VIDEO_STACKER_FILE).unlink()
        (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def retrain_frame_expert(weights) -> None:
    """Replace the frame expert by another one: the head trained on its embeddings is stale."""
    torch.manual_seed(1)
    save_expert(create_expert(ExpertConfig(kind="mesonet"), SIZE).eval(), weights, "mesonet", FACE, extra={})


def test_no_head_is_none_and_a_retrained_expert_makes_it_stale(trained, tmp_path):
    weights = copy_of_weights(trained, tmp_path / "no_head", head=False)
    assert load_temporal(weights) is None
    with pytest.raises(WeightsError, match="no temporal head"):
        temporal_score(weights, [np.zeros((SIZE, SIZE, 3), np.uint8)])

    weights = copy_of_weights(trained, tmp_path / "stale")
    retrain_frame_expert(weights)
    with pytest.raises(WeightsError, match="retrained"):
        load_temporal(weights)


def stacked_score(weights, folder, name: str, precision: str = "fp32") -> float:
    """One video's score by the video stacker, from the ensemble's frame scores, by hand."""
    crops = video_crops(folder, name)
    detector = EnsembleDetector.from_weights(weights, device="cpu", precision=precision)
    frame_scores, _ = detector.score_crops(detector.batch_of_crops(crops))
    model = load_temporal(weights, precision=precision)
    return model.score_stacked(crops, frame_scores)


def test_video_stacker_joins_the_head_and_the_frame_ensemble(trained):
    """Fitted on the held-out sequences of the training videos (6 per class), saved with the
    frame ensemble it was fitted on; on 80 new videos it keeps the head's separation,
    where the frame ensemble's mean is near chance, and it is monotone in both scores."""
    weights = trained["weights"]
    manifest = json.loads((weights / MANIFEST).read_text())
    entry = manifest["ensemble"]["temporal"]["stacker"]
    assert entry["file"] == VIDEO_STACKER_FILE and entry["columns"] == ["frames_mean", "temporal"]
    assert entry["fitted_on"] == f"{entry_held_out(manifest)} held-out sequences"
    assert entry["frame_ensemble"] == {"experts": {"mesonet": manifest["experts"]["mesonet"]["sha256"]},
                                       "stacker_sha256": None, "tta": []}  # no frame stacker: the plain mean
    assert entry["method"] in entry["cv_auc"]

    held_out = trained["tmp"] / "held_out"
    y = [target for _, target in trained["held_out_rows"]]
    stacked = [stacked_score(weights, held_out, name) for name, _ in trained["held_out_rows"]]
    assert roc_auc(y, stacked) >= 0.9
    model = load_temporal(weights)
    grid = np.array([[f, t] for f in (0.2, 0.5, 0.8) for t in (0.1, 0.5, 0.9)])
    p = model.video_stacker.predict_proba(grid)[:, 1].reshape(3, 3)
    assert (np.diff(p, axis=0) >= -1e-12).all() and (np.diff(p, axis=1) >= -1e-12).all()


def entry_held_out(manifest) -> int:
    return manifest["ensemble"]["temporal"]["sequences"]["held_out"]


def test_too_few_held_out_sequences_give_no_video_stacker(trained, tmp_path, caplog):
    (tmp_path / "weights").mkdir()
    for name in ("mesonet.safetensors", MANIFEST):
        (tmp_path / "weights" / name).write_bytes((trained["weights"] / name).read_bytes())
    assert temporal.main([str(trained["tmp"] / "train"), "--weights", str(tmp_path / "weights"),
                          "threads=1", "device=cpu", "temporal.val_fraction=0.1"]) == 0  # 2 per class
    assert "stacker" not in json.loads((tmp_path / "weights" / MANIFEST).read_text())["ensemble"]["temporal"]
    assert any("no video stacker" in r.getMessage() for r in caplog.records)
    model = load_temporal(tmp_path / "weights")
    assert model.video_stacker is None and "without a video stacker" in model.stacker_problem


def test_command_line_error_is_one_line(trained, tmp_path, capsys):
    (tmp_path / "no_videos").mkdir()
    (tmp_path / "no_videos" / "labels.csv").write_text("video_name,target\n")
    assert temporal.main([str(tmp_path / "no_videos"), "--weights", str(trained["weights"]),
                          "threads=1", "device=cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert temporal.main([str(trained["tmp"] / "train"), "--frames", "1", "--weights",
                          str(trained["weights"])]) == 2


# ---------------------------------------------------------------- the head in evaluate and infer

def evaluate_args(trained, tmp_path, videos, weights) -> list[str]:
    """ensemble.evaluate on a labelled image folder (real/ + fake/: the first frame of six
    held-out videos) and the video folder `videos`, with thresholds 0.5 (no data root)."""
    images = tmp_path / "frames"
    for name, target in trained["held_out_rows"][:6]:
        folder = images / ("fake" if target else "real")
        folder.mkdir(parents=True, exist_ok=True)
        first = video_crops(trained["tmp"] / "held_out", name)[0]
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(first, cv2.COLOR_RGB2BGR))
    return ["--test", str(images), "--weights", str(weights), "--videos", str(videos), "--no-plots",
            "--reports", str(tmp_path / "reports"), "threads=1", "device=cpu", "data.num_workers=0"]


def test_evaluate_videos_reports_the_temporal_head_where_frame_rules_see_nothing(trained, tmp_path, capsys):
    held_out = trained["tmp"] / "held_out"
    assert evaluate.main(evaluate_args(trained, tmp_path, held_out, trained["weights"])) == 0
    video = json.loads((tmp_path / "reports" / "metrics.json").read_text())["video"]
    assert list(video["video_level"]) == ["mean", "median", "confidence", "max", "top-k", "temporal",
                                          "temporal_stack"]
    row = video["video_level"]["temporal"]["temporal"]
    assert row["n"] == 2 * N_HELD_OUT and row["threshold"] == 0.5 and row["auc"] >= 0.9
    assert video["video_level"]["temporal_stack"]["temporal_stack"]["auc"] >= 0.9
    assert abs(video["video_level"]["mean"]["ensemble"]["auc"] - 0.5) <= 0.2
    first = video["videos"][0]
    expected = temporal_score(load_temporal(trained["weights"]), video_crops(held_out, first["video"]))
    assert first["p_temporal"] == pytest.approx(expected, abs=1e-6)
    assert first["p_temporal_stack"] == pytest.approx(  # evaluate's precision: the default, auto
        stacked_score(trained["weights"], held_out, first["video"], precision="auto"), abs=1e-6)
    assert "| top-k | temporal | temporal_stack |" in capsys.readouterr().out  # the per-video table


def test_evaluate_skips_a_stale_head_with_one_warning(trained, tmp_path, caplog):
    weights = copy_of_weights(trained, tmp_path / "weights")
    retrain_frame_expert(weights)
    videos = tmp_path / "videos"
    write_videos(videos, 2, seed=3)
    assert evaluate.main(evaluate_args(trained, tmp_path, videos, weights)) == 0
    video = json.loads((tmp_path / "reports" / "metrics.json").read_text())["video"]
    assert "temporal" not in video["video_level"] and "p_temporal" not in video["videos"][0]
    assert "temporal_stack" not in video["video_level"]
    (warning,) = [r.getMessage() for r in caplog.records if "temporal" in r.getMessage()]
    assert "skipped" in warning and "retrained" in warning and "\n" not in warning


def test_infer_video_rule_temporal(trained, tmp_path, capsys):
    held_out = trained["tmp"] / "held_out"
    name = trained["held_out_rows"][1][0]
    weights = str(trained["weights"])
    out = tmp_path / "video.csv"
    assert infer.main([str(held_out / name), "--weights", weights, "--video-rule", "temporal", "--csv", str(out)]) == 0
    header, row = out.read_text().splitlines()
    expected = temporal_score(load_temporal(weights), video_crops(held_out, name))
    assert header == "video_name,y_pred" and row.split(",")[0] == name
    assert float(row.split(",")[1]) == pytest.approx(expected, abs=1e-6)
    # bf16 autocast of the frame expert moves the score only a little
    assert infer.main([str(held_out / name), "--weights", weights, "--video-rule", "temporal", "--csv", str(out),
                       "--precision", "bf16"]) == 0
    assert float(out.read_text().splitlines()[1].split(",")[1]) == pytest.approx(expected, abs=0.05)

    assert infer.main([str(held_out / name), "--weights", weights, "--video-rule", "temporal_stack",
                       "--csv", str(out), "--precision", "fp32"]) == 0
    assert float(out.read_text().splitlines()[1].split(",")[1]) == pytest.approx(
        stacked_score(weights, held_out, name), abs=1e-6)

    capsys.readouterr()  # other frame scores than the video stacker was fitted on: refused in one line
    assert infer.main([str(held_out / name), "--weights", weights, "--video-rule", "temporal_stack",
                       "--tta", "hflip"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another ensemble" in err and "python -m ensemble.temporal" in err

    no_head = copy_of_weights(trained, tmp_path / "no_head", head=False)
    assert infer.main([str(held_out / name), "--weights", str(no_head), "--video-rule", "temporal"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no temporal head" in err and "python -m ensemble.temporal" in err
    assert infer.main([str(held_out / name), "--weights", weights, "--video-rule", "temporal",
                       "--backend", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend torch" in err


# ---------------------------------------------------------------- image sets: near-duplicate runs

def test_near_duplicate_runs_keep_one_label_one_method_and_drop_copies(tmp_path):
    """Four 'clips' of noisy copies of one random texture each; clip 0 has real and fake
    frames (a real and its fakes are near duplicates too), clip 3 two methods."""
    rng = np.random.default_rng(0)
    samples, methods = [], {}
    for clip, targets in enumerate([[0, 0, 0, 1, 1], [1] * 20, [0], [1, 1, 1, 1]]):
        base = cv2.resize(rng.uniform(0, 255, (8, 8, 3)), (64, 64), interpolation=cv2.INTER_CUBIC)
        for k, target in enumerate(targets):
            path = tmp_path / f"c{clip}_{k:02d}.png"
            cv2.imwrite(str(path), np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8))
            samples.append(Sample(path, target))
            methods[path] = "real" if target == 0 else ("FaceSwap" if clip == 3 and k >= 2 else "Deepfakes")
    copy = tmp_path / "c1_99.png"                  # an exact copy: not a second frame
    copy.write_bytes((tmp_path / "c1_00.png").read_bytes())
    samples.append(Sample(copy, 1))
    runs = temporal.near_duplicate_runs(samples, methods, max_distance=4, max_length=8)
    names = sorted([s.name for s in run] for run in runs)
    assert names == [["c0_00.png", "c0_01.png", "c0_02.png"], ["c0_03.png", "c0_04.png"],
                     [f"c1_{k:02d}.png" for k in range(7)], [f"c1_{k:02d}.png" for k in range(7, 14)],
                     [f"c1_{k:02d}.png" for k in range(14, 20)],
                     ["c3_00.png", "c3_01.png"], ["c3_02.png", "c3_03.png"]]


def test_config_section_defaults_and_override():
    cfg = load_config("cpu", ["temporal.hidden=8", "temporal.expert=forensic"])
    assert (cfg.temporal.hidden, cfg.temporal.expert, cfg.temporal.max_distance) == (8, "forensic", 4)

"""Tests for data_prep.diffusion with tiny random SD pipelines built in code (no download)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from data_prep import diffusion
from data_prep.diffusion import generate_fakes
from data_prep.diffusion_pipelines import ModelLoadError, load_pipelines
from tiny_diffusion import build_tiny_pipeline_dir

REAL_SIZES = {"real_a.jpg": (64, 64), "real_b.jpg": (64, 64), "real_c.jpg": (72, 56)}  # name: (w, h)
FAST = dict(steps=2, size=64, batch_size=2)


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def inpaint_pipelines(tmp_path_factory, offline):
    model = build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_inpaint"), inpaint=True)
    return load_pipelines(str(model), "cpu")


@pytest.fixture(scope="module")
def plain_pipelines(tmp_path_factory, offline):
    model = build_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_plain"), inpaint=False)
    return load_pipelines(str(model), "cpu")


def smooth_image(w, h, seed):
    """A smooth gradient: JPEG keeps it nearly exact, so pasted-back pixels can be compared."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    channels = [(a * x + b * y) % 200 + 20 for a, b in rng.uniform(0.5, 2.0, size=(3, 2))]
    return np.stack(channels, axis=-1).astype(np.uint8)


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    (root / "trainset").mkdir(parents=True)
    rows = ["img_name,target"]
    for seed, (name, (w, h)) in enumerate(REAL_SIZES.items()):
        Image.fromarray(smooth_image(w, h, seed)).save(root / "trainset" / name, quality=90)
        rows.append(f"{name},0")
    Image.fromarray(smooth_image(64, 64, 9)).save(root / "trainset" / "fake_x.jpg")
    rows.append("fake_x.jpg,1")
    (root / "trainset_label.txt").write_text("\n".join(rows) + "\n")
    return root


def label_rows(out):
    return (out / "trainset_label.txt").read_text().splitlines()


def test_inpaint_writes_fakes_masks_and_labels(data_root, tmp_path, inpaint_pipelines):
    out = tmp_path / "out"
    summary = generate_fakes(data_root, out, inpaint_pipelines, mode="inpaint", **FAST)

    names = [f"{name[:-4]}_sdinp_0.jpg" for name in REAL_SIZES]
    assert summary["generated"] == 3 and summary["label_rows_added"] == 3
    assert label_rows(out) == ["img_name,target"] + [f"{n},1" for n in names]
    for real_name, fake_name in zip(REAL_SIZES, names):
        real = np.asarray(Image.open(data_root / "trainset" / real_name).convert("RGB"), np.float32)
        fake = np.asarray(Image.open(out / "trainset" / fake_name).convert("RGB"), np.float32)
        mask = np.asarray(Image.open(out / "trainset_masks" / fake_name.replace(".jpg", ".png")))
        assert fake.shape == real.shape and mask.shape == real.shape[:2]  # back to the real's size
        assert mask.max() == 255 and mask[0, 0] == 0  # a face region, not the corners
        outside = mask == 0
        assert np.abs(fake - real)[outside].mean() < 4  # background is the real photo (+ JPEG)
        assert np.abs(fake - real)[mask == 255].mean() > 10  # the face was repainted


def test_rerun_is_resumable(data_root, tmp_path, inpaint_pipelines):
    out = tmp_path / "out"
    generate_fakes(data_root, out, inpaint_pipelines, **FAST)
    files = sorted((out / "trainset").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    labels = label_rows(out)

    again = generate_fakes(data_root, out, inpaint_pipelines, **FAST)
    assert again["generated"] == 0 and again["already_present"] == 3 and again["label_rows_added"] == 0
    assert label_rows(out) == labels
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # A deleted fake is remade; a fake whose label row was lost gets its row back, once.
    (out / "trainset" / "real_a_sdinp_0.jpg").unlink()
    (out / "trainset_label.txt").write_text("\n".join(labels[:-1]))  # drop real_c's row and the last newline
    repaired = generate_fakes(data_root, out, inpaint_pipelines, **FAST)
    assert repaired["generated"] == 1 and repaired["label_rows_added"] == 1
    assert sorted(label_rows(out)) == sorted(labels)


def test_output_does_not_depend_on_batch_size(data_root, tmp_path, inpaint_pipelines):
    generate_fakes(data_root, tmp_path / "b1", inpaint_pipelines, steps=2, size=64, batch_size=1)
    generate_fakes(data_root, tmp_path / "b3", inpaint_pipelines, steps=2, size=64, batch_size=3)
    for name in REAL_SIZES:
        fake = f"{name[:-4]}_sdinp_0.jpg"
        one = np.asarray(Image.open(tmp_path / "b1" / "trainset" / fake), np.float32)
        three = np.asarray(Image.open(tmp_path / "b3" / "trainset" / fake), np.float32)
        assert np.abs(one - three).mean() < 1.0


def test_unreadable_real_is_reported_not_fatal(data_root, tmp_path, inpaint_pipelines):
    (data_root / "trainset" / "real_b.jpg").write_bytes(b"not a jpeg")
    summary = generate_fakes(data_root, tmp_path / "out", inpaint_pipelines, **FAST)
    assert summary["generated"] == 2
    assert len(summary["unreadable"]) == 1 and "real_b.jpg" in summary["unreadable"][0]


def test_img2img_with_plain_checkpoint(data_root, tmp_path, plain_pipelines):
    out = tmp_path / "out"
    summary = generate_fakes(data_root, out, plain_pipelines, mode="img2img", per_real=2, **FAST)
    assert summary["generated"] == 6 and summary["modes"] == ["img2img"]
    for name, (w, h) in REAL_SIZES.items():
        for k in (0, 1):
            assert Image.open(out / "trainset" / f"{name[:-4]}_sdi2i_{k}.jpg").size == (w, h)
    assert not any((out / "trainset_masks").iterdir())
    assert len(label_rows(out)) == 1 + 6


def test_both_modes(data_root, tmp_path, plain_pipelines, inpaint_pipelines):
    # A plain checkpoint does both modes from the same weights.
    summary = generate_fakes(data_root, tmp_path / "plain", plain_pipelines, mode="both", limit=1, **FAST)
    assert summary["generated"] == 2 and summary["skipped_modes"] == {}
    # An inpainting checkpoint cannot do img2img: skipped in 'both', an error alone.
    summary = generate_fakes(data_root, tmp_path / "inp", inpaint_pipelines, mode="both", limit=1, **FAST)
    assert summary["generated"] == 1 and "img2img" in summary["skipped_modes"]
    with pytest.raises(ModelLoadError, match="cannot do img2img"):
        generate_fakes(data_root, tmp_path / "inp", inpaint_pipelines, mode="img2img", **FAST)


def test_bad_settings_are_clear_errors(data_root, tmp_path, inpaint_pipelines):
    with pytest.raises(ValueError, match="multiple of 8"):
        generate_fakes(data_root, tmp_path, inpaint_pipelines, size=60)
    with pytest.raises(ValueError, match="no denoising step"):
        generate_fakes(data_root, tmp_path, inpaint_pipelines, steps=1, strength=0.5)
    with pytest.raises(ValueError, match="trainset_label.txt: missing label file"):
        generate_fakes(tmp_path / "nowhere", tmp_path, inpaint_pipelines, **FAST)


def test_offline_hub_id_fails_fast(offline):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE is set"):
        load_pipelines("someone/not-a-cached-model", "cpu")
    assert time.perf_counter() - started < 5
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_pipelines("./no/such/model_dir", "cpu")


def test_cli_runs_end_to_end(data_root, tmp_path, offline, capsys):
    model = build_tiny_pipeline_dir(tmp_path / "tiny", inpaint=True)
    code = diffusion.main([str(data_root), "--model", str(model), "--out", str(tmp_path / "out"),
                           "--size", "64", "--steps", "2", "--limit", "2", "--device", "cpu"])
    assert code == 0 and '"generated": 2' in capsys.readouterr().out
    assert diffusion.main([str(data_root), "--model", "org/absent", "--out", str(tmp_path / "o")]) == 2
    assert "error: org/absent: not a local directory" in capsys.readouterr().err

"""infer.py on what a submission folder may hold: odd and broken images, names with commas,
missing files, --strict, a stale error list, videos; every input gets its row or its error."""
import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import infer
from helpers import PREDICTION_LINE, read_prediction_csv


def make_mixed_folder(folder, demo_root):
    folder.mkdir()
    rgb = np.asarray(Image.open(sorted((demo_root / "testset").iterdir())[0]).convert("RGB"))
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=90)
    (folder / "valid.jpg").write_bytes(jpeg.getvalue())
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (rgb.shape[0], 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    deep = (rgb.mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    (folder / "UPPER.JPG").write_bytes(jpeg.getvalue())
    (folder / "gesicht_äöü_日本.jpg").write_bytes(jpeg.getvalue())
    broken = {
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "empty.png": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
    }
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("ignored: not an image\n")
    valid = ["valid.jpg", "alpha.png", "gray.png", "deep16.png", "UPPER.JPG", "gesicht_äöü_日本.jpg"]
    return valid, sorted(broken)


def test_infer_never_drops_an_input_silently(trained_ensemble, demo_root, tmp_path, capsys):
    """A dangling link, a folder named like an image and a video that is not one each get a
    row and a named error; subfolders are reported as skipped, or scored with --recursive
    under their relative names; the closing line counts inputs, scored and failed."""
    folder = tmp_path / "in"
    valid, broken = make_mixed_folder(folder, demo_root)
    (folder / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (folder / "dir.png").mkdir()
    (folder / "fake.mp4").write_bytes(b"not a video")
    for sub in ("a", "b"):
        (folder / sub).mkdir()
        shutil.copy(folder / "valid.jpg", folder / sub / "valid.jpg")
    odd = ["dir.png", "fake.mp4", "gone.jpg"]
    out = tmp_path / "sub.csv"
    assert infer.main([str(folder), "--csv", str(out), "--weights", str(trained_ensemble["weights"])]) == 0
    err = capsys.readouterr().err
    names = [n for n, _ in read_prediction_csv(out)]
    assert sorted(names) == sorted(valid + broken + odd)
    errors = (tmp_path / "sub.csv.errors").read_text()
    for name in odd:
        assert name in errors
    assert "2 subfolder(s) not scored (use --recursive)" in err
    n = len(valid + broken + odd)
    assert f"{n} input(s): {len(valid)} scored, {len(broken + odd)} failed" in err
    weights = str(trained_ensemble["weights"])
    assert infer.main([str(folder), "--csv", str(out), "--recursive", "--weights", weights]) == 0
    names = [n for n, _ in read_prediction_csv(out)]
    assert "a/valid.jpg" in names and "b/valid.jpg" in names and "valid.jpg" in names


@pytest.mark.parametrize("loader_args", [[], ["--batch-size", "2", "--workers", "1"]],
                         ids=["default", "batch2-worker"])
def test_infer_mixed_folder(trained_ensemble, demo_root, tmp_path, capsys, loader_args):
    valid, broken = make_mixed_folder(tmp_path / "mixed", demo_root)
    out = tmp_path / "out.csv"
    code = infer.main([str(tmp_path / "mixed"), "--csv", str(out), "--weights", str(trained_ensemble["weights"])]
                      + loader_args)
    assert code == 0
    rows = read_prediction_csv(out)
    names = [n for n, _ in rows]
    assert names == sorted(valid + broken)
    assert "notes.txt" not in names
    scores = dict(rows)
    for name in broken:
        assert scores[name] == 0.5, name
    for name in valid:
        assert 0.0 <= scores[name] <= 1.0
    errors = (tmp_path / "out.csv.errors").read_text(encoding="utf-8").splitlines()
    assert len(errors) == len(broken)
    for name in broken:
        (line,) = [e for e in errors if name in e]
        assert line.split(": ", 1)[1].strip()  # a reason after the name
    assert any("empty" in e for e in errors if "empty.png" in e)
    assert any("truncated" in e for e in errors if "truncated.jpg" in e)
    err = capsys.readouterr().err
    for name in broken:
        assert name in err


def test_infer_mixed_folder_strict(trained_ensemble, demo_root, tmp_path, capsys):
    make_mixed_folder(tmp_path / "mixed", demo_root)
    out = tmp_path / "strict.csv"
    code = infer.main([str(tmp_path / "mixed"), "--csv", str(out), "--weights", str(trained_ensemble["weights"]),
                       "--strict"])
    assert code == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict.csv")]
    assert "strict" in capsys.readouterr().err


def test_infer_stale_error_file_removed(trained_ensemble, demo_root, tmp_path):
    out = tmp_path / "o.csv"
    (tmp_path / "o.csv.errors").write_text("old\n")
    weights = str(trained_ensemble["weights"])
    assert infer.main([str(demo_root / "testset"), "--csv", str(out), "--weights", weights]) == 0
    assert not (tmp_path / "o.csv.errors").exists()


def test_infer_print_mode_broken_and_missing(trained_ensemble, demo_root, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    good = sorted((demo_root / "testset").iterdir())[0]
    weights = str(trained_ensemble["weights"])
    code = infer.main([str(good), str(bad), str(tmp_path / "absent.jpg"), "--weights", weights])
    assert code == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1 and PREDICTION_LINE.match(lines[0])
    assert "bad.png" in captured.err and "absent.jpg" in captured.err


def test_infer_csv_names_with_comma_stay_one_column(trained_ensemble, demo_root, tmp_path):
    folder = tmp_path / "odd_names"
    folder.mkdir()
    source = sorted((demo_root / "testset").iterdir())[0]
    shutil.copy(source, folder / "face, left.jpg")
    shutil.copy(source, folder / "plain.jpg")
    out = tmp_path / "o.csv"
    assert infer.main([str(folder), "--csv", str(out), "--weights", str(trained_ensemble["weights"])]) == 0
    rows = read_prediction_csv(out)  # every row must parse as exactly img_name,y_pred
    assert [n for n, _ in rows] == ["face, left.jpg", "plain.jpg"]
    assert rows[0][1] == rows[1][1]


def test_infer_scores_a_folder_of_videos(trained_ensemble, tmp_path, capsys):
    import cv2

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 96))
        rng = np.random.default_rng(len(name))
        for _ in range(12):
            writer.write(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
        writer.release()
    out = tmp_path / "videos.csv"
    weights = str(trained_ensemble["weights"])
    assert infer.main([str(folder), "--csv", str(out), "--weights", weights, "--frames", "4"]) == 0
    header, *rows = out.read_text().splitlines()
    assert header == "video_name,y_pred" and [r.split(",")[0] for r in rows] == ["a.mp4", "b.mp4"]
    assert all(0 <= float(r.split(",")[1]) <= 1 for r in rows)

    assert infer.main([str(folder / "a.mp4"), "--weights", str(trained_ensemble["weights"]), "--frames", "4"]) == 0
    assert re.fullmatch(r"Prediction of \[.*a\.mp4\] being Deepfake: \d\.\d{6}\n", capsys.readouterr().out)
    # the top-k rule, on frames capped from 96 to 64 px
    assert infer.main([str(folder / "a.mp4"), "--weights", weights, "--frames", "4", "--video-rule", "top-k",
                       "--max-side", "64"]) == 0
    assert re.fullmatch(r"Prediction of \[.*a\.mp4\] being Deepfake: \d\.\d{6}\n", capsys.readouterr().out)


def test_infer_precision_bf16_and_onnx_refuses_it(trained_ensemble, demo_root, tmp_path, capsys):
    images = sorted((demo_root / "testset").iterdir())[:4]
    weights = str(trained_ensemble["weights"])
    scores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.csv"
        assert infer.main([*map(str, images), "--csv", str(out), "--weights", weights, "--precision", precision]) == 0
        scores[precision] = np.array([p for _, p in read_prediction_csv(out)])
    assert len(scores["bf16"]) == 4 and np.abs(scores["bf16"] - scores["fp32"]).max() < 0.05
    capsys.readouterr()
    assert infer.main([str(images[0]), "--weights", weights, "--backend", "onnx", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fp32" in err and "--backend torch" in err


def test_infer_threads_leave_the_decode_workers_their_cores(trained_ensemble, demo_root, tmp_path, monkeypatch):
    import torch

    from ensemble import predictor

    images = [str(p) for p in sorted((demo_root / "testset").iterdir())[:2]]
    weights = str(trained_ensemble["weights"])
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(predictor.os, "cpu_count", lambda: 6)  # 6 cores, 3 workers: 3 threads
        assert infer.main([*images, "--csv", str(tmp_path / "a.csv"), "--weights", weights, "--device", "cpu",
                           "--workers", "3"]) == 0
        assert torch.get_num_threads() == 3
        assert infer.main([*images, "--csv", str(tmp_path / "b.csv"), "--weights", weights, "--device", "cpu",
                           "--workers", "3", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert infer.main([images[0], "--weights", weights, "--threads", "-1"]) == 2

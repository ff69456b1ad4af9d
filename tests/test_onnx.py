"""ONNX export and the onnxruntime backend: the experts the cpu profile runs or defines (forensic, mesonet, resnet
on SRM residuals, dae), trained for an epoch, exported, scored by `infer.py --backend onnx`
as by torch, the stacker's TTA spreads included; a changed file is refused; an expert that
cannot be exported is left out."""
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

import infer
from ensemble import fit as ensemble_fit
from experts import export_onnx
from experts import train as experts_train
from experts.forensic import ForensicStatistics
from experts.weights import MANIFEST, sha256_file
from helpers import tiny_overrides

CPU_EXPERTS = ["forensic", "mesonet", "resnet", "dae"]


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """The four cpu experts (tiny sizes) after one epoch, and a logistic-regression stacker
    over them with two TTA views, so that every part of the scoring path is exercised."""
    tmp = tmp_path_factory.mktemp("onnx")
    overrides = tiny_overrides(tmp, epochs=1, experts=",".join(CPU_EXPERTS)) + [
        "expert.resnet.image_size=64", "expert.forensic.epochs=1", "expert.mesonet.epochs=1", "ensemble.method=logreg",
        "ensemble.editing_fakes=0", "train.tta=[hflip,scale]"]
    assert experts_train.main([str(demo_root)] + overrides) == 0
    assert ensemble_fit.main([str(demo_root)] + overrides) == 0
    return tmp / "weights"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_export") / "onnx"
    assert export_onnx.main(["--weights", str(trained), "--out", str(out)]) == 0
    return out


def images_of(demo_root):
    return sorted((demo_root / "testset").glob("*.jpg")) + sorted((demo_root / "valset").glob("*.jpg"))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_matrix_spectrum_equals_the_fft():
    """The forensic spectrum is a matrix product so that it exports; it must still be the
    radial profile of fft2's log power (the zero frequency, 0 after the mean is removed, aside)."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 1, 12, 12), size=(64, 64), mode="bicubic")
    grey = (smooth[:, 0] + 0.02 * torch.rand(3, 64, 64)).clamp(0, 1)
    got = ForensicStatistics(grid=2).spectrum(grey).double()

    centre = grey[:, 16:48, 16:48].double()
    power = torch.fft.fftshift(torch.fft.fft2(centre - centre.mean(dim=(1, 2), keepdim=True)).abs() ** 2, dim=(-2, -1))
    power[:, 16, 16] = 0
    yy, xx = torch.meshgrid(torch.arange(32) - 16, torch.arange(32) - 16, indexing="ij")
    bins = (torch.sqrt(yy.float() ** 2 + xx.float() ** 2) / 16 * 16).long().flatten()
    expected = torch.stack([(power + 1e-8).log().flatten(1)[:, bins == b].mean(1) for b in range(16)], dim=1)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not math.isclose(float(expected[0, 0]), float(expected[0, 5]))  # a profile, not a constant


def test_manifest_records_files_sources_and_settings(trained, exported):
    manifest = json.loads((exported / export_onnx.ONNX_MANIFEST).read_text())
    weights_manifest = json.loads((trained / MANIFEST).read_text())
    assert list(manifest["experts"]) == CPU_EXPERTS and manifest["opset"] == export_onnx.OPSET
    for name, entry in manifest["experts"].items():
        assert entry["file"] == f"{name}.onnx" and entry["sha256"] == sha256_file(exported / entry["file"])
        assert entry["source_sha256"] == weights_manifest["experts"][name]["sha256"]
        assert entry["input_size"] == weights_manifest["experts"][name]["input_size"] == 64
        assert entry["max_difference_from_torch"] <= export_onnx.TOLERANCE
        assert entry["outputs"] == ["p_fake"]
    stacker = weights_manifest["ensemble"]["stacker"]
    assert manifest["ensemble"] == {"file": "ensemble.json", "sha256": stacker["sha256"], "experts": CPU_EXPERTS,
                                    "tta": ["hflip", "scale"]}
    assert sha256_file(exported / "ensemble.json") == stacker["sha256"]
    assert manifest["face"] == weights_manifest["experts"]["forensic"]["face"]
    assert "not_exported" not in manifest


def test_onnx_backend_scores_like_torch(trained, exported, demo_root):
    """Every expert's TTA-averaged P(fake) and spread, and the stacker's output, per image
    (onnxruntime computes in float32: torch too, whatever `auto` chooses on this machine)."""
    from ensemble.onnx_backend import OnnxExpert, onnx_detector
    from ensemble.predictor import EnsembleDetector, score_samples

    with_torch = EnsembleDetector.from_weights(trained, device="cpu", precision="fp32")
    with_onnx = onnx_detector(exported)
    assert all(isinstance(e, OnnxExpert) for e in with_onnx.experts.values())
    assert with_onnx.stacker is not None and with_onnx.tta == with_torch.tta == ["hflip", "scale"]
    assert with_onnx.feature_names() == with_torch.feature_names()
    assert with_torch.feature_names()[-1] == "dae_tta_spread"
    paths = images_of(demo_root)
    p_torch, f_torch, errors_torch = score_samples(with_torch, paths, batch_size=16)
    p_onnx, f_onnx, errors_onnx = score_samples(with_onnx, paths, batch_size=16)
    assert not errors_torch and not errors_onnx
    np.testing.assert_allclose(f_onnx, f_torch, atol=1e-4, rtol=0)
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4, rtol=0)
    assert np.ptp(p_torch) > 1e-3  # the images are told apart: the comparison means something


def test_infer_csv_with_onnx_matches_torch(trained, exported, demo_root, tmp_path):
    testset = str(demo_root / "testset")
    common = ["--workers", "0", "--batch-size", "8"]
    assert infer.main([testset, "--csv", str(tmp_path / "torch.csv"), "--weights", str(trained),
                       "--precision", "fp32"] + common) == 0
    assert infer.main([testset, "--csv", str(tmp_path / "onnx.csv"), "--weights", str(exported),
                       "--backend", "onnx"] + common) == 0
    by_torch, by_onnx = read_csv(tmp_path / "torch.csv"), read_csv(tmp_path / "onnx.csv")
    assert [row[0] for row in by_onnx] == [row[0] for row in by_torch] and len(by_onnx) == 17
    np.testing.assert_allclose([float(r[1]) for r in by_onnx[1:]], [float(r[1]) for r in by_torch[1:]],
                               atol=1e-4, rtol=0)


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_changed_onnx_file_is_refused(exported, demo_root, tmp_path, capsys):
    copy = tmp_path / "onnx"
    shutil.copytree(exported, copy)
    model = bytearray((copy / "mesonet.onnx").read_bytes())
    model[len(model) // 2] ^= 0x01
    (copy / "mesonet.onnx").write_bytes(bytes(model))
    args = [str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(copy), "--backend", "onnx"]
    capsys.readouterr()
    assert infer.main(args) == 2
    line = one_error_line(capsys)
    assert "mesonet.onnx" in line and "sha256" in line
    assert not (tmp_path / "o.csv").exists()

    # corrupt, with the manifest "agreeing": onnxruntime refuses it, in one line too
    (copy / "mesonet.onnx").write_bytes(b"not a model")
    manifest = json.loads((copy / export_onnx.ONNX_MANIFEST).read_text())
    manifest["experts"]["mesonet"]["sha256"] = sha256_file(copy / "mesonet.onnx")
    (copy / export_onnx.ONNX_MANIFEST).write_text(json.dumps(manifest))
    assert infer.main(args) == 2
    assert "cannot load" in one_error_line(capsys)


def test_torch_weights_given_to_the_onnx_backend(trained, demo_root, tmp_path, capsys):
    capsys.readouterr()
    assert infer.main([str(demo_root / "testset"), "--weights", str(trained), "--backend", "onnx"]) == 2
    assert "no ONNX export here (these are torch weights)" in one_error_line(capsys)
    assert export_onnx.main(["--weights", str(trained), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "one .onnx file is written per expert" in one_error_line(capsys)


def test_expert_that_cannot_be_exported_is_left_out(trained, demo_root, tmp_path, capsys, monkeypatch):
    """An FFT (which torch's exporter cannot write) in the forensic expert: it is named on one
    line and left out, the stacker with it; the others still export and score."""
    def spectrum_by_fft(self, grey):
        return torch.fft.fft2(grey).abs().mean(dim=(1, 2))[:, None].expand(-1, 16)

    monkeypatch.setattr(ForensicStatistics, "spectrum", spectrum_by_fft)
    manifest_path = tmp_path / "deploy" / "detector.json"
    capsys.readouterr()
    assert export_onnx.main(["--weights", str(trained), "--out", str(manifest_path)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "'forensic'" in warnings[0] and "cannot be exported" in warnings[0] and "fft" in warnings[0].lower()
    assert "stacker" in warnings[1]
    manifest = json.loads(manifest_path.read_text())
    assert list(manifest["experts"]) == ["mesonet", "resnet", "dae"] and "ensemble" not in manifest
    assert set(manifest["not_exported"]) == {"forensic"}
    assert not (tmp_path / "deploy" / "forensic.onnx").exists()
    assert infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(manifest_path),
                       "--backend", "onnx", "--workers", "0"]) == 0
    assert len(read_csv(tmp_path / "o.csv")) == 17


def test_onnx_speed_benchmark(tmp_path):
    from bench import onnx_speed

    out = tmp_path / "speed.json"
    assert onnx_speed.main(["--batch", "2", "--repeats", "1", "--threads", "1", "--out", str(out),
                            "experts=[mesonet,resnet]", "expert.mesonet.image_size=64",
                            "expert.resnet.model=test_resnet"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["expert"] for r in rows] == ["mesonet", "resnet", "all experts"]
    assert [r["input_size"] for r in rows] == [64, 128, None]  # the profile's sizes unless overridden
    assert all(r["torch_img_s"] > 0 and r["onnxruntime_img_s"] > 0 for r in rows)
    assert rows[-1]["onnxruntime_s"] == pytest.approx(rows[0]["onnxruntime_s"] + rows[1]["onnxruntime_s"])
    assert onnx_speed.main(["--threads", "two"]) == 2

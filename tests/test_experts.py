"""Every registered expert: interface, trainability, DAE calibration, pretrained weights offline."""
import time

import pytest
import timm
import torch
import torch.nn as nn

from configs import ExpertConfig, LossConfig, load_config
from experts import EXPERTS, create_expert
from experts.base import PretrainedWeightsError
from experts.clip_vit import is_layernorm_param

SIZE = 64
CASES = [
    ("convnext", "test_convnext", "all"),
    ("efficientnet", "test_efficientnet", "all"),
    ("clip", "test_vit", "layernorm_head"),
    ("clip", "test_vit", "all"),
    ("dae", "test_resnet", "all"),
    ("resnet", "test_resnet", "all"),
    ("mesonet", "mesonet4", "all"),
    ("forensic", "stats", "all"),
]
IDS = [f"{k}-{t}" for k, _, t in CASES]
SRM_CASES = [("resnet", "test_resnet"), ("convnext", "test_convnext"), ("efficientnet", "test_efficientnet"),
             ("clip", "test_vit"), ("mesonet", "mesonet4")]


def make(kind, model, trainable="all", **kw):
    torch.manual_seed(0)
    return create_expert(ExpertConfig(kind=kind, model=model, trainable=trainable, **kw), SIZE)


def batch(n=4, size=SIZE):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g), torch.tensor([0, 1] * (n // 2))


def test_registry_holds_the_four_kinds():
    assert {"convnext", "efficientnet", "clip", "dae", "resnet", "mesonet"} <= set(EXPERTS)


def test_mesonet4_is_the_papers_size():
    expert = create_expert(ExpertConfig(kind="mesonet"), 256)
    counted = sum(p.numel() for n, p in expert.named_parameters() if not n.startswith("projector."))
    assert 27_000 < counted < 29_000  # Afchar et al.: 27,977 at 256 px (one output; here two)
    with pytest.raises(ValueError, match="divisible by 32"):
        create_expert(ExpertConfig(kind="mesonet"), 100)


@pytest.mark.parametrize("kind,model", SRM_CASES)
def test_srm_input_filter_adds_noise_residual_channels(kind, model):
    expert = make(kind, model, input_filter="srm").eval()
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


@pytest.mark.parametrize("kind,model,trainable", CASES, ids=IDS)
def test_expert_interface(kind, model, trainable):
    expert = make(kind, model, trainable)
    assert expert.kind == kind and expert.image_size == SIZE
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
    if kind != "forensic":  # fixed statistics: no learned spatial map to explain
        assert isinstance(expert.gradcam_layer(), nn.Module)
    # normalisation travels with the weights
    assert "mean" in expert.state_dict() and "std" in expert.state_dict()


@pytest.mark.parametrize("kind,model,trainable", CASES, ids=IDS)
def test_training_loss_and_backward(kind, model, trainable):
    expert = make(kind, model, trainable)
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


def test_is_layernorm_param_handles_top_level_parameters():
    vit = timm.create_model("test_vit", num_classes=0)
    assert is_layernorm_param(vit, "norm.weight")
    assert is_layernorm_param(vit, "blocks.0.norm1.bias")
    assert not is_layernorm_param(vit, "blocks.0.attn.qkv.weight")
    assert not is_layernorm_param(vit, "cls_token")   # parameter of the model itself
    assert not is_layernorm_param(vit, "pos_embed")


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
    cfg = load_config("cpu")
    ecfg = cfg.expert[name]
    size = ecfg.image_size or cfg.data.image_size
    expert = create_expert(ecfg, size).eval()
    with torch.no_grad():
        p = expert.predict_proba(torch.rand(1, 3, size, size))
    assert p.shape == (1,)

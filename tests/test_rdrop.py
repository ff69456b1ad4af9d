"""The KL term's dropout view (`loss.kl_view: dropout`, R-Drop) and per-expert losses
(`expert.<name>.loss`): the loss on hand-made logits, which experts can draw twice, and the
config that selects it."""
import json
import math

import pytest
import torch

from common.errors import ConfigError
from configs import ExpertConfig, LossConfig, load_config, loss_of
from experts import create_expert
from experts import train as experts_train
from experts.base import check_expert_config
from experts.losses import classification_losses, has_dropout, kl_consistency, symmetric_kl
from experts.weights import MANIFEST
from helpers import tiny_overrides

SIZE = 64


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, SIZE, SIZE, generator=g), torch.tensor([0, 1] * (n // 2))


def test_symmetric_kl_is_the_mean_of_both_directions_and_flows_into_both():
    a = torch.tensor([[2.0, -1.0], [0.0, 1.0]], requires_grad=True)
    b = torch.tensor([[0.5, 0.5], [1.0, -2.0]], requires_grad=True)
    p, q = a.softmax(1).detach(), b.softmax(1).detach()
    by_hand = 0.5 * sum(float((p[i] * (p[i] / q[i]).log()).sum() + (q[i] * (q[i] / p[i]).log()).sum())
                        for i in range(2)) / 2
    kl = symmetric_kl(a, b)
    assert kl.item() == pytest.approx(by_hand, rel=1e-5)
    assert symmetric_kl(b, a).item() == pytest.approx(by_hand, rel=1e-5)
    kl.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0  # neither draw is a fixed target


def test_the_dropout_view_takes_the_ce_of_both_draws_and_the_symmetric_kl():
    first = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    second = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    total, logs = classification_losses(first, y, LossConfig(kl=2.0, kl_view="dropout"), second)
    ce = 0.5 * (torch.nn.functional.cross_entropy(first, y) + torch.nn.functional.cross_entropy(second, y))
    assert logs["ce"] == pytest.approx(ce.item(), rel=1e-6)
    assert logs["kl"] == pytest.approx(symmetric_kl(first, second).item(), rel=1e-6)
    assert total.item() == pytest.approx(ce.item() + 2.0 * logs["kl"], rel=1e-6)
    # the noise view is unchanged: the clean CE alone, and the one-sided KL
    _, noise_logs = classification_losses(first, y, LossConfig(kl=2.0), second)
    assert noise_logs["ce"] == pytest.approx(torch.nn.functional.cross_entropy(first, y).item(), rel=1e-6)
    assert noise_logs["kl"] == pytest.approx(kl_consistency(first, second).item(), rel=1e-6)
    assert not math.isclose(noise_logs["kl"], logs["kl"])


def test_has_dropout_sees_dropout_and_drop_path_with_a_rate_only():
    assert has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert not has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))
    tiny = dict(kind="timm", model="test_convnext")
    assert not has_dropout(create_expert(ExpertConfig(**tiny), SIZE))
    assert has_dropout(create_expert(ExpertConfig(**tiny, model_args={"drop_path_rate": 0.1}), SIZE))
    assert has_dropout(create_expert(ExpertConfig(**tiny, drop_rate=0.2), SIZE))


@pytest.mark.parametrize("ecfg", [ExpertConfig(kind="forensic", relative=True),
                                  ExpertConfig(kind="timm", model="test_convnext", drop_rate=0.3)],
                         ids=["forensic", "timm-with-dropout"])
def test_an_expert_trains_under_the_dropout_view(ecfg):
    torch.manual_seed(0)
    expert = create_expert(ecfg, SIZE).train()
    loss_cfg = LossConfig(kl=1.0, kl_view="dropout")
    params = expert.trainable_parameters(loss_cfg)
    x, y = batch()
    loss, logs = expert.training_loss(x, y, loss_cfg)
    assert set(logs) == {"ce", "kl"} and logs["kl"] > 0  # two draws that differ
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    expert.eval()  # in eval mode the two draws are one: the term vanishes
    _, eval_logs = expert.training_loss(x, y, loss_cfg)
    assert eval_logs["kl"] == pytest.approx(0.0, abs=1e-6)


def test_the_forensic_expert_computes_its_statistics_once_for_both_draws():
    expert = create_expert(ExpertConfig(kind="forensic", relative=True), SIZE).train()
    calls = []
    expert.statistics.register_forward_hook(lambda *_: calls.append(1))
    expert.training_loss(*batch(), LossConfig(kl=1.0, kl_view="dropout"))
    assert len(calls) == 1


def test_the_dropout_view_on_an_expert_without_dropout_is_a_config_error():
    expert = create_expert(ExpertConfig(kind="timm", model="test_convnext"), SIZE)
    with pytest.raises(ConfigError, match="no dropout or drop path") as err:
        expert.trainable_parameters(LossConfig(kl=1.0, kl_view="dropout"))
    assert "\n" not in str(err.value)
    expert.trainable_parameters(LossConfig(kl=0.0, kl_view="dropout"))  # no KL term: nothing to draw


def test_an_expert_trains_with_its_own_loss_values_over_the_shared_ones():
    cfg = load_config("cpu", ["loss.nce=0.2", "expert.forensic.loss.kl=1", "expert.forensic.loss.kl_view=dropout"])
    own = loss_of(cfg, cfg.expert["forensic"], "forensic")
    assert (own.kl, own.kl_view, own.nce) == (1.0, "dropout", 0.2) and isinstance(own.kl, float)
    assert loss_of(cfg, cfg.expert["resnet"], "resnet") == cfg.loss  # no values of its own
    assert cfg.loss.kl == 0.0 and cfg.loss.kl_view == "noise"  # the shared values are not touched


@pytest.mark.parametrize("override,named", [
    ("expert.forensic.loss.kl_veiw=dropout", "expert.forensic.loss.kl_veiw"),
    ("expert.forensic.loss.kl=strong", "expert.forensic.loss.kl"),
    ("expert.forensic.loss.kl_view=both", "expert.forensic.loss.kl_view"),
])
def test_a_bad_expert_loss_is_an_error_naming_it(override, named):
    cfg = load_config("cpu", [override])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check_expert_config(cfg.expert["forensic"], "forensic")  # the trainer's check before any data is read


def test_a_bad_shared_kl_view_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"^loss\.kl_view: 'dropuot' is not one of"):
        load_config("cpu", ["loss.kl_view=dropuot"])


def test_the_trainer_gives_each_expert_its_own_losses(demo_root, tmp_path, crop_cache):
    """expert.forensic.loss: the forensic expert trains with the dropout KL (its history logs
    the term), the resnet beside it with the shared losses (CE alone, no KL logged)."""
    overrides = tiny_overrides(tmp_path, epochs=1, experts="forensic,resnet", cache_dir=crop_cache) + [
        "expert.forensic.epochs=1", "expert.forensic.loss.kl=1", "expert.forensic.loss.kl_view=dropout"]
    assert experts_train.main([str(demo_root)] + overrides) == 0
    trained = json.loads((tmp_path / "weights" / MANIFEST).read_text())["experts"]
    (forensic_epoch,), (resnet_epoch,) = (trained[name]["training"]["history"] for name in ("forensic", "resnet"))
    assert forensic_epoch["train_kl"] > 0 and "train_kl" not in resnet_epoch

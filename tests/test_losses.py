"""The three training losses on hand-made cases, and their weighting/switches."""
import math

import pytest
import torch

from configs import LossConfig
from experts.losses import classification_losses, kl_consistency, supervised_nce


def manual_log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


LOGITS = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
TARGETS = torch.tensor([0, 1, 1])


def test_cross_entropy_equals_manual_formula():
    expected = -sum(manual_log_softmax(row)[t] for row, t in zip(LOGITS.tolist(), TARGETS.tolist())) / 3
    loss, logs = classification_losses(LOGITS, TARGETS, LossConfig(ce=1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs == {"ce": pytest.approx(expected, rel=1e-6)}


def test_label_smoothing():
    eps = 0.2
    expected = 0.0
    for row, t in zip(LOGITS.tolist(), TARGETS.tolist()):
        logp = manual_log_softmax(row)
        # smoothed target: (1 - eps) on the label + eps / K on every class (K = 2)
        q = [eps / 2 + (1 - eps) * (k == t) for k in range(2)]
        expected -= sum(qk * lk for qk, lk in zip(q, logp))
    expected /= 3
    loss, logs = classification_losses(LOGITS, TARGETS, LossConfig(ce=1.0, label_smoothing=eps))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    plain, _ = classification_losses(LOGITS, TARGETS, LossConfig(ce=1.0))
    assert loss.item() != pytest.approx(plain.item())


def test_kl_is_zero_for_equal_logits():
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    assert kl_consistency(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_hand_computed_two_class():
    clean = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])   # p = (0.5, 0.5), (0.75, 0.25)
    noisy = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0]])   # q = (0.8, 0.2), (0.5, 0.5)
    kl0 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = (kl0 + kl1) / 2  # KL(p_clean || p_noisy), batch mean
    assert kl_consistency(clean, noisy).item() == pytest.approx(expected, rel=1e-5)


def test_kl_gradient_flows_to_noisy_only():
    clean = torch.tensor([[1.0, -1.0]], requires_grad=True)
    noisy = torch.tensor([[0.0, 0.5]], requires_grad=True)
    kl_consistency(clean, noisy).backward()
    assert clean.grad is None
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0


def unit(*v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_supervised_nce_hand_computed():
    t = 0.5
    z = [unit(1, 0), unit(1, 1), unit(0, 1), unit(-1, 1)]
    y = [0, 0, 1, 1]
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    total = 0.0
    for i in range(4):
        denom = sum(math.exp(dot(z[i], z[a]) / t) for a in range(4) if a != i)
        positives = [p for p in range(4) if p != i and y[p] == y[i]]
        total += -sum(math.log(math.exp(dot(z[i], z[p]) / t) / denom) for p in positives) / len(positives)
    expected = total / 4
    got = supervised_nce(torch.tensor(z), torch.tensor(y), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_supervised_nce_skips_anchors_without_positive():
    t = 0.5
    z = torch.tensor([unit(1, 0), unit(1, 1), unit(0, 1)])
    y = torch.tensor([0, 0, 1])  # anchor 2 has no positive: averaged over anchors 0 and 1 only
    s01 = z[0] @ z[1] / t
    s02 = z[0] @ z[2] / t
    s12 = z[1] @ z[2] / t
    l0 = -(s01 - torch.logsumexp(torch.stack([s01, s02]), 0))
    l1 = -(s01 - torch.logsumexp(torch.stack([s01, s12]), 0))
    assert supervised_nce(z, y, t).item() == pytest.approx(((l0 + l1) / 2).item(), rel=1e-5)


def test_supervised_nce_without_positives_is_zero():
    z = torch.nn.functional.normalize(torch.randn(3, 4, requires_grad=True), dim=1)
    loss = supervised_nce(z, torch.tensor([0, 1, 2]), 0.1)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    single = supervised_nce(z[:1], torch.tensor([1]), 0.1)
    assert single.item() == 0.0


def test_losses_weighted_sum_and_logs():
    clean = LOGITS.clone()
    noisy = LOGITS.flip(1)
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=1)
    cfg = LossConfig(ce=0.5, kl=2.0, nce=3.0, nce_temperature=0.5)
    loss, logs = classification_losses(clean, TARGETS, cfg, noisy, z)
    assert set(logs) == {"ce", "kl", "nce"}
    ce = classification_losses(clean, TARGETS, LossConfig(ce=1.0))[0].item()
    kl = kl_consistency(clean, noisy).item()
    nce = supervised_nce(z, TARGETS, 0.5).item()
    assert logs["ce"] == pytest.approx(ce) and logs["kl"] == pytest.approx(kl)
    assert logs["nce"] == pytest.approx(nce)
    assert loss.item() == pytest.approx(0.5 * ce + 2.0 * kl + 3.0 * nce, rel=1e-6)


@pytest.mark.parametrize("weights,present", [
    (dict(ce=1.0, kl=0.0, nce=0.0), {"ce"}),
    (dict(ce=0.0, kl=1.0, nce=0.0), {"kl"}),
    (dict(ce=0.0, kl=0.0, nce=1.0), {"nce"}),
    (dict(ce=1.0, kl=1.0, nce=0.0), {"ce", "kl"}),
    (dict(ce=0.0, kl=0.0, nce=0.0), set()),
])
def test_zero_weight_switches_term_off(weights, present):
    z = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    loss, logs = classification_losses(LOGITS, TARGETS, LossConfig(**weights), LOGITS.flip(1), z)
    assert set(logs) == present
    expected = sum(logs.values())
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_kl_and_nce_need_their_inputs():
    loss, logs = classification_losses(LOGITS, TARGETS, LossConfig(ce=1.0, kl=1.0, nce=1.0))
    assert set(logs) == {"ce"}

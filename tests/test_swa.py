"""Stochastic weight averaging (experts/swa.py) in the one trainer: the exported mean of the
last epochs' weights, under the learning rate's cosine to 0."""
import json
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from experts import train as experts_train
from experts.swa import warmup_cosine
from experts.weights import MANIFEST
from helpers import tiny_overrides


def test_swa_exports_the_mean_of_the_last_epochs_with_batchnorm_measured_again(demo_root, tmp_path, crop_cache):
    """swa_fraction 0.5 of 4 epochs: the exported parameters are the mean of epochs 3 and 4's
    raw weights, and BatchNorm's statistics are measured again for them, not averaged; the
    learning rate runs to 0 at the last epoch, as without SWA."""
    raw_states = []
    original = experts_train.save_checkpoint

    def keep_raw_weights(run, epoch):
        raw_states.append({k: v.detach().clone() for k, v in run.expert.state_dict().items()})
        original(run, epoch)

    overrides = tiny_overrides(tmp_path, epochs=4, experts="resnet", cache_dir=crop_cache) + [
        "expert.resnet.swa_fraction=0.5", "expert.resnet.lr=0.004"]
    with mock.patch.object(experts_train, "save_checkpoint", side_effect=keep_raw_weights):
        assert experts_train.main([str(demo_root)] + overrides) == 0
    assert len(raw_states) == 4
    exported = load_file(str(tmp_path / "weights" / "resnet.safetensors"))
    last_two = raw_states[2:]
    batchnorm_buffers = {k for k in exported if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert batchnorm_buffers
    for key in set(exported) - batchnorm_buffers:
        torch.testing.assert_close(exported[key], (last_two[0][key] + last_two[1][key]) / 2, msg=key)
    assert all(not torch.equal(exported[key], last_two[1][key]) for key in exported
               if key.endswith("weight") and key not in batchnorm_buffers and "backbone" in key)
    means = [k for k in batchnorm_buffers if k.endswith("running_mean")]
    averaged = {k: (last_two[0][k] + last_two[1][k]) / 2 for k in means}
    assert all(not torch.allclose(exported[k], averaged[k]) for k in means)
    training = json.loads((tmp_path / "weights" / MANIFEST).read_text())["experts"]["resnet"]["training"]
    assert training["weights"] == "mean of epochs 3-4" and np.isfinite(training["val_auc"])
    assert training["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ran to 0
    # measured in one pass over the training crops (batches of 16), counted from zero
    batches = -(-training["data"]["trainset"]["n"] // 16)
    assert all(int(exported[k.replace("running_mean", "num_batches_tracked")]) == batches for k in means)


def test_the_schedule_warms_up_then_runs_a_cosine_to_0():
    steps, warmup = 10 * 20, 20
    factor = warmup_cosine(steps, warmup)
    assert factor(0) == 1 / warmup and factor(warmup) == 1.0
    assert factor((steps + warmup) // 2) == pytest.approx(0.5)
    assert factor(steps - 1) < 1e-3 and factor(steps) == factor(steps + 5) == 0.0


def test_validating_every_second_epoch_exports_the_same_average(demo_root, tmp_path, crop_cache):
    """validate_every 2 of 3 epochs validates epochs 2 and 3 (the last) and only logs epoch 1's
    loss; validation takes no randomness from training, so the averaged weights are the same."""
    exported = {}
    for every in (1, 2):
        overrides = tiny_overrides(tmp_path / str(every), epochs=3, experts="resnet", cache_dir=crop_cache) + [
            "expert.resnet.swa_fraction=0.5", f"expert.resnet.validate_every={every}"]
        assert experts_train.main([str(demo_root)] + overrides) == 0
        weights = tmp_path / str(every) / "weights"
        exported[every] = load_file(str(weights / "resnet.safetensors"))
        history = json.loads((weights / MANIFEST).read_text())["experts"]["resnet"]["training"]["history"]
        assert [("val_auc" in row) for row in history] == ([True] * 3 if every == 1 else [False, True, True])
    assert exported[1].keys() == exported[2].keys()
    assert all(torch.equal(exported[1][k], exported[2][k]) for k in exported[1])

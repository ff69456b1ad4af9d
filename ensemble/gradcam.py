"""Grad-CAM heatmaps: which image regions pushed a detector towards "fake".

Grad-CAM (Selvaraju et al., 2017) weights each channel of a layer's output by
the average gradient of the class score with respect to that channel, sums
the weighted channels, keeps the positive part, and upsamples the result to
the input size.

Works for CNN layers that output (B, C, h, w) and for ViT-style blocks that
output tokens (B, N, C); tokens are reshaped to a square grid after dropping
the ``num_prefix_tokens`` leading tokens (class / register tokens).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def grad_cam(model, target_layer, x, class_index=1, num_prefix_tokens=0):
    """Heatmaps of shape (B, H, W), each scaled to [0, 1].

    model: returns logits (B, 2) -- class_index picks the column -- or a
        single fake logit (B,) / (B, 1); then class_index 1 uses the logit and
        class_index 0 its negation (the "real" evidence).
    target_layer: submodule whose output is explained (e.g. the last conv
        stage, or the last transformer block); it must run once per forward.
        If it returns a tuple (some transformer blocks do), the first element
        is used.
    x: input batch (B, C, H, W).

    The model is run in eval mode and every module's train/eval flag is
    restored afterwards; hooks are always removed; parameter .grad fields are
    left untouched.
    """
    captured = {}

    def save_activation_and_its_gradient(module, inputs, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        # clone: a later in-place op (e.g. ReLU(inplace=True)) must not change
        # the saved values. The tensor hook receives d(score)/d(output).
        captured["activation"] = output.detach().clone()
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad.detach()))

    modes = {module: module.training for module in model.modules()}
    handle = target_layer.register_forward_hook(save_activation_and_its_gradient)
    try:
        model.eval()
        # Gradients flow from the input, so this works even for frozen models
        # and when called inside torch.no_grad().
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            score = _class_score(model(x), class_index)
            # autograd.grad (not .backward) so parameter .grad stays untouched.
            torch.autograd.grad(score.sum(), x)
    finally:
        handle.remove()
        for module, was_training in modes.items():
            module.training = was_training

    if "gradient" not in captured:
        raise RuntimeError("target_layer did not run in the forward pass, or the score does not depend on it")
    activation = _as_feature_map(captured["activation"], num_prefix_tokens)
    gradient = _as_feature_map(captured["gradient"], num_prefix_tokens)
    return _heatmap(activation, gradient, size=x.shape[-2:])


def _class_score(output, class_index):
    """Per-sample score of the explained class from the model output."""
    if not torch.is_tensor(output):
        raise TypeError(f"model must return a tensor of logits, got {type(output).__name__}")
    batch = output.shape[0]
    if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
        fake_logit = output.reshape(batch)
        return fake_logit if class_index == 1 else -fake_logit
    if output.dim() == 2:
        return output[:, class_index]
    raise ValueError(f"expected logits of shape (B,), (B, 1) or (B, K), got {tuple(output.shape)}")


def _as_feature_map(tensor, num_prefix_tokens):
    """(B, C, h, w) as is; tokens (B, N, C) -> (B, C, side, side) without prefix tokens."""
    if tensor.dim() == 4:
        return tensor
    if tensor.dim() != 3:
        raise ValueError(f"target layer output must be (B, C, h, w) or (B, N, C), got {tuple(tensor.shape)}")
    patches = tensor[:, num_prefix_tokens:, :]
    batch, n_patches, channels = patches.shape
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(
            f"{n_patches} patch tokens do not form a square grid; "
            f"check num_prefix_tokens (got {num_prefix_tokens})"
        )
    return patches.reshape(batch, side, side, channels).permute(0, 3, 1, 2)


def _heatmap(activation, gradient, size):
    """Grad-CAM map from a feature map and its gradient, upsampled and scaled to [0, 1]."""
    activation, gradient = activation.float(), gradient.float()  # half-precision models
    channel_weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((channel_weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    high = cam.amax(dim=(1, 2), keepdim=True)
    span = high - low
    # A flat map (e.g. no positive evidence at all) becomes all zeros, not NaN.
    cam = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.cpu().numpy().astype(np.float32)

"""Loading the Stable Diffusion pipelines that `data_prep.diffusion` makes its fakes with.

    pipelines = load_pipelines("path/to/sd15", device="auto")   # .inpaint, and .img2img or None

A local pipeline directory, or a hub id (from the local cache only when HF_HUB_OFFLINE is
set); anything that cannot be loaded is one ModelLoadError line naming the model and why.
A plain SD checkpoint (UNet with 4 input channels) does both modes from one set of weights;
an inpainting checkpoint (9 channels) cannot do img2img without `img2img_model`.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

from common.errors import UserError
from common.runtime import select_device


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded; the message names it and says why."""


@dataclass
class Pipelines:
    """The loaded pipelines; `img2img` is None when the checkpoint cannot do img2img."""
    inpaint: StableDiffusionInpaintPipeline
    img2img: StableDiffusionImg2ImgPipeline | None
    device: torch.device
    img2img_missing_reason: str = ""


def load_pipelines(model: str, device: str = "auto", img2img_model: str | None = None) -> Pipelines:
    """Load an inpainting pipeline from `model` and, when possible, an img2img one.

    img2img comes from `img2img_model` when given, else from `model`'s own weights when its
    UNet takes 4 channels; an inpainting UNet (9 channels) leaves img2img unavailable.
    """
    device = select_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    inpaint = _from_pretrained(StableDiffusionInpaintPipeline, model, dtype)
    channels = inpaint.unet.config.in_channels
    if channels not in (4, 9):
        raise ModelLoadError(f"{model}: UNet has {channels} input channels; "
                             f"expected 4 (plain SD) or 9 (inpainting)")

    reason = ""
    if img2img_model:
        img2img = _from_pretrained(StableDiffusionImg2ImgPipeline, img2img_model, dtype)
        if img2img.unet.config.in_channels != 4:
            raise ModelLoadError(f"{img2img_model}: --img2img-model must be a plain SD checkpoint "
                                 f"(UNet with 4 input channels), not an inpainting one")
    elif channels == 4:
        img2img = _img2img_sharing_weights(inpaint)
    else:
        img2img = None
        reason = (f"{model} is an inpainting checkpoint (9-channel UNet), which cannot do img2img; "
                  f"pass --img2img-model with a plain SD checkpoint")

    for pipe in (inpaint, img2img):
        if pipe is not None:
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)  # one tqdm bar over the whole run instead
    return Pipelines(inpaint, img2img, device, reason)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _from_pretrained(pipeline_class, model: str, dtype: torch.dtype):
    """`pipeline_class.from_pretrained` with one-line errors and no network when offline."""
    path = Path(model).expanduser()
    is_local = path.is_dir()
    if path.exists() and not is_local:
        raise ModelLoadError(f"{model}: is a file; expected a pipeline directory (with model_index.json)")
    if not is_local and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ModelLoadError(f"{model}: no such directory")
    offline = hub_offline()
    try:
        return pipeline_class.from_pretrained(
            str(path) if is_local else model,
            dtype=dtype,
            local_files_only=is_local or offline,
            safety_checker=None,  # see the module docstring
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        if not is_local and offline:
            raise ModelLoadError(f"{model}: not a local directory and not in the Hugging Face cache, "
                                 f"and HF_HUB_OFFLINE is set; pass a local pipeline directory") from None
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{model}: cannot load pipeline ({first_line})") from None


def _img2img_sharing_weights(pipe) -> StableDiffusionImg2ImgPipeline:
    """An img2img pipeline built from `pipe`'s modules, so the weights are in memory once."""
    accepted = inspect.signature(StableDiffusionImg2ImgPipeline.__init__).parameters
    components = {name: module for name, module in pipe.components.items() if name in accepted}
    return StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)

"""A tiny randomly initialised Stable Diffusion pipeline on disk, for the tests and a CPU demo.

    python -c "from tests.tiny_diffusion import build_tiny_pipeline_dir as b; b('/tmp/tiny_sd')"
    python -m data_prep.diffusion DATA_ROOT --model /tmp/tiny_sd --out /tmp/sd_fakes \\
        --size 64 --steps 2 --limit 4 --device cpu

Nothing is downloaded; the images it makes are noise, but the code path is the real one.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def build_tiny_pipeline_dir(path, inpaint: bool = True) -> Path:
    """Save a tiny randomly initialised SD pipeline to `path` (no download) and return the path.

    Same component classes as a real checkpoint, so loading it exercises the real
    `from_pretrained` path; outputs are noise. `inpaint=True` gives a 9-channel inpainting
    UNet, `inpaint=False` a plain 4-channel one. Sizes follow diffusers' own fast tests; the
    VAE downscales by 2, so `size=64` gives 32x32 latents = the UNet's sample_size.
    """
    path = Path(path)
    tokenizer = _tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):  # same weights every time, global RNG untouched
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
            in_channels=9 if inpaint else 4, out_channels=4, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=1000, layer_norm_eps=1e-5, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    # Stable Diffusion v1's noise schedule.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline_class = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = pipeline_class(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def _tiny_clip_tokenizer():
    """A CLIPTokenizer whose vocabulary is the 256 byte-level symbols (no merges, no download).

    Every byte is a token, so any prompt tokenises; 2 + 2 * 256 = 514 ids < the text
    encoder's vocab_size of 1000.
    """
    symbols = [chr(c) for c in _byte_level_alphabet()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # CLIP's BPE marks the last symbol of a word with </w>
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True)


def _byte_level_alphabet() -> list[int]:
    """GPT-2 / CLIP byte -> printable unicode mapping: printable bytes map to themselves,
    the others to code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return printable + [256 + i for i in range(len(others))]

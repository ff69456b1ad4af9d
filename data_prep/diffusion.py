"""Stable Diffusion fakes made from the real images of a data split.

    python -m data_prep.diffusion DATA_ROOT --model PATH_OR_HUB_ID --out OUT \
        [--split trainset] [--mode inpaint|img2img|both] [--per-real 1] [--batch-size 4] \
        [--steps 25] [--strength 0.6] [--guidance 7.5] [--size 512] \
        [--prompt "a photo of a face"] [--device auto|cpu|cuda] [--seed 0] [--limit N] \
        [--img2img-model PATH_OR_HUB_ID]

Input: `DATA_ROOT/<split>_label.txt` (CSV `img_name,target`, 1 = fake, 0 = real) and the
images in `DATA_ROOT/<split>/`; only the real rows are used. Output, for every real image,
`per_real` fakes per mode:

* `OUT/<split>/<stem>_sdinp_<k>.jpg`: the face region repainted by an inpainting pipeline
  (mask in `OUT/<split>_masks/<stem>_sdinp_<k>.png`);
* `OUT/<split>/<stem>_sdi2i_<k>.jpg`: the whole image re-rendered by img2img;
* one row `<name>,1` per fake appended to `OUT/<split>_label.txt` (created with its header).

Decisions:

* Inpainting mask: a centred ellipse (faces in the data are centred crops) with a seeded
  random jitter of centre and radii, feathered at the edge. The pipeline gets the binarised
  ellipse; the soft one pastes the result back onto the real photo, so only the face is
  fake and the background keeps the real pixels (otherwise the whole image would carry the
  VAE's fingerprint, an easy shortcut for a detector). The saved mask is the soft one.
* Which checkpoint does what: a plain SD checkpoint (UNet with 4 input channels) does both
  modes, from one set of weights (inpainting then blends latents under the mask). An
  inpainting checkpoint (9 input channels: latents + mask + masked image) cannot do
  img2img; give `--img2img-model` for that. Without it, `--mode both` skips img2img with a
  message and `--mode img2img` is an error.
* `--strength` applies to both modes. Below 1 the face is repainted from a noised copy
  of the real one, so pose and lighting survive and the new face fits the head.
* Results are resized back to the real image's size and saved as JPEG with the real
  file's own quantisation tables, so a fake differs from its real only by the edit, not by
  size or compression.
* `safety_checker=None`: the checker is an NSFW filter that replaces flagged outputs by
  black images. Our inputs are ordinary photos of real people's faces; false positives
  would silently become black "fakes" in the training data, and it costs memory and time.
* Resumable and deterministic: existing outputs are skipped and label rows are never
  written twice; each fake uses its own torch.Generator seeded from (seed, index of the
  real image, k, mode), so it does not depend on batch size or on what was done before
  (the mask jitter uses the same seed). CPU fp32 and CUDA fp16 give different pixels.
* Offline: with HF_HUB_OFFLINE set (or a local directory), models load with
  `local_files_only=True`; a hub id that is not in the cache is a one-line error.

CPU smoke demo with a tiny random pipeline (the images are noise, the code path is real):

    python -c "from tests.tiny_diffusion import build_tiny_pipeline_dir as b; b('/tmp/tiny_sd')"
    python -m data_prep.diffusion DATA_ROOT --model /tmp/tiny_sd --out /tmp/sd_fakes \
        --size 64 --steps 2 --limit 4 --device cpu
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

from common.cli import CommandLine, entry_point
from common.errors import UsageError
from common.files import atomic_write
from data_prep.diffusion_pipelines import ModelLoadError, Pipelines, load_pipelines
from data_prep.images import ImageDecodeError, decode_image
from data_prep.labels import append_label_rows, label_path, read_label_file, write_label_file

MODES = ("inpaint", "img2img", "both")
NAME_TAGS = {"inpaint": "sdinp", "img2img": "sdi2i"}  # <stem>_<tag>_<k>.jpg
MODE_IDS = {"inpaint": 0, "img2img": 1}  # part of each fake's seed
DEFAULT_PROMPT = "a photo of a face"
FALLBACK_JPEG_QUALITY = 95  # when the real image is not a JPEG (no tables to copy)

# Centred face ellipse, as fractions of the image width / height, and its jitter.
ELLIPSE_CENTRE_Y = 0.52  # faces sit slightly below the middle of a head-and-shoulders crop
ELLIPSE_RADIUS_X, ELLIPSE_RADIUS_Y = 0.27, 0.35
CENTRE_JITTER, RADIUS_JITTER = 0.04, 0.12  # +- fraction of the size / of the radius
FEATHER_FRACTION = 0.04  # blur sigma of the soft edge, as a fraction of the short side


@dataclass(frozen=True)
class FakeJob:
    """One fake to make: which real image, which variant k, which mode."""
    real_name: str
    real_index: int  # position among the split's real images; part of the seed
    k: int
    mode: str  # "inpaint" or "img2img"

    @property
    def out_name(self) -> str:
        return f"{Path(self.real_name).stem}_{NAME_TAGS[self.mode]}_{self.k}.jpg"

    @property
    def seed_parts(self) -> tuple[int, int, int]:
        return self.real_index, self.k, MODE_IDS[self.mode]


# ================================================================ generating fakes

def generate_fakes(data_root, out, pipelines: Pipelines, split: str = "trainset", mode: str = "inpaint",
                   per_real: int = 1, batch_size: int = 4, steps: int = 25, strength: float = 0.6,
                   guidance: float = 7.5, size: int = 512, prompt: str = DEFAULT_PROMPT, seed: int = 0,
                   limit: int | None = None) -> dict:
    """Make the fakes of one split (see the module docstring) and return a summary dict."""
    _check_settings(mode, per_real, batch_size, steps, strength, size, limit)
    started = time.perf_counter()
    data_root, out = Path(data_root), Path(out)
    real_dir = data_root / split
    image_dir, mask_dir = out / split, out / f"{split}_masks"
    out_labels = label_path(out, split)

    modes, skipped_modes = _usable_modes(mode, pipelines)
    real_names = [name for name, target in read_label_file(label_path(data_root, split)).items()
                  if target == 0][:limit]
    jobs = [FakeJob(name, index, k, m)
            for m in modes for index, name in enumerate(real_names) for k in range(per_real)]

    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    if not out_labels.exists():  # even when nothing is made: the output is a labelled split
        write_label_file(out_labels, [])
    labelled = set(read_label_file(out_labels))
    done = [job for job in jobs if (image_dir / job.out_name).exists()]
    pending = [job for job in jobs if not (image_dir / job.out_name).exists()]
    # Fakes on disk without a row are from a run killed between saving and appending.
    rows_added = append_label_rows(out_labels, [job.out_name for job in done], 1, labelled)

    settings = dict(steps=steps, strength=strength, guidance=guidance, size=size, prompt=prompt, seed=seed)
    generated, unreadable = 0, []
    with tqdm(total=len(pending), desc=f"SD fakes ({split})", unit="img") as bar:
        for m in modes:
            mode_jobs = [job for job in pending if job.mode == m]
            for start in range(0, len(mode_jobs), batch_size):
                batch = mode_jobs[start:start + batch_size]
                made, failed = _make_batch(batch, pipelines, real_dir, image_dir, mask_dir, settings)
                rows_added += append_label_rows(out_labels, [job.out_name for job in made], 1, labelled)
                generated += len(made)
                unreadable.extend(failed)
                bar.update(len(batch))

    return {
        "split": split,
        "modes": list(modes),
        "skipped_modes": skipped_modes,
        "real_images": len(real_names),
        "planned": len(jobs),
        "generated": generated,
        "already_present": len(done),
        "label_rows_added": rows_added,
        "unreadable": sorted(set(unreadable)),
        "seconds": round(time.perf_counter() - started, 2),
        "out": str(out),
    }


def _check_settings(mode, per_real, batch_size, steps, strength, size, limit) -> None:
    if mode not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
    if per_real < 1 or batch_size < 1 or steps < 1:
        raise UsageError("per_real, batch_size and steps must be >= 1")
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"strength must be in (0, 1], got {strength}")
    if int(steps * strength) < 1:  # diffusers runs int(steps * strength) denoising steps
        raise UsageError(f"steps * strength = {steps * strength:g} leaves no denoising step; raise --steps")
    if size < 8 or size % 8:
        raise UsageError(f"size must be a positive multiple of 8 (the VAE's downscale), got {size}")
    if limit is not None and limit < 0:
        raise UsageError(f"limit must be >= 0, got {limit}")


def _usable_modes(mode: str, pipelines: Pipelines) -> tuple[list[str], dict[str, str]]:
    """The modes to run, and {mode: why it is skipped}."""
    wanted = ["inpaint", "img2img"] if mode == "both" else [mode]
    if "img2img" in wanted and pipelines.img2img is None:
        if mode == "img2img":
            raise ModelLoadError(f"img2img unavailable: {pipelines.img2img_missing_reason}")
        print(f"skipping img2img: {pipelines.img2img_missing_reason}", file=sys.stderr)
        return ["inpaint"], {"img2img": pipelines.img2img_missing_reason}
    return wanted, {}


def _make_batch(batch, pipelines, real_dir, image_dir, mask_dir,
                settings: dict) -> tuple[list[FakeJob], list[str]]:
    """Generate and save one batch (all one mode); returns (jobs saved, unreadable reals)."""
    jobs, reals, failed = _decode_reals(batch, real_dir)
    if not jobs:
        return [], failed
    seeds = [_job_seed(settings["seed"], job) for job in jobs]
    masks = None  # img2img changes the whole image
    if jobs[0].mode == "inpaint":
        masks = [face_ellipse_mask(rgb.shape[:2], np.random.default_rng(s)) for rgb, s in zip(reals, seeds)]
    outputs = _run_pipeline(pipelines, reals, masks, seeds, **settings)
    for job, real, output, mask in zip(jobs, reals, outputs, masks or [None] * len(jobs)):
        _save_fake(job, real, output, mask, real_dir, image_dir, mask_dir)
    return jobs, failed


def _decode_reals(batch, real_dir) -> tuple[list[FakeJob], list[np.ndarray], list[str]]:
    """(jobs whose real decoded, their RGB arrays, "file: reason" of the others)."""
    jobs, reals, failed = [], [], []
    for job in batch:
        try:
            reals.append(decode_image(real_dir / job.real_name))
            jobs.append(job)
        except ImageDecodeError as exc:
            print(f"skipping unreadable real image: {exc}", file=sys.stderr)
            failed.append(str(exc))
    return jobs, reals, failed


def _run_pipeline(pipelines, reals, masks, seeds, *, steps, strength, guidance, size, prompt, seed):
    """One pipeline call for the batch: inpainting when `masks` is given, else img2img."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU: same noise on any device
    common = dict(prompt=[prompt] * len(reals), image=[_to_pipeline_size(rgb, size) for rgb in reals],
                  num_inference_steps=steps, strength=strength, guidance_scale=guidance,
                  generator=generators)
    if masks is None:
        return pipelines.img2img(**common).images
    binary_masks = [_binary_pipeline_mask(mask, size) for mask in masks]
    return pipelines.inpaint(**common, mask_image=binary_masks, height=size, width=size).images


def _save_fake(job, real, output, mask, real_dir, image_dir, mask_dir) -> None:
    """Resize to the real's size, paste the face back (inpainting), save fake and mask."""
    fake = _back_to_real_size(output, real)
    if mask is not None:
        fake = _paste_face(fake, real, mask)
        _save_atomically(Image.fromarray(np.rint(mask * 255).astype(np.uint8)),
                         mask_dir / Path(job.out_name).with_suffix(".png").name, format="PNG")
    _save_atomically(Image.fromarray(fake), image_dir / job.out_name, format="JPEG",
                     **jpeg_settings_like(real_dir / job.real_name))


def _job_seed(seed: int, job: FakeJob) -> int:
    # SeedSequence mixes the numbers so that nearby (seed, index, k) give unrelated noise.
    return int(np.random.SeedSequence([seed, *job.seed_parts]).generate_state(1)[0])


def face_ellipse_mask(shape_hw, rng: np.random.Generator) -> np.ndarray:
    """H x W float32 in [0, 1]: a feathered ellipse over a centred face, jittered by `rng`."""
    h, w = shape_hw
    cx = w * (0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER))
    cy = h * (ELLIPSE_CENTRE_Y + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER))
    rx = w * ELLIPSE_RADIUS_X * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
    ry = h * ELLIPSE_RADIUS_Y * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
    mask = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (round(cx), round(cy)), (max(1, round(rx)), max(1, round(ry))),
                0, 0, 360, 1.0, thickness=-1)
    sigma = max(1.0, FEATHER_FRACTION * min(h, w))
    return np.clip(cv2.GaussianBlur(mask, (0, 0), sigma), 0.0, 1.0)


def _binary_pipeline_mask(soft_mask: np.ndarray, size: int) -> Image.Image:
    """White = repaint. The pipeline gets the ellipse itself; the feather is for pasting back."""
    binary = np.where(soft_mask >= 0.5, 255, 0).astype(np.uint8)
    return Image.fromarray(binary).resize((size, size), Image.Resampling.NEAREST)


def _to_pipeline_size(rgb: np.ndarray, size: int) -> Image.Image:
    # Square input: the aspect change is undone when the result is resized back.
    return Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)


def _back_to_real_size(output: Image.Image, real: np.ndarray) -> np.ndarray:
    h, w = real.shape[:2]
    return np.asarray(output.convert("RGB").resize((w, h), Image.Resampling.BICUBIC))


def _paste_face(fake: np.ndarray, real: np.ndarray, soft_mask: np.ndarray) -> np.ndarray:
    alpha = soft_mask[..., None]
    return np.rint(fake * alpha + real * (1.0 - alpha)).astype(np.uint8)


def jpeg_settings_like(real_path: Path) -> dict:
    """PIL save options that reproduce the real file's JPEG compression (tables, subsampling)."""
    try:
        with Image.open(real_path) as image:
            if image.format == "JPEG" and image.quantization:
                settings = {"qtables": image.quantization}
                sampling = JpegImagePlugin.get_sampling(image)
                if sampling >= 0:
                    settings["subsampling"] = sampling
                return settings
    except OSError:
        pass  # the real was decodable a moment ago; fall back rather than fail the batch
    return {"quality": FALLBACK_JPEG_QUALITY}


def _save_atomically(image: Image.Image, path: Path, **save_options) -> None:
    # Write then rename: a killed run never leaves a half-written file that looks finished.
    with atomic_write(path, "wb") as handle:
        image.save(handle, **save_options)


# ================================================================ command line

@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m data_prep.diffusion", __doc__, config=False)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--model", required=True, help="local pipeline directory or hub id")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--split", default="trainset")
    parser.add_argument("--mode", default="inpaint", choices=MODES)
    parser.add_argument("--img2img-model", default=None,
                        help="plain SD checkpoint for img2img when --model is an inpainting one")
    parser.add_argument("--per-real", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N real images")
    args = parser.parse_args(argv)

    # Check the cheap things (settings, label file) before loading a multi-GB model.
    _check_settings(args.mode, args.per_real, args.batch_size, args.steps, args.strength,
                    args.size, args.limit)
    read_label_file(label_path(args.data_root, args.split))
    pipelines = load_pipelines(args.model, args.device, args.img2img_model)
    summary = generate_fakes(
        args.data_root, args.out, pipelines, split=args.split, mode=args.mode,
        per_real=args.per_real, batch_size=args.batch_size, steps=args.steps,
        strength=args.strength, guidance=args.guidance, size=args.size,
        prompt=args.prompt, seed=args.seed, limit=args.limit)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

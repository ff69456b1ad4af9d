"""Where every expert of a profile will get its pretrained weights, checked before training.

    python -m experts.check_pretrained [--profile gpu] [key=value ...]
    python -m experts.check_pretrained --list       # the packaged weights this machine has

One line per expert in `experts`: its name, its timm model, and the source of its weights:
  file PATH           expert.<name>.pretrained_file (must exist; a .safetensors header must read)
  package NAME        pretrained: efficientnet_lite0 (1, 2): weights shipped inside an installed
                      registry package, offline (experts/pretrained.py); the model must be the
                      timm architecture they map onto
  hub cache PATH      pretrained=hub (true), found in the local Hugging Face hub cache
  hub download ID     pretrained=hub, not cached, but the hub answers that it has the file
  none                pretrained=false (random initialisation), or no timm backbone at all
Exit status 2, with one line per expert saying why and how to fix it, when any weights are
unavailable: so that a user learns it before a 10-hour gpu run, not when its first expert
starts. With HF_HUB_OFFLINE=1 it makes no network call: a file missing from the cache is
unavailable. `train.sh` runs it first when profile=gpu.
"""
from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import file_exists, try_to_load_from_cache
from timm.models import get_pretrained_cfg

from common.cli import EXIT_KNOWN_ERROR, CommandLine, entry_point
from common.errors import UnknownNameError
from configs import ExpertConfig, config_from
from experts import expert_class
from experts.base import check_expert_config
from experts.pretrained import (
    PretrainedWeightsError,
    architecture_mismatch,
    available,
    is_packaged,
    packaged,
    packaged_file,
)

# timm fetches the safetensors twin of a pickled hub file when the repository has one
# (timm.models._hub.load_state_dict_from_hf); the pickle is the fallback.
SAFETENSORS_TWIN = {"pytorch_model.bin": "model.safetensors",
                    "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


@dataclass
class WeightsSource:
    expert: str
    model: str        # the timm model name ("-" for an expert without a timm backbone)
    source: str       # where the weights come from, as printed
    problem: str = ""  # why they are unavailable; empty when they are


def uses_timm_backbone(ecfg: ExpertConfig) -> bool:
    """Whether the kind builds a timm backbone (experts.base.create_backbone): it reads
    `pretrained`; the others (forensic statistics, MesoNet) are trained from scratch."""
    return "pretrained" in expert_class(ecfg.kind).config_fields


def locate_weights(name: str, ecfg: ExpertConfig) -> WeightsSource:
    """Where expert `name` gets its weights, resolved as experts.base.create_backbone and
    timm would (pretrained_file first, then the hub), without downloading anything."""
    try:
        expert_class(ecfg.kind)
    except UnknownNameError as err:
        return WeightsSource(name, ecfg.model, "-", str(err))
    if not uses_timm_backbone(ecfg):
        return WeightsSource(name, "-", "none (no timm backbone: trained from scratch)")
    if not timm.is_model(ecfg.model):
        return WeightsSource(name, ecfg.model, "-", f"timm has no model named {ecfg.model!r}")
    try:
        pretrained_cfg = get_pretrained_cfg(ecfg.model)
    except RuntimeError as err:  # timm: "Invalid pretrained tag (x) for y."
        return WeightsSource(name, ecfg.model, "-", f"timm: {err}")
    if ecfg.pretrained_file:
        return local_file_source(name, ecfg)
    if is_packaged(ecfg.pretrained):
        return packaged_source(name, ecfg)
    if not ecfg.pretrained:
        return WeightsSource(name, ecfg.model, "none (pretrained=false: random initialisation)")
    if pretrained_cfg is None:
        return WeightsSource(name, ecfg.model, "-", f"timm publishes no pretrained weights for {ecfg.model!r}")
    if pretrained_cfg.hf_hub_id:  # timm prefers the hub over a plain URL when both are given
        return hub_source(name, ecfg.model, pretrained_cfg.hf_hub_id, pretrained_cfg.hf_hub_filename)
    if pretrained_cfg.url:
        return url_source(name, ecfg.model, pretrained_cfg.url)
    return WeightsSource(name, ecfg.model, "-", f"timm publishes no pretrained weights for {ecfg.model!r}")


def local_file_source(name: str, ecfg: ExpertConfig) -> WeightsSource:
    path = Path(ecfg.pretrained_file)
    if not path.is_file():
        return WeightsSource(name, ecfg.model, f"file {path}", "pretrained_file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:  # reads the header only
                f.keys()
        except Exception as err:
            return WeightsSource(name, ecfg.model, f"file {path}",
                                 f"not a readable safetensors file ({str(err).splitlines()[0][:120]})")
    return WeightsSource(name, ecfg.model, f"file {path}")


def packaged_source(name: str, ecfg: ExpertConfig) -> WeightsSource:
    try:
        spec = packaged(ecfg.pretrained)
        path, version = packaged_file(ecfg.pretrained)
    except (UnknownNameError, PretrainedWeightsError) as err:
        return WeightsSource(name, ecfg.model, f"package {ecfg.pretrained}", str(err))
    mismatch = architecture_mismatch(ecfg.pretrained, ecfg.model)
    return WeightsSource(name, ecfg.model, f"package {spec.package} {version}: {path}",
                         mismatch and f"{mismatch}; set expert.{name}.model={spec.timm_model}")


def hub_source(name: str, model: str, hub_id: str, hub_filename: str | None) -> WeightsSource:
    repo_id, _, revision = hub_id.partition("@")
    revision = revision or None
    filename = hub_filename or "pytorch_model.bin"
    candidates = [SAFETENSORS_TWIN[filename], filename] if filename in SAFETENSORS_TWIN else [filename]
    for candidate in candidates:
        cached = try_to_load_from_cache(repo_id, candidate, revision=revision)
        if isinstance(cached, str):
            return WeightsSource(name, model, f"hub cache {cached}")
    if hf_constants.HF_HUB_OFFLINE:
        return WeightsSource(name, model, f"hub {hub_id}",
                             f"not in the hub cache ({hf_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                             f"fetch it with `hf download {repo_id} {candidates[0]}`")
    try:
        for candidate in candidates:
            if file_exists(repo_id, candidate, revision=revision):
                return WeightsSource(name, model, f"hub download {hub_id} ({candidate}, not cached yet)")
    except Exception as err:  # no network, gated repository, ...
        return WeightsSource(name, model, f"hub {hub_id}",
                             f"not cached and the hub did not answer: {type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160]}")
    return WeightsSource(name, model, f"hub {hub_id}", f"the hub has none of {candidates}")


def url_source(name: str, model: str, url: str) -> WeightsSource:
    """Weights timm downloads with torch.hub into <torch hub dir>/checkpoints/."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if cached.is_file():
        return WeightsSource(name, model, f"torch hub cache {cached}")
    if hf_constants.HF_HUB_OFFLINE:
        return WeightsSource(name, model, f"url {url}", f"not in the torch hub cache ({cached}) and offline")
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
    except Exception as err:
        return WeightsSource(name, model, f"url {url}", f"not cached and not reachable: {err}")
    return WeightsSource(name, model, f"url download {url} (not cached yet)")


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m experts.check_pretrained", __doc__)
    parser.add_argument("--list", action="store_true", help="list the packaged weights this machine has, and stop")
    args = parser.parse_args(argv)
    if args.list:
        print("packaged pretrained weights (offline; pretrained: NAME with model: TIMM MODEL):")
        for weights, spec, where in available():
            print(f"  {weights:<20} {spec.timm_model:<24} {spec.input_size} px  {where}")
        return 0
    cfg = config_from(args)
    for name in cfg.experts:  # a setting an expert's kind ignores: an error now, not after this check
        check_expert_config(cfg.expert_config(name), name)
    sources = [locate_weights(name, cfg.expert_config(name)) for name in cfg.experts]
    print(f"pretrained weights, profile {cfg.profile}:")
    for s in sources:
        print(f"  {s.expert:<14} {s.model:<36} {s.source}" + (f"  MISSING: {s.problem}" if s.problem else ""))
    missing = [s for s in sources if s.problem]
    if missing:
        print(f"error: {len(missing)} of {len(sources)} experts have no usable weights: "
              f"{', '.join(s.expert for s in missing)}. Give expert.<name>.pretrained_file=PATH "
              f"(a .safetensors or .pth file), packaged weights (expert.<name>.pretrained=efficientnet_lite0, "
              f"see --list), fill the hub cache, or set expert.<name>.pretrained=false",
              file=sys.stderr)
        return EXIT_KNOWN_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The interface every expert implements, and the registry that builds them by kind.

An expert is an `nn.Module` that takes a float batch in [0, 1] (B, 3, H, W) and gives
  forward(x)         -> logits (B, 2), class 1 = fake
  predict_proba(x)   -> P(fake) (B,)
  embed(x)           -> feature vectors (B, D) for clustering and t-SNE
  training_loss(x, y, loss_cfg) -> (loss, {name: float}), used by the one trainer; an
      expert with `learns_boundaries` also takes the editing fakes' blending boundaries.
Normalisation (mean/std) is a buffer of the expert, so it is saved with the weights. What it
reads is `region` (`expert.<name>.region`: the whole face crop or the mouth, data_prep/regions.py)
at `image_size`; the loaders and the predictor cut and resize the crop for it.
The hooks the trainer calls on every expert, each with a default here: `training_samples`
(what it learns from), `trainable_parameters` (what the optimizer updates), `finalize` (after
training, with the best weights) and `gradcam_layer` (what Grad-CAM explains).

    @register_expert("mesonet")
    class MesoNet4Expert(FeatureClassifier):
        config_fields = frozenset({"input_filter", "embed_dim"})   # the ExpertConfig fields it reads
    model = create_expert(expert_cfg, image_size=128)

Each kind declares the `ExpertConfig` fields it reads (`config_fields`); a field it does not
read, set away from its default, is a config error naming the key: `trainable` on a timm
classifier would otherwise be silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import ConfigError, UnknownNameError
from common.inputs import IMAGENET_MEAN, IMAGENET_STD
from configs import Config, ExpertConfig, LossConfig, check_removed_names
from configs.settings import expert_settings
from data_prep.regions import check_region
from experts.losses import classification_losses
from experts.pretrained import (  # noqa: F401  (PretrainedWeightsError: re-exported)
    HUB,
    PACKAGED,
    PretrainedWeightsError,
    is_packaged,
    load_packaged_weights,
    packaged,
)

EXPERTS: dict[str, type["Expert"]] = {}          # kind -> class
EXPERT_ALIASES: dict[str, str] = {}              # an older kind name -> the kind that builds it now
# Read by the trainer for every kind, so never an error.
TRAINER_FIELDS = frozenset({"kind", "image_size", "region", "epochs", "swa_fraction", "lr", "seed", "validate_every",
                            "online_fakes", "online_fake_ops", "train_on", "augment", "loss"})
TRAIN_ON = ("all", "reals")  # expert.<name>.train_on


def register_expert(kind: str, aliases: tuple[str, ...] = ()):
    """Class decorator: `kind` (and each of `aliases`, names that manifests and configs
    written before may still use) builds this class."""
    def decorator(cls):
        for name in (kind, *aliases):
            if name in EXPERTS or name in EXPERT_ALIASES:
                raise ValueError(f"expert kind {name!r} registered twice")
        cls.kind = kind
        EXPERTS[kind] = cls
        EXPERT_ALIASES.update(dict.fromkeys(aliases, kind))
        return cls
    return decorator


def expert_class(kind: str) -> type["Expert"]:
    """The class that builds expert `kind` (a registered kind or an alias of one)."""
    kind = EXPERT_ALIASES.get(kind, kind)
    if kind not in EXPERTS:
        check_removed_names("kind", kind, error=UnknownNameError)
        raise UnknownNameError(f"unknown expert kind {kind!r}; registered: {sorted(EXPERTS)}, "
                               f"aliases: {sorted(EXPERT_ALIASES)}")
    return EXPERTS[kind]


def check_expert_config(cfg: ExpertConfig, name: str | None = None) -> type["Expert"]:
    """The class of `cfg.kind`, after checking that every field set away from its default is
    one that kind reads (that swa_fraction is a fraction, boundary_loss not negative, augment
    names augmentation settings); ConfigError naming the key (`expert.<name>.<field>`) otherwise."""
    cls = expert_class(cfg.kind)
    prefix = f"expert.{name}." if name else ""
    if not 0 <= cfg.swa_fraction <= 1:
        raise ConfigError(f"{prefix}swa_fraction: {cfg.swa_fraction} is not a fraction of the epochs "
                          "(0 = off, up to 1)")
    if cfg.validate_every < 1:
        raise ConfigError(f"{prefix}validate_every: {cfg.validate_every} must be 1 (every epoch) or more")
    if cfg.seed is not None and cfg.seed < 0:
        raise ConfigError(f"{prefix}seed: {cfg.seed} is negative (unset: the run's seed)")
    check_region(cfg.region, f"{prefix}region")
    if cfg.online_fakes is not None and not 0 <= cfg.online_fakes <= 1:
        raise ConfigError(f"{prefix}online_fakes: {cfg.online_fakes} is not a share of the training reals "
                          "(0 to 1; unset: data.online_fakes)")
    if cfg.train_on not in TRAIN_ON:
        raise ConfigError(f"{prefix}train_on: {cfg.train_on!r} is not one of {list(TRAIN_ON)}")
    if cfg.train_on == "reals" and cfg.online_fakes == 0:
        raise ConfigError(f"{prefix}train_on: reals needs editing fakes to learn from (online_fakes > 0)")
    if cfg.boundary_loss < 0:
        raise ConfigError(f"{prefix}boundary_loss: {cfg.boundary_loss} is negative (0 = off)")
    # its augment keys must name augmentation settings, its loss keys loss settings
    expert_settings(Config(expert={name or "<name>": cfg}), name or "<name>")
    defaults = ExpertConfig()
    for field in dataclasses.fields(ExpertConfig):
        if field.name in TRAINER_FIELDS or field.name in cls.config_fields:
            continue
        if getattr(cfg, field.name) != getattr(defaults, field.name):
            key = f"expert.{name}.{field.name}" if name else field.name
            kind = repr(cfg.kind) + ("" if cfg.kind == cls.kind else f" (= {cls.kind!r})")
            raise ConfigError(f"{key}: the {kind} expert kind does not use this setting (it reads "
                              f"{', '.join(sorted(cls.config_fields | TRAINER_FIELDS))}); remove it")
    return cls


def create_expert(cfg: ExpertConfig, image_size: int) -> "Expert":
    return check_expert_config(cfg)(cfg, image_size)


FEATURE_KWARGS = ("features_only", "out_indices")  # timm.create_model's feature-extractor arguments


def create_backbone(cfg: ExpertConfig, **kwargs) -> nn.Module:
    """A timm backbone without classifier, random or from pretrained weights: a local file
    (`pretrained_file`), weights shipped in a package (`pretrained: efficientnet_lite0`,
    experts/pretrained.py) or the hub (`pretrained: hub`); `cfg.model_args` go to
    timm.create_model beside the expert's own `kwargs`."""
    clash = sorted(set(cfg.model_args) & (set(kwargs) | {"pretrained", "num_classes", "pretrained_cfg_overlay"}))
    if clash:
        raise ConfigError(f"model_args {clash}: set by the expert itself, not settable here")
    kwargs = {**kwargs, **cfg.model_args}
    if cfg.pretrained_file:
        path = Path(cfg.pretrained_file)
        if not path.is_file():
            raise PretrainedWeightsError(f"{path}: pretrained_file not found")
        # timm reads .safetensors directly, and .pth/.bin with torch.load(weights_only=True).
        return _create_model(cfg, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    if is_packaged(cfg.pretrained):
        spec = packaged(cfg.pretrained)
        overlay = dict(mean=spec.mean, std=spec.std)
        full = {k: v for k, v in kwargs.items() if k not in FEATURE_KWARGS}
        backbone = _create_model(cfg, pretrained=False, pretrained_cfg_overlay=overlay, **full)
        load_packaged_weights(backbone, cfg.pretrained)
        if full == kwargs:
            return backbone
        # A feature extractor (features_only) holds a subset of the network under the same
        # names: the weights are mapped onto the whole network, then copied over by name.
        features = _create_model(cfg, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
        state = backbone.state_dict()
        wanted = features.state_dict()
        missing = [k for k in wanted if k not in state or state[k].shape != wanted[k].shape]
        if missing:
            raise PretrainedWeightsError(f"pretrained {cfg.pretrained}: the features of {cfg.model} hold "
                                         f"{missing[0]}, which the whole network does not")
        features.load_state_dict({k: state[k] for k in wanted}, strict=True)
        return features
    if cfg.pretrained == HUB:
        try:
            return _create_model(cfg, pretrained=True, **kwargs)
        except ConfigError:
            raise
        except Exception as err:  # offline, unknown tag, ...: one clear line, no retry loop
            hint = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise PretrainedWeightsError(
                f"cannot load pretrained weights for {cfg.model!r}{hint}: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}. Use pretrained_file=PATH, packaged weights "
                f"(pretrained: {'|'.join(PACKAGED)}) or pretrained=false."
            ) from None
    return _create_model(cfg, pretrained=False, **kwargs)


def _create_model(cfg: ExpertConfig, **kwargs) -> nn.Module:
    try:
        return timm.create_model(cfg.model, num_classes=0, **kwargs)
    except TypeError as err:  # a model_args key the architecture does not take
        if not cfg.model_args:
            raise
        raise ConfigError(f"model_args {cfg.model_args}: not accepted by timm model {cfg.model!r} "
                          f"({str(err).splitlines()[0][:200]})") from None


class Expert(nn.Module):
    kind = "expert"
    config_fields: ClassVar[frozenset[str]] = frozenset()  # ExpertConfig fields read, besides TRAINER_FIELDS
    # An expert that learns what real faces look like (the DAE): it trains on reals only, and
    # the trainer makes no editing fakes and draws no class balance for it.
    trains_on_real_only: ClassVar[bool] = False
    # An expert that also learns where an editing fake was blended (timm kind, boundary_loss):
    # the trainer then hands training_loss each image's boundary map as well.
    learns_boundaries: bool = False

    def __init__(self, cfg: ExpertConfig, image_size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.region = cfg.region  # the part of the face crop it sees (data_prep/regions.py)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, x, y, loss_cfg: LossConfig):
        raise NotImplementedError

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).float().softmax(dim=1)[:, 1]

    # ---------------------------------------------------------------- the trainer's hooks

    def training_samples(self, splits: dict[str, list]) -> list:
        """The samples this expert learns from: the trainset; for a reals-only expert the
        trainset's reals, never a fake; with `train_on: reals` the trainset's reals, which the
        trainer turns into editing fakes."""
        reals = [s for s in splits["trainset"] if s.target == 0]
        return reals if self.trains_on_real_only or self.cfg.train_on == "reals" else splits["trainset"]

    def trainable_parameters(self, loss_cfg: LossConfig) -> list[nn.Parameter]:
        """The parameters the optimizer updates under these losses; the others are frozen
        (requires_grad False) before the trainer wraps the expert for DDP."""
        return [p for p in self.parameters() if p.requires_grad]

    def finalize(self, real_batches, val_batches) -> None:
        """Called once after training, in eval mode with the best weights loaded, with
        iterables of (x, y) batches of the training samples (no augmentation) and of the
        validation split: fit what is not learned by gradient (the DAE's score scales and
        calibration). By default nothing."""

    def gradcam_layer(self) -> nn.Module | None:
        """The layer Grad-CAM explains (last spatial feature map), if any."""
        return None

    def parameter_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable


class NoiseResiduals(nn.Module):
    """Fixed SRM high-pass filters (steganalysis rich models, Fridrich & Kodovsky 2012) on
    the grey image: 3 noise-residual maps. Face swaps resample and blend the inner face, which
    changes its noise and high frequencies; a network trained from scratch on a few thousand
    images finds those traces far sooner in the residuals than in RGB (measured: RESULTS.md,
    "Choosing the cpu experts")."""

    def __init__(self):
        super().__init__()
        k = torch.zeros(3, 1, 5, 5)
        k[0, 0, 1:4, 1:4] = torch.tensor([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]) / 4
        k[1, 0] = torch.tensor([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2],
                                [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]]) / 12
        k[2, 0, 2, 1:4] = torch.tensor([1, -2, 1]) / 2
        self.register_buffer("kernels", k)

    def forward(self, x):  # x in [0, 1]; residuals scaled to roughly unit variance
        return F.conv2d(x.mean(dim=1, keepdim=True), self.kernels.to(x.dtype), padding=2) * 10


class FeatureClassifier(Expert):
    """An expert that maps the input to a feature vector (`features`, defined by the
    subclass), then to 2 logits (`self.head`) and, for the supervised contrastive loss, to an
    L2-normalised projection (`self.projector`). The losses are shared by every such expert."""

    head: nn.Module
    projector: nn.Module

    def features(self, x):
        raise NotImplementedError

    def network_input(self, x):
        """Normalised RGB, plus the SRM noise-residual channels when the expert has them
        (`self.residuals`, set with `input_filter: srm`)."""
        inputs = self.normalize(x)
        residuals = getattr(self, "residuals", None)
        if residuals is not None:
            inputs = torch.cat([inputs, residuals(x)], dim=1)
        return inputs

    def forward(self, x):
        return self.head(self.features(x))

    def embed(self, x):
        return self.features(x)

    def training_loss(self, x, y, loss_cfg: LossConfig):
        return self.losses_of_features(x, y, self.features(x), loss_cfg)

    def losses_of_features(self, x, y, feats, loss_cfg: LossConfig):
        """The losses of `feats` = features(x)."""
        logits = self.head(feats)
        # The KL term's second view costs a forward pass; skip it without the term.
        second_logits = None
        if loss_cfg.kl > 0:
            noisy = (x + loss_cfg.kl_noise_std * torch.randn_like(x)).clamp(0, 1)
            second_logits = self(noisy)
        projected = F.normalize(self.projector(feats), dim=1) if loss_cfg.nce > 0 else None
        return classification_losses(logits, y, loss_cfg, second_logits, projected)

    def trainable_parameters(self, loss_cfg: LossConfig) -> list[nn.Parameter]:
        if loss_cfg.nce == 0:
            # Only the NCE loss uses the projection head: without it, freeze it, so it neither
            # counts as trainable nor leaves DDP waiting for gradients that never come.
            self.projector.requires_grad_(False)
        return super().trainable_parameters(loss_cfg)


class FixedStatistics(nn.Module):
    """Base of the parameterless statistics modules of the fixed-statistics experts: a
    subclass computes (B, n_features) from float32 images in `compute` and says `n_features`.

    The statistics always run in float32, also under bf16 autocast (train.amp, infer
    --precision bf16): with 8 significant bits the residuals of neighbouring pixels cancel to
    rounding noise and the weak frequencies drown (FF++ testset AUC of the forensic expert
    0.715 -> 0.633 when they ran in bf16). They are cheap; only the MLP on top may run in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.compute(x.float())

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FixedStatisticsClassifier(FeatureClassifier):
    """A FeatureClassifier whose features are fixed statistics of the image (a
    `FixedStatistics` module) and a small MLP: the forensic expert. Nothing but the MLP
    learns, in a few epochs from a few thousand images, where a CNN from scratch needs many."""

    width = 64

    def __init__(self, cfg: ExpertConfig, image_size: int, statistics: FixedStatistics):
        super().__init__(cfg, image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.statistics = statistics
        n = statistics.n_features
        # BatchNorm puts features of very different scales (log residuals, colour, spectrum,
        # log frequencies) on one, from the training data; its running statistics are saved
        # with the weights.
        self.body = nn.Sequential(nn.BatchNorm1d(n), nn.Dropout(0.2), nn.Linear(n, self.width), nn.GELU(),
                                  nn.Dropout(0.2))
        self.head = nn.Linear(self.width, 2)
        self.projector = nn.Linear(self.width, cfg.embed_dim)

    def features(self, x):
        return self.body(self.statistics(x))

    def gradcam_layer(self):
        return None  # fixed statistics: no learned spatial map to explain


def check_input_filter(cfg: ExpertConfig) -> int:
    """Input channels for `input_filter` (srm: RGB + 3 noise-residual maps)."""
    if cfg.input_filter not in ("none", "srm"):
        raise ConfigError(f"input_filter must be 'none' or 'srm', got {cfg.input_filter!r}")
    return 6 if cfg.input_filter == "srm" else 3


def make_mlp(width: int, out: int, layers: int) -> nn.Module:
    if layers <= 1:
        return nn.Linear(width, out)
    blocks: list[nn.Module] = []
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(width, out))

"""Typed configuration: dataclass defaults <- profile YAML <- `key=value` overrides.

    cfg = load_config("cpu", ["train.epochs=3", "experts=[convnext,dae]"])
    cfg.train.epochs  # -> 3 (an int: every value is cast to the type of its default)

Unknown keys are errors (a typo must not be silently ignored); so is a removed option, with
the message that it was removed (configs/removed.py). The YAML files in this folder are
named after their profile; `default` values live in the dataclasses below.
`expert.*.KEY=VALUE` sets KEY on every expert defined so far (`expert.*.pretrained=false`).
An expert's effective settings, its own values over the global ones, are resolved once by
`configs.settings.expert_settings`.

On the command line, every command that reads the config takes the same arguments
(`common.cli.CommandLine`): `--profile NAME` or `profile=NAME`, and `key=value` overrides;
`config_from` turns them into the config:

    python -m experts.train DATA_ROOT --profile gpu train.epochs=3 "experts=[convnext,dae]"
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.cli import CommandLine
from common.errors import ConfigError, UnknownNameError
from configs.removed import REMOVED_NAMES, check_removed_names, removed_key, without_removed  # noqa: F401 (re-exported)

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_PROFILE = "cpu"
EVERY_EXPERT = "*"  # expert.*.pretrained=false sets the key on every expert defined so far


@dataclass
class DataConfig:
    image_size: int = 128          # side of the square network input, after the face crop
    num_workers: int = 0           # DataLoader workers; 0 = load in the main process
    cache_dir: str = ".cache"      # decoded face crops are cached here (keyed by file + settings)
    online_fakes: float = 0.0      # probability that a training real becomes an editing fake on the fly
    online_fake_ops: list[str] = field(default_factory=list)  # empty = manipulations.DEFAULT_OPS
    fake_masks: str = "ellipse"    # ellipse (from the face box) | landmarks (dlib 68-point hull, as in SBI)
    methods: list[str] = field(default_factory=list)  # keep only these methods (<split>_methods.csv); [] = all
    folds_csv: str = ""            # folds.csv of experts.cluster_split: train on fold `fold`'s split ...
    fold: int = -1                 # ... (validate on its cluster); experts export as <name>_fold<k>


@dataclass
class FaceConfig:
    enabled: bool = True
    detector: str = "lbp"          # lbp: OpenCV's LBP cascade (shipped in scikit-image) | dlib: dlib's HOG
    margin: float = 0.3            # box grown by this fraction of its size on every side
    min_face: float = 0.2          # smallest face side searched, as a fraction of the short image side
    fallback: str = "center"       # no face found: "center" crop of fallback_fraction, or "full" image
    fallback_fraction: float = 0.7
    crop_size: int = 192           # crops are cached at this side; the input transform resizes later
    shrink: str = "resize"         # box larger than crop_size: resize it down, or keep its "center" window


@dataclass
class AugmentConfig:
    hflip: float = 0.5
    scale: float = 0.1             # random resized crop: relative scale jitter
    color: float = 0.3             # probability of brightness/contrast/hue jitter
    blur: float = 0.1
    noise: float = 0.1
    jpeg: float = 0.3
    jpeg_quality_min: int = 60
    downscale: float = 0.0         # probability of a round trip to 35-90 % of the side and back (a resized upload)
    cutout: float = 0.0            # probability of blacking out one facial part along the 68 landmarks


@dataclass
class LossConfig:
    ce: float = 1.0
    label_smoothing: float = 0.0
    kl: float = 0.0                # weight of the KL consistency term between the predictions on x and x + noise
    kl_noise_std: float = 0.05     # std of the Gaussian noise added to the [0, 1] input (before normalisation)
    nce: float = 0.0               # weight of the supervised contrastive (InfoNCE) loss
    nce_temperature: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    ema_decay: float = 0.998
    amp: str = "auto"              # auto (bf16 where native, fp16 on other GPUs, else off) | off | bf16 | fp16
    channels_last: bool = False
    grad_accum: int = 1
    balanced_sampling: bool = True
    grad_clip: float = 5.0
    sync_bn: bool = False
    tta: list[str] = field(default_factory=list)  # test-time augmentation: "hflip", "scale"


@dataclass
class EnsembleConfig:
    method: str = "auto"           # auto | lgbm | logreg | mean | rank_mean (auto: best CV AUC)
    cv: int = 5                    # folds of the meta-learner's own cross-validation
    editing_fakes: float = 0.0     # share of validation reals also fitted on as an editing fake of itself
    monotone: bool = True          # P(fake) may only grow with each expert's score (no negative weights)
    # Platt-scale the stacker's output on the scored images (not the editing fakes, which tilt
    # the class balance), from its cross-validated predictions: P(fake) that means what it says.
    calibrate: bool = True
    # k-fold stacking (ensemble.oof): K > 0 fits the meta-learner on out-of-fold scores of
    # trainset+valset, every expert trained K more times (K + 1 trainings); 0 = valset hold-out.
    oof_folds: int = 0
    oof_folds_csv: str = ""        # the folds: a folds.csv of experts.cluster_split; "" = stratified random
    oof_group_distance: int = 4    # random folds: near duplicates (pHash bits apart) share a fold; -1 = off


@dataclass
class TemporalConfig:
    """The temporal head (`ensemble.temporal`): a GRU over one frame expert's embeddings."""
    expert: str = ""               # frame expert it reads; "" = the stacker's heaviest, else the first
    hidden: int = 32               # GRU hidden size
    steps: int = 300               # optimizer steps, each on batch_size sequences
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.25     # videos held out per class (by video) to report the head's AUC
    max_distance: int = 4          # image sets: pHash bits (of 64) within which images chain into a clip


@dataclass
class ExpertConfig:
    """One expert = one registered kind + its settings. Each kind reads some of the fields
    below (experts.base.check_expert_config): setting one it does not read is an error. None, the
    one "unset" marker, takes the global value (`configs.settings.expert_settings` resolves them)."""
    kind: str = "timm"             # a kind of experts.EXPERTS: timm, clip, dae, forensic, mesonet
                                   # (convnext, efficientnet and resnet: older names of timm)
    model: str = "convnext_atto"   # timm model name (timm, clip; dae: its frozen feature CNN)
    pretrained: str = ""           # the backbone's starting weights: "" (false: random), hub (true: timm's
                                   # weights for the model's tag, needs network) or packaged weights that
                                   # install offline (efficientnet_lite0/1/2 onto tf_efficientnet_lite0/1/2,
                                   # experts/pretrained.py)
    pretrained_file: str = ""      # ... or a local .safetensors / .pth file (wins over `pretrained`)
    model_args: dict[str, typing.Any] = field(default_factory=dict)  # more keyword arguments of timm.create_model
                                   # (timm, clip, dae), e.g. {drop_path_rate: 0.1, channels: [32, 64, 128, 256]}
    image_size: int | None = None  # unset: data.image_size
    region: str = "face"           # the part of the face crop it sees: face (all) | mouth (data_prep/regions.py)
    epochs: int | None = None      # unset: train.epochs
    swa_fraction: float = 0.0      # >0: export the mean of the raw weights of this last fraction of the epochs
                                   # (SWA, BatchNorm statistics measured again), not the best-validated EMA weights
    online_fakes: float | None = None  # share of its training reals made editing fakes on the fly; unset: data's
    train_on: str = "all"          # all: the trainset | reals: its reals only, the fakes it learns from are its
                                   # editing fakes of them (the self-blended-images recipe; needs online_fakes > 0)
    online_fake_ops: list[str] | None = None  # its training fakes' editing ops; unset: data's
    augment: dict[str, float] = field(default_factory=dict)   # its own `augment.*` values, e.g. {jpeg: 0.3}
    loss: dict[str, typing.Any] = field(default_factory=dict)  # its own `loss.*` values, e.g. {kl: 1.0}
    boundary_loss: float = 0.0     # >0: an auxiliary head learns where the editing fakes were blended (Face X-ray),
                                   # this weight beside the classification losses (timm kind)
    lr: float | None = None        # unset: train.lr
    seed: int | None = None        # unset: the run's seed; its own: the same settings trained again under
                                   # another seed, a second member of a seed ensemble
    validate_every: int = 1        # validate every n-th epoch and the last (the best EMA epoch is one of them)
    input_filter: str = "none"     # none | srm (fixed noise-residual channels beside RGB)
    trainable: str = "all"         # timm, clip: all | norm_head (the normalisation layers' affine + the head;
                                   # CLIP's LayerNorms, a CNN's BatchNorms)
    head_layers: int = 1           # depth of the MLP head (timm, clip)
    embed_dim: int = 128           # output of the projection head for the NCE loss
    drop_rate: float = 0.0
    score_weights: list[float] = field(default_factory=lambda: [0.4, 0.3, 0.3])  # DAE score mix
    noise_std: float = 0.1         # DAE input noise (0-1 pixel units)
    relative: bool = False         # forensic expert: only region-vs-crop contrasts, no absolute levels
    grid: int = 4                  # forensic expert: statistics pooled on a grid x grid layout

    def __setattr__(self, name, value):
        # `pretrained` was a bool: true and false (YAML, the command line, older manifests) still mean hub and none;
        # the "unset" markers of older profiles and manifests (LEGACY_UNSET) are None.
        if name == "pretrained":
            value = pretrained_name(value)
        elif name in LEGACY_UNSET and value == LEGACY_UNSET[name]:
            value = None
        super().__setattr__(name, value)


# ExpertConfig fields -> what profiles and manifests written before None meant "unset" held for it
LEGACY_UNSET = {"image_size": 0, "epochs": 0, "lr": 0, "seed": -1, "online_fakes": -1, "online_fake_ops": []}


def pretrained_name(value) -> str:
    """`pretrained` as one string: "" (none), "hub", or the name of packaged weights."""
    text = str(value).strip()
    if text.lower() in {"", "0", "false", "no", "off", "none"}:
        return ""
    return "hub" if text.lower() in {"1", "true", "yes", "on", "hub"} else text


@dataclass
class Config:
    profile: str = "cpu"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch CPU threads; 0 = torch's default
    data_root: str = ""            # empty = build the demo data set
    out: str = "weights"           # inference-ready weights + manifest
    reports: str = "reports"
    run_dir: str = "runs"          # checkpoints (resume) and per-epoch metrics
    resume: bool = False
    experts: list[str] = field(default_factory=lambda: ["convnext"])
    data: DataConfig = field(default_factory=DataConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    expert: dict[str, ExpertConfig] = field(default_factory=dict)

    def expert_config(self, name: str) -> ExpertConfig:
        if name not in self.expert:
            raise UnknownNameError(f"no expert named {name!r} in the config; known: {sorted(self.expert)}")
        return self.expert[name]


def _cast(value, typ, key: str):
    """Cast a YAML/CLI value to the declared type of the field (e.g. '3' -> 3 for an int)."""
    if typ is typing.Any:  # a value passed through (model_args): as YAML reads it, '0.1' -> 0.1
        return yaml.safe_load(value) if isinstance(value, str) else value
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # X | None: null (YAML), "null" or "none" is None
        if value is None or (isinstance(value, str) and value.strip().lower() in {"null", "none"}):
            return None
        return _cast(value, next(t for t in typing.get_args(typ) if t is not type(None)), key)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            value = [value]
        return [_cast(v, item_type, key) for v in value]
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in {"1", "true", "yes", "on"}:
                return True
            if value.lower() in {"0", "false", "no", "off"}:
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if typ in (int, float, str):
        if isinstance(value, (list, dict)):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return typ("" if value is None else value) if typ is str else typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    return value


def _merge(obj, updates: dict, prefix: str = "", stored: bool = False):
    """Set `updates` (nested mappings) on the dataclass `obj`, each value cast to its field's
    type. A removed key is an error (configs/removed.py); `stored` (a config a manifest
    recorded, `from_dict`): one at its old default is passed over."""
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if removed_key(path, value, stored):
            continue
        if key not in hints:
            raise ConfigError(f"unknown config key {path!r}; valid here: {sorted(hints)}")
        typ = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping")
            _merge(current, value, path + ".", stored)
        elif typing.get_origin(typ) is dict and typing.get_args(typ)[1] is not ExpertConfig:
            # a mapping of settings (expert.<name>.augment): its values cast, merged key by key
            if not isinstance(value or {}, dict):
                raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
            value_type = typing.get_args(typ)[1]
            current.update({k: _cast(v, value_type, f"{path}.{k}") for k, v in (value or {}).items()
                            if not removed_key(f"{path}.{k}", v, stored)})
        elif typing.get_origin(typ) is dict:  # the expert table: name -> ExpertConfig
            if not isinstance(value or {}, dict):
                raise ConfigError(f"{path}: expected a mapping of expert name -> settings, got {value!r}")
            for name, sub in (value or {}).items():
                if not isinstance(sub or {}, dict):
                    raise ConfigError(f"{path}.{name}: expected a mapping of settings, got {sub!r}")
                # `expert.*.key=value`: every expert defined so far (the profile's and earlier overrides')
                for each in (list(current) if name == EVERY_EXPERT else [name]):
                    entry = current.setdefault(each, ExpertConfig())
                    _merge(entry, sub or {}, f"{path}.{each}.", stored)
        else:
            value = _cast(value, typ, path)
            if key in REMOVED_NAMES and not stored:  # a recorded expert never built may name a removed kind
                check_removed_names(key, value, path)
            setattr(obj, key, value)


def _dotted_to_nested(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _parse_yaml(text: str, source: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None


def parse_overrides(overrides: list[str]) -> list[dict]:
    nested = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = _parse_yaml(raw, f"override {item!r}") if raw.strip() else ""
        if isinstance(value, (int, float, bool)) or value is None:
            value = raw  # keep the raw string; _cast converts it to the declared type
        nested.append(_dotted_to_nested(key.strip(), value))
    return nested


def load_config(profile: str = DEFAULT_PROFILE, overrides: list[str] | None = None) -> Config:
    """Defaults, then configs/<profile>.yaml (or a path to a YAML file), then overrides."""
    cfg = Config()
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no profile {profile!r} ({path}); known profiles: {known}")
    _merge(cfg, _parse_yaml(path.read_text(), str(path)) or {})
    cfg.profile = path.stem
    for update in parse_overrides(overrides or []):
        _merge(cfg, update)
    missing = [e for e in cfg.experts if e not in cfg.expert]
    if missing:
        raise ConfigError(f"experts {missing} have no `expert.<name>` section; known: {sorted(cfg.expert)}")
    return cfg


def config_from(args, data_root: str | None = None) -> Config:
    """The config of a command line parsed by `common.cli.CommandLine`: the profile's YAML,
    then its `key=value` overrides, then `data_root` (the command's DATA_ROOT, when given)."""
    overrides = list(args.overrides) + ([f"data_root={data_root}"] if data_root else [])
    return load_config(args.profile or DEFAULT_PROFILE, overrides)


def config_from_argv(argv: list[str]) -> Config:
    """`[DATA_ROOT] [--profile NAME | profile=NAME] [key=value ...]` -> the config, exactly as
    the commands read it (train.sh and the benchmarks use this to see the settings of a run)."""
    args = CommandLine("config", None, positional="DATA_ROOT", required=False).parse_args(list(argv))
    return config_from(args, data_root=args.positional)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """The config a manifest recorded (`to_dict`); one written before an option was removed
    loads when it holds that option at its old default."""
    cfg = Config()
    _merge(cfg, data, stored=True)
    return cfg

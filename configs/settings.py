"""One expert's effective settings, resolved once (`expert_settings`): its `expert.<name>` entry
over copies of the global sections. The trainer, the loaders and the manifest read these, not
the whole `Config`. Each value of its own (not None, the one "unset" marker of `ExpertConfig`)
replaces the global one: image_size, online_fakes, online_fake_ops (`data`), epochs, lr
(`train`), its `augment` and `loss` values, and `seed`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from configs import AugmentConfig, Config, DataConfig, ExpertConfig, FaceConfig, LossConfig, TrainConfig, _merge


@dataclass
class ExpertSettings:
    name: str                      # the expert's name in the config
    seed: int                      # expert.<name>.seed, else the run's seed
    expert: ExpertConfig           # its entry: kind, model and the kind's own settings
    data: DataConfig               # with its own image_size, online_fakes, online_fake_ops
    face: FaceConfig
    augment: AugmentConfig         # augment.*, then expert.<name>.augment
    loss: LossConfig               # loss.*, then expert.<name>.loss
    train: TrainConfig             # with its own epochs and lr


def expert_settings(cfg: Config, name: str) -> ExpertSettings:
    """The effective settings of the expert `name` of `cfg`; ConfigError naming the key for an
    `augment` or `loss` value of its own that is not a setting of that section."""
    own = cfg.expert_config(name)

    def with_own(section, *keys: str):
        return copy.deepcopy(replace(section, **{k: getattr(own, k) for k in keys if getattr(own, k) is not None}))

    def merged(section, values: dict, key: str):
        section = copy.deepcopy(section)
        _merge(section, values, f"expert.{name}.{key}.")
        return section

    return ExpertSettings(name=name, seed=cfg.seed if own.seed is None else own.seed, expert=copy.deepcopy(own),
                          data=with_own(cfg.data, "image_size", "online_fakes", "online_fake_ops"),
                          face=copy.deepcopy(cfg.face), augment=merged(cfg.augment, own.augment, "augment"),
                          loss=merged(cfg.loss, own.loss, "loss"), train=with_own(cfg.train, "epochs", "lr"))

"""Options that were measured and not kept (RESULTS.md), removed with their code: the one table
of them, and the checks `configs` applies wherever a config is read.

A profile YAML or a `key=value` override that names a removed key, or a removed expert kind or
editing op, is a one-line ConfigError saying so (`expert.resnet.space_to_depth was removed
(measured and not kept: RESULTS.md)`), never an "unknown key". A record written before the
removal (a manifest's `config` and `expert_config` entries, the stacker's entry) holds each
removed key at its old default, which did nothing: it loads as before (`without_removed`); one
that holds another value describes what can no longer be built, and is the same error.
"""
from __future__ import annotations

from common.errors import ConfigError

REMOVED = "was removed (measured and not kept: RESULTS.md)"

# key (`expert.*.`: any expert's) -> its old default
REMOVED_KEYS = {
    "data.extra_reals": [],             # more reals for the reals-only experts (the DAE)
    "loss.kl_view": "noise",            # the KL term's dropout view (R-Drop); the noise view is the KL term
    "expert.*.loss.kl_view": "noise",
    "ensemble.meta_features": [],       # dae_terms: the DAE's error terms as stacker inputs
    "expert.*.patch_size": 0,           # training on random native-resolution patches
    "expert.*.space_to_depth": 1,       # s x s pixel blocks folded into channels (timm kind)
    "expert.*.swa_lr": 0.0,             # SWA's rate held through the averaged epochs; the cosine runs to 0
}

# config key whose values are names -> (what they name, the names removed)
REMOVED_NAMES = {
    "kind": ("expert kind", ("cooccurrence",)),                # the residual co-occurrence expert
    "online_fake_ops": ("editing op", ("upsample_artefacts",)),  # a generator's up-sampling pattern
    "trainable": ("trainable setting", ("head",)),              # a linear probe on the frozen backbone
}


def check_removed_names(key: str, names, where: str = "", error: type[Exception] = ConfigError) -> None:
    """`error` when one of `names` (one name or a list) is a removed value of the config key
    `key`, after `where` (the key's full path). The registries that hold these names
    (experts.base.expert_class, data_prep.manipulations.check_names) ask too."""
    what, removed = REMOVED_NAMES[key]
    for name in [names] if isinstance(names, str) else names or ():  # None: an expert's unset ops
        if name in removed:
            raise error(f"{where + ': ' if where else ''}the {what} {name!r} {REMOVED}")


def removed_key(path: str, value, stored: bool = False, source: str = "") -> bool:
    """Whether the config key `path` (`expert.resnet.swa_lr`) was removed: True for one that a
    record (`stored`) holds at its old default, to pass over; ConfigError (after `source`, the
    record's file) for any other mention."""
    parts = path.split(".")
    pattern = ".".join(["expert", "*", *parts[2:]]) if parts[0] == "expert" and len(parts) > 2 else path
    if pattern not in REMOVED_KEYS:
        return False
    if stored and value == REMOVED_KEYS[pattern]:
        return True
    raise ConfigError(f"{source + ': ' if source else ''}{path} {REMOVED}")


def without_removed(record: dict, prefix: str = "", source: str = "") -> dict:
    """`record`, the part of a recorded config at `prefix` (`expert.resnet.` for an expert's
    settings, `ensemble.` for the stacker's entry), without the removed keys it holds at their
    old default; ConfigError naming `source` (its file) for one it holds at another value."""
    return {key: without_removed(value, f"{prefix}{key}.", source) if isinstance(value, dict) else value
            for key, value in record.items() if not removed_key(prefix + key, value, stored=True, source=source)}

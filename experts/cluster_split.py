"""The cluster re-split command: embed the train+val face crops, cluster them, write folds.

    python -m experts.cluster_split DATA_ROOT --out reports/folds [--k 5]
                                    [--expert NAME [--weights DIR] | --backbone resnet18 [--pretrained [NAME]]]
                                    [--random | --unsupervised] [--image-size 128] [--batch-size 64]
                                    [--profile NAME | profile=NAME] [key=value ...]

The face crops are the ones training uses: the same profile and `face.*` / `data.*` overrides
(train.sh passes its own), or, with `--expert`, that trained expert's own face settings and
input size. `seed=` and `device=` are the config's. The embeddings come from a trained expert
(`--expert`, its `embed`) or from a timm backbone; the folds (`data_prep.folds`), the k-means
clustering (`data_prep.clustering`) and the pseudo labels (`data_prep.pseudo_labels`) need no
model. This command lives in experts/ because it builds and loads models: data_prep stays
below the experts.

Outputs (OUT = --out):

    folds.csv        img_name,target,fold   (fold -1 = unreadable image: train only)
    clusters.json    size, n_real, n_fake, fake fraction of every cluster
    clusters.md      the same as a Markdown table
    tsne_cluster.png t-SNE of the embeddings coloured by cluster
    tsne_label.png   ... coloured by real / fake

`--random` writes stratified random folds instead (the baseline to compare against), and
`--unsupervised` ignores the labels: it splits the embeddings into two clusters, names one
fake by a documented rule (`data_prep.pseudo_labels`) and writes
pseudo_labels.csv and pseudo_labels.json.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.cli import CommandLine, entry_point
from common.errors import UnknownNameError
from common.inputs import IMAGENET_MEAN, IMAGENET_STD, to_unit_float
from common.runtime import select_device
from configs import ExpertConfig, FaceConfig, config_from
from data_prep.clustering import kmeans
from data_prep.dataset import DataLayoutError, Sample, load_splits
from data_prep.faces import FaceCropCache
from data_prep.folds import UNCLUSTERED, check_unique_names, make_folds, random_folds, write_folds
from data_prep.images import ImageDecodeError
from data_prep.labels import write_label_file
from data_prep.pseudo_labels import pseudo_labels
from data_prep.regions import region_tensor
from experts.base import create_backbone
from experts.weights import face_config_of, load_expert

log = logging.getLogger(__name__)

TSNE_MAX_POINTS = 3000  # t-SNE is quadratic-ish; a seeded subsample shows the same structure


# ================================================================ embedding

def embed_with_backbone(samples: list[Sample], model_name: str, face_cfg: FaceConfig, cache_dir,
                        image_size: int = 128, batch_size: int = 64, pretrained: str = "",
                        device: str = "cpu",
                        embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, region: str = "face"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n_kept, D) float32, kept_indices (n_kept,)) of the samples' face crops.

    Crops come from FaceCropCache and are cut to `region` and resized to image_size the way
    evaluation does.
    Images that cannot be decoded are skipped with a one-line warning each; kept_indices
    says which samples the rows belong to.

    By default the features are those of timm `model_name` (num_classes=0, pooled), fed
    with the model's own pretrained_cfg mean/std. `embed_fn`, when given, replaces the
    backbone: it takes a float batch (B, 3, H, W) in [0, 1] on `device` and returns (B, D)
    features (e.g. a trained expert's `embed`, which normalises by itself).
    """
    torch_device = select_device(device)
    if embed_fn is None:
        embed_fn = timm_embedder(model_name, pretrained, torch_device)
    crops = FaceCropCache(face_cfg, cache_dir)

    features, kept, batch, batch_indices = [], [], [], []

    def flush():
        x = to_unit_float(torch.stack(batch), torch_device)
        with torch.no_grad():
            out = embed_fn(x)
        features.append(out.float().reshape(len(batch), -1).cpu().numpy())
        kept.extend(batch_indices)
        batch.clear()
        batch_indices.clear()

    with logging_redirect_tqdm():  # warnings print above the progress bar, not through it
        for index, sample in enumerate(tqdm(samples, desc="embedding", unit="img", leave=False)):
            try:
                crop = crops.load(sample.path)
            except ImageDecodeError as err:
                log.warning("skipped %s", err)
                continue
            points = crops.landmarks(sample.path) if region != "face" else None  # cached beside the crop
            batch.append(region_tensor(crop, region, image_size, points))
            batch_indices.append(index)
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    if not features:
        raise DataLayoutError(f"none of the {len(samples)} images could be read")
    if len(kept) < len(samples):
        log.warning("%d of %d images could not be read and were skipped", len(samples) - len(kept), len(samples))
    return np.concatenate(features), np.asarray(kept, dtype=np.int64)


def timm_embedder(model_name: str, pretrained: str, device: torch.device) -> Callable:
    """A [0, 1] batch -> pooled timm features, normalised with the model's own mean/std."""
    if not timm.is_model(model_name):
        raise UnknownNameError(f"--backbone {model_name!r} is not a timm model name")
    backbone = create_backbone(ExpertConfig(model=model_name, pretrained=pretrained)).to(device).eval()
    data_cfg = backbone.pretrained_cfg or {}
    mean = torch.tensor(data_cfg.get("mean", IMAGENET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg.get("std", IMAGENET_STD), device=device).view(1, 3, 1, 1)
    return lambda x: backbone((x - mean) / std)


# ================================================================ command line

@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m experts.cluster_split", __doc__, positional="DATA_ROOT")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--k", type=int, default=5, help="number of clusters = folds")
    parser.add_argument("--backbone", default="resnet18", help="timm model that embeds the face crops")
    parser.add_argument("--pretrained", nargs="?", const="hub", default="", metavar="NAME",
                        help="the backbone's weights: hub (the default when given bare; needs network) or packaged "
                             "weights that install offline (efficientnet_lite0 for --backbone tf_efficientnet_lite0)")
    parser.add_argument("--expert", help="embed with this trained expert (its face crop and input size) "
                                         "instead of --backbone")
    parser.add_argument("--weights", type=Path, default=Path("weights"), help="where --expert is")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--random", action="store_true", help="stratified random folds instead (baseline)")
    mode.add_argument("--unsupervised", action="store_true",
                      help="ignore the labels: 2-means pseudo labels -> pseudo_labels.csv")
    args = parser.parse_args(argv)
    cfg = config_from(args, data_root=args.positional)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    splits = load_splits(cfg.data_root, cfg.seed, methods=cfg.data.methods)
    samples = splits["trainset"] + splits["valset"]
    names = [s.name for s in samples]
    targets = np.array([s.target for s in samples])
    check_unique_names(names)  # before the slow embedding, not after it
    if args.random:
        folds_path = write_folds(args.out, names, targets, random_folds(names, targets, args.k, cfg.seed),
                                 method=f"stratified random ({args.k} folds, seed {cfg.seed})")
        print((args.out / "clusters.md").read_text())
        print(f"wrote {folds_path}")
        return 0
    face, image_size, embed_fn, region, source = cfg.face, args.image_size, None, "face", args.backbone
    if args.expert:
        model, entry = load_expert(args.weights, args.expert, select_device(cfg.device))
        face, image_size, embed_fn, region = face_config_of(entry), model.image_size, model.embed, model.region
        source = f"expert {args.expert!r}"
    emb, kept = embed_with_backbone(samples, args.backbone, face, cfg.data.cache_dir, image_size,
                                    args.batch_size, args.pretrained, cfg.device, embed_fn=embed_fn, region=region)
    if args.unsupervised:
        write_pseudo_labels(args.out, [samples[i] for i in kept], emb, cfg.seed)
    else:
        write_cluster_split(args.out, samples, emb, kept, args.k, cfg.seed, cfg.device,
                            method=f"k-means (k={args.k}) on {source} embeddings")
    return 0


def write_cluster_split(out_dir: Path, samples: list[Sample], emb: np.ndarray, kept: np.ndarray, k: int,
                        seed: int, device: str, method: str) -> Path:
    """Cluster the kept samples, write folds (unreadable samples get fold -1) and t-SNE plots."""
    from common.plots import plot_embedding_tsne  # matplotlib is only needed here

    clusters = np.full(len(samples), UNCLUSTERED, dtype=np.int64)
    clusters[kept] = kmeans(emb, k, seed, device)
    names = [s.name for s in samples]
    targets = np.array([s.target for s in samples])
    make_folds(names, targets, clusters)  # warns about single-class validation clusters
    folds_path = write_folds(out_dir, names, targets, clusters, method=method)

    shown = _tsne_subsample(len(kept), seed)
    plot_embedding_tsne(emb[shown], clusters[kept][shown], out_dir / "tsne_cluster.png",
                        f"{method}: clusters", colour_by_name="cluster")
    plot_embedding_tsne(emb[shown], _label_names(targets[kept][shown]), out_dir / "tsne_label.png",
                        f"{method}: labels", colour_by_name="label")
    print((out_dir / "clusters.md").read_text())
    print(f"wrote {folds_path}")
    return folds_path


def write_pseudo_labels(out_dir: Path, samples: list[Sample], emb: np.ndarray, seed: int) -> Path:
    """pseudo_labels.csv (img_name,target) + pseudo_labels.json (rule, evidence, and AUC /
    accuracy against the true labels when every sample has one) + t-SNE plots."""
    from sklearn.metrics import roc_auc_score

    from common.plots import plot_embedding_tsne

    labels, info = pseudo_labels(emb, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "pseudo_labels.csv"
    write_label_file(csv_path, [(s.name, int(label)) for s, label in zip(samples, labels)])

    report = {key: value for key, value in info.items() if key != "fake_score"}
    true = np.array([s.target for s in samples])
    if all(t is not None for t in true) and len(set(true.tolist())) == 2:
        true = true.astype(np.int64)
        report["accuracy"] = round(float((labels == true).mean()), 4)
        report["auc"] = round(float(roc_auc_score(true, info["fake_score"])), 4)
    (out_dir / "pseudo_labels.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    shown = _tsne_subsample(len(samples), seed)
    plot_embedding_tsne(emb[shown], _label_names(labels[shown]), out_dir / "tsne_pseudo_label.png",
                        f"pseudo labels ({info['rule']})", colour_by_name="pseudo label")
    if "auc" in report:
        plot_embedding_tsne(emb[shown], _label_names(true[shown]), out_dir / "tsne_label.png",
                            "true labels", colour_by_name="label")
    print(json.dumps(report, indent=2))
    print(f"wrote {csv_path}")
    return csv_path


def _tsne_subsample(n: int, seed: int) -> np.ndarray:
    if n <= TSNE_MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, TSNE_MAX_POINTS, replace=False))


def _label_names(targets) -> np.ndarray:
    return np.where(np.asarray(targets) == 1, "fake", "real")


if __name__ == "__main__":
    sys.exit(main())

"""Data preparation, below the experts: everything about images and labels, no model.

    dataset, labels          data roots, splits and the label-file format
    images, faces, landmarks decoding, face crops, the 68 facial landmarks
    transforms, loaders      training augmentations; the datasets, sampler and loaders training reads
    manipulations, masks     editing fakes and where they edit
    make_fakes, diffusion    commands that add editing / Stable Diffusion fakes to a data root
    diffusion_pipelines      loading the Stable Diffusion pipelines
    clustering, folds, pseudo_labels   the cluster re-split (its command: experts.cluster_split)
    demo, video, audit       the demo data set, videos, the duplicate / leakage audit
"""

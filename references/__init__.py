"""Reference representations and the data behind them, built by name (timm-style registries).

``build_dataset(name, **options)`` returns a ``references.datasets.DataBundle``;
``build_reference(name, bundle=..., model=..., layer=..., ...)`` returns an object with the
reference protocol the trainable calls, ``targets(images, image_ids) -> groups of (rows, Y)``.
The sweep files name both; tests parametrise over the registries.
"""

from __future__ import annotations

import os
from typing import Any

from trainable.registry import Registry

__all__ = ["DATASETS", "REFERENCES", "build_dataset", "build_reference"]


# Builders import their modules when called: importing the package stays cheap, and
# `python -m references.nsd` does not find its own module pre-imported by the package.


def _simulated_single_label(**options: Any):
    from references import datasets

    return datasets.simulated_single_label_bundle(**options)


def _simulated_nsd(**options: Any):
    from references import datasets

    return datasets.simulated_nsd_bundle(**options)


def _imagenet(root: str | os.PathLike, **options: Any):
    from references import datasets

    return datasets.imagefolder_bundle(root, **options)


def _nsd_release(*, nsd_root: str | os.PathLike, coco_annotations: str | os.PathLike,
                 roi: str, image_size: int, subjects=None, progress: bool = True,
                 split_seed: int | None = None):
    """A real NSD release: prepare (cached by the inputs' sizes and mtimes), then open.
    ``subjects`` None = every subject present in the release."""
    from pathlib import Path

    from references import datasets, nsd

    chosen = nsd.subjects_in_release(nsd_root) if subjects is None else tuple(subjects)
    table = nsd.prepare_cached(nsd_root, coco_annotations, chosen, roi, progress=progress)
    seed = datasets.NSD_SPLIT_SEED if split_seed is None else split_seed
    return datasets.nsd_bundle(table, Path(nsd_root) / nsd.STIMULI, image_size=image_size,
                               seed=seed, subjects=chosen)


#: data name (as in a sweep file) -> builder(**options) -> DataBundle
DATASETS: Registry = Registry("data")
DATASETS.register("simulated_single_label", _simulated_single_label)
DATASETS.register("simulated_nsd", _simulated_nsd)
DATASETS.register("imagenet", _imagenet)
DATASETS.register("nsd", _nsd_release)


def build_dataset(name: str, **options: Any):
    """Build data set ``name`` (see ``DATASETS``); unknown names list the accepted ones."""
    return DATASETS.build(name, **options)


def _gabor(**_: Any):
    from references.gabor import GaborReference

    return GaborReference()


def _pretrained(*, bundle, model: str, layer: str, width: float,
                image_size: int, weights: str = "auto", dataset_key: object = None,
                device: str = "cpu", **_: Any):
    """A frozen network at the trial's layer. weights: "torchvision" (local hub cache, paper
    scale), a state-dict path, or "auto" (train the project's own reference network on the
    sweep's training split, task only, its own seed, cached under a file lock)."""
    from references.pretrained import ReferenceTraining, pretrained_reference

    return pretrained_reference(
        model, layer, weights,
        data=bundle.train, num_classes=bundle.num_classes,
        multilabel=bundle.task == "multi_label", image_size=image_size,
        training=ReferenceTraining(width=width), dataset_key=dataset_key, device=device,
    )


def _voxels(*, bundle, **_: Any):
    if bundle.responses is None:
        raise ValueError("reference 'nsd' needs voxel data (data 'nsd' or 'simulated_nsd'), "
                         f"but the data is {bundle.task} without responses")
    return bundle.responses


#: reference name (as in a sweep file) -> builder(bundle=..., model=..., layer=..., ...)
REFERENCES: Registry = Registry("reference")
REFERENCES.register("gabor", _gabor)
REFERENCES.register("pretrained", _pretrained)
REFERENCES.register("nsd", _voxels)


def build_reference(name: str, **options: Any):
    """Build reference ``name`` (see ``REFERENCES``) for one condition; the options are the
    condition's data bundle, model, layer, width and image size (and weights for
    "pretrained"). Unknown names list the accepted ones."""
    return REFERENCES.build(name, **options)

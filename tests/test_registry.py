"""Every data set and reference the sweep files name builds from its registry name, and the
built reference speaks the protocol the trainable calls."""

from __future__ import annotations

import pytest
import torch

from references import DATASETS, REFERENCES, build_dataset, build_reference
from references.simulated import generate_nsd_like, generate_single_label
from trainable.data import decode, normalize
from trainable.models import build_model

SMALL_SINGLE = dict(n_categories=3, n_train_per_class=6, n_val_per_class=4, seed=1)
SMALL_NSD = dict(n_images=120, n_subjects=2, trials_per_session=60, seed=1)


def _options(name: str) -> dict:
    if name == "simulated_single_label":
        return dict(image_size=64, **SMALL_SINGLE)
    if name == "simulated_nsd":
        return dict(roi="V1", image_size=64, **SMALL_NSD)
    if name == "imagenet":  # the simulated single-label set is an ImageNet-layout tree
        return dict(root=generate_single_label(image_size=64, **SMALL_SINGLE), image_size=64)
    if name == "nsd":  # and the simulated NSD-like set is a release in the native layout
        sim = generate_nsd_like(image_size=64, **SMALL_NSD)
        return dict(nsd_root=sim.nsd_root, coco_annotations=sim.coco_annotations,
                    subjects=sim.subjects, roi="VVS", image_size=64, progress=False)
    raise AssertionError(f"no test options for data {name!r}: add them here")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_builds_from_its_name(name):
    bundle = build_dataset(name, **_options(name))
    image, target, image_id = bundle.train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert bundle.task in ("single_label", "multi_label")
    assert (bundle.responses is not None) == (bundle.task == "multi_label")
    assert len(bundle.val) > 0


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_every_reference_builds_from_its_name_and_gives_groups(name, tmp_path):
    data = "simulated_nsd" if name == "nsd" else "simulated_single_label"
    bundle = build_dataset(data, **_options(data))
    weights = "auto"
    if name == "pretrained":  # a weights file, as at paper scale (auto is tested elsewhere)
        net = build_model("alexnet", num_classes=bundle.num_classes, width=0.25, seed=0)
        weights = tmp_path / "alexnet.pth"
        torch.save(net.net.state_dict(), weights)
    reference = build_reference(name, bundle=bundle, model="alexnet", layer="conv1",
                                width=0.25, image_size=64, weights=str(weights))
    split = decode(bundle.train)
    images, ids = normalize(split.images[:12]), split.image_ids[:12]
    out = reference.targets(images, ids)
    groups = list(out.values()) if isinstance(out, dict) else list(out)
    assert groups
    for rows, y in groups:
        assert rows.dtype == torch.int64 and y.shape[0] == rows.numel()


def test_unknown_names_list_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown data 'coco'; accepted: imagenet, nsd"):
        build_dataset("coco")
    with pytest.raises(ValueError, match=r"unknown reference 'v4'; accepted: gabor, nsd"):
        build_reference("v4")


def test_the_registries_build_exactly_the_shared_vocabulary():
    """One source for each enumeration (records): every reference kind, data kind and ROI a
    sweep file may name has a builder, and every builder is named there."""
    import records
    from references import nsd
    from trainable.alignment import METRICS
    from trainable.config import TrialConfig

    assert set(REFERENCES) == set(records.REFERENCE_KINDS)
    assert set(DATASETS) == set(records.PAPER_DATA) | set(records.DEMO_DATA)
    assert set(records.PAPER_DATA.values()) | set(records.DEMO_DATA.values()) == set(
        records.TASKS)
    assert set(records.VOXEL_DATA) <= set(DATASETS)
    assert set(nsd.ROIS) == set(records.ROIS)
    assert TrialConfig().metric in METRICS


def test_one_registry_style_for_models_metrics_datasets_and_references():
    from trainable.alignment import METRICS
    from trainable.models import MODELS
    from trainable.registry import Registry

    for registry in (MODELS, METRICS, DATASETS, REFERENCES):
        assert isinstance(registry, Registry)
        with pytest.raises(ValueError, match=rf"unknown {registry.kind} 'nope'; accepted: "):
            registry.get("nope")
        name = next(iter(registry))
        with pytest.raises(ValueError, match="already registered"):
            registry.register(name, registry[name])

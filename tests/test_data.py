"""The streaming data path (trainable/data.py): trials read their own images, streamed through a
DataLoader with worker processes or decoded once into memory; the two give the same trial; the
driver never decodes or ships images; real ImageNet trees in both layouts run through a real
sweep on a local Ray."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from imagenet_tree import write_imagenet_tree
from mlflow.tracking import MlflowClient

from references.datasets import (
    imagefolder_bundle,
    simulated_nsd_bundle,
    simulated_single_label_bundle,
)
from references.gabor import GaborReference
from trainable.data import (
    BatchFeed,
    TrialData,
    sequential_schedule,
    steps_in_epoch,
    train_batches,
)
from trainable.train import LocalHooks, train

REPO = Path(__file__).resolve().parents[1]
TIMING = ("epoch_seconds", "images_per_second", "data_wait_seconds")
TINY = dict(model="alexnet", layer="conv1", image_size=64, width=0.25, batch_size=16,
            epochs=2, val_images=24, val_folds=3, threads=1, lr=1e-3)


def _science(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def _run(cfg, data, reference, workdir, resume_from=None):
    hooks = LocalHooks(workdir, resume_from=resume_from)
    return train(cfg, data=data, reference=reference, hooks=hooks), hooks


@pytest.fixture(scope="module")
def single():
    bundle = simulated_single_label_bundle(image_size=64, n_categories=3, n_train_per_class=20,
                                           n_val_per_class=10, seed=5)
    return TrialData.from_bundle(bundle, "simulated single-label (test)")


@pytest.fixture(scope="module")
def nsd_like():
    bundle = simulated_nsd_bundle(roi="V1", image_size=64, n_images=160, n_subjects=2,
                                  trials_per_session=80, seed=6)
    return TrialData.from_bundle(bundle, "simulated NSD (test)"), bundle.responses


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet") / "tree", n_classes=3,
                               n_train=12, n_val=4, sizes=((160, 120), (120, 160), (200, 150)))


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_and_in_memory_give_the_same_trial(single, tmp_path, workers):
    """Same batches, same flips, same numbers: streaming only changes where images come from."""
    cfg = dict(TINY, reference="gabor", alpha=2.0)
    memory, _ = _run(dict(cfg, in_memory_mb=64), single, GaborReference(), tmp_path / "m")
    streamed, _ = _run(dict(cfg, in_memory_mb=0, loader_workers=workers), single,
                       GaborReference(), tmp_path / "s")
    assert _science(streamed) == _science(memory)


def test_nsd_streams_like_in_memory(nsd_like, tmp_path):
    data, responses = nsd_like
    cfg = dict(TINY, reference="nsd", alpha=0.5, rectify=True, pool=8, epochs=1)
    memory, _ = _run(dict(cfg, in_memory_mb=64), data, responses, tmp_path / "m")
    streamed, _ = _run(dict(cfg, in_memory_mb=0, loader_workers=1), data, responses,
                       tmp_path / "s")
    assert _science(streamed) == _science(memory)


def test_feed_chooses_memory_by_size_and_augmentation(single):
    cpu = torch.device("cpu")
    one_split = single.decoded_bytes("train")
    order = sequential_schedule(len(single.train), 8)
    small = BatchFeed(single.train, schedule=order, workers=0, device=cpu, image_size=64,
                      in_memory_bytes=one_split)
    assert not small.streaming and len(small.memory) == len(single.train)
    big = BatchFeed(single.train, schedule=order, workers=0, device=cpu, image_size=64,
                    in_memory_bytes=one_split - 1)
    assert big.streaming
    cropped = BatchFeed(single.train, schedule=order, workers=0, device=cpu, image_size=64,
                        in_memory_bytes=10 * one_split, cacheable=False)
    assert cropped.streaming  # a random crop needs the file: never cached
    picked = BatchFeed(single.train, schedule=lambda e: ([torch.tensor([5, 0, 7 + e])], 0),
                       workers=1, device=cpu, image_size=64, first_epoch=2)
    try:
        with pytest.raises(ValueError, match="epoch 0 asked for, but this feed serves epoch 2"):
            next(picked.epoch(0))
        for epoch in (2, 3, 4):  # one loader iterator across epochs, each epoch its own batches
            (images, targets, ids), = list(picked.epoch(epoch))
            assert images.dtype == torch.uint8 and ids.tolist() == [5, 0, 7 + epoch]
            assert torch.equal(images[1], single.train[0][0])
    finally:
        picked.close()


def test_steps_per_epoch_caps_training_and_batches_follow_seed_and_epoch(single, tmp_path):
    final, hooks = _run(dict(TINY, reference="gabor", steps_per_epoch=2, epochs=1), single,
                        GaborReference(), tmp_path)
    assert final["images_per_second"] > 0 and len(hooks.history) == 1
    assert steps_in_epoch(60, 16, 3, 0) == 4 and steps_in_epoch(60, 16, 13, 0) == 3
    assert steps_in_epoch(60, 16, 3, 2) == 2
    a = train_batches(60, 16, seed=1, epoch=3, steps=4)
    assert [len(b) for b in a] == [16, 16, 16, 12]
    assert sorted(torch.cat(a).tolist()) == list(range(60))
    assert all(torch.equal(x, y) for x, y in zip(a, train_batches(60, 16, 1, 3, 4)))
    assert not torch.equal(a[0], train_batches(60, 16, 1, 4, 4)[0])


def test_crop_flip_streaming_is_reproducible_and_resumes_bit_exact(imagenet_tree, tmp_path):
    """RandomResizedCrop runs in the loader's workers under a per-item seed drawn from (seed,
    epoch, step): two runs agree, and a resumed trial equals one that never stopped."""
    bundle = imagefolder_bundle(imagenet_tree, image_size=64)
    data = TrialData.from_bundle(bundle, "imagenet tree (test)")
    assert data.augment == "crop_flip"
    cfg = dict(TINY, reference="gabor", alpha=1.0, batch_size=12, val_images=12,
               loader_workers=1)
    straight, _ = _run(cfg, data, GaborReference(), tmp_path / "a")
    again, _ = _run(cfg, data, GaborReference(), tmp_path / "b")
    assert _science(again) == _science(straight)
    _, first = _run(dict(cfg, epochs=1), data, GaborReference(), tmp_path / "c")
    resumed, hooks = _run(cfg, data, GaborReference(), tmp_path / "d",
                          resume_from=first.checkpoints[-1])
    assert [m["epoch"] for m in hooks.history] == [1.0]
    assert _science(resumed) == _science(straight)


def test_crop_flip_items_are_seeded_at_the_largest_accepted_seed(imagenet_tree):
    """Each item's seed comes from (seed, epoch, step); at seed 2**31 - 1 (or a date such as
    20240101) that product passed 2**64 and every trial failed on its first batch."""
    from trainable.config import TrialConfig
    from trainable.train import training_schedule

    data = TrialData.from_bundle(imagefolder_bundle(imagenet_tree, image_size=64), "tree")
    for seed in (2**31 - 1, 20240101):
        cfg = TrialConfig(**dict(TINY, batch_size=12, seed=seed))
        feed = BatchFeed(data.train, schedule=training_schedule(len(data.train), cfg),
                         workers=0, device=torch.device("cpu"), image_size=64,
                         cacheable=False, random_items=True)  # as train() builds it
        try:
            images, _, _ = next(iter(feed.epoch(0)))
            assert images.shape == (12, 3, 64, 64)
        finally:
            feed.close()


class _TensorRecorder(pickle.Pickler):
    """Pickles like ray.put's serialiser would, recording every tensor it meets."""

    def __init__(self, file):
        super().__init__(file, protocol=5)
        self.tensors: list[torch.Tensor] = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
        return NotImplemented


@pytest.mark.parametrize("source", ["imagenet", "simulated_nsd"])
def test_the_driver_puts_no_image_tensor_in_the_object_store(source, imagenet_tree, tmp_path):
    """What ``sweeps.execute`` puts in Ray's object store per condition: the data is split
    indices and labels (no 4-D tensor, no image bytes), the reference its own small state."""
    from sweeps.execute import _prepare
    from sweeps.plan import make_plan
    from sweeps.run import build_parser

    if source == "imagenet":
        argv = ["gabor_conv1", "--data", "imagenet", "--imagenet-root", str(imagenet_tree),
                "--set", "image_size=64", "--set", "batch_size=8"]  # a 36-image tree
    else:
        argv = ["nsd_conv1_v1", "--smoke-test"]
    plan = make_plan(build_parser().parse_args([*argv, "--storage", str(tmp_path)]))
    datas, references = _prepare(plan)
    for name, data in datas.items():
        buf = io.BytesIO()
        rec = _TensorRecorder(buf)
        rec.dump(data)
        n_images = len(data.train) + len(data.val)
        assert not [t for t in rec.tensors if t.ndim == 4], name
        # labels (80 floats for multi-hot) and ids: a few hundred bytes an image, never
        # 3 * S * S bytes of pixels
        assert buf.tell() < 20_000 + 400 * n_images < n_images * 3 * 64 * 64, buf.tell()
        big = [t for t in rec.tensors if t.numel() * t.element_size() > 1_000_000]
        assert not big, [tuple(t.shape) for t in big]


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("layout", ["imagefolder", "torchvision_flat_val"])
def test_real_imagenet_tree_runs_through_a_real_sweep(layout, tmp_path):
    """A lab's ImageNet (JPEGs of varied sizes; the ImageFolder layout, or torchvision's with a
    devkit and a flat val folder) through `run.py --data imagenet` on a local Ray, shrunk with
    --set, one configuration picked with --only; the overrides reach MLflow."""
    root = write_imagenet_tree(tmp_path / layout, layout=layout, n_classes=3, n_train=6,
                               n_val=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["epochs=1", "steps_per_epoch=2", "batch_size=8", "image_size=64", "width=0.25",
            "val_images=12", "val_folds=3"]
    argv = ["gabor_conv1", "--data", "imagenet", "--imagenet-root", str(root),
            *[x for s in sets for x in ("--set", s)], "--only", "gabor_conv1-max-a8-b1-*",
            "--cpus-per-trial", "1", "--gpus-per-trial", "0", "--mlflow-uri", uri,
            "--storage", str(tmp_path / "ray")]
    dry = _cli(*argv, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "selected: 1 of 33 trials by --only" in dry.stdout
    assert "overrides: batch_size=8,epochs=1," in dry.stdout
    proc = _cli(*argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validation images indexed" in proc.stdout and "each trial reads its own" in proc.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gabor_conv1-paper")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1
    run = children[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["steps_per_epoch"] == "2" and run.data.params["image_size"] == "64"
    assert run.data.tags["overrides"].startswith("batch_size=8,epochs=1,")
    assert run.data.tags["trial_id"] == "gabor_conv1-max-a8-b1-s0"
    assert 0.0 <= run.data.metrics["val_top1"] <= 1.0


def test_paper_dry_run_checks_every_dataset_and_the_pretrained_weights(tmp_path, imagenet_tree):
    """`paper --data paper` as a newcomer runs it: an ImageNet tree and an NSD release in their
    real layouts, every subject of the release; the pretrained conditions need torchvision's
    weights file in the local torch hub cache, and say so in one line when it is missing."""
    import torchvision

    from references.simulated import generate_nsd_like

    sim = generate_nsd_like(image_size=32, n_images=100, n_subjects=2, n_categories=6,
                            trials_per_session=80, seed=1)
    argv = ["paper", "--data", "paper", "--imagenet-root", str(imagenet_tree),
            "--nsd-root", str(sim.nsd_root), "--coco-annotations", str(sim.coco_annotations),
            "--dry-run", "--storage", str(tmp_path / "ray"),
            "--set", "batch_size=16"]  # the paper's 1000 is refused for a 36-image tree
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: condition pretrained_conv1: no ImageNet weights for "
                                  "alexnet: put alexnet-owt-7be5be79.pth in ")
    assert len(proc.stderr.strip().splitlines()) == 1
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), hub / "alexnet-owt-7be5be79.pth")
    torch.save(torchvision.models.resnet18().state_dict(), hub / "resnet18-f37072fd.pth")
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "subjects 1, 2" in proc.stdout.splitlines()[0]  # every subject in the release
    assert proc.stdout.strip().endswith("79 trials")


def test_trial_memory_does_not_grow_with_the_dataset(tmp_path):
    """The same trial (index, object-store round trip, 224 px, streamed training and
    evaluation over the whole validation split) over N and 10N JPEGs: the peak memory of the
    trial and its loader workers stays flat. Keeping the splits decoded would add
    9N x 3 x 224^2 bytes for each split (2 x 136 MB here); the C heap growing with the
    number of batches evaluated (fixed by trainable.data.fix_mmap_threshold) added 0.2-0.6 GB
    at these sizes."""
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from bench_data import peak_memory_mb

    sizes = ((256, 192), (192, 256), (320, 240))
    peaks = {}
    for n in (100, 1000):
        root = write_imagenet_tree(tmp_path / f"n{n}", n_classes=4, n_train=n // 4,
                                   n_val=n // 4, sizes=sizes)
        peaks[n], pickled = peak_memory_mb(root, steps=3)
        assert pickled < 200 * n, pickled  # the path index, no pixels
    assert peaks[1000] - peaks[100] < 100, peaks

"""How a trial gets its images: one streaming data path at every scale.

Item protocol (every dataset of ``references.datasets`` speaks it)::

    dataset[i] -> (image uint8 (3, S, S), target, image_id int64 scalar)

target : int64 class index (single-label) or float32 (num_classes,) multi-hot (multi-label).
Images stay uint8 through the loader (4x less to move between processes and to the GPU than
float32); :func:`normalize` runs per batch on the trial's device.

What crosses the object store is a :class:`TrialData`: the two split *datasets*, each a small
index (paths or ids, labels) over files every node sees; never decoded images. A trial reads its
own images through :class:`BatchFeed`:

* **streaming** (the general case): a ``torch.utils.data.DataLoader`` with worker processes
  sized from the trial's CPU share (persistent workers, prefetching, pinned memory on CUDA).
  The batch order of an epoch is a permutation drawn from (seed, epoch) in the trial process
  and handed to the workers as index batches, so a resumed trial sees the same batches.
* **in memory**: a split whose decoded size is at most ``TrialConfig.in_memory_mb`` and whose
  augmentation does not need the original file (``augment`` "none" or "flip") is decoded once,
  through the same loader, into a uint8 :class:`TensorSplit` in the trial's own memory; its
  batches are then slices of it. Same order, same batches, same augmentation as streaming; it
  only skips decoding every epoch (``tests/benchmarks/bench_data.py`` measures both).

Augmentation (``TrialData.augment``), a property of the data:

* ``"crop_flip"``: torchvision's classification reference (RandomResizedCrop + horizontal
  flip), done by the dataset in the loader's workers (ImageNet at paper scale). Image-computed
  references (Gabor, pretrained) are computed by the trainable on the same augmented batch.
* ``"flip"``: the dataset yields the evaluation view and the trainable flips half of each batch
  (draws from (seed, epoch, step)): the simulated single-label world.
* ``"none"``: images exactly as stored. NSD: a voxel responded to the image as shown, so NSD
  images are never cropped or flipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from records import TASKS  # one source: records

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("none", "flip", "crop_flip")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) or (3, H, W) in 0..255 -> float32 normalised with ImageNet mean/std,
    on the input's device."""
    # One float32 buffer, updated in place: at 224 px a batch's float copy is tens of MB, and
    # four such temporaries a batch churn the C heap (see ``fix_mmap_threshold``).
    x = images.to(torch.float32)
    mean, std = _mean_std(x.device)
    return x.div_(255.0).sub_(mean).div_(std)


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (3, 1, 1) float32 on ``device``, made once per device (on a
    GPU a fresh copy per batch is two blocking host-to-device transfers)."""
    if device not in _MEAN_STD:
        _MEAN_STD[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device)
                                  .view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _MEAN_STD[device]


class TensorSplit(Dataset):
    """A decoded split in memory, with the item protocol.

    images : (N, 3, S, S) uint8; targets : (N,) int64 or (N, C) float32; image_ids : (N,) int64.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor,
                 image_ids: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, 3, S, S), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if not images.shape[0] == targets.shape[0] == image_ids.shape[0]:
            raise ValueError(f"images, targets and image_ids differ in length: "
                             f"{images.shape[0]}, {targets.shape[0]}, {image_ids.shape[0]}")
        self.images, self.targets, self.image_ids = images, targets, image_ids

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index], self.image_ids[index]

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement()
                   for t in (self.images, self.targets, self.image_ids))

    def take(self, index: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.images[index], self.targets[index], self.image_ids[index])


@dataclass(frozen=True)
class TrialData:
    """What the driver prepares once per data source and every trial of it shares: the two
    split datasets (indices over files, never decoded images) and what they mean.

    train, val : datasets with the item protocol (for NSD, val is the test split).
    task : "single_label" (cross-entropy, top-1/top-5) or "multi_label" (BCE, mAP).
    num_classes : logits the model produces.
    image_size : S of the items.
    augment : "none", "flip" or "crop_flip" for the training split (module docstring).
    description : where the data came from, for tags and messages.
    """

    train: Dataset
    val: Dataset
    task: str
    num_classes: int
    image_size: int
    augment: str = "none"
    description: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}; accepted: {', '.join(TASKS)}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment={self.augment!r}; accepted: {', '.join(AUGMENTATIONS)}")

    @classmethod
    def from_bundle(cls, bundle, description: str = "") -> TrialData:
        """Wrap a ``references.datasets.DataBundle``: nothing is decoded."""
        return cls(bundle.train, bundle.val, bundle.task, bundle.num_classes,
                   bundle.image_size, bundle.augment, description)

    def subset(self, n_train: int, n_val: int) -> TrialData:
        """The first n_train / n_val items of each split (smoke tests, benchmarks)."""
        return replace(self, train=Subset(self.train, range(min(n_train, len(self.train)))),
                       val=Subset(self.val, range(min(n_val, len(self.val)))))

    def decoded_bytes(self, split: str) -> int:
        """Bytes of a split's images decoded to uint8."""
        return len(getattr(self, split)) * 3 * self.image_size ** 2


def loader_workers(requested: int, threads: int, device: torch.device) -> int:
    """DataLoader worker processes for a trial: ``requested`` when >= 0, else from the trial's
    CPU share: on CUDA every CPU of the share decodes (the trial process mostly waits on the
    GPU); on CPU, half of them (at least one), the rest compute."""
    if requested >= 0:
        return requested
    cpus = max(1, threads)
    return cpus if device.type == "cuda" else max(1, cpus // 2)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of an epoch: depends only on (n, seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def flip_mask(batch: int, seed: int, epoch: int, step: int) -> torch.Tensor:
    """(batch,) bool: which images of a step are flipped under ``augment == "flip"``."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + step) % 2**63)
    return torch.rand(batch, generator=gen) < 0.5


#: glibc's mallopt parameters and the mmap threshold trials use
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 16 * 2**20


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve C allocations of ``nbytes`` or more by mmap, returned to the OS when freed
    (glibc ``mallopt(M_MMAP_THRESHOLD)``; elsewhere nothing happens, returns False).

    Why: glibc raises its mmap threshold to the size of any mmapped chunk that is freed (up to
    32 MiB), so after the first batch a 224 px batch's float copy (tens of MB) comes from the
    heap, where chunks that outlive a batch pin the freed space: a trial's resident memory
    then grew with the number of batches it evaluated, i.e. with the dataset (+0.2 to +0.6 GB
    from 300 to 3,000 validation images in tests/benchmarks/bench_data.py; flat with this).
    A fixed threshold also turns that adjustment off, and with it the trim threshold's, which
    would then stay at 128 KiB and return (and refault) the top of the heap every step: it is
    set to twice the mmap threshold, as glibc's own adjustment does. Process-wide, so it is set
    in the trial process (and inherited by its loader workers), never in a library import."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes))
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2 * int(nbytes)))
    except (OSError, AttributeError):
        return False


#: a worker's batch of images up to this size travels inside its message (a copy through the
#: pipe); larger ones in shared memory (a file-descriptor exchange per tensor, ~1 ms here)
INLINE_BATCH_BYTES = 8 * 2**20


def _collate(items):
    """A batch from a worker. Targets and ids are numpy arrays, which travel inside the
    message; so do the images when small (``INLINE_BATCH_BYTES``: the demo's 50 images at
    64 px are 0.6 MB), while a large batch is stacked straight into one shared-memory tensor
    (``default_collate``), so 1,000 images at 224 px (150 MB) are never copied through a
    pipe. A shared-memory tensor costs the receiving trial process a file-descriptor exchange
    with the worker, which at the demo's step time was a few per cent of it."""
    first = items[0][0]
    if len(items) * first.numel() * first.element_size() <= INLINE_BATCH_BYTES:
        # C order: np.stack keeps its inputs' layout, and decoded images are channels-last
        # views; a channels-last batch takes other conv kernels (other rounding) than the
        # contiguous batches of the in-memory path.
        images = np.ascontiguousarray(np.stack([np.asarray(item[0]) for item in items]))
    else:
        images = default_collate([item[0] for item in items])
    targets = np.stack([np.asarray(item[1]) for item in items])
    ids = np.array([int(item[2]) for item in items], dtype=np.int64)
    return images, targets, ids


def _as_tensor(a) -> torch.Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


class _PlannedBatches:
    """The batch sampler of a streaming feed: every future epoch's batches, one after the
    other, generated in the trial process as the loader asks for them. One loader iterator
    then serves the whole trial, so its workers prefetch across epoch boundaries (the next
    epoch's first batches decode while this one is evaluated) instead of starting cold."""

    def __init__(self, feed: BatchFeed) -> None:
        self.feed = feed

    def __iter__(self) -> Iterator[list]:
        epoch = self.feed._first_epoch
        while True:
            batches, seed = self.feed.schedule(epoch)
            for k, b in enumerate(batches):
                if self.feed.random_items:
                    yield list(zip(b.tolist(), _item_seeds(b, (seed * 1_000_033 + k) % 2**63)))
                else:
                    yield b.tolist()
            epoch += 1


class _SeededItems(Dataset):
    """``dataset[(index, seed)]`` = ``dataset[index]`` with torch's RNG seeded by ``seed`` for
    that item only: a random augmentation (RandomResizedCrop, flip) depends on the (seed, epoch,
    step, position) the seed was drawn from, not on which worker made it or how many items it
    made before, so a resumed trial augments exactly as one that never stopped, and the
    trial process's own RNG is untouched when items load in it (workers=0)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _item_seeds(batch: torch.Tensor, step_seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(step_seed)
    return torch.randint(0, 2**62, (len(batch),), generator=gen).tolist()


#: epoch -> (index batches of that epoch, seed of its random augmentation)
Schedule = Callable[[int], tuple[list[torch.Tensor], int]]


def sequential_schedule(n: int, batch: int) -> Schedule:
    """Every epoch the same: the split in order, in batches of ``batch`` (evaluation)."""
    batches = [torch.arange(lo, min(lo + batch, n)) for lo in range(0, n, batch)]
    return lambda epoch: (batches, 0)


class BatchFeed:
    """Batches of one split for one trial, streamed or from memory (module docstring).

    dataset : the split (item protocol).
    schedule : epoch -> (index batches, augmentation seed); ``epoch(e)`` serves epoch e's.
    workers : DataLoader worker processes (0 = load in the trial process).
    device : where batches go (pinned memory and non-blocking copies on CUDA).
    image_size : S of the items (for the size estimate).
    in_memory_bytes : decode the split once into memory when its uint8 size is at most this
        and ``cacheable``; 0 = always stream. A ``TensorSplit`` is already in memory.
    random_items : the dataset's items are random (augmentation in the dataset): each item
        is then made under its own seed (``_SeededItems``), drawn from the batch's seed.
    first_epoch : the epoch the feed starts at (a resumed trial's).

    Epochs are served in order from ``first_epoch``; a streaming feed keeps one loader
    iterator (persistent workers) for all of them, created by ``start`` (or the first
    ``epoch``), so decoding begins while the trial still sets up.
    """

    def __init__(self, dataset: Dataset, *, schedule: Schedule, workers: int,
                 device: torch.device, image_size: int, in_memory_bytes: int = 0,
                 cacheable: bool = True, random_items: bool = False,
                 first_epoch: int = 0) -> None:
        self.dataset, self.schedule, self.device = dataset, schedule, device
        self.workers, self.random_items = workers, random_items
        self._first_epoch = self._next_epoch = first_epoch
        self._loader: DataLoader | None = None
        self._iterator: Iterator | None = None
        self.memory: TensorSplit | None = None
        decoded = len(dataset) * 3 * image_size ** 2
        if isinstance(dataset, TensorSplit):
            self.memory = dataset
        elif cacheable and 0 < decoded <= in_memory_bytes:
            self.memory = decode(dataset, workers=workers)

    @property
    def streaming(self) -> bool:
        return self.memory is None

    def __len__(self) -> int:
        return len(self.dataset)

    def start(self) -> None:
        """Start the workers decoding the first epoch's batches (streaming only)."""
        if self.memory is None and self._iterator is None:
            cuda = self.device.type == "cuda"
            extra = {}
            if self.workers > 0:
                extra = dict(persistent_workers=True, prefetch_factor=4 if cuda else 2)
            ds = _SeededItems(self.dataset) if self.random_items else self.dataset
            # An explicit generator: the loader's base seed is then not drawn from (and does
            # not advance) torch's global RNG, which the trial checkpoints.
            self._loader = DataLoader(ds, batch_sampler=_PlannedBatches(self),
                                      num_workers=self.workers, pin_memory=cuda,
                                      collate_fn=_collate, generator=torch.Generator(), **extra)
            self._iterator = iter(self._loader)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield epoch ``epoch``'s batches, (images uint8, targets, image_ids) on the device.
        Epochs must be asked for in order (the loader has already prefetched the next)."""
        if epoch != self._next_epoch:
            raise ValueError(f"epoch {epoch} asked for, but this feed serves epoch "
                             f"{self._next_epoch} next (epochs are served in order)")
        self._next_epoch += 1
        index_batches, _ = self.schedule(epoch)
        nb = self.device.type == "cuda"
        if self.memory is not None:
            for idx in index_batches:
                part = self.memory.take(idx)
                yield (part.images.to(self.device, non_blocking=nb),
                       part.targets.to(self.device, non_blocking=nb),
                       part.image_ids.to(self.device, non_blocking=nb))
            return
        self.start()
        for _ in index_batches:
            images, targets, ids = map(_as_tensor, next(self._iterator))
            yield (images.to(self.device, non_blocking=nb),
                   targets.to(self.device, non_blocking=nb), ids.to(self.device, non_blocking=nb))

    def close(self) -> None:
        """Stop the loader's worker processes now (they would otherwise live until garbage
        collection, and a reused Ray actor runs the next trial in the same process)."""
        it, self._iterator, self._loader = self._iterator, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def decode(dataset: Dataset, *, workers: int = 0, batch: int = 64) -> TensorSplit:
    """Every item of ``dataset`` in order, stacked into a :class:`TensorSplit` (uint8 images).
    Reads through a DataLoader (``workers`` processes), so decoding is parallel."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot decode an empty split")
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                        generator=torch.Generator())  # leaves torch's global RNG alone
    images = targets = ids = None
    lo = 0
    for im, tg, ii in loader:
        if images is None:
            images = torch.empty((n, *im.shape[1:]), dtype=im.dtype)
            targets = torch.empty((n, *tg.shape[1:]), dtype=tg.dtype)
            ids = torch.empty((n,), dtype=torch.int64)
        k = im.shape[0]
        images[lo:lo + k], targets[lo:lo + k], ids[lo:lo + k] = im, tg, ii
        lo += k
    return TensorSplit(images, targets, ids)


def steps_in_epoch(n: int, batch_size: int, min_rows: int, steps_per_epoch: int) -> int:
    """Training steps of one epoch: full batches, plus the last partial one when it has at
    least ``min_rows`` images; capped at ``steps_per_epoch`` when that is > 0."""
    full, rest = divmod(n, batch_size)
    steps = full + (1 if rest >= max(2, min_rows) else 0)
    return min(steps, steps_per_epoch) if steps_per_epoch > 0 else steps


def train_batches(n: int, batch_size: int, seed: int, epoch: int, steps: int) -> list[torch.Tensor]:
    """The index batches of a training epoch: the epoch's permutation cut into ``steps``
    batches of ``batch_size`` (the last may be shorter)."""
    order = epoch_order(n, seed, epoch)
    return [order[lo:lo + batch_size] for lo in range(0, min(n, steps * batch_size), batch_size)]


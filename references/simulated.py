"""The simulated world: the embedded default data, needing no download.

Procedural scenes of known object categories on textured backgrounds. A category is its
objects' luminance grating (orientation x spatial frequency, on a grid of orientations and the
``CATEGORY_FREQUENCIES``) and shape family; every object is drawn in a random hue, so colour is
no cue. The task therefore needs what the V1-like voxels below encode (oriented Gabor energy):
the world was built so that misalignment with V1 can cost performance (the demo's positive
control; README, "What the demo demonstrates"). Two variants:

* single-label (one object per image), written as an ImageFolder tree
  ``root/train/<class>/*.png``, ``root/val/<class>/*.png`` (:func:`generate_single_label`);
* multi-label (1-3 objects of distinct categories), written as a miniature NSD release in the
  native layout that :mod:`references.nsd` reads, with COCO-style annotation files and simulated
  voxel responses with repeats (:func:`generate_nsd_like`).

Simulated voxels (per subject, each with its own voxel models and volume):

* V1-like (``prf-visualrois`` labels 1, 2): rectified, compressed Gabor energy inside a Gaussian
  population receptive field. Energy comes from a quadrature-pair (complex) Gabor bank, 8
  orientations x 3 frequencies, on the image luminance; each voxel weights it by a pRF (centre,
  size) and an orientation/frequency tuning, then ``max(drive - threshold, 0) ** 0.5``.
* VVS-like (``streams`` label 5): a nonlinear mixture of category presence and shape features
  (area-weighted shape family and texture, size, elongation, object count, hue):
  ``softplus(a . x - 1) * (1 + 0.5 tanh(b . x))`` with a preferred category per voxel.
* all other brain voxels: noise only. Outside the brain (label -1): zeros, as in the release.

Each voxel's signal is standardised over the subject's images and scaled by its own ncsnr (signal
std / noise std, log-normal around 0.75 for V1 and 0.55 for VVS); unit Gaussian noise is added
per trial; then a per-session, per-voxel gain and offset (which within-session z-scoring must
remove), x 300, rounded to int16. Noise ceilings are measured from the written betas with
:func:`references.nsd.noise_ceiling` (and the true ones, from the ncsnr used, are kept too).

Everything is deterministic by ``seed`` and cached under ``cache_root()/simulated`` by a hash of
the parameters (and ``GENERATOR_VERSION``); concurrent callers build once.

    python -m references.simulated            # generate the demo-size sets, print where they are
"""

from __future__ import annotations

import colorsys
import csv
import json
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from records.errors import exception_line
from references import nsd
from references.cache import (
    DamagedCacheEntry,
    OneLineParser,
    build_once,
    cache_root,
    content_hash,
    damaged_entry,
)

GENERATOR_VERSION = 3  # 2: writes each subject's ncsnr.nii.gz; 3: categories by grating
# Number of real builds per kind in this process: lets tests see that a cached call built nothing.
BUILD_COUNTS: Counter[str] = Counter()

# The 80 COCO category ids (1..90 with the 10 unused ids removed), as in instances_*2017.json.
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
assert len(COCO_CATEGORY_IDS) == 80

SHAPES: tuple[tuple[str, int], ...] = (
    ("ellipse", 0), ("polygon", 3), ("polygon", 4), ("polygon", 5), ("polygon", 6),
    ("star", 4), ("star", 5), ("star", 6), ("ring", 0), ("cross", 0), ("crescent", 0))
TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "dots", "radial")


@dataclass(frozen=True)
class CategorySpec:
    """The generative statistics of one object category (angles in radians).

    What tells categories apart is what V1-like voxels encode: the orientation and spatial
    frequency of the object's luminance grating (``orientation``, ``texture_freq``), then its
    shape. Colour is no cue: every object is drawn in a random hue (``hue`` is kept for the
    record only), so a network cannot solve the task while ignoring oriented energy.
    """

    name: str
    shape: int  # index into SHAPES
    texture: int  # index into TEXTURES (always "stripes" since GENERATOR_VERSION 3)
    hue: float  # unused for drawing since version 3 (objects get a random hue)
    saturation: float
    aspect: float  # length / width of the shape's frame
    texture_freq: float  # grating cycles per image width (whatever the image size)
    orientation: float  # the grating's orientation in the image (object orientation follows)
    kappa: float  # von Mises concentration of the orientation (0 = uniform)
    scale: float  # size factor


# Grating frequencies in cycles per image width: the simulated V1 bank's 0.06-0.24 cycles per
# pixel at 64 px spans 3.8-15.4 cycles per image; categories use levels inside it.
CATEGORY_FREQUENCIES = (5.0, 7.5, 11.0, 15.0)


def make_categories(n: int, rng: np.random.Generator) -> list[CategorySpec]:
    """``n`` categories, each a distinct (grating orientation, grating frequency) pair on a grid
    of ``ceil(n / 4)`` orientations x up to 4 frequencies (``CATEGORY_FREQUENCIES``), with
    shapes spread as evenly as ``n`` allows. Orientations are held to about +-10 degrees
    (kappa 30), so a category's oriented energy is its signature."""
    n_freq = min(len(CATEGORY_FREQUENCIES), n)
    n_ori = -(-n // n_freq)
    shapes = np.resize(rng.permutation(len(SHAPES)), n)
    offset = rng.uniform(0, np.pi / n_ori)
    cells = rng.permutation(n_ori * n_freq)[:n]
    specs = []
    for c in range(n):
        i_ori, i_freq = divmod(int(cells[c]), n_freq)
        family, sides = SHAPES[shapes[c]]
        orientation = (offset + i_ori * np.pi / n_ori) % np.pi
        freq = CATEGORY_FREQUENCIES[i_freq]
        name = f"{family}{sides or ''}-o{int(np.degrees(orientation)):03d}-f{freq:g}"
        specs.append(CategorySpec(
            name=name, shape=int(shapes[c]), texture=TEXTURES.index("stripes"),
            hue=float(rng.uniform()), saturation=float(rng.uniform(0.55, 0.95)),
            aspect=float(rng.uniform(1.0, 1.5)), texture_freq=float(freq),
            orientation=float(orientation), kappa=30.0, scale=float(rng.uniform(0.9, 1.1))))
    return specs


# --------------------------------------------------------------------------------------------
# Rendering (vectorised over pixels; one scene at a time)


@dataclass(frozen=True)
class SceneObject:
    category: int  # index into the category list
    cx: float  # centre in [-1, 1] image coordinates (x right, y down)
    cy: float
    radius: float  # in the same units (1 = half the image)
    theta: float
    area: float  # visible pixels / image pixels
    hue: float  # the colour it was drawn in
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels (COCO convention)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c)  # xx (size, size) varies along columns, yy along rows


def _upsample(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of (k, k, c) to (size, size, c)."""
    k = a.shape[0]
    pos = np.linspace(0, k - 1, size)
    i0 = np.clip(np.floor(pos).astype(int), 0, k - 2)
    f = (pos - i0)[:, None, None]
    rows = a[i0] * (1 - f) + a[i0 + 1] * f
    return rows[:, i0] * (1 - f.transpose(1, 0, 2)) + rows[:, i0 + 1] * f.transpose(1, 0, 2)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Textured background (size, size, 3) in [0, 1]: a base colour, smooth colour noise and two
    oriented gratings of random frequency."""
    size = xx.shape[0]
    img = rng.uniform(0.25, 0.75, 3) + _upsample(rng.normal(0, 0.12, (4, 4, 3)), size)
    for _ in range(2):
        ang, freq = rng.uniform(0, np.pi), rng.uniform(2, 10)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)) + phase)
        img = img + rng.uniform(0.03, 0.12) * wave[..., None]
    return img


def _shape_margin(family: str, sides: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed inside-margin of a unit shape in object coordinates (> 0 inside)."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if family == "ellipse":
        return 1 - rho
    if family == "polygon":
        sector = 2 * np.pi / sides
        return np.cos(np.pi / sides) / np.cos(np.mod(phi, sector) - np.pi / sides) - rho
    if family == "star":
        return 0.5 + 0.5 * (0.5 + 0.5 * np.cos(sides * phi)) ** 2 - rho
    if family == "ring":
        return np.minimum(1 - rho, rho - 0.55)
    if family == "cross":
        arm = 0.32
        return np.maximum(np.minimum(arm - np.abs(u), 1 - np.abs(v)),
                          np.minimum(arm - np.abs(v), 1 - np.abs(u)))
    if family == "crescent":
        return np.minimum(1 - rho, np.hypot(u - 0.45, v) - 0.8)
    raise ValueError(f"unknown shape family {family!r}; known: {sorted({s for s, _ in SHAPES})}")


def _texture(kind: str, freq: float, phase: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Surface pattern in [0, 1], in object coordinates (so it turns with the object)."""
    if kind == "plain":
        return 0.6 + 0.15 * u
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + phase)
    if kind == "checker":
        return 0.5 + 0.5 * np.tanh(4 * np.sin(np.pi * freq * u + phase) * np.sin(np.pi * freq * v))
    if kind == "dots":
        return 0.5 + 0.5 * np.tanh(5 * (np.cos(np.pi * freq * u) * np.cos(np.pi * freq * v) - 0.3))
    if kind == "radial":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(u, v) + phase)
    raise ValueError(f"unknown texture {kind!r}; known: {list(TEXTURES)}")


def _draw_object(img: np.ndarray, spec: CategorySpec, category: int, cx: float, cy: float,
                 radius: float, rng: np.random.Generator, xx: np.ndarray,
                 yy: np.ndarray) -> SceneObject:
    """Composite one object onto ``img`` (size, size, 3) in place."""
    size = xx.shape[0]
    # The grating keeps the category's orientation in the image: the object (and its stripes,
    # across its long axis) turns to theta near it.
    theta = float(rng.vonmises(spec.orientation, spec.kappa)) if spec.kappa > 0 else \
        float(rng.uniform(-np.pi, np.pi))
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(theta), np.sin(theta)
    u = (dx * c + dy * s) / (radius * spec.aspect)
    v = (-dx * s + dy * c) / radius
    family, sides = SHAPES[spec.shape]
    # Margin is in object units; x radius / pixel size gives pixels: a one-pixel soft edge.
    alpha = np.clip(_shape_margin(family, sides, u, v) * radius * size / 2 + 0.5, 0, 1)
    hue = float(rng.uniform())  # colour is no cue to the category
    light = _hsv(hue, spec.saturation, rng.uniform(0.85, 1.0))
    dark = _hsv(hue + 0.04, min(1.0, spec.saturation + 0.1), rng.uniform(0.15, 0.35))
    # texture_freq cycles per image width (2 units) -> cycles per unit of u.
    per_u = spec.texture_freq * radius * spec.aspect / 2
    t = _texture(TEXTURES[spec.texture], per_u, rng.uniform(0, 2 * np.pi), u, v)
    colour = light * t[..., None] + dark * (1 - t[..., None])
    img *= 1 - alpha[..., None]
    img += alpha[..., None] * colour
    ys, xs = np.nonzero(alpha > 0.5)
    bbox = ((float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
             float(ys.max() - ys.min() + 1)) if xs.size else (0.0, 0.0, 0.0, 0.0))
    return SceneObject(category, cx, cy, radius, theta, float(alpha.mean()), hue, bbox)


def render_scene(rng: np.random.Generator, specs: list[CategorySpec], categories: list[int],
                 size: int, *, multi: bool) -> tuple[np.ndarray, list[SceneObject]]:
    """One scene: a textured background and one object per entry of ``categories``.

    Returns the image (size, size, 3) uint8 and the objects drawn, back to front. Single-label
    objects sit near the centre and are large; multi-label ones are smaller and spread out.
    """
    xx, yy = _grid(size)
    img = _background(rng, xx, yy)
    objects = []
    for cat in categories:
        spec = specs[cat]
        if multi:
            cx, cy = rng.uniform(-0.55, 0.55, 2)
            radius = spec.scale * rng.uniform(0.28, 0.42)
        else:
            cx, cy = rng.uniform(-0.2, 0.2, 2)
            radius = spec.scale * rng.uniform(0.4, 0.6)
        objects.append(_draw_object(img, spec, cat, float(cx), float(cy), float(radius), rng,
                                    xx, yy))
    img = 0.5 + (img - 0.5) * rng.uniform(0.85, 1.15) + rng.normal(0, 0.015, img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), objects


# --------------------------------------------------------------------------------------------
# Single-label ImageFolder tree


def check_arg(name: str, value, lo, hi=None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not (ok and value >= lo and (hi is None or value <= hi)):
        accepted = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
        raise ValueError(f"{name}={value!r}; accepted: {accepted}")


# Upper bounds of the generators' sizes: a typo must not start rendering for days.
MAX_IMAGES = 1_000_000


#: The sizes a world is rendered at (image_size of the generators; render_size of a sweep).
RENDER_SIZES = (16, 1024)
#: numpy's seed sequences take non-negative integers; bounded to 32 bits for a readable range
MAX_SEED = 2**32 - 1


def check_single_label_args(*, image_size: int, n_categories: int, n_train_per_class: int,
                            n_val_per_class: int, seed: int = 0) -> None:
    """``generate_single_label``'s argument checks (ValueError naming the value)."""
    check_arg("seed", seed, 0, MAX_SEED)
    check_arg("image_size", image_size, *RENDER_SIZES)
    check_arg("n_categories", n_categories, 2, 80)
    check_arg("n_train_per_class", n_train_per_class, 1, MAX_IMAGES)
    check_arg("n_val_per_class", n_val_per_class, 1, MAX_IMAGES)


def check_nsd_like_args(*, image_size: int, n_images: int, n_subjects: int, n_categories: int,
                        repeats: int, trials_per_session: int,
                        n_shared: int | None, seed: int = 0) -> tuple[int, int]:
    """``generate_nsd_like``'s argument checks; returns (n_shared, n_unique per subject)."""
    check_arg("seed", seed, 0, MAX_SEED)
    check_arg("image_size", image_size, *RENDER_SIZES)
    check_arg("n_subjects", n_subjects, 1, 8)
    check_arg("n_categories", n_categories, 2, 80)
    check_arg("repeats", repeats, 2, 10)
    check_arg("n_images", n_images, 10, MAX_IMAGES)
    check_arg("trials_per_session", trials_per_session, 1, MAX_IMAGES)
    n_shared = n_images // 5 if n_shared is None else n_shared
    check_arg("n_shared", n_shared, 0, n_images)
    n_unique = (n_images - n_shared) // n_subjects
    if n_shared + n_unique < 2:
        raise ValueError(f"n_images={n_images} leaves {n_shared + n_unique} images per subject; "
                         f"accepted: at least 2")
    return n_shared, n_unique


def generate_single_label(*, image_size: int = 64, n_categories: int = 10,
                          n_train_per_class: int = 100, n_val_per_class: int = 25, seed: int = 0,
                          progress: bool = False) -> Path:
    """The single-label set as an ImageFolder tree; returns its root.

    ``root/train/<class>/<index>.png`` and ``root/val/<class>/<index>.png``, images
    (image_size, image_size, 3) RGB; class folders are named ``NN_<shape>-<texture>-h<hue>`` so
    ImageFolder's alphabetical class index equals the category index. ``root/categories.json``
    records each category's statistics. Cached: a second call with the same arguments returns
    the same path without rendering.
    """
    check_single_label_args(image_size=image_size, n_categories=n_categories,
                            n_train_per_class=n_train_per_class, n_val_per_class=n_val_per_class,
                            seed=seed)
    params = {"kind": "single_label", "version": GENERATOR_VERSION, "image_size": image_size,
              "n_categories": n_categories, "n_train_per_class": n_train_per_class,
              "n_val_per_class": n_val_per_class, "seed": seed}
    final = cache_root() / "simulated" / f"single-{content_hash(params)}"
    with build_once(final) as tmp:
        if tmp is None:
            _check_single_label_entry(final, n_categories, {"train": n_train_per_class,
                                                            "val": n_val_per_class})
            return final
        BUILD_COUNTS["single_label"] += 1
        specs = make_categories(n_categories, np.random.default_rng([seed, 1]))
        rng = np.random.default_rng([seed, 2])
        jobs = [(split, c, i) for split, n in (("train", n_train_per_class),
                                               ("val", n_val_per_class))
                for c in range(n_categories) for i in range(n)]
        for split, c, i in tqdm(jobs, desc="simulated single-label", disable=not progress):
            folder = tmp / split / f"{c:02d}_{specs[c].name}"
            if i == 0:
                folder.mkdir(parents=True)
            img, _ = render_scene(rng, specs, [c], image_size, multi=False)
            Image.fromarray(img).save(folder / f"{i:05d}.png", compress_level=1)
        (tmp / "categories.json").write_text(json.dumps(
            {"params": params, "categories": [vars(s) for s in specs]}, indent=1))
    return final


def _check_single_label_entry(root: Path, n_categories: int, per_class: dict[str, int]) -> None:
    """A built world holds what its arguments make (a listing, no decoding): a class folder or
    images deleted by hand were trained on as a smaller task without a word."""
    for split, n in per_class.items():
        folder = root / split
        classes = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        counts = [sum(1 for f in c.iterdir() if f.suffix == ".png") for c in classes]
        if len(classes) != n_categories or any(k != n for k in counts):
            raise DamagedCacheEntry(damaged_entry(
                root, f"{split}/ holds {sum(counts)} images in {len(classes)} class folders; "
                      f"its arguments make {n_categories} x {n}"))


# --------------------------------------------------------------------------------------------
# Multi-label miniature NSD release


@dataclass(frozen=True)
class SimulatedNSD:
    """A generated miniature NSD release and what is known about it.

    nsd_root, coco_annotations : pass these to ``references.nsd.prepare``.
    subjects : subject numbers with betas (1..n_subjects); later ones have fewer sessions.
    sessions : {subject: number of session files written}.
    category_ids : COCO ids (ascending) that the scenes use; the JSON lists all 80.
    noise_ceilings : {subject: {roi: (n_voxels,)}} measured from the written betas, voxels in
        the prepared table's order; true_noise_ceilings likewise, from the simulated ncsnr.
    """

    root: Path
    nsd_root: Path
    coco_annotations: Path
    subjects: tuple[int, ...]
    sessions: dict[int, int]
    image_size: int
    n_images: int
    repeats: int
    category_ids: tuple[int, ...]
    noise_ceilings: dict[int, dict[str, np.ndarray]] = field(repr=False)
    true_noise_ceilings: dict[int, dict[str, np.ndarray]] = field(repr=False)

    @property
    def stimuli(self) -> Path:
        return self.nsd_root / nsd.STIMULI

    @classmethod
    def load(cls, root: Path) -> SimulatedNSD:
        """Rebuild the description of a generated release from its manifest, and check that
        the release holds what it lists (a session file deleted by hand was prepared as a
        smaller release without a word; a damaged manifest was a JSON error naming nothing)."""
        try:
            man = json.loads((root / "manifest.json").read_text())
            with np.load(root / "noise_ceilings.npz") as arrays:
                ceilings: dict[int, dict[str, np.ndarray]] = {}
                true: dict[int, dict[str, np.ndarray]] = {}
                for key in arrays.files:
                    kind, subj, roi = key.split("_")
                    target = ceilings if kind == "measured" else true
                    target.setdefault(int(subj), {})[roi] = arrays[key]
            sim = cls(root=root, nsd_root=root / "nsd",
                      coco_annotations=root / "coco_annotations",
                      subjects=tuple(man["subjects"]),
                      sessions={int(k): v for k, v in man["sessions"].items()},
                      image_size=man["image_size"], n_images=man["n_images"],
                      repeats=man["repeats"], category_ids=tuple(man["category_ids"]),
                      noise_ceilings=ceilings, true_noise_ceilings=true)
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                zipfile.BadZipFile) as exc:
            raise DamagedCacheEntry(damaged_entry(root, exception_line(exc, None))) from None
        for s, n in sim.sessions.items():
            folder = nsd.betas_dir(sim.nsd_root, s)
            found = sorted(folder.glob("betas_session*.hdf5")) if folder.is_dir() else []
            if len(found) != n:
                raise DamagedCacheEntry(damaged_entry(
                    root, f"subject {s} has {len(found)} session files of the {n} its "
                          f"manifest lists"))
        if not sim.stimuli.is_file():
            raise DamagedCacheEntry(damaged_entry(root, f"{nsd.STIMULI} is missing"))
        return sim


def _gabor_energy(images: np.ndarray, pool: int) -> np.ndarray:
    """Quadrature-pair Gabor energy of the luminance, pooled to (pool, pool).

    images : (n, S, S, 3) uint8 -> (n, 24, pool, pool) float32; filters 8 orientations x 3
    frequencies (0.06, 0.12, 0.24 cycles/pixel). A one-sided Gaussian in the Fourier domain is
    a complex Gabor, so |response| is the even/odd pair's energy.
    """
    size = images.shape[1]
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    bank = []
    for freq in (0.06, 0.12, 0.24):
        for ang in np.arange(8) * np.pi / 8:
            cx, cy = freq * np.cos(ang), freq * np.sin(ang)
            bank.append(torch.exp(-((fx - cx) ** 2 + (fy - cy) ** 2) / (2 * (0.35 * freq) ** 2)))
    bank_t = torch.stack(bank).to(torch.complex64)  # (24, S, S)
    out = np.empty((images.shape[0], len(bank), pool, pool), np.float32)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)
    for i0 in range(0, images.shape[0], 128):
        lum = torch.from_numpy(images[i0:i0 + 128]).float() @ weights / 255.0
        lum = lum - lum.mean(dim=(1, 2), keepdim=True)
        spec = torch.fft.fft2(lum)[:, None]  # (b, 1, S, S)
        energy = torch.fft.ifft2(spec * bank_t).abs()
        out[i0:i0 + 128] = torch.nn.functional.adaptive_avg_pool2d(energy, pool).numpy()
    return out


def _v1_signal(energy: np.ndarray, n_vox: int, rng: np.random.Generator) -> np.ndarray:
    """Rectified Gabor energy in Gaussian pRFs: (n_images, 24, P, P) -> (n_images, n_vox)."""
    n_ori, n_freq, pool = 8, 3, energy.shape[-1]
    g = (np.arange(pool) + 0.5) / pool * 2 - 1
    gx, gy = np.meshgrid(g, g)
    cx, cy = rng.uniform(-0.75, 0.75, (2, n_vox))
    sigma = rng.uniform(0.08, 0.3, n_vox)
    prf = np.exp(-((gx.reshape(1, -1) - cx[:, None]) ** 2 + (gy.reshape(1, -1) - cy[:, None]) ** 2)
                 / (2 * sigma[:, None] ** 2))
    prf /= prf.sum(axis=1, keepdims=True)  # (n_vox, P*P)
    pref_ori = rng.uniform(0, np.pi, n_vox)
    pref_freq = rng.uniform(0, n_freq - 1, n_vox)
    ori = np.arange(n_ori) * np.pi / n_ori
    ori_tune = np.exp(rng.uniform(0.5, 2.5, n_vox)[:, None]
                      * (np.cos(2 * (ori[None] - pref_ori[:, None])) - 1))
    freq_tune = np.exp(-(np.arange(n_freq)[None] - pref_freq[:, None]) ** 2 / 2)
    tuning = (freq_tune[:, :, None] * ori_tune[:, None, :]).reshape(n_vox, -1)  # freq-major
    tuning /= tuning.sum(axis=1, keepdims=True)
    pooled = np.einsum("ifp,vp->ifv", energy.reshape(*energy.shape[:2], -1), prf)
    drive = np.einsum("ifv,vf->iv", pooled, tuning)
    threshold = np.quantile(drive, 0.1, axis=0)
    return np.sqrt(np.maximum(drive - threshold, 0.0))


def _scene_features(objects: list[list[SceneObject]], specs: list[CategorySpec]) -> tuple[
        np.ndarray, np.ndarray]:
    """Category presence (n, n_cat) and shape features (n, 23), both float64."""
    n, n_cat = len(objects), len(specs)
    presence = np.zeros((n, n_cat))
    feats = np.zeros((n, len(SHAPES) + len(TEXTURES) + 7))
    for i, objs in enumerate(objects):
        for o in objs:
            spec = specs[o.category]
            presence[i, o.category] = 1
            feats[i, spec.shape] += o.area
            feats[i, len(SHAPES) + spec.texture] += o.area
        k = len(SHAPES) + len(TEXTURES)
        feats[i, k] = np.mean([o.radius for o in objs])
        feats[i, k + 1] = np.mean([specs[o.category].aspect for o in objs])
        feats[i, k + 2] = len(objs)
        feats[i, k + 3] = np.mean([np.cos(2 * o.theta) for o in objs])
        feats[i, k + 4] = np.mean([np.sin(2 * o.theta) for o in objs])
        feats[i, k + 5] = np.mean([np.cos(2 * np.pi * o.hue) for o in objs])
        feats[i, k + 6] = np.mean([np.sin(2 * np.pi * o.hue) for o in objs])
    return presence, feats


def _vvs_signal(presence: np.ndarray, feats: np.ndarray, n_vox: int,
                rng: np.random.Generator) -> np.ndarray:
    """Nonlinear mixtures of category presence and shape features: (n_images, n_vox)."""
    n_cat = presence.shape[1]
    z = (feats - feats.mean(0)) / np.where(feats.std(0) > 0, feats.std(0), 1.0)
    w_cat = rng.normal(0, 0.3, (n_cat, n_vox)) * (rng.random((n_cat, n_vox)) < 0.2)
    w_cat[rng.integers(0, n_cat, n_vox), np.arange(n_vox)] += 2.0  # a preferred category
    w_shape = rng.normal(0, 0.4, (z.shape[1], n_vox))
    gate_cat = rng.normal(0, 0.5, (n_cat, n_vox))
    gate_shape = rng.normal(0, 0.3, (z.shape[1], n_vox))
    drive = presence @ w_cat + z @ w_shape
    gate = presence @ gate_cat + z @ gate_shape
    return np.logaddexp(0, drive - 1) * (1 + 0.5 * np.tanh(gate))


def _ellipsoid(shape: tuple[int, int, int], centre, radii) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float64)
    d = sum(((idx[a] - centre[a] * (shape[a] - 1)) / radii[a]) ** 2 for a in range(3))
    return d <= 1


def _subject_volume(subject: int) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """Volume shape (x, y, z) and the two ROI label volumes (x, y, z) int16 of a subject.

    Shapes differ between subjects (as in the release) and are never symmetric, so an axis-order
    mistake in a reader shows up as a shape error. -1 marks outside the brain.
    """
    shape = (16 + subject, 22 + subject, 14 + (subject % 2))
    brain = _ellipsoid(shape, (0.5, 0.5, 0.5), (shape[0] / 1.9, shape[1] / 1.9, shape[2] / 1.9))
    base = np.where(brain, 0, -1).astype(np.int16)
    idx = np.indices(shape)
    v1 = _ellipsoid(shape, (0.5, 0.2, 0.45), (5.5, 3.6, 4.5)) & brain
    prf = base.copy()
    prf[v1 & (idx[2] < 0.45 * (shape[2] - 1))] = 1  # V1v
    prf[v1 & (idx[2] >= 0.45 * (shape[2] - 1))] = 2  # V1d
    prf[_ellipsoid(shape, (0.25, 0.5, 0.3), (2.5, 2.5, 2.0)) & brain] = 7  # hV4, not simulated
    streams = base.copy()
    streams[v1] = 1  # early
    streams[_ellipsoid(shape, (0.5, 0.62, 0.3), (6.0, 4.5, 3.5)) & brain & ~v1] = 5  # ventral
    streams[_ellipsoid(shape, (0.5, 0.7, 0.85), (4.0, 3.0, 1.6)) & brain & ~v1] = 7  # parietal
    return shape, prf, streams


def _write_expdesign(path: Path, masterordering: np.ndarray, subjectim: np.ndarray,
                     sharedix: np.ndarray) -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    # MATLAB doubles, 2-D, 1-based: what loadmat returns for the release.
    scipy.io.savemat(str(path), {"masterordering": (masterordering + 1)[None].astype(np.float64),
                                 "subjectim": (subjectim + 1).astype(np.float64),
                                 "sharedix": (sharedix + 1)[None].astype(np.float64)})


def generate_nsd_like(*, image_size: int = 64, n_images: int = 1000, n_subjects: int = 2,
                      n_categories: int = 10, repeats: int = 3, trials_per_session: int = 320,
                      n_shared: int | None = None, seed: int = 0,
                      progress: bool = False) -> SimulatedNSD:
    """A miniature NSD release of multi-label scenes with simulated voxel responses.

    Images: ``n_images`` scenes (image_size, image_size, 3) with 1-3 objects of distinct
    categories among ``n_categories`` (a seeded subset of the 80 COCO ids). Design: ``n_shared``
    images (default n_images // 5) seen by every subject, the rest split evenly into images
    unique to each subject; each of a subject's images is shown ``repeats`` times in a random
    ``masterordering`` shared by all subjects (like the release); its trials are cut into
    session files of ``trials_per_session`` (the last may be shorter), and subject s keeps only
    its first ``max(1, n_sessions - (s - 1))`` sessions, so later subjects have fewer.

    Layout written under ``root/nsd`` as in the release, COCO files under
    ``root/coco_annotations``. Cached by the parameters; see :class:`SimulatedNSD`.
    """
    n_shared, n_unique = check_nsd_like_args(
        image_size=image_size, n_images=n_images, n_subjects=n_subjects,
        n_categories=n_categories, repeats=repeats, trials_per_session=trials_per_session,
        n_shared=n_shared, seed=seed)
    # "ceilings": 2 since each subject's ceilings count the trials it has (the same data)
    params = {"kind": "nsd_like", "version": GENERATOR_VERSION, "ceilings": 2,
              "image_size": image_size,
              "n_images": n_images, "n_subjects": n_subjects, "n_categories": n_categories,
              "repeats": repeats, "trials_per_session": trials_per_session,
              "n_shared": n_shared, "seed": seed}
    final = cache_root() / "simulated" / f"nsd-{content_hash(params)}"
    with build_once(final) as tmp:
        if tmp is not None:
            BUILD_COUNTS["nsd_like"] += 1
            _build_nsd_like(tmp, params, n_unique, progress)
    return SimulatedNSD.load(final)


def _build_nsd_like(root: Path, p: dict, n_unique: int, progress: bool) -> None:
    seed, size, n_images, repeats = p["seed"], p["image_size"], p["n_images"], p["repeats"]
    n_subjects, n_shared = p["n_subjects"], p["n_shared"]
    nsd_root, coco_dir = root / "nsd", root / "coco_annotations"
    bar = tqdm(total=n_images + n_subjects, desc="simulated NSD", disable=not progress)

    # Categories and scenes.
    rng = np.random.default_rng([seed, 1])
    specs = make_categories(p["n_categories"], rng)
    cat_ids = sorted(int(c) for c in rng.choice(COCO_CATEGORY_IDS, len(specs), replace=False))
    rng = np.random.default_rng([seed, 2])
    images = np.empty((n_images, size, size, 3), np.uint8)
    scenes: list[list[SceneObject]] = []
    for i in range(n_images):
        n_obj = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
        cats = [int(c) for c in rng.choice(len(specs), n_obj, replace=False)]
        images[i], objs = render_scene(rng, specs, cats, size, multi=True)
        scenes.append(objs)
        bar.update(1)

    # Design: shared images first in every subject's list, as in the release.
    rng = np.random.default_rng([seed, 3])
    perm = rng.permutation(n_images)
    shared = np.sort(perm[:n_shared])
    n_per = n_shared + n_unique
    subjectim = np.empty((8, n_per), np.int64)
    for s in range(8):
        if s < n_subjects:
            own = perm[n_shared + s * n_unique: n_shared + (s + 1) * n_unique]
        else:  # rows of subjects without betas still hold valid nsdIds, as the release does
            own = rng.choice(np.setdiff1d(np.arange(n_images), shared), n_unique, replace=False)
        subjectim[s] = np.concatenate([shared, own])
    masterordering = rng.permutation(np.tile(np.arange(n_per), repeats))
    n_trials = masterordering.size
    bounds = list(range(0, n_trials, p["trials_per_session"])) + [n_trials]
    n_sessions = len(bounds) - 1
    _write_expdesign(nsd_root / nsd.EXPDESIGN, masterordering, subjectim, shared)

    # Stimuli, stim info and COCO annotations.
    stim_path = nsd_root / nsd.STIMULI
    stim_path.parent.mkdir(parents=True)
    with h5py.File(stim_path, "w") as f:
        f.create_dataset(nsd.STIMULI_DATASET, data=images, chunks=(1, size, size, 3))
    coco_ids = np.sort(rng.choice(np.arange(1, 600_000), n_images, replace=False))
    rng.shuffle(coco_ids)
    splits = np.where(rng.random(n_images) < 0.85, "train2017", "val2017")
    sessions_of = {s: max(1, n_sessions - (s - 1)) for s in range(1, n_subjects + 1)}
    _write_stim_info(nsd_root / nsd.STIM_INFO, coco_ids, splits, subjectim, masterordering,
                     shared, repeats, {s: bounds[sessions_of[s]] for s in sessions_of})
    _write_coco(coco_dir, coco_ids, splits, scenes, cat_ids, specs, size)

    # Voxels.
    energy = _gabor_energy(images, pool=min(16, size))
    presence, feats = _scene_features(scenes, specs)
    measured, true = {}, {}
    for subject in range(1, n_subjects + 1):
        m, t = _write_subject(nsd_root, subject, seed, energy, presence, feats, subjectim,
                              masterordering, bounds[:sessions_of[subject] + 1])
        for roi in m:
            measured[f"measured_{subject}_{roi}"] = m[roi]
            true[f"true_{subject}_{roi}"] = t[roi]
        bar.update(1)
    bar.close()
    np.savez(root / "noise_ceilings.npz", **measured, **true)
    (root / "manifest.json").write_text(json.dumps({
        "params": p, "subjects": list(range(1, n_subjects + 1)),
        "sessions": {str(s): n for s, n in sessions_of.items()}, "image_size": size,
        "n_images": n_images, "repeats": repeats, "category_ids": cat_ids,
        "categories": [dict(vars(s), coco_id=c) for s, c in zip(specs, cat_ids)]}, indent=1))


def _write_stim_info(path: Path, coco_ids: np.ndarray, splits: np.ndarray,
                     subjectim: np.ndarray, masterordering: np.ndarray, shared: np.ndarray,
                     repeats: int, trials_on_disk: dict[int, int]) -> None:
    """nsd_stim_info_merged.csv with the release's columns (an unnamed index column first)."""
    n = coco_ids.size
    seen = np.zeros((8, n), np.int64)
    rep_trial = np.zeros((8, n, repeats), np.int64)  # 1-based trial numbers, 0 = none
    for s in range(8):
        seen[s, subjectim[s]] = 1
        if s + 1 in trials_on_disk:
            ids = subjectim[s, masterordering[:trials_on_disk[s + 1]]]
            count = np.zeros(n, np.int64)
            for trial, nsd_id in enumerate(ids):
                rep_trial[s, nsd_id, count[nsd_id]] = trial + 1
                count[nsd_id] += 1
    is_shared = np.isin(np.arange(n), shared)
    header = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000",
              "shared1000"] + [f"subject{s}" for s in range(1, 9)] + [
        f"subject{s}_rep{r}" for s in range(1, 9) for r in range(repeats)]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in range(n):
            w.writerow([i, int(coco_ids[i]), splits[i], "(0, 0, 0, 0)", 0.0, i, False, False,
                        bool(is_shared[i])] + [int(seen[s, i]) for s in range(8)]
                       + [int(rep_trial[s, i, r]) for s in range(8) for r in range(repeats)])


def _write_coco(folder: Path, coco_ids: np.ndarray, splits: np.ndarray,
                scenes: list[list[SceneObject]], cat_ids: list[int], specs: list[CategorySpec],
                size: int) -> None:
    """instances_{train,val}2017.json: all 80 categories, images, one annotation per object."""
    folder.mkdir(parents=True)
    used = dict(zip(cat_ids, specs))
    categories = [{"id": c, "name": used[c].name if c in used else f"unused-{c}",
                   "supercategory": "simulated" if c in used else "none"}
                  for c in COCO_CATEGORY_IDS]
    for split in nsd.COCO_FILES:
        images, annotations = [], []
        for i in np.flatnonzero(splits == split):
            cid = int(coco_ids[i])
            images.append({"id": cid, "file_name": f"{cid:012d}.jpg", "height": size,
                           "width": size})
            for o in scenes[i]:
                annotations.append({"id": len(annotations) + 1 + (0 if split == "train2017"
                                                                  else 10**7),
                                    "image_id": cid, "category_id": cat_ids[o.category],
                                    "bbox": list(o.bbox), "area": o.area * size * size,
                                    "iscrowd": 0, "segmentation": []})
        (folder / nsd.COCO_FILES[split]).write_text(json.dumps(
            {"info": {"description": "alignsweep simulated world"}, "licenses": [],
             "images": images, "annotations": annotations, "categories": categories}))


def _write_subject(nsd_root: Path, subject: int, seed: int, energy: np.ndarray,
                   presence: np.ndarray, feats: np.ndarray, subjectim: np.ndarray,
                   masterordering: np.ndarray, bounds: list[int]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Write a subject's ROI masks and session files; return measured and true noise ceilings
    per ROI, voxels in C order of the mask's (x, y, z) nonzero entries."""
    import nibabel as nib

    rng = np.random.default_rng([seed, 10, subject])
    shape, prf, streams = _subject_volume(subject)
    roi_dir = nsd.roi_file(nsd_root, subject, "V1").parent
    roi_dir.mkdir(parents=True)
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    nib.save(nib.Nifti1Image(prf, affine), str(roi_dir / nsd.ROIS["V1"].filename))
    nib.save(nib.Nifti1Image(streams, affine), str(roi_dir / nsd.ROIS["VVS"].filename))
    masks = {"V1": np.isin(prf, nsd.ROIS["V1"].labels),
             "VVS": np.isin(streams, nsd.ROIS["VVS"].labels)}
    brain = (prf != -1).reshape(-1)

    own = subjectim[subject - 1]
    signal = np.zeros((subjectim.shape[1], brain.size))  # (subject's images, voxels in x,y,z)
    ncsnr = np.zeros(brain.size)
    for roi, centre in (("V1", 0.75), ("VVS", 0.55)):
        cols = np.flatnonzero(masks[roi].reshape(-1))
        sig = (_v1_signal(energy[own], cols.size, rng) if roi == "V1"
               else _vvs_signal(presence[own], feats[own], cols.size, rng))
        sig = (sig - sig.mean(0)) / np.where(sig.std(0) > 0, sig.std(0), 1.0)
        signal[:, cols] = sig
        ncsnr[cols] = np.exp(rng.normal(np.log(centre), 0.4, cols.size))

    folder = nsd.betas_dir(nsd_root, subject)
    folder.mkdir(parents=True)
    # The release's ncsnr volume: here the true one (signal sd / noise sd of a trial).
    nib.save(nib.Nifti1Image(ncsnr.reshape(shape).astype(np.float32), affine),
             str(nsd.ncsnr_file(nsd_root, subject)))
    roi_cols = {roi: np.flatnonzero(m.reshape(-1)) for roi, m in masks.items()}
    z_trials: dict[str, list[np.ndarray]] = {roi: [] for roi in masks}
    for k, (t0, t1) in enumerate(zip(bounds[:-1], bounds[1:])):
        order = masterordering[t0:t1]
        trial = ncsnr * signal[order] + rng.standard_normal((t1 - t0, brain.size))
        gain = rng.uniform(0.6, 1.6, brain.size)
        offset = rng.normal(0, 0.8, brain.size)
        psc = np.where(brain, 1.5 * gain * trial + offset, 0.0)
        betas = np.clip(np.rint(psc * nsd.BETAS_SCALE), -32768, 32767).astype(np.int16)
        with h5py.File(nsd.session_file(nsd_root, subject, k + 1), "w") as f:
            # (trials, x, y, z) -> (trials, z, y, x): the release stores the reverse of NIfTI.
            zyx = betas.reshape(-1, *shape).transpose(0, 3, 2, 1)
            f.create_dataset(nsd.BETAS_DATASET, data=np.ascontiguousarray(zyx))
        for roi, cols in roi_cols.items():
            z_trials[roi].append(nsd.zscore_session(betas[:, cols] / nsd.BETAS_SCALE))
    trial_images = subjectim[subject - 1, masterordering[:bounds[-1]]]
    # NSD's ceiling for responses averaged over n_i trials: ncsnr^2 / (ncsnr^2 + mean(1/n_i))
    # over the subject's images. A subject with fewer sessions saw some images fewer than
    # the design's repeats (taking 1/repeats overstated its ceilings: 0.61 against 0.45)
    inv_n = float(np.mean(1.0 / np.unique(trial_images, return_counts=True)[1]))
    measured = {roi: nsd.noise_ceiling(np.concatenate(z), trial_images, n_average=1.0 / inv_n)
                for roi, z in z_trials.items()}
    true = {roi: ncsnr[cols] ** 2 / (ncsnr[cols] ** 2 + inv_n)
            for roi, cols in roi_cols.items()}
    return measured, true


# --------------------------------------------------------------------------------------------
# CLI

# The demo-size worlds are the generators' defaults (one source; the sweep files' [demo]
# data_kwargs state the same values where they use them).


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m references.simulated",
                           description="Generate (or find in the cache) the demo-size "
                                       "simulated datasets and print where they are.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        single = generate_single_label(seed=args.seed, progress=True)
        t1 = time.perf_counter()
        sim = generate_nsd_like(seed=args.seed, progress=True)
    except (ValueError, OSError) as exc:  # OSError: a cache under a file, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    print(f"single-label ImageFolder: {single}  ({t1 - t0:.1f} s)")
    print(f"NSD-like release:         --nsd-root {sim.nsd_root} "
          f"--coco-annotations {sim.coco_annotations}  ({t2 - t1:.1f} s)")
    for s in sim.subjects:
        nc = ", ".join(f"{roi} {len(v)} voxels, mean noise ceiling {v.mean():.2f}"
                       for roi, v in sim.noise_ceilings[s].items())
        print(f"  subject {s}: {sim.sessions[s]} sessions; {nc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The cache's publishing primitives under the failures they exist for: a writer killed by
SIGKILL mid-write, a write that fails halfway, a builder killed inside build_once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from faults import HalfThenFull

from references import cache
from references.cache import atomic_write_bytes, atomic_write_text, build_once

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_atomic_write_replaces_the_file_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "report.html"
    assert atomic_write_text(path, "old") == path
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    # the mode a plain open() gives (0666 less the umask), not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _temporaries(path.parent) == []


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.parquet"
    atomic_write_bytes(path, b"previous, complete")
    fdopen = os.fdopen

    monkeypatch.setattr(cache.os, "fdopen", lambda *a, **k: HalfThenFull(fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, b"x" * 1_000_000)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous, complete"
    assert _temporaries(tmp_path) == []


def test_a_writer_killed_mid_write_leaves_the_old_file_or_the_new_one(tmp_path):
    # Two 8 MB payloads rewritten in turn until SIGKILL lands, wherever it lands. A plain
    # write_bytes killed the same way leaves a truncated file under the final name.
    path = tmp_path / "epochs.parquet"
    size = 8 << 20
    proc = _python(f"""
        from references.cache import atomic_write_bytes
        print("ready", flush=True)
        for i in range(10**6):
            atomic_write_bytes({str(path)!r}, (b"A" if i % 2 else b"B") * {size})
    """)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    data = path.read_bytes()
    assert len(data) == size and data in (b"A" * size, b"B" * size)
    # at most the one write that was cut short is left, hidden; a later write is unaffected
    assert len(_temporaries(tmp_path)) <= 1
    assert all(n.startswith(".epochs.parquet.tmp-") for n in _temporaries(tmp_path))
    atomic_write_bytes(path, b"after")
    assert path.read_bytes() == b"after"


def test_a_taken_temporary_name_is_redrawn(tmp_path, monkeypatch):
    path = tmp_path / "statistics.json"
    (tmp_path / ".statistics.json.tmp-00000000").write_text("a killed writer's leftover")
    names = iter(["00000000", "11111111"])
    monkeypatch.setattr(cache.secrets, "token_hex", lambda n: next(names))
    atomic_write_text(path, "{}")
    assert path.read_text() == "{}"
    assert (tmp_path / ".statistics.json.tmp-00000000").read_text() == "a killed writer's leftover"


def test_build_once_removes_the_temporary_folder_of_a_killed_builder(tmp_path):
    final = tmp_path / "world-0123abcd"
    proc = _python(f"""
        import time
        from pathlib import Path
        from references.cache import build_once
        with build_once(Path({str(final)!r})) as tmp:
            (tmp / "half.npy").write_bytes(b"0" * 4096)
            print(tmp, flush=True)
            time.sleep(600)
    """)
    leftover = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)  # no finally, no cleanup: the folder stays
    proc.wait(timeout=30)
    assert leftover.name.startswith("world-0123abcd.tmp-") and (leftover / "half.npy").is_file()
    # another entry's folders, and a name that only shares a prefix, are not this entry's
    others = [tmp_path / "world-0123abcd-v2.tmp-x", tmp_path / "other.tmp-y"]
    for folder in others:
        folder.mkdir()

    with build_once(final) as tmp:  # the lock died with the builder: taken at once
        assert not leftover.exists()
        (tmp / "done").write_text("ok")
    assert (final / "done").read_text() == "ok"
    assert all(folder.is_dir() for folder in others)


def test_build_once_cleans_up_also_when_the_entry_exists(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    stale = tmp_path / "entry.tmp-dead"
    (stale / "x").mkdir(parents=True)
    with build_once(final) as tmp:
        assert tmp is None
    assert not stale.exists() and final.is_dir()


def test_lock_files_are_made_for_every_user_who_shares_the_folder(tmp_path):
    """A cache or storage folder a lab shares: a lock file made under the first user's 022
    (or 077) umask was theirs alone, and every other user's run died opening it (exit 1,
    after Ray had started). Lock files are now made rw for all, whatever the umask; an
    entry already built is used even where its lock cannot be opened (a read-only cache)."""
    import stat

    from references.cache import SHARED_LOCK_MODE

    final = tmp_path / "entry"
    old = os.umask(0o077)
    try:
        with build_once(final) as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "entry.lock").stat().st_mode) == SHARED_LOCK_MODE == 0o666
    assert stat.S_IMODE(final.stat().st_mode) == 0o700  # the maker's umask, as for any folder
    other = tmp_path / "other"
    old = os.umask(0o022)
    try:
        with build_once(other) as tmp:  # (mkdtemp's 0700 was every entry's: a lab's shared
            (tmp / "x").write_text("1")  # cache was its first user's alone)
    finally:
        os.umask(old)
    assert stat.S_IMODE(other.stat().st_mode) == 0o755
    (tmp_path / "entry.lock").unlink()
    (tmp_path / "entry.lock").mkdir()  # a lock that cannot be opened at all
    with build_once(final) as tmp:
        assert tmp is None


def test_damaged_simulated_worlds_are_refused_naming_the_entry(tmp_path, monkeypatch):
    """A class folder or images deleted from the simulated single-label world, a session
    file deleted from the NSD-like one: both were used as smaller data without a word (a
    3-class task trained and reported done); a garbage manifest was a JSON error naming
    nothing. Each is now the damaged-entry line with the rm -r that rebuilds it."""
    import shutil

    from references.cache import DamagedCacheEntry
    from references.simulated import generate_nsd_like, generate_single_label

    monkeypatch.setenv("ALIGNSWEEP_CACHE", str(tmp_path / "cache"))
    kw = dict(image_size=32, n_categories=3, n_train_per_class=4, n_val_per_class=2, seed=5)
    root = generate_single_label(**kw)
    assert generate_single_label(**kw) == root  # intact: reused
    shutil.rmtree(sorted((root / "train").iterdir())[2])
    with pytest.raises(DamagedCacheEntry, match=rf"^cache entry {root} is damaged \(train/ "
                                                rf"holds 8 images in 2 class folders; its "
                                                rf"arguments make 3 x 4\); delete it to "
                                                rf"rebuild it: rm -r '{root}'$"):
        generate_single_label(**kw)
    shutil.rmtree(root)
    root = generate_single_label(**kw)
    (sorted((root / "val").iterdir())[0] / "00001.png").unlink()
    with pytest.raises(DamagedCacheEntry, match=r"val/ holds 5 images in 3 class folders"):
        generate_single_label(**kw)

    nkw = dict(image_size=32, n_images=60, n_subjects=2, n_categories=4,
               trials_per_session=60, seed=5)
    sim = generate_nsd_like(**nkw)
    session = sorted(sim.nsd_root.rglob("betas_session*.hdf5"))[-1]
    session.unlink()
    with pytest.raises(DamagedCacheEntry, match=r"has \d+ session files of the \d+ its "
                                                r"manifest lists\); delete it to rebuild it"):
        generate_nsd_like(**nkw)
    (sim.root / "manifest.json").write_text("{not json")
    with pytest.raises(DamagedCacheEntry, match=rf"^cache entry {sim.root} is damaged "
                                                r"\(JSONDecodeError: "):
        generate_nsd_like(**nkw)


def test_a_relative_cache_setting_is_taken_from_the_current_folder(tmp_path, monkeypatch):
    """``ALIGNSWEEP_CACHE=relcache``: the prepared data's paths were made from the relative
    value and the trials were given it as set, so each trial, which Tune runs in its own
    folder, looked for the NSD demo's stimuli there and failed ("cannot read 'imgBrick' ...
    copy it again from the release"). The root is absolute, from the folder it was set in,
    and the trials are given that."""
    from sweeps.execute import _worker_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGNSWEEP_CACHE", "relcache")
    assert cache.cache_root(create=False) == tmp_path / "relcache"
    assert cache.cache_root() == tmp_path / "relcache" and (tmp_path / "relcache").is_dir()
    elsewhere = tmp_path / "trial"
    elsewhere.mkdir()
    env = _worker_env()
    monkeypatch.chdir(elsewhere)  # where a trial runs: the value it was given still points here
    assert env["ALIGNSWEEP_CACHE"] == str(tmp_path / "relcache")
    monkeypatch.setenv("ALIGNSWEEP_CACHE", str(tmp_path / "abs" / ".." / "abs"))
    assert cache.cache_root(create=False) == tmp_path / "abs"  # normalised, links kept

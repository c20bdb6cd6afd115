"""The pretrained-network reference: frozen activations equal the network's own tap, weights
from a file or the torch hub cache (never a download), the missing-weights message, and the
"auto" reference network trained once per content hash, also under concurrent builders."""

import copy
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import references.pretrained as pretrained
from references.pretrained import (
    TORCHVISION_WEIGHT_FILES,
    PretrainedReference,
    ReferenceTraining,
    WeightsNotFoundError,
    dataset_fingerprint,
    find_weights,
    hub_checkpoints_dir,
    load_network,
    pretrained_reference,
    train_reference_network,
)
from trainable.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = ReferenceTraining(epochs=1, seed=3, lr=1e-3, batch_size=16, width=0.25)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt to fetch weights over the network fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"attempted download: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: torch.hub.get_dir() -> tmp/torch/hub."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub", "torch.hub.set_dir was called elsewhere"
    return home


def tiny_data(n: int = 64, size: int = 32, classes: int = 4, seed: int = 0):
    """(images float32 (n, 3, size, size), int64 labels, int64 ids): the class is the bright
    quadrant, so a small network can learn it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = 0.3 * torch.randn(n, 3, size, size, generator=g)
    h = size // 2
    for k in range(classes):
        r, c = divmod(k, 2)
        images[labels == k, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.5
    return images, labels, torch.arange(n) + 1000


# ----------------------------------------------------------------------------- frozen network


def channels_last_tap(model, x: torch.Tensor, layer: str, channels_last: bool = True
                      ) -> torch.Tensor:
    """The network's own tap, run as the reference runs it (``PretrainedReference``: eval, in
    channels-last memory layout where the forward to the layer runs more than one convolution,
    which oneDNN convolves without reorders); the reference must equal it bit for bit."""
    net = copy.deepcopy(model).eval()
    x = x.detach()
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    with torch.no_grad():
        _, taps = net(x, taps=(layer,))
    return taps[layer]


@pytest.mark.parametrize("name,layer,size,channels_last", [
    ("alexnet", "conv1", 64, False), ("alexnet", "fc1", 64, True),
    ("resnet18", "conv1", 32, False), ("resnet18", "block2", 32, True)])
def test_activations_equal_the_networks_tap(tmp_path, name, layer, size, channels_last):
    """A layer at the first convolution runs in the images' layout (channels-last would only
    add the images' reordering and the layer's flattening copy); deeper ones channels-last."""
    model = build_model(name, num_classes=5, width=0.25, seed=0).eval()
    path = tmp_path / "weights.pt"
    torch.save(model.net.state_dict(), path)
    ref = pretrained_reference(name, layer, path)
    assert ref.channels_last is channels_last
    x = torch.randn(3, 3, size, size)
    tap = channels_last_tap(model, x, layer, channels_last)
    y = ref.representation(x)
    assert torch.equal(y, tap)
    if y.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert y.is_contiguous() is not channels_last
    groups = ref.targets(x, torch.arange(3))
    assert len(groups) == 1 and torch.equal(groups[0][0], torch.arange(3))
    assert torch.equal(groups[0][1], tap)
    assert ref.source == str(path) and ref.model_name == name and ref.layer == layer


def test_loads_a_tapped_model_checkpoint(tmp_path):
    """A TappedModel state dict (net. prefix) inside a checkpoint dict loads the same."""
    model = build_model("resnet18", num_classes=3, width=0.5, seed=1).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "epoch": 4}, path)
    net = load_network("resnet18", path)
    assert net.num_classes == 3 and net.net.conv1.out_channels == 32
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x), model(x))


def test_frozen_eval_no_grad(tmp_path):
    model = build_model("resnet18", num_classes=5, width=0.25, seed=0)
    path = tmp_path / "w.pt"
    torch.save(model.net.state_dict(), path)
    ref = pretrained_reference("resnet18", "block1", path)
    assert all(not p.requires_grad for p in ref.network.parameters())
    ref.network.train()  # e.g. a careless caller; the reference must still run in eval mode
    stats = ref.network.net.bn1.running_mean.clone()
    batches = ref.network.net.bn1.num_batches_tracked.clone()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    y = ref.representation(x)
    assert not y.requires_grad and y.grad_fn is None
    assert torch.equal(ref.network.net.bn1.running_mean, stats)
    assert torch.equal(ref.network.net.bn1.num_batches_tracked, batches)
    assert not ref.network.training
    # eval-mode output: deterministic and equal to the model's own eval tap
    assert torch.equal(y, channels_last_tap(model, x, "block1"))


def test_unknown_layer_for_the_reference(tmp_path):
    with pytest.raises(ValueError, match=r"unknown layer 'block1' for model 'alexnet'; "
                                         r"accepted: conv1, .*fc2"):
        pretrained_reference("alexnet", "block1", tmp_path / "w.pt")


# ----------------------------------------------------------------------------- weight files


def test_loads_from_the_torch_hub_cache(torch_home):
    """The real torchvision shapes (1000 classes, width 1) under the expected file name."""
    model = build_model("resnet18", num_classes=1000, seed=0).eval()
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(model.net.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    ref = pretrained_reference("resnet18", "block4")  # weights="torchvision" is the default
    assert ref.network.num_classes == 1000
    assert ref.source == str(checkpoints / "resnet18-f37072fd.pth")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ref.representation(x), channels_last_tap(model, x, "block4"))


@pytest.mark.parametrize("name", list(TORCHVISION_WEIGHT_FILES))
def test_missing_weights_say_how_to_supply_them(torch_home, name):
    expected = TORCHVISION_WEIGHT_FILES[name]
    with pytest.raises(WeightsNotFoundError, match=rf"put {expected} in "
                                                   rf"{torch_home / 'hub' / 'checkpoints'}.*"
                                                   rf"--weights PATH.*--weights auto") as info:
        pretrained_reference(name, "conv1")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.mark.parametrize("env", [{"TORCH_HOME": "th"}, {"XDG_CACHE_HOME": "xdg"}, {}],
                         ids=["TORCH_HOME", "XDG_CACHE_HOME", "HOME"])
def test_the_hub_folder_is_torchs_own_also_where_torch_is_not_imported(env, tmp_path,
                                                                       monkeypatch):
    """The post-processor looks for AlexNet's file without importing torch (4 s): the folder it
    works out must be the one torch.hub itself would use, under every setting torch reads."""
    for var in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var, sub in env.items():
        monkeypatch.setenv(var, str(tmp_path / sub))
    expected = Path(torch.hub.get_dir()) / "checkpoints"
    assert expected.is_relative_to(tmp_path)  # each case is one of torch's rules, not a default
    code = ("import sys; from references.hub import hub_checkpoints_dir; "
            "print(hub_checkpoints_dir()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split("\n")
    assert out[:2] == [str(expected), "False"]
    assert hub_checkpoints_dir() == expected  # and, torch imported, torch's own answer


def test_missing_weights_file_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsNotFoundError, match=rf"'{missing}' for alexnet does not exist; "
                                                   r"pass --weights PATH"):
        find_weights("alexnet", missing)


def test_a_file_of_the_wrong_model(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("resnet18", num_classes=3, width=0.25).net.state_dict(), path)
    with pytest.raises(ValueError, match="is not a state dict of alexnet: missing"):
        load_network("alexnet", path)


# ----------------------------------------------------------------------------- "auto"


def test_train_reference_network_is_deterministic_and_learns():
    data = tiny_data()
    kw = dict(num_classes=4, multilabel=False, lr=3e-3, batch_size=16, width=0.25,
              device="cpu", image_size=32)
    state = torch.get_rng_state()
    a = train_reference_network("resnet18", data, epochs=8, seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    b = train_reference_network("resnet18", TensorDataset(*data), epochs=8, seed=1, **kw)
    c = train_reference_network("resnet18", data, epochs=1, seed=2, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["net.conv1.weight"], sc["net.conv1.weight"])
    assert not a.training
    with torch.no_grad():
        accuracy = (a(data[0]).argmax(1) == data[1]).float().mean().item()
    assert accuracy > 0.9


def test_train_reference_network_multilabel_and_size_check():
    images, labels, ids = tiny_data()
    multi_hot = torch.nn.functional.one_hot(labels, 4).float()
    multi_hot[::3, 0] = 1.0
    net = train_reference_network("resnet18", (images, multi_hot, ids), num_classes=4,
                                  multilabel=True, epochs=1, seed=0, batch_size=32, width=0.25,
                                  device="cpu", image_size=32)
    assert net.num_classes == 4
    with pytest.raises(ValueError, match=r"expects images \(3, 64, 64\), got \(3, 32, 32\)"):
        train_reference_network("resnet18", (images, labels, ids), num_classes=4,
                                multilabel=False, epochs=1, seed=0, batch_size=32, width=0.25,
                                device="cpu", image_size=64)


def _auto(data, training=TINY, **kw):
    return pretrained_reference("resnet18", "block1", "auto", data=data, num_classes=4,
                                image_size=32, training=training, **kw)


def test_auto_trains_once_and_reuses_the_cache(monkeypatch):
    calls = []
    original = pretrained.train_reference_network

    def counting(*args, **kwargs):
        calls.append(kwargs["seed"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrained, "train_reference_network", counting)
    data = tiny_data(seed=10)
    first = _auto(data)
    assert calls == [TINY.seed]
    second = _auto(TensorDataset(*data))  # same content, other container: same entry
    assert calls == [TINY.seed]
    assert first.source == second.source and first.source.startswith("auto:")
    x = data[0][:4]
    assert torch.equal(first.representation(x), second.representation(x))
    # what determines the network is in the key: another seed, or other data, trains anew
    _auto(data, training=ReferenceTraining(epochs=1, seed=4, lr=1e-3, batch_size=16,
                                           width=0.25))
    changed = (data[0].clone(), data[1], data[2])
    changed[0][0, 0, 0, 0] += 1
    _auto(changed)
    assert calls == [TINY.seed, 4, TINY.seed]
    entry = Path(first.source.removeprefix("auto:"))
    assert (entry / "weights.pt").is_file() and (entry / "meta.json").is_file()
    # an entry damaged after it was built (cut short, deleted by hand) is named with the way
    # out, not "save the weights with torch.save" or "pass --weights auto"
    whole = (entry / "weights.pt").read_bytes()
    for damage in (lambda: (entry / "weights.pt").write_bytes(whole[:500]),
                   lambda: (entry / "weights.pt").unlink()):
        damage()
        with pytest.raises(ValueError, match=rf"^cache entry {re.escape(str(entry))} is "
                                             rf"damaged \(.*weights\.pt.*\); delete it to "
                                             rf"rebuild it: rm -r '{re.escape(str(entry))}'$"):
            _auto(data)
    shutil.rmtree(entry)
    assert _auto(data).source == first.source and calls[-1] == TINY.seed


def test_auto_needs_data_and_a_key_for_other_datasets():
    with pytest.raises(ValueError, match="'auto' trains a reference network and needs data, "
                                         "num_classes, image_size"):
        pretrained_reference("resnet18", "block1", "auto")

    class Listed(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), torch.tensor(0), torch.tensor(i)

    with pytest.raises(ValueError, match="cannot fingerprint a Listed by content; pass "
                                         "dataset_key="):
        dataset_fingerprint(Listed())
    ref = _auto(Listed(), dataset_key={"data": "listed", "n": 1})
    assert isinstance(ref, PretrainedReference)


def _concurrent_builder(barrier, counter: str, out: str) -> None:
    """Child process: count real trainings in ``counter``, race the other child to build."""
    original = pretrained.train_reference_network

    def counting(*args, **kwargs):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # hold the lock long enough that the other builder must wait on it
        return original(*args, **kwargs)

    pretrained.train_reference_network = counting
    torch.set_num_threads(1)
    barrier.wait(timeout=60)
    ref = _auto(tiny_data(seed=20))
    Path(out).write_text(ref.source)


def test_two_concurrent_builders_train_once(tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    counter = tmp_path / "trainings.txt"
    outs = [tmp_path / f"out{i}.txt" for i in range(2)]
    procs = [ctx.Process(target=_concurrent_builder, args=(barrier, str(counter), str(o)))
             for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(counter.read_text().split()) == 1
    sources = {o.read_text() for o in outs}
    assert len(sources) == 1
    # and the parent (same cache) reuses the entry the children built, training nothing
    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(pretrained, "train_reference_network", refuse)
    assert _auto(tiny_data(seed=20)).source in sources


def test_checkpoints_labs_save_load_and_bad_files_are_one_line(tmp_path):
    """What a lab brings as a frozen network's weights: a Lightning checkpoint (the network
    as ``self.model``, optimizer state beside it) and a DataParallel-wrapped state dict load;
    an empty, truncated or text file, a whole pickled model, a folder, a state dict of
    another shape or with extra entries are each one line naming the file and what is
    expected."""
    model = build_model("alexnet", num_classes=4, width=0.25, seed=3).eval()
    sd = model.net.state_dict()
    x = torch.randn(2, 3, 64, 64)
    good = {
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in sd.items()},
                           "epoch": 7, "global_step": 70, "optimizer_states": [{}]},
        "ddp.pt": {f"module.{k}": v for k, v in sd.items()},
        "lightning_tapped.ckpt": {"state_dict": {f"model.net.{k}": v for k, v in sd.items()}},
    }
    for name, obj in good.items():
        torch.save(obj, tmp_path / name)
        net = load_network("alexnet", tmp_path / name)
        assert torch.equal(net(x), model(x)), name
    full = tmp_path / "full_model.pt"
    torch.save(model.net, full)
    text = tmp_path / "notes.pt"
    text.write_text("weights are on the other server\n")
    empty = tmp_path / "empty.pt"
    empty.touch()
    truncated = tmp_path / "truncated.pt"
    torch.save(sd, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    other_width = tmp_path / "width_half.pt"
    torch.save(build_model("alexnet", num_classes=4, width=0.5).net.state_dict(), other_width)
    extra = tmp_path / "extra.pt"
    torch.save({**sd, "features.99.weight": torch.zeros(1)}, extra)
    tagged = tmp_path / "tagged.pt"
    torch.save({**sd, "note": "run 12"}, tagged)
    cases = {
        full: r"cannot read as a state dict \(it holds pickled Python objects \(torchvision.models"
              r".alexnet.AlexNet: e.g. a whole model saved with torch.save\(model\)\), which are "
              r"never unpickled here\); save the network's weights with "
              r"torch.save\(model.state_dict\(\), PATH\)",
        text: r"cannot read as a state dict \(not a file torch.save wrote: Unsupported operand "
              r"119\); save the network's weights",
        empty: r"cannot read as a state dict \(empty or truncated file",
        truncated: r"cannot read as a state dict \(",
        extra: r"does not fit alexnet \(width 0.25, 4 classes, read off the file\): unexpected "
               r"features.99.weight",
        tagged: r"expected a state dict \(name -> tensor\), but entry 'note' is a str",
        tmp_path: r"is a folder; pass --weights PATH to a state dict file",
    }
    for path, match in cases.items():
        with pytest.raises(ValueError, match=rf"{path}.*{match}") as info:
            load_network("alexnet", path)
        assert "\n" not in str(info.value), path
    with pytest.raises(ValueError, match=r"does not fit alexnet \(width 0.25 as given, 4 "
                                         r"classes, read off the file\): 15 shape\(s\) differ, "
                                         r"e.g. classifier.1.bias: file \(2048,\), model "
                                         r"\(1024,\)"):
        load_network("alexnet", other_width, width=0.25)


def test_weights_that_load_but_are_no_network_are_one_line(tmp_path):
    """Each passed the dry run's load, or failed it with a traceback: NaN weights (every trial
    then failed in the reference's ridge, naming no file), integer or complex weights (cast
    without a word), integer keys (AttributeError), a 0-dim head or conv1 (IndexError), a head
    of 0 classes (a message naming no file)."""
    sd = build_model("alexnet", num_classes=4, width=0.25, seed=3).net.state_dict()

    def changed(key, value):
        return {**sd, key: value}

    cases = {
        "nan.pt": (changed("features.0.weight", sd["features.0.weight"].clone().fill_(
            float("nan"))), r"features\.0\.weight holds NaN or infinite values; expected "
                            r"finite weights"),
        "int.pt": (changed("features.3.weight", sd["features.3.weight"].long()),
                   r"features\.3\.weight holds torch\.int64 values; expected floating-point "
                   r"weights"),
        "complex.pt": (changed("classifier.1.weight", sd["classifier.1.weight"].to(
            torch.complex64)), r"classifier\.1\.weight holds torch\.complex64 values"),
        "intkey.pt": ({1: torch.zeros(1)}, r"expected a state dict \(name -> tensor\), but "
                                           r"key 1 is a int"),
        "scalarhead.pt": (changed("classifier.6.weight", torch.tensor(1.0)),
                          r"classifier\.6\.weight has shape \(\); expected a 2-D weight of "
                          r"alexnet with at least one class"),
        "scalarconv1.pt": (changed("features.0.weight", torch.tensor(1.0)),
                           r"features\.0\.weight has shape \(\); expected a 4-D weight"),
        "zerohead.pt": (changed("classifier.6.weight", torch.zeros(0, 1024)),
                        r"classifier\.6\.weight has shape \(0, 1024\); expected a 2-D weight "
                        r"of alexnet with at least one class"),
    }
    for name, (obj, match) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: {match}") \
                as info:
            load_network("alexnet", tmp_path / name)
        assert "\n" not in str(info.value), name


def test_the_sweep_records_each_network_file_with_its_digest(tmp_path):
    """The parent run's ``reference_weights`` names the file each pretrained condition loaded
    and its sha256 (a file replaced at the same path is told apart); the child runs'
    ``ran.reference`` names it too. The Gabor bank has no file."""
    import hashlib

    from references.gabor import GaborReference
    from sweeps.execute import _weights_tags
    from trainable.train import ShuffledReference, describe_reference

    path = tmp_path / "weights.pt"
    torch.save(build_model("alexnet", num_classes=5, width=0.25, seed=0).net.state_dict(), path)
    ref = pretrained_reference("alexnet", "conv5", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tags = _weights_tags({"pretrained_conv5": ref, "gabor_conv1": GaborReference()})
    assert tags == {"reference_weights": f"pretrained_conv5: {path} (sha256 {digest})"}
    assert _weights_tags({"gabor_conv1": GaborReference()}) == {}
    assert describe_reference(ref) == f"pretrained alexnet conv5 from {path}"
    assert describe_reference(ShuffledReference(GaborReference(), 0)) == (
        "shuffled across images: gabor")


def test_more_checkpoint_layouts_labs_save_load(tmp_path):
    """PyTorch's tutorial layout (model_state_dict), a Lightning module with a buffer beside
    its network (criterion.pos_weight outside model.), and Lightning's hyper_parameters holding
    an argparse.Namespace or numpy scalars were each refused; a checkpoint with the network
    under another key names the keys it looked for. A whole model stays refused."""
    import argparse

    import numpy as np

    model = build_model("alexnet", num_classes=4, width=0.25, seed=3).eval()
    sd = model.net.state_dict()
    x = torch.randn(2, 3, 64, 64)
    prefixed = {f"model.{k}": v for k, v in sd.items()}
    good = {
        "tutorial.pt": {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {},
                        "loss": 0.4},
        "buffer_beside.ckpt": {"state_dict": {**prefixed,
                                              "criterion.pos_weight": torch.ones(4)}},
        "namespace.ckpt": {"state_dict": prefixed,
                           "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}},
        "numpy.ckpt": {"state_dict": prefixed, "hyper_parameters": {
            "lr": np.float64(0.1), "steps": np.int64(3), "grid": np.arange(3)}},
    }
    for name, obj in good.items():
        torch.save(obj, tmp_path / name)
        assert torch.equal(load_network("alexnet", tmp_path / name)(x), model(x)), name
    other_key = tmp_path / "other_key.pt"
    torch.save({"epoch": 3, "weights": sd}, other_key)
    with pytest.raises(ValueError, match=r"other_key.pt: a checkpoint without the network's "
                                         r"state dict under any of 'state_dict', "
                                         r"'model_state_dict', 'model' \(its keys: epoch, "
                                         r"weights\)"):
        load_network("alexnet", other_key)
    sneaky = tmp_path / "sneaky.ckpt"  # a whole model beside an allowed Namespace
    torch.save({"state_dict": prefixed, "args": argparse.Namespace(lr=0.1),
                "net": model.net}, sneaky)
    with pytest.raises(ValueError, match=r"it holds pickled Python objects \(torchvision\."
                                         r"models\.alexnet\.AlexNet: e\.g\. a whole model"):
        load_network("alexnet", sneaky)  # named: not the Namespace met first


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building the TorchScript file
def test_wrapped_inside_compiled_or_scripted_networks(tmp_path):
    """pytorch/examples' ImageNet script wraps AlexNet's ``features`` alone in DataParallel
    (``features.module.0.weight``) and torch.compile prefixes ``_orig_mod.``: both were refused
    as another network's. A TorchScript archive printed torch's two-line warning and a message
    cut mid-word; it is one line. Finite weights whose activations are not finite (a
    BatchNorm's negative running variance, weights far too large) passed the load and failed
    every trial in its first ridge, naming no file."""
    model = build_model("alexnet", num_classes=4, width=0.25, seed=3).eval()
    sd = model.net.state_dict()
    x = torch.randn(2, 3, 64, 64)
    examples = {k.replace("features.", "features.module.", 1): v for k, v in sd.items()}
    good = {
        "examples.pth.tar": {"epoch": 90, "arch": "alexnet", "best_acc1": torch.tensor(56.5),
                             "state_dict": examples, "optimizer": {}},
        "compiled.pt": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "compiled_ddp.pt": {f"module._orig_mod.{k}": v for k, v in sd.items()},
    }
    for name, obj in good.items():
        torch.save(obj, tmp_path / name)
        assert torch.equal(load_network("alexnet", tmp_path / name)(x), model(x)), name
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model.net, x), scripted)
    resnet = build_model("resnet18", num_classes=4, width=0.25, seed=3).net.state_dict()
    resnet["bn1.running_var"] = torch.full_like(resnet["bn1.running_var"], -1.0)
    torch.save(resnet, tmp_path / "negative_var.pt")
    huge = {k: v * 1e8 if k.endswith("weight") else v for k, v in sd.items()}
    torch.save(huge, tmp_path / "huge.pt")
    cases = {
        scripted: ("alexnet", r"a TorchScript archive \(torch\.jit\.save\), whose code is "
                              r"never run here; save the network's weights with"),
        tmp_path / "negative_var.pt": ("resnet18", r"bn1\.running_var holds negative values "
                                                   r"\(-1\); expected a BatchNorm's"),
        tmp_path / "huge.pt": ("alexnet", r"the network's conv\d is NaN or infinite on a test "
                                          r"image although every weight is finite"),
    }
    for path, (name, match) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's TorchScript warning, raised, is no match
            with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {match}") as info:
                load_network(name, path)
        assert "\n" not in str(info.value), path


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
@pytest.mark.parametrize("width", [0.1, 0.2, 0.3, 0.6, 1.3])
def test_weights_of_any_width_load(tmp_path, name, width):
    """The width was read off conv1 alone, which does not round-trip: width 0.3 has 19 conv1
    channels (0.296875), whose conv2 would have 57 where the file has 58. A trial's own
    checkpoint at such a width could not serve as a reference."""
    model = build_model(name, num_classes=5, width=width, seed=1).eval()
    torch.save(model.net.state_dict(), tmp_path / "w.pt")
    got = load_network(name, tmp_path / "w.pt")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(got(x), model(x))

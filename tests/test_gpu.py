"""CUDA paths: embedding, fine-tuning, compile and prediction on a real GPU.

Deselected by default (``-m gpu``): CI and the development machines have no GPU. Run them with
``python -m pytest -m gpu tests/test_gpu.py`` on a CUDA machine. Each one compares the GPU
result with the CPU result of the same images, so a wrong device path cannot pass.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurepipe.embed import embed
from featurepipe.exceptions import FeaturePipeWarning
from featurepipe.store import FeatureStore
from tests.helpers import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos (scikit-image's bundled ones), as JPEG and PNG, in two class folders."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    arrays = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    for i, arr in enumerate(arrays):
        folder = root / ("cat" if i == 0 else "other")
        folder.mkdir(exist_ok=True)
        Image.fromarray(arr).save(folder / f"p{i}.jpg", quality=92)
        Image.fromarray(arr).rotate(90, expand=True).save(folder / f"p{i}_rot.png")
    return root


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _features(source: Path, store: Path, **kw) -> tuple[np.ndarray, list[str], list[str]]:
    rep = embed(source, store, dtype="float32", progress=False, **kw)
    fs = FeatureStore(store).load(rep.key)
    skipped = sorted(sid for sid, _ in fs.skipped)
    return fs.features, list(fs.ids), skipped


@pytest.mark.parametrize(("precision", "min_cos"), [("fp32", 0.9999), ("bf16", 0.99),
                                                    ("fp16", 0.995)])
def test_cuda_features_match_cpu_fp32(photos, tmp_path, precision, min_cos):
    ref, ref_ids, _ = _features(photos, tmp_path / "cpu.h5", device="cpu", precision="fp32")
    got, ids, _ = _features(photos, tmp_path / "gpu.h5", device="cuda", precision=precision)
    assert ids == ref_ids
    cos = _cosines(got, ref)
    assert cos.min() >= min_cos, cos


def test_cuda_embedding_skips_the_same_bad_files_as_cpu(mixed_folder, tmp_path):
    root, expected = mixed_folder
    cpu, cpu_ids, cpu_bad = _features(root, tmp_path / "cpu.h5", device="cpu",
                                      precision="fp32", **TINY)
    gpu, gpu_ids, gpu_bad = _features(root, tmp_path / "gpu.h5", device="cuda",
                                      precision="bf16", workers=2, **TINY)
    assert gpu_ids == cpu_ids
    assert gpu_bad == cpu_bad == sorted(k for k, why in expected.items() if why)
    assert _cosines(gpu, cpu).min() >= 0.98  # a random tiny net in bf16


def test_lite0_on_cuda_calls_chelsea_a_cat():
    from skimage.data import chelsea

    from featurepipe.backbones import load_backbone

    bb = load_backbone("efficientnet_lite0")
    x = bb.preprocess.eval_transform()(Image.fromarray(chelsea()))[None]
    model = bb.model.eval().cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        top = int(model(x.cuda()).float().argmax())
    assert 281 <= top <= 285


def test_compiled_embedding_on_cuda_matches_eager(photos, tmp_path):
    eager, ids, _ = _features(photos, tmp_path / "e.h5", device="cuda", precision="bf16",
                              compile="off")
    comp, comp_ids, _ = _features(photos, tmp_path / "c.h5", device="cuda", precision="bf16",
                                  compile="on", batch_size=4)
    assert comp_ids == ids
    assert _cosines(comp, eager).min() >= 0.995


# Python 3.12 warns when DataLoader workers fork a process that has CUDA's threads running;
# the workers only decode images (no CUDA), which is the case PyTorch documents as safe.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finetune_on_cuda_trains_and_predicts(mixed_folder, tmp_path, precision):
    from featurepipe.finetune import FineTuneClassifier

    root, _ = mixed_folder
    clf = FineTuneClassifier(**TINY, strategy="full", epochs=2, batch_size=4, device="cuda",
                             precision=precision, num_workers=2, val_size=0.25, verbose=0,
                             checkpoint_dir=tmp_path / "ck")
    with pytest.warns(FeaturePipeWarning, match="skipped 3 image"):
        clf.fit(root)
    assert clf.device_.startswith("cuda") and clf.precision_ == precision
    assert next(clf.model_.parameters()).is_cuda
    assert all(np.isfinite(r["train_loss"]) for r in clf.history_)
    good = sorted(p for p in root.rglob("img_*"))
    pred = clf.predict(good)
    assert set(pred) <= {"a", "b"} and len(pred) == len(good)
    # A pickled GPU model predicts the same on the CPU (weights moved, fp16 -> fp32 there).
    clone = pickle.loads(pickle.dumps(clf))
    clone.model_.cpu()
    np.testing.assert_allclose(clone.decision_function(good), clf.decision_function(good),
                               atol=0.1)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_nvjpeg_decoder_matches_pillow_and_routes_the_rest_to_it(mixed_folder, photos, tmp_path):
    # Real photos: GPU-decoded features agree with Pillow-decoded ones.
    pil, ids, _ = _features(photos, tmp_path / "p.h5", device="cuda", precision="fp32")
    nv, nv_ids, _ = _features(photos, tmp_path / "n.h5", device="cuda", precision="fp32",
                              decoder="nvjpeg")
    assert nv_ids == ids
    assert _cosines(nv, pil).min() >= 0.99
    jpg = [k for k, i in enumerate(ids) if i.endswith(".jpg")]
    assert not np.array_equal(nv[jpg], pil[jpg])  # the JPEGs really took the GPU path
    # Odd and broken files: the same rows and the same skip reasons as the CPU decoder.
    root, expected = mixed_folder
    pil, ids, bad = _features(root, tmp_path / "mp.h5", device="cuda", precision="fp32", **TINY)
    nv, nv_ids, nv_bad = _features(root, tmp_path / "mn.h5", device="cuda", precision="fp32",
                                   decoder="nvjpeg", **TINY)
    assert nv_ids == ids and nv_bad == bad == sorted(k for k, w in expected.items() if w)
    png = [k for k, i in enumerate(ids) if not i.endswith(".jpg") or "cmyk" in i]
    np.testing.assert_allclose(nv[png], pil[png], atol=1e-4)  # decoded by Pillow either way
    store = FeatureStore(tmp_path / "mn.h5")
    assert store.attrs(store.keys()[0])["decoder"] == "nvjpeg"


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_nvjpeg_stays_correct_over_many_full_batches(tmp_path):
    # Many batches in a row are what exposed a stream race (nvjpeg writing into memory that
    # queued work still read): min cosine fell to 0.08 on 4,096 files. A few photos cannot.
    from benchmarks.common import make_photo_folder

    root = make_photo_folder(tmp_path / "many", 2048)
    pil, ids, _ = _features(root, tmp_path / "p.h5", device="cuda", precision="bf16",
                            batch_size=256)
    nv, nv_ids, _ = _features(root, tmp_path / "n.h5", device="cuda", precision="bf16",
                              batch_size=256, decoder="nvjpeg")
    assert nv_ids == ids
    assert _cosines(nv, pil).min() >= 0.98

"""`featurepipe demo`: the claim of transfer learning, shown where it holds, in about a minute.

Frozen ImageNet features help most when labels are few (the learning curve in
``benchmarks/results/fashion_mnist_learning_curve.md``). The demo therefore takes a few labelled
images per class of Fashion-MNIST (installed by ``apt-get install dataset-fashion-mnist``, or any
folder holding its four IDX files), embeds them and a fixed test set with the offline default
backbone (the pooled output of ``blocks.5``, as in the learning curve, at 96 px: in the probe of
``benchmarks/results/fashion_mnist_runs.md`` the fastest size within about a point of the best), and
compares a linear classifier on those features with the same classifier on raw pixels, both
with their regularisation chosen by the same cross-validation on the training rows only.
Without Fashion-MNIST it falls back to scikit-learn's 8x8 digits. The summary line says what
the table shows and, where raw pixels win, why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEMO_SIZES", "DemoData", "FASHION_MNIST_DIR", "digits_data", "digits_images",
           "fashion_mnist_data", "load_demo_data", "per_class_subsets", "run_demo",
           "summary_line"]

#: Where ``apt-get install dataset-fashion-mnist`` puts the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Labelled training images per class, one table row each.
DEMO_SIZES = (5, 20, 50)
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_WHY_PIXELS_WIN = {
    "digits": ("8x8 digits are tiny, clean, centred strokes that raw pixels already separate, "
               "and an ImageNet network sees them only as blurred upscaled blobs; install "
               "Fashion-MNIST (apt-get install dataset-fashion-mnist) to see where frozen "
               "features help"),
    "fashion-mnist": ("grey 28x28 product shots are far from ImageNet photos, and with enough "
                      "labels a pixel model learns their outlines directly"),
}


@dataclass
class DemoData:
    """Training pool and test set of the demo, uint8 images (N, H, W) with int labels."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_data(folder: str | os.PathLike = FASHION_MNIST_DIR,
                       n_test: int = 1000) -> DemoData | None:
    """Fashion-MNIST from its IDX files in ``folder``; None when they are not there.

    The test set is the first ``n_test`` images of the official test split.
    """
    from featurepipe.sources import read_idx

    root = Path(folder)
    files = {k: [_idx_file(root, s) for s in stems] for k, stems in _FASHION_FILES.items()}
    if any(f is None for pair in files.values() for f in pair):
        return None
    (tr_x, tr_y), (te_x, te_y) = ([read_idx(f) for f in files[k]]  # type: ignore[arg-type]
                                  for k in ("train", "test"))
    return DemoData("fashion-mnist", tr_x, tr_y.astype(np.int64), te_x[:n_test],
                    te_y[:n_test].astype(np.int64), list(FASHION_CLASSES))


def digits_images() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All 1,797 digits as uint8 grayscale images (N, 8, 8), labels and class names."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64), [str(c) for c in digits.target_names]


def digits_data(n_test: int = 500) -> DemoData:
    """scikit-learn's 1,797 digits as uint8 8x8 images; a stratified ``n_test`` are the test set."""
    from featurepipe.splits import stratified_split

    images, labels, classes = digits_images()
    # sort=False keeps scikit-learn's shuffled order: the nested per-class subsets are drawn
    # from the training rows by position.
    train, test = stratified_split(labels, n_test, seed=0, sort=False)
    return DemoData("digits", images[train], labels[train], images[test], labels[test], classes)


def load_demo_data(dataset: str = "auto", folder: str | os.PathLike = FASHION_MNIST_DIR,
                   n_test: int | None = None) -> DemoData:
    """``auto``: Fashion-MNIST when its files are in ``folder``, else digits."""
    from featurepipe.exceptions import ConfigError

    if dataset not in ("auto", "fashion-mnist", "digits"):
        raise ConfigError(f"dataset {dataset!r}: expected auto, fashion-mnist or digits")
    if dataset != "digits":
        data = fashion_mnist_data(folder, n_test=n_test or 1000)
        if data is not None:
            return data
        if dataset == "fashion-mnist":
            raise ConfigError(f"{folder}: no Fashion-MNIST IDX files there (install them with "
                              "`apt-get install dataset-fashion-mnist`, or pass their folder)")
    return digits_data(n_test=n_test or 500)


def per_class_subsets(labels: np.ndarray, sizes: Sequence[int], seed: int = 0
                      ) -> dict[int, np.ndarray]:
    """Nested training subsets: the first k of one fixed per-class shuffle, for each k."""
    rng = np.random.default_rng(seed)
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    return {k: np.sort(np.concatenate([idx[:k] for idx in order.values()])) for k in sizes}


def _linear_head(x: np.ndarray, y: np.ndarray) -> Any:
    """The same model and search for every feature set: standardise, then a ridge classifier.

    Its regularisation is chosen by efficient leave-one-out CV on the training rows only, in
    closed form, so the search costs one fit (a logistic regression C search on 784 pixel
    columns takes minutes on two cores and lands within noise of it).
    """
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 4, 11))
                         ).fit(x, y)


def summary_line(rows: Sequence[dict[str, Any]], dataset: str, backbone: str) -> str:
    """One line saying what the table shows and, where raw pixels win, why."""
    gaps = [(r["labels_per_class"], r["frozen_accuracy"] - r["pixels_accuracy"]) for r in rows]
    won = [k for k, g in gaps if g > 0]
    lost = [k for k, g in gaps if g <= 0]
    points = ", ".join(f"{100 * g:+.1f} at {k}" for k, g in gaps)
    if not lost:
        trend = ("the gap is widest with the fewest labels, where a pretrained network helps "
                 "most" if gaps[0][1] >= max(g for _k, g in gaps) else
                 "a pretrained network helps even with few labels")
        return (f"Frozen {backbone} features beat raw pixels at every size (points at each "
                f"number of labels per class: {points}): {trend} (Fashion-MNIST's full curve: "
                "benchmarks/results/fashion_mnist_learning_curve.md).")
    why = _WHY_PIXELS_WIN.get(dataset, "these images are far from ImageNet photos")
    where = ("at every size" if not won else
             "at " + ", ".join(map(str, lost)) + " labels per class")
    return (f"Raw pixels win {where} (frozen minus pixels, points: {points}): {why}.")


def run_demo(
    out_dir: str | os.PathLike = "featurepipe-demo",
    *,
    dataset: str = "auto",
    data_dir: str | os.PathLike = FASHION_MNIST_DIR,
    sizes: Sequence[int] = DEMO_SIZES,
    n_test: int | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    image_size: int | None = 96,
    layer: str | None = "blocks.5",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Embed a few labelled images per class and a test set; frozen features vs raw pixels.

    Parameters
    ----------
    out_dir : path
        Folder for the feature store (a rerun re-uses its features).
    dataset : {"auto", "fashion-mnist", "digits"}
        ``auto`` uses Fashion-MNIST when its IDX files are in ``data_dir``, digits otherwise.
    sizes : sequence of int
        Labelled training images per class, one table row each (nested subsets).
    n_test : int, optional
        Test images (default 1,000 for Fashion-MNIST, 500 for digits).
    backbone, weights, image_size, layer
        The embedding spec (defaults: see the module docstring).
    progress : bool
        tqdm bars on stderr for the embedding and the fits.
    log : callable, optional
        Receives one line per stage, with its time.

    Returns
    -------
    dict
        ``rows`` (one per size), ``table`` (Markdown), ``summary`` (one line), ``stages``
        (seconds per stage), ``dataset``, ``n_test``, ``store``, ``embed`` (the report).
    """
    from tqdm.auto import tqdm

    from featurepipe.embed import embed
    from featurepipe.report import markdown_table
    from featurepipe.store import FeatureStore

    say = log or (lambda _m: None)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    data = load_demo_data(dataset, data_dir, n_test)
    subsets = per_class_subsets(data.train_labels, sorted(set(sizes)))
    pool = subsets[max(subsets)]
    images = np.concatenate([data.train_images[pool], data.test_images])
    labels = np.concatenate([data.train_labels[pool], data.test_labels])
    stages["load"] = time.perf_counter() - t
    say(f"[1/3] {data.name}: {len(pool)} training images ({', '.join(map(str, subsets))} per "
        f"class), {len(data.test_labels)} test images ({stages['load']:.1f}s)")

    t = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    store_path = os.path.join(out_dir, f"{data.name}.h5")
    say(f"[2/3] embedding {len(images)} images with {backbone} ({image_size or 'default'} px, "
        f"layer {layer or 'penultimate'}) into {store_path}")
    report = embed(images, store_path, backbone, weights=weights, image_size=image_size,
                   layer=layer, labels=labels, progress=progress, log=say)
    feats = FeatureStore(store_path).load(report.key)
    # Array sources name rows "name[i]"; map the stored rows back to the input order.
    row = np.empty(len(images), dtype=np.int64)
    row[[int(i.rsplit("[", 1)[1].rstrip("]")) for i in feats.ids]] = np.arange(len(feats.ids))
    features = np.asarray(feats.features, dtype=np.float32)[row]
    stages["embed"] = time.perf_counter() - t
    say(f"      embedded in {stages['embed']:.1f}s")

    t = time.perf_counter()
    n_pool = len(pool)
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
    test = np.arange(n_pool, len(images))
    y_test = labels[test]
    pos = {int(i): p for p, i in enumerate(pool)}
    rows = []
    jobs = [(k, arm) for k in subsets for arm in ("pixels", "frozen")]
    bar = tqdm(jobs, desc="[3/3] fitting heads", unit="fit", disable=not progress, leave=False)
    acc: dict[tuple[int, str], float] = {}
    for k, arm in bar:
        bar.set_postfix_str(f"{arm}, {k}/class")
        train = np.array([pos[int(i)] for i in subsets[k]])
        x = pixels if arm == "pixels" else features
        model = _linear_head(x[train], labels[train])
        acc[(k, arm)] = float(model.score(x[test], y_test))
    bar.close()
    for k in subsets:
        rows.append({"labels_per_class": k, "n_train": int(len(subsets[k])),
                     "pixels_accuracy": acc[(k, "pixels")], "frozen_accuracy": acc[(k, "frozen")],
                     "gain_points": round(100 * (acc[(k, "frozen")] - acc[(k, "pixels")]), 1)})
    stages["fit"] = time.perf_counter() - t
    say(f"[3/3] fitted {len(jobs)} heads in {stages['fit']:.1f}s")

    header = {"labels_per_class": "labels per class", "n_train": "training images",
              "pixels_accuracy": "raw pixels + ridge",
              "frozen_accuracy": f"{backbone} {layer or 'penultimate'} + ridge",
              "gain_points": "frozen - pixels (points)"}
    shown = [{**r, "gain_points": f"{r['gain_points']:+.1f}"} for r in rows]
    table = markdown_table([{header[c]: r[c] for c in header} for r in shown],
                           list(header.values()))
    return {"dataset": data.name, "rows": rows, "table": table,
            "summary": summary_line(rows, data.name, backbone), "n_test": int(len(test)),
            "stages": stages, "store": store_path, "embed": report.to_dict(),
            "classes": data.classes}

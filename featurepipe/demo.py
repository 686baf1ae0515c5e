"""`featurepipe demo`: the main job end to end on data that ships with scikit-learn.

Embeds the 1,797 8x8 digits of ``sklearn.datasets.load_digits`` with the offline default backbone,
trains head presets on a stratified split, and compares them with logistic regression on raw pixels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DEMO_HEADS = ("logreg", "linear-svm", "knn")


def digits_images() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The digits set as uint8 grayscale images (N, 8, 8), labels and class names."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64), [str(c) for c in digits.target_names]


def run_demo(
    out_dir: str | os.PathLike = "featurepipe-demo",
    *,
    heads: Sequence[str] = DEMO_HEADS,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Embed digits, fit heads on a 70/30 stratified split, return rows and a Markdown table.

    ``limit`` keeps the first N images (tests); a rerun re-uses the cached features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featurepipe.embed import embed
    from featurepipe.heads import fit_head, make_head
    from featurepipe.report import markdown_table
    from featurepipe.store import FeatureStore

    say = log or (lambda _m: None)
    images, labels, names = digits_images()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    os.makedirs(out_dir, exist_ok=True)
    store_path = os.path.join(out_dir, "digits.h5")
    say(f"embedding {len(images)} digit images with {backbone} into {store_path}")
    report = embed(images, store_path, backbone, weights=weights, image_size=image_size,
                   labels=labels, progress=progress, log=say)
    feats = FeatureStore(store_path).load(report.key)
    order = np.array([int(i.split("[")[1].rstrip("]")) for i in feats.ids])
    y = labels[order]
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)

    rows = []
    pixels = images.reshape(len(images), -1).astype(np.float32)[order]
    t = time.perf_counter()
    raw = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    raw.fit(pixels[train], y[train])
    rows.append({"model": "raw pixels + logistic regression",
                 "accuracy": raw.score(pixels[test], y[test]),
                 "fit_seconds": time.perf_counter() - t})
    for head in heads:
        fitted, info = fit_head(make_head(head), feats.features[train], y[train])
        rows.append({"model": f"{backbone} + {head}",
                     "accuracy": float(fitted.score(feats.features[test], y[test])),
                     "fit_seconds": info["fit_seconds"]})
    table = markdown_table(rows, ["model", "accuracy", "fit_seconds"])
    return {"store": store_path, "embed": report.to_dict(), "rows": rows, "table": table,
            "n_train": len(train), "n_test": len(test), "classes": names}

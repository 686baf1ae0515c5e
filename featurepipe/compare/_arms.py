"""The arms of a comparison and how each is trained and scored under the shared protocol.

An arm gets a training :class:`~featurepipe.compare._data.Part`, a validation ``Part`` (training
rows it is not fitted on, shared by every arm) and a test ``Part``. Hyperparameters are chosen by
the head's cross-validation *inside* ``fit_head`` on the training rows only (or, for fine-tuning,
by early stopping on a split of the training rows); the validation score selects headline arms;
the test rows are touched once, for the reported score.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from featurepipe.compare._data import HOG, PIXELS, Part, ids_digest, layer_features
from featurepipe.compare._measure import Measure
from featurepipe.exceptions import ConfigError
from featurepipe.finetune.loop import Callback
from featurepipe.splits import stratified_subsample

#: name -> (features, head preset, parameter overrides of the preset's estimator).
#: HOG + linear SVM forces liblinear's dual solver: with n_samples > n_features the preset's
#: ``dual="auto"`` picks the primal Newton solver, which on standardized Fashion-MNIST HOG
#: features (3,000 x 1,296) took 7.4 s at C=0.01 but over 5 minutes at C=1; the dual solver is
#: bounded by ``max_iter`` passes (3.7-12.3 s for C in 1e-3..1e2, high C stopping at the cap).
CLASSICAL_ARMS: dict[str, tuple[str, str, tuple[tuple[str, Any], ...]]] = {
    "pixels+logreg": (PIXELS, "logreg", ()),
    "pixels+svm-rbf": (PIXELS, "svm-rbf", ()),
    "hog+linear-svm": (HOG, "linear-svm", (("dual", True), ("max_iter", 1000))),
    # The same head families as the frozen arms get, so no feature set lacks a head another has.
    "hog+logreg": (HOG, "logreg", ()),
    "hog+svm-rbf": (HOG, "svm-rbf", ()),
}
FINETUNE_STRATEGIES = ("head", "full")
#: Feature matrices smaller than this (rows x columns) are fitted with one BLAS thread. On tiny
#: problems thread hand-offs dominate: a logreg search on 21 x 192 features took 2.0-4.2 s with
#: OpenBLAS's 2 threads on a busy 2-core machine and 0.42-0.46 s with 1.
SINGLE_THREAD_BELOW = 2_000_000


@dataclass(frozen=True)
class ArmSpec:
    """What one arm is.

    ``family`` is ``"classical"`` (features computed from pixels, model trained from scratch),
    ``"frozen"`` (pretrained features + a head preset) or ``"finetune"``; ``features`` names the
    feature matrix (``"pixels"``, ``"hog"``, a backbone name, or ``backbone@layer`` with a
    layer list; ``"images"`` for fine-tuning). ``layers`` are the layers a frozen arm reads
    (several: side by side, through a :class:`~featurepipe.heads.BlockStandardScaler`).
    """

    name: str
    family: str
    features: str
    head: str | None = None
    strategy: str | None = None
    backbone: str | None = None
    head_params: tuple[tuple[str, Any], ...] = ()
    layers: tuple[str, ...] = ()


def build_arms(classical: tuple[str, ...], backbones: tuple[str, ...], heads: tuple[str, ...],
               finetune: tuple[str, ...], finetune_backbone: str,
               layers: tuple[str | None, ...] | None = None) -> list[ArmSpec]:
    """The arms in report order: classical, then frozen (per backbone x head), then fine-tune.

    With ``layers``, each backbone gets frozen arms per layer and, for several layers, per
    head on all of them side by side (``efficientnet_lite0@blocks.5+logreg``,
    ``efficientnet_lite0@blocks.4,blocks.5+logreg``).
    """
    from featurepipe.finetune import STRATEGIES

    arms = []
    for name in classical:
        if name not in CLASSICAL_ARMS:
            raise ConfigError(f"unknown classical arm {name!r}; choose from "
                              f"{', '.join(CLASSICAL_ARMS)}")
        feats, head, overrides = CLASSICAL_ARMS[name]
        arms.append(ArmSpec(name, "classical", feats, head=head, head_params=overrides))
    for bb in backbones:
        if layers is None:
            arms += [ArmSpec(f"{bb}+{head}", "frozen", bb, head=head, backbone=bb)
                     for head in heads]
            continue
        arms += [ArmSpec(f"{feats}+{head}", "frozen", feats, head=head, backbone=bb,
                         layers=names)
                 for feats, names in layer_features(bb, layers) for head in heads]
    for strategy in finetune:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown fine-tuning strategy {strategy!r}; choose from "
                              f"{', '.join(STRATEGIES)} (no fine-tuning: --no-finetune, or "
                              "finetune=None in Python)")
        arms.append(ArmSpec(f"finetune-{strategy}", "finetune", "images", strategy=strategy,
                            backbone=finetune_backbone))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate arms: {names}")
    return arms


def max_train_for(name: str, caps: Mapping[str, int] | None) -> int | None:
    """The training-set cap for arm ``name``: the first pattern (fnmatch) in ``caps`` it matches."""
    for pattern, n in (caps or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return int(n)
    return None


@dataclass
class ArmContext:
    """Settings every arm shares, and the per-image cost of the features it reads."""

    seed: int = 0
    cv: int = 5
    n_jobs: int | None = None
    max_train: Mapping[str, int] | None = None
    finetune_params: dict[str, Any] = field(default_factory=dict)
    feature_seconds_per_image: dict[str, float | None] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _m: None
    #: Fine-tuning arms show their epoch bars (tqdm, stderr) when True.
    progress: bool = False
    #: Called with (arm name, training Part) before fitting; tests use it to check the protocol.
    on_fit: Callable[[str, Part], None] | None = None
    #: When given, each arm's test predictions are stored here under its name (paired tests).
    predictions: dict[str, np.ndarray] | None = None


def run_arm(arm: ArmSpec, train: Part, test: Part, ctx: ArmContext,
            val: Part | None = None) -> dict[str, Any]:
    """Train ``arm`` on ``train`` (subsampled if capped), score it on ``val`` and ``test``.

    ``val`` (rows of the training split the arm was not fitted on) gives ``val_accuracy``, the
    score that selects headline arms; the test rows only give the reported test scores.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, f1_score

    from featurepipe.compare._stats import accuracy_interval

    cap = max_train_for(arm.name, ctx.max_train)
    if cap is not None and cap < len(train):
        train = train.take(stratified_subsample(train.labels, cap, ctx.seed))
    if ctx.on_fit is not None:
        ctx.on_fit(arm.name, train)
    ctx.log(f"arm {arm.name}: training on {len(train)} images")
    with warnings.catch_warnings(record=True) as caught, Measure() as m:
        warnings.simplefilter("always")
        if arm.family == "finetune":
            fit_s, predict_s, preds, params, extra = _finetune(arm, train, test, ctx, val)
        else:
            fit_s, predict_s, preds, params, extra = _head(arm, train, test, ctx, val)
    pred, val_pred = preds
    if ctx.predictions is not None:
        ctx.predictions[arm.name] = np.asarray(pred)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    test_ci = accuracy_interval(test.labels, pred)
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught
                                  if not issubclass(w.category, DeprecationWarning)))
    per_image = ctx.feature_seconds_per_image.get(arm.features) or 0.0
    return {
        "arm": arm.name, "family": arm.family, "features": arm.features,
        "head": arm.head, "strategy": arm.strategy, "backbone": arm.backbone,
        **({"layers": list(arm.layers)} if arm.layers else {}),
        "accuracy": float(accuracy_score(test.labels, pred)),
        "accuracy_ci95": [test_ci["ci_low"], test_ci["ci_high"]],
        "val_accuracy": (None if val is None or val_pred is None
                         else float(accuracy_score(val.labels, val_pred))),
        "macro_f1": float(f1_score(test.labels, pred, average="macro")),
        "n_train": len(train), "n_val": 0 if val is None else len(val), "n_test": len(test),
        "max_train": cap, "converged": converged,
        "fit_seconds": fit_s, "extraction_seconds": per_image * len(train),
        # What training really cost from raw images: the fit plus making the training features.
        "train_seconds": fit_s + per_image * len(train),
        "predict_ms_per_image": 1000.0 * (predict_s / max(len(test), 1) + per_image),
        "peak_mib": m.peak_mib, "memory_method": m.memory_method,
        "params": params, "head_overrides": dict(arm.head_params), "warnings": messages,
        "train_ids_sha256": ids_digest(train.ids), "test_ids_sha256": ids_digest(test.ids),
        **extra,
    }


Preds = tuple[np.ndarray, np.ndarray | None]


def _head(arm: ArmSpec, train: Part, test: Part, ctx: ArmContext, val: Part | None
          ) -> tuple[float, float, Preds, dict[str, Any], dict[str, Any]]:
    from featurepipe.heads import block_head, fit_head, make_head

    head = _override(make_head(arm.head or "logreg", cv=ctx.cv, random_state=ctx.seed,
                               n_jobs=ctx.n_jobs), dict(arm.head_params))
    if len(arm.layers) > 1:
        head = block_head(head, [train.features[f"{arm.backbone}@{name}"].shape[1]
                                 for name in arm.layers])
    X_train = _matrix(arm, train)
    threads = 1 if X_train.size < SINGLE_THREAD_BELOW else None
    with threadpool_limits(limits=threads, user_api="blas"):
        fitted, info = fit_head(head, X_train, train.labels)
    del X_train
    t0 = time.perf_counter()
    pred = fitted.predict(_matrix(arm, test))
    predict_s = time.perf_counter() - t0
    val_pred = None if val is None else fitted.predict(_matrix(arm, val))
    return info["fit_seconds"], predict_s, (pred, val_pred), info["params"], {}


def _override(head: Any, params: dict[str, Any]) -> Any:
    """Set ``params`` on every nested estimator of ``head`` that has them (by short name)."""
    if params:
        names = head.get_params(deep=True)
        head.set_params(**{path: params[path.rsplit("__", 1)[-1]] for path in names
                           if path.rsplit("__", 1)[-1] in params})
    return head


def _matrix(arm: ArmSpec, part: Part) -> np.ndarray:
    """The arm's float32 features of ``part``: several layers side by side, in layer order."""
    if len(arm.layers) > 1:
        return np.hstack([_as_float(part.features[f"{arm.backbone}@{name}"])
                          for name in arm.layers])
    return _as_float(part.features[arm.features])


def _as_float(X: np.ndarray) -> np.ndarray:
    """uint8 pixels -> [0, 1] float32; float16 features -> float32 (sklearn would go float64)."""
    if X.dtype == np.uint8:
        return X.astype(np.float32) / 255.0
    return X.astype(np.float32, copy=False)


class TimeLimit(Callback):
    """Fine-tuning callback: stop after the epoch in which ``seconds`` of training have passed.

    The best epoch's weights are still restored (by early stopping's end-of-training hook).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = 0.0
        self.stopped_at: int | None = None

    def on_train_begin(self, trainer: Any) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if time.perf_counter() - self.start >= self.seconds and trainer.epoch < trainer.epochs:
            trainer.stop_training = True
            self.stopped_at = int(record["epoch"])



def _finetune(arm: ArmSpec, train: Part, test: Part, ctx: ArmContext, val: Part | None
              ) -> tuple[float, float, Preds, dict[str, Any], dict[str, Any]]:
    from featurepipe.finetune import FineTuneClassifier

    params = dict(ctx.finetune_params)
    minutes = params.pop("max_minutes", None)
    limit = TimeLimit(60.0 * minutes) if minutes else None
    params.setdefault("random_state", ctx.seed)
    params.setdefault("verbose", 1 if ctx.progress else 0)
    est = FineTuneClassifier(backbone=arm.backbone or "efficientnet_lite0",
                             strategy=arm.strategy or "head",
                             callbacks=[limit] if limit else None, **params)
    t0 = time.perf_counter()
    est.fit(train.images(), train.labels)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = est.predict(test.images())
    predict_s = time.perf_counter() - t0
    # Its early stopping used a split of its own training rows; the shared holdout is scored
    # like every other arm's, so validation accuracies are comparable across arms.
    val_pred = None if val is None else est.predict(val.images())
    best = est.history_[est.best_epoch_ - 1] if est.history_ else {}
    shown = {k: v for k, v in est.get_params().items()
             if k in ("epochs", "lr", "batch_size", "image_size", "val_size", "weights",
                      "augment", "backbone_lr_factor", "early_stopping", "label_smoothing",
                      "warmup_epochs")}
    extra = {
        "epochs_run": len(est.history_), "best_epoch": est.best_epoch_,
        "best_val_acc": best.get("val_acc"), "n_val_early_stopping": est.n_val_,
        "time_limit_minutes": minutes, "stopped_by_time_limit": bool(limit and limit.stopped_at),
        "device": est.device_, "precision": est.precision_,
    }
    return fit_s, predict_s, (pred, val_pred), shown, extra

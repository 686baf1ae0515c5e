"""``FineTuneClassifier``: end-to-end fine-tuning of a pretrained backbone, sklearn-style."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.utils.data import DataLoader

from featurepipe.exceptions import BackboneError, ConfigError
from featurepipe.finetune.augment import AUGMENTS, train_transform
from featurepipe.finetune.callbacks import Checkpoint, EarlyStopping, ProgressBar, Unfreezer
from featurepipe.finetune.checkpoint import load_checkpoint, set_rng_state
from featurepipe.finetune.data import (
    ImageDataset,
    classifier_targets,
    data_fingerprint,
    scan_decodable,
    split_indices,
)
from featurepipe.finetune.history import HistoryFile, plot_history, save_history
from featurepipe.finetune.loop import Callback, Trainer
from featurepipe.finetune.schedules import make_scheduler
from featurepipe.finetune.strategies import STRATEGIES, param_groups, stage_groups

__all__ = ["CHECKPOINT_NAME", "FineTuneClassifier"]

CHECKPOINT_NAME = "checkpoint.pt"
#: Parameters that may change between a run and its resume without changing the result's meaning.
RESUME_FREE = frozenset({"resume", "verbose", "num_workers", "checkpoint_dir", "device",
                         "callbacks", "on_error"})


class FineTuneClassifier(ClassifierMixin, BaseEstimator):
    """Fine-tune a pretrained image backbone end to end, with scikit-learn's interface.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Any name :func:`featurepipe.backbones.resolve_spec` accepts (``timm:<model>``,
        ``torchvision:<model>``, an exported fine-tuned directory).
    weights : str, optional
        None = the name's pretrained weights, a file path, or ``"random"`` (tests).
    image_size : int, optional
        Input crop size; default from the weights' config.
    strategy : {"head", "partial", "full", "gradual"}, default="head"
        What is trained; see :mod:`featurepipe.finetune.strategies`.
    unfreeze_stages : int, default=2
        Backbone stages trained (from the top) with ``strategy="partial"``.
    gradual_every : int, default=1
        Epochs between unfreezing the next stage with ``strategy="gradual"``.
    epochs : int, default=10
    lr : float, default=1e-3
        Learning rate of the new head (AdamW).
    backbone_lr_factor : float, default=0.1
        Pretrained stages learn at ``lr * backbone_lr_factor`` ...
    stage_lr_decay : float, default=1.0
        ... times ``stage_lr_decay ** (d - 1)`` for a stage ``d`` stages below the head.
    weight_decay : float, default=0.01
        AdamW weight decay (not applied to biases and norm weights).
    warmup_epochs : float, default=1
        Linear warmup length; cosine decay to 0 over the rest, stepped per batch.
    label_smoothing : float, default=0.0
    augment : {"basic", "trivial", "randaugment", "erasing"}, callable or None, default="basic"
        Training augmentation (see :func:`featurepipe.finetune.augment.train_transform`).
    batch_size : int, default=32
    val_size : float or int, default=0.1
        Stratified validation split (fraction or count); 0 or None trains on everything and keeps
        the last epoch.
    early_stopping : int or None, default=5
        Patience in epochs on validation loss; None never stops early. The best epoch's weights
        (lowest validation loss) are restored at the end either way.
    device : str, default="auto"
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        ``auto``: bf16 (or fp16 + GradScaler) autocast on CUDA, bf16 on CPUs with native bf16,
        else fp32. ``fp32`` is exact and, with ``num_workers=0``, bit-reproducible.
    num_workers : int, default=0
        DataLoader worker processes for decoding and augmentation.
    random_state : int or None, default=0
        Seeds the head init, split, shuffling, augmentation and dropout. The global RNGs of the
        caller are left as they were.
    checkpoint_dir : str or path, optional
        Where ``checkpoint.pt`` (every epoch, atomic), ``history.json`` and ``history.png`` go.
    resume : bool, default=False
        Continue from ``checkpoint_dir/checkpoint.pt`` if present; different parameters (other
        than verbose, num_workers, device, on_error, callbacks) raise ConfigError.
    on_error : {"skip", "raise"}, default="skip"
        Images that cannot be decoded are skipped with one FeaturePipeWarning listing them, or raise
        DecodeError.
    callbacks : list of Callback, optional
        Extra hooks, called after the built-in ones and before the checkpoint is written.
    verbose : int, default=1
        0 = silent; 1 = a progress bar per epoch.

    Attributes
    ----------
    classes_ : ndarray
    n_classes_ : int
    model_ : torch.nn.Module
        The fine-tuned network (best epoch), in eval mode.
    backbone_spec_ : BackboneSpec
    preprocess_ : PreprocessSpec
        Eval preprocessing of the weights, used by ``predict``.
    family_ : str
    history_ : list of dict
        Per epoch: epoch, train_loss, train_acc, val_loss, val_acc, lrs (per trained stage, at the
        epoch's first step), seconds, n_trainable.
    best_epoch_ : int
        1-based epoch whose weights ``model_`` holds.
    skipped_ : list of dict
        ``{path, reason}`` of images that could not be decoded.
    n_train_, n_val_ : int
    device_, precision_ : str
    seed_ : int

    Examples
    --------
    >>> clf = FineTuneClassifier("timm:test_efficientnet", weights="random", image_size=32,
    ...                          epochs=1, verbose=0)            # doctest: +SKIP
    >>> clf.fit("photos/").predict(["new.jpg"])                  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str | None = None,
        image_size: int | None = None,
        strategy: str = "head",
        unfreeze_stages: int = 2,
        gradual_every: int = 1,
        epochs: int = 10,
        lr: float = 1e-3,
        backbone_lr_factor: float = 0.1,
        stage_lr_decay: float = 1.0,
        weight_decay: float = 0.01,
        warmup_epochs: float = 1,
        label_smoothing: float = 0.0,
        augment: str | Callable | None = "basic",
        batch_size: int = 32,
        val_size: float | int | None = 0.1,
        early_stopping: int | None = 5,
        device: str = "auto",
        precision: str = "auto",
        num_workers: int = 0,
        random_state: int | None = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        on_error: str = "skip",
        callbacks: Sequence[Callback] | None = None,
        verbose: int = 1,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.strategy = strategy
        self.unfreeze_stages = unfreeze_stages
        self.gradual_every = gradual_every
        self.epochs = epochs
        self.lr = lr
        self.backbone_lr_factor = backbone_lr_factor
        self.stage_lr_decay = stage_lr_decay
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.batch_size = batch_size
        self.val_size = val_size
        self.early_stopping = early_stopping
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.on_error = on_error
        self.callbacks = callbacks
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    def fit(self, X: Any, y: Any | None = None) -> FineTuneClassifier:
        """Fine-tune on images ``X`` (anything ``open_source`` accepts) with labels ``y``.

        Without ``y`` the labels come from the source (class subfolders, manifest labels).
        """
        from featurepipe.devices import resolve_device, resolve_precision
        from featurepipe.sources import open_source

        self._check_params()
        device = resolve_device(self.device)
        precision = resolve_precision(self.precision, device)
        source = open_source(X)
        classes, codes = classifier_targets(source, y)
        ckpt = self._load_resume_checkpoint()
        if ckpt is not None:
            self._check_resume_params(ckpt)
        seed = self._resolve_seed(ckpt)
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):  # the caller's RNGs stay untouched
            torch.manual_seed(seed)
            model, spec, bb = self._build_model(len(classes))
            data = self._prepare_data(source, codes, bb.preprocess, seed)
            if ckpt is not None and ckpt.get("data") != data["fingerprint"]:
                raise ConfigError(
                    f"cannot resume from {self.checkpoint_dir}: the training images or labels "
                    "differ from the checkpoint's; use the same data, or resume=False to start over"
                )
            model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
            trainer = self._make_trainer(model, bb, source, codes, data, device, precision, seed)
            if ckpt is not None:
                trainer.load_state_dict(ckpt["trainer"])
                set_rng_state(ckpt["rng"])
            trainer.fit()
        model.eval()
        self.classes_ = classes
        self.n_classes_ = len(classes)
        self.model_ = model
        self.backbone_spec_ = spec
        self.preprocess_ = bb.preprocess
        self.family_ = bb.family
        self.history_ = trainer.history
        stopper = next(cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping))
        self.best_epoch_ = stopper.best_epoch or len(trainer.history)
        self.skipped_ = data["skipped"]
        self.n_train_, self.n_val_ = len(data["train"]), len(data["val"])
        self.device_, self.precision_, self.seed_ = str(device), precision, seed
        if self.checkpoint_dir is not None:
            save_history(self.history_, Path(self.checkpoint_dir) / "history.json")
            plot_history(self.history_, Path(self.checkpoint_dir) / "history.png")
        return self

    def _prepare_data(self, source: Any, codes: np.ndarray, preprocess: Any,
                      seed: int) -> dict[str, Any]:
        """Decode check (skip or raise), stratified split, and the data fingerprint."""
        from featurepipe.decode import DecodePolicy

        policy = DecodePolicy()
        target = preprocess.resize_size if policy.reduce_on_load else None
        good, skipped = scan_decodable(source, range(len(source)), policy, target,
                                       self.on_error, self.num_workers)
        train, val = split_indices(good, codes[good], self.val_size, seed % 2**32)
        fingerprint = data_fingerprint(source, train + val, codes[train + val])
        return {"policy": policy, "target": target, "skipped": skipped, "train": train,
                "val": val, "fingerprint": fingerprint}

    def _check_params(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}; expected {expected}")

        if self.strategy not in STRATEGIES:
            raise bad("strategy", "one of " + ", ".join(STRATEGIES))
        for name in ("epochs", "batch_size", "gradual_every"):
            if not isinstance(getattr(self, name), (int, np.integer)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if not isinstance(self.unfreeze_stages, (int, np.integer)) or self.unfreeze_stages < 0:
            raise bad("unfreeze_stages", "an integer >= 0")
        for name in ("lr", "backbone_lr_factor", "stage_lr_decay", "weight_decay",
                     "warmup_epochs"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise bad(name, "a number >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", "a number in [0, 1)")
        if not (callable(self.augment) or self.augment in AUGMENTS):
            raise bad("augment", "'basic', 'trivial', 'randaugment', 'erasing', None or a callable")
        if self.early_stopping is not None and (
                not isinstance(self.early_stopping, (int, np.integer)) or self.early_stopping < 1):
            raise bad("early_stopping", "an integer >= 1 (patience in epochs) or None")
        if self.val_size is not None and not (
                (isinstance(self.val_size, float) and 0.0 <= self.val_size < 1.0)
                or (isinstance(self.val_size, (int, np.integer)) and self.val_size >= 0)):
            raise bad("val_size", "a fraction in [0, 1), a count >= 0, or None")
        if self.on_error not in ("skip", "raise"):
            raise bad("on_error", "'skip' or 'raise'")
        if not isinstance(self.num_workers, (int, np.integer)) or self.num_workers < 0:
            raise bad("num_workers", "an integer >= 0")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("resume=True needs checkpoint_dir (where the checkpoint is)")

    def _resolve_seed(self, ckpt: dict | None) -> int:
        if ckpt is not None:
            return int(ckpt["seed"])
        if self.random_state is None:
            return int(np.random.SeedSequence().generate_state(1)[0])
        if isinstance(self.random_state, (int, np.integer)):
            return int(self.random_state)
        from sklearn.utils import check_random_state

        return int(check_random_state(self.random_state).randint(2**31 - 1))

    def _build_model(self, n_classes: int) -> tuple[nn.Module, Any, Any]:
        from featurepipe.backbones import load_backbone, reset_classifier, resolve_spec

        spec = resolve_spec(self.backbone, weights=self.weights, image_size=self.image_size)
        bb = load_backbone(spec)
        model = bb.model
        out = reset_classifier(model, n_classes, bb.family)
        if isinstance(out, nn.Module):
            model = out
        return model, spec, bb

    def _make_trainer(self, model: nn.Module, bb: Any, source: Any, codes: np.ndarray,
                      data: dict[str, Any], device: torch.device, precision: str,
                      seed: int) -> Trainer:
        """Loaders, optimizer, schedule, loss and callbacks around ``model``."""
        pin = device.type == "cuda"
        train_idx, val_idx = data["train"], data["val"]
        policy, target = data["policy"], data["target"]
        train_ds = ImageDataset(source, train_idx, codes[train_idx],
                                train_transform(bb.preprocess, self.augment), policy, target)
        # A last batch of one breaks BatchNorm on pooled (1, C) activations; drop only that case.
        # Workers are not persistent: each epoch's workers are seeded from the reseeded generator.
        drop_last = len(train_idx) % self.batch_size == 1 and len(train_idx) > 1
        train_loader = DataLoader(train_ds, batch_size=self.batch_size, shuffle=True,
                                  generator=torch.Generator(), num_workers=self.num_workers,
                                  drop_last=drop_last, pin_memory=pin)
        val_loader = None
        if val_idx:
            val_ds = ImageDataset(source, val_idx, codes[val_idx], bb.preprocess.eval_transform(),
                                  policy, target)
            val_loader = DataLoader(val_ds, batch_size=self.batch_size,
                                    num_workers=self.num_workers, pin_memory=pin)
        groups = stage_groups(model, bb.family)
        optimizer = torch.optim.AdamW(
            param_groups(model, groups, self.lr, self.backbone_lr_factor, self.weight_decay,
                         self.stage_lr_decay),
            lr=self.lr, weight_decay=self.weight_decay)
        steps = len(train_loader)
        scheduler = make_scheduler(optimizer, round(self.warmup_epochs * steps),
                                   self.epochs * steps)
        callbacks: list[Callback] = [
            Unfreezer(groups, self.strategy, self.unfreeze_stages, self.gradual_every),
            ProgressBar(disable=not self.verbose),
            EarlyStopping("val_loss", self.early_stopping if val_idx else None),
            *(self.callbacks or []),
        ]
        if self.checkpoint_dir is not None:
            folder = Path(self.checkpoint_dir)
            callbacks.append(HistoryFile(folder / "history.json"))
            extra = {"params": self._config(), "seed": seed, "data": data["fingerprint"]}
            callbacks.append(Checkpoint(folder / CHECKPOINT_NAME, extra=lambda: extra))
        return Trainer(model, optimizer, scheduler,
                       nn.CrossEntropyLoss(label_smoothing=self.label_smoothing),
                       train_loader, val_loader, epochs=self.epochs, device=device,
                       precision=precision, seed=seed, callbacks=callbacks)

    # ------------------------------------------------------------------ resume

    def _config(self) -> dict[str, Any]:
        """The parameters as plain values (what a checkpoint records)."""
        out: dict[str, Any] = {}
        for k, v in self.get_params(deep=False).items():
            if k in ("callbacks",):
                continue
            if callable(v):
                v = f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
            elif isinstance(v, os.PathLike):
                v = os.fspath(v)
            elif isinstance(v, np.generic):
                v = v.item()
            elif not isinstance(v, (str, int, float, bool, type(None))):
                v = repr(v)
            out[k] = v
        return out

    def _load_resume_checkpoint(self) -> dict[str, Any] | None:
        if not self.resume or self.checkpoint_dir is None:
            return None
        path = Path(self.checkpoint_dir) / CHECKPOINT_NAME
        return load_checkpoint(path) if path.exists() else None

    def _check_resume_params(self, ckpt: dict[str, Any]) -> None:
        saved, now = ckpt.get("params", {}), self._config()
        done = int(ckpt.get("trainer", {}).get("epoch", 0))
        if isinstance(self.epochs, int) and self.epochs < done:
            raise ConfigError(f"cannot resume from {self.checkpoint_dir} with epochs="
                              f"{self.epochs}: the run has already trained {done} epochs")
        # More epochs than the run planned extend it (the cosine schedule is stretched).
        diff = sorted(k for k in set(saved) | set(now)
                      if k not in RESUME_FREE and k != "epochs" and saved.get(k) != now.get(k))
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise ConfigError(
                f"cannot resume from {self.checkpoint_dir}: parameters differ from the checkpoint "
                f"({detail}); use the same parameters, or resume=False to start over"
            )

    # ------------------------------------------------------------------ predict

    @torch.no_grad()
    def decision_function(self, X: Any) -> np.ndarray:
        """Logits ``(n_images, n_classes)``; eval preprocessing of the weights. Bad images raise."""
        from featurepipe.backbones import Backbone
        from featurepipe.embedding import EmbedOptions, embed_in_memory
        from featurepipe.exceptions import DecodeError
        from featurepipe.sources import open_source

        check_is_fitted(self, "model_")
        source = open_source(X)
        device = next(self.model_.parameters()).device
        # fp16 autocast is a CUDA choice; a model unpickled onto the CPU predicts in fp32.
        precision = self.precision_
        if device.type == "cpu" and precision == "fp16":
            precision = "fp32"
        self.model_.eval()
        # The whole network as the engine's "extractor": its outputs are the logits.
        net = Backbone(spec=self.backbone_spec_, model=self.model_, extractor=self.model_,
                       preprocess=self.preprocess_, feature_dim=self.n_classes_,
                       weights_sha256="fine-tuned", family="fine-tuned")
        options = EmbedOptions(batch_size=self.batch_size, workers=self.num_workers,
                               compile="off", progress=False)
        rows = embed_in_memory(source, net, options, device=device, precision=precision)
        for i, row in enumerate(rows):
            if isinstance(row, str):
                raise DecodeError(source.samples[i].path or source.samples[i].id, row)
        return (np.stack(rows).astype(np.float32) if rows
                else np.zeros((0, self.n_classes_), np.float32))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)``, columns in ``classes_`` order."""
        logits = torch.from_numpy(self.decision_function(X))
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels (values of ``classes_``)."""
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def score(self, X: Any, y: Any | None = None, sample_weight: Any | None = None) -> float:
        """Accuracy; without ``y`` the labels come from the source (e.g. class subfolders)."""
        if y is None:
            from featurepipe.sources import open_source

            source = open_source(X)
            names, codes = classifier_targets(source, None)
            y, X = names[codes], source
        return super().score(X, y, sample_weight=sample_weight)

    # ------------------------------------------------------------------ export / pickling

    def export(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write the fine-tuned network as a backbone directory usable by ``load_backbone``.

        ``featurepipe embed SOURCE --backbone OUT_DIR`` then embeds with the fine-tuned weights,
        so classical heads can be trained on fine-tuned features.
        """
        from featurepipe.backbones import export_finetuned

        check_is_fitted(self, "model_")
        out = export_finetuned(self.model_, self.backbone_spec_, [str(c) for c in self.classes_],
                               self.preprocess_, out_dir)
        return Path(out) if out is not None else Path(out_dir)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            state["_model_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        model_state = state.pop("_model_state", None)
        self.__dict__.update(state)
        if model_state is not None:
            self.model_ = self._rebuild(model_state)

    def _rebuild(self, model_state: dict[str, torch.Tensor]) -> nn.Module:
        """The architecture from ``backbone_spec_`` (random init is enough) + the saved weights."""
        from dataclasses import replace

        from featurepipe.backbones import load_backbone, reset_classifier

        with _quiet_rng():
            try:
                bb = load_backbone(replace(self.backbone_spec_, weights="random"))
            except BackboneError:
                bb = load_backbone(self.backbone_spec_)
            model = bb.model
            out = reset_classifier(model, self.n_classes_, bb.family)
        model = out if isinstance(out, nn.Module) else model
        model.load_state_dict(model_state)
        return model.eval()

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # images: paths, folders, (N, H, W[, C]) arrays
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False  # folder sources carry their own labels
        tags.non_deterministic = self.precision not in ("fp32",)
        return tags


@contextlib.contextmanager
def _quiet_rng() -> Iterator[None]:
    """Run without disturbing the caller's torch RNG (random init draws from it)."""
    with torch.random.fork_rng(devices=[]):
        yield

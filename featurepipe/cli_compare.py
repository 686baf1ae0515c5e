"""``featurepipe compare`` and ``featurepipe finetune``: thin wrappers over the library.

Registered into the main parser by :func:`register` (see ``featurepipe.cli.build_parser``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from featurepipe.cli_common import add_output_args, check_output
from featurepipe.exceptions import ConfigError

# Library defaults mirrored here so that building the parser (``featurepipe --help``) does not
# import torch; tests/test_compare.py checks they match featurepipe.compare / featurepipe.finetune.
DEFAULT_HEADS = ("logreg", "linear-svm", "svm-rbf", "knn")
DEFAULT_CLASSICAL = ("pixels+logreg", "pixels+svm-rbf", "hog+logreg", "hog+svm-rbf")
FINETUNE_STRATEGIES = ("head", "full")
STRATEGIES = ("head", "partial", "full", "gradual")
AUGMENTS = ("basic", "trivial", "randaugment", "erasing")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def _size(text: str) -> float | int:
    """``0.2`` -> fraction, ``100`` -> count."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.2) or a count (100), got "
                                         f"{text!r}") from None


def _caps(items: list[str] | None) -> dict[str, int]:
    caps: dict[str, int] = {}
    for item in items or []:
        pattern, sep, n = item.rpartition("=")
        if not sep or not pattern or not n.isdigit() or int(n) < 1:
            raise ConfigError(
                f"--max-train expects PATTERN=N (e.g. '*svm-rbf=10000'); got {item!r}")
        caps[pattern] = int(n)
    return caps


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 where the hardware has it; fp32 = exact mode")


# --------------------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace) -> int:
    from featurepipe.compare import compare, learning_curve

    check_output(args.out, folder=True)
    finetune = None if args.no_finetune else args.finetune_strategies
    ft_params: dict[str, Any] = {}
    if args.finetune_image_size is not None:
        ft_params["image_size"] = args.finetune_image_size
    if args.finetune_minutes is not None:
        ft_params["max_minutes"] = args.finetune_minutes
    common = dict(
        test_source=args.test_source, test_size=args.test_size, seed=args.seed,
        backbones=args.backbones, weights=args.weights, image_size=args.image_size,
        layer=args.layer, heads=args.heads,
        classical=[] if args.classical in ("", "none") else args.classical,
        finetune_epochs=args.finetune_epochs, finetune_params=ft_params,
        max_train=_caps(args.max_train), pixel_size=args.pixel_size, hog_size=args.hog_size,
        hog_cell=args.hog_cell, cv=args.cv, n_jobs=args.n_jobs, batch_size=args.batch_size,
        workers=args.workers, device=args.device, precision=args.precision, progress=not args.quiet,
        log=None if args.quiet else _say,
    )
    if args.samples_per_class and args.layers:
        raise ConfigError("--layers is for the comparison; learning curves take one --layer")
    if args.samples_per_class:
        curve = learning_curve(args.source, args.out, args.samples_per_class, seeds=args.seeds,
                               finetune=finetune if args.curve_finetune else None,
                               **common)
        if args.json:
            _print_json(curve.to_dict())
        else:
            print(curve.table)
            print(f"\nwrote {curve.paths['markdown']}, {curve.paths['json']}, "
                  f"{curve.paths['png']}")
        return 0
    res = compare(args.source, args.out, finetune=finetune, val_size=args.val_size,
                  layers=args.layers, **common)
    if args.json:
        _print_json(res.to_dict())
    else:
        print(res.table)
        print(f"wrote {res.paths['markdown']}, {res.paths['json']}, {res.paths['png']}")
    return 0


def _add_compare(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="classical ML vs frozen features + heads vs fine-tuning, one protocol",
        description="Train every arm on the same stratified split (hyperparameters chosen on "
                    "training data only) and report test accuracy, macro-F1, training time, "
                    "prediction time per image and peak memory as Markdown, JSON and a PNG. "
                    "Features are cached in OUT/features.h5; a rerun embeds nothing.")
    p.add_argument("source", help="labelled images: class-per-subfolder folder, CSV manifest, "
                                  "IDX file")
    p.add_argument("--out", required=True, help="report folder (also holds the feature cache)")
    p.add_argument("--test-source", default=None,
                   help="a fixed labelled test set; then SOURCE is all training data")
    p.add_argument("--test-size", type=_size, default=0.2,
                   help="held-out fraction (0.2) or count (500) when no --test-source")
    p.add_argument("--val-size", type=_size, default=0.1,
                   help="validation rows held out of the training split (fraction or count); "
                        "their accuracy, not the test accuracy, picks the headline arms")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the searches")
    p.add_argument("--backbones", "--backbone", type=_csv, default=["efficientnet_lite0"],
                   help="comma-separated backbones for the frozen arms (the first one is "
                        "fine-tuned)")
    p.add_argument("--weights", default=None, help="weights for every backbone ('random': tests)")
    p.add_argument("--image-size", type=int, default=None, help="backbone input size")
    p.add_argument("--layer", default=None,
                   help="frozen arms use this named layer, globally average-pooled (e.g. "
                        "blocks.5); default: the penultimate layer")
    p.add_argument("--layers", default=None,
                   help="several layers, e.g. blocks.4,blocks.5,penultimate: frozen arms per "
                        "layer (backbone@layer+head) and on all of them side by side, each "
                        "layer standardised to the same total variance")
    p.add_argument("--heads", type=_csv, default=list(DEFAULT_HEADS),
                   help=f"head presets on frozen features (default {','.join(DEFAULT_HEADS)})")
    p.add_argument("--classical", default=",".join(DEFAULT_CLASSICAL),
                   type=lambda s: s if s in ("", "none") else _csv(s),
                   help="from-scratch arms, or 'none' (default: all of them)")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning arms")
    p.add_argument("--finetune-strategies", type=_csv, default=list(FINETUNE_STRATEGIES),
                   help="fine-tuning strategies (default head,full)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="epochs per fine-tuning arm")
    p.add_argument("--finetune-image-size", type=int, default=None,
                   help="input size for fine-tuning (default: --image-size)")
    p.add_argument("--finetune-minutes", type=float, default=None,
                   help="stop fine-tuning after the epoch in which this many minutes passed")
    p.add_argument("--max-train", action="append", metavar="PATTERN=N",
                   help="train every arm on one stratified subsample of N images: '*=10000' "
                        "(caps that differ between arms are refused)")
    p.add_argument("--samples-per-class", type=_ints, default=None,
                   help="learning curve: comma-separated labelled images per class")
    p.add_argument("--seeds", type=int, default=3, help="learning curve: seeds per size")
    p.add_argument("--curve-finetune", action="store_true",
                   help="learning curve: include fine-tuning arms (off by default: slow)")
    p.add_argument("--pixel-size", type=int, default=32, help="raw-pixel arms: image side")
    p.add_argument("--hog-size", type=int, default=64, help="HOG arm: image side")
    p.add_argument("--hog-cell", type=int, default=8, help="HOG arm: cell side in pixels")
    p.add_argument("--cv", type=int, default=5, help="folds of the hyperparameter searches")
    p.add_argument("--n-jobs", type=int, default=None,
                   help="parallel jobs of the searches (default: scikit-learn's, one)")
    _add_device_args(p)
    add_output_args(p, "the full result")
    p.set_defaults(func=cmd_compare)


# --------------------------------------------------------------------------- finetune


def cmd_finetune(args: argparse.Namespace) -> int:
    from featurepipe.finetune import finetune

    check_output(args.out, folder=True)
    result = finetune(
        args.source, args.out, backbone=args.backbone, weights=args.weights,
        image_size=args.image_size, strategy=args.strategy, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, val_size=args.val_size, resume=args.resume,
        overwrite=args.overwrite,
        device=args.device, precision=args.precision, num_workers=args.workers,
        augment=None if args.augment == "none" else args.augment,
        random_state=args.seed, verbose=0 if args.quiet else 1,
    )
    summary = result.to_dict()
    if args.json:
        _print_json(summary)
        return 0
    acc = summary.get("best_val_acc")
    print(f"{summary['out_dir']}: {summary['strategy']} fine-tuning, "
          f"{summary['epochs_run']} epoch(s), best epoch {summary['best_epoch']}"
          + (f", val accuracy {acc:.4f}" if acc is not None else "")
          + f"; {summary['n_train']} train / {summary['n_val']} val images, "
          f"{summary['n_skipped']} skipped; {summary['seconds']:.1f}s on {summary['device']} "
          f"({summary['precision']})")
    for item in summary.get("skipped", [])[:50]:
        print(f"  skipped {item['path']}: {item['reason']}")
    print(f"model: {summary['paths']['model']} "
          f"(featurepipe embed SOURCE --backbone {summary['paths']['model']})")
    return 0


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune a backbone end to end (resumable)",
                       description="Fine-tune on labelled images; writes OUT/checkpoint.pt "
                                   "(every epoch), history.json/.png, metrics.json and model/.")
    p.add_argument("source", help="labelled images: class-per-subfolder folder, CSV manifest, "
                                  "IDX file")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="backbone to fine-tune (see `featurepipe models`)")
    p.add_argument("--weights", default=None,
                   help="weights: a local file, an enum name or 'random' (default: the "
                        "backbone's pretrained weights)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the weights' own)")
    p.add_argument("--strategy", default="head", choices=list(STRATEGIES),
                   help="head: backbone frozen; partial: last stages; full; gradual: stages "
                        "unfrozen one by one")
    p.add_argument("--epochs", type=int, default=10,
                   help="total epochs; with --resume, more than the run has extends it")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the head")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step")
    p.add_argument("--augment", default="basic", choices=[*AUGMENTS, "none"],
                   help="training augmentation: basic = random resized crop + flip; trivial / "
                        "randaugment / erasing add TrivialAugmentWide / RandAugment / "
                        "RandomErasing (default: basic)")
    p.add_argument("--val-size", type=_size, default=0.1,
                   help="validation fraction (0.1) or count (200); 0 = none")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.pt (a finished run too, with more "
                            "--epochs)")
    group.add_argument("--overwrite", action="store_true",
                       help="start over in an OUT that holds a finished or interrupted run")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast where the hardware has it; fp32 = exact mode")
    add_output_args(p, "the summary")
    p.set_defaults(func=cmd_finetune)


def register(sub: Any) -> None:
    """Add the ``compare`` and ``finetune`` subcommands to the main parser's subparsers."""
    _add_compare(sub)
    _add_finetune(sub)

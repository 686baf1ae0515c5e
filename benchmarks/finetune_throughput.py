"""Fine-tuning throughput (training images/s) for each strategy and precision, from JPEG files.

Runs ``FineTuneClassifier`` for a fixed number of epochs on a photo-like folder and reports training
images per second from the per-epoch history (train pass only: ``train_seconds`` when recorded,
else the epoch's seconds minus nothing -- see the JSON for which). CPU by default; on a CUDA machine
the same script measures AMP + channels_last.

    python -m benchmarks.finetune_throughput --n-images 256 --strategies head,full
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, make_photo_folder, write_results
from featurepipe import FineTuneClassifier
from featurepipe.report import markdown_table


def run(root: Path, strategy: str, precision: str, args: argparse.Namespace) -> dict:
    est = FineTuneClassifier(
        backbone=args.backbone, strategy=strategy, epochs=args.epochs, batch_size=args.batch_size,
        val_size=0.1, early_stopping=None, precision=precision, num_workers=args.workers,
        image_size=args.image_size, verbose=0, random_state=0)
    t0 = time.perf_counter()
    est.fit(str(root))
    wall = time.perf_counter() - t0
    last = est.history_[-1]
    seconds = last.get("train_seconds", last["seconds"])
    return {
        "strategy": strategy, "precision": est.precision_, "device": str(est.device_),
        "n_train": est.n_train_, "epochs": args.epochs, "batch_size": args.batch_size,
        "image_size": args.image_size or 224,
        "train_img_s": est.n_train_ / seconds, "epoch_seconds": last["seconds"],
        "timed": "train_seconds" if "train_seconds" in last else "epoch seconds (incl. validation)",
        "trainable_params": last.get("n_trainable"), "wall_seconds": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--strategies", default="head,full")
    ap.add_argument("--precisions", default="fp32,auto")
    ap.add_argument("--epochs", type=int, default=2,
                    help="the last epoch is timed (earlier ones warm up)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--name", default="finetune-throughput-cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photo_folder(Path(tmp) / "images", args.n_images)
        rows = []
        for strategy in args.strategies.split(","):
            for precision in args.precisions.split(","):
                rows.append(run(root, strategy, precision, args))
                print(rows[-1], flush=True)
    md = (f"# Fine-tuning throughput ({args.backbone}, {args.n_images} JPEG files, "
          f"batch {args.batch_size})\n\n"
          + markdown_table(rows, ["strategy", "precision", "device", "image_size", "n_train",
                                  "train_img_s", "epoch_seconds", "timed"])
          + f"\n\nTimed: epoch {args.epochs} of {args.epochs} (earlier epochs warm up).")
    write_results(args.name, {"machine": machine(), "args": vars(args), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()

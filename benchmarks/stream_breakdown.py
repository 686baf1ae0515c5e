"""Where a compiled CPU embedding run spends each image's time, stream by stream.

``benchmarks/throughput.py`` compares whole runs with the forward-only ceiling; this script says
why they differ. It runs ``featurepipe.embed(compile="on")`` on CPU, where each core runs one
stream (:mod:`featurepipe.cpu_streams`) that decodes a batch and then embeds it, and times
both stages inside every stream: CPU time (user + system, per thread), wall time (the
difference is time spent waiting: the GIL, the scheduler) and minor page faults. It then
times the forward pass alone in the same streams (the ceiling of ``throughput.py``).

A stream's CPU time per image is at least ``forward + decode``, so a run can reach at most
``forward_ceiling / (forward_ceiling + decode_cpu)`` of the ceiling however little else it
does: ``cap_fraction`` below.

    python -m benchmarks.stream_breakdown --images /tmp/photos --n-images 8192 \
        --backbones efficientnet_lite0,torchvision:resnet50
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, make_photo_folder, write_results
from benchmarks.throughput import ceiling
from featurepipe.backbones import load_backbone, resolve_spec
from featurepipe.embedding import EmbedOptions, EmbedReport, resolve_backbone, run_embed
from featurepipe.embedding.runners.cpu_streams import CpuStreamsRunner
from featurepipe.report import markdown_table

STAGES = ("decode", "forward")


def _thread_usage() -> tuple[float, float, int]:
    """This thread's CPU seconds, wall clock and minor page faults so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime, time.perf_counter(), usage.ru_minflt


class StageClock:
    """Sums, over every stream thread, what each stage cost: CPU and wall seconds, faults."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.images = 0
        self._lock = threading.Lock()

    def timed(self, stage: str, call: Any, *args: Any) -> Any:
        cpu0, wall0, faults0 = _thread_usage()
        result = call(*args)
        cpu1, wall1, faults1 = _thread_usage()
        with self._lock:
            self.totals[f"{stage}_cpu"] += cpu1 - cpu0
            self.totals[f"{stage}_wall"] += wall1 - wall0
            self.totals[f"{stage}_faults"] += faults1 - faults0
            if stage == "decode":
                self.images += 1
        return result


class _TimedDataset:
    """The engine's dataset, with each ``decode_into`` timed (every call of the CPU streams)."""

    def __init__(self, dataset: Any, clock: StageClock) -> None:
        self.dataset, self.clock = dataset, clock
        self.input_size, self.fill_dtype = dataset.input_size, dataset.fill_dtype

    def decode_into(self, k: int, out: torch.Tensor) -> tuple[int, str]:
        return self.clock.timed("decode", self.dataset.decode_into, k, out)


def timed_run(root: Path, name: str, weights: str | None, batch_size: int
              ) -> tuple[EmbedReport, float, StageClock]:
    """One ``embed(compile="on")`` run with its streams' stages timed: report, seconds, clock."""
    clock = StageClock()

    class TimedStreams(CpuStreamsRunner):
        def streams(self, pixels: Any, batches: Any, embed: Any, n: int) -> Any:
            return super().streams(_TimedDataset(pixels, clock), batches,
                                   lambda x, reasons: clock.timed("forward", embed, x, reasons),
                                   n)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = run_embed(root, Path(tmp) / "f.h5", resolve_backbone(name, weights),
                           EmbedOptions(batch_size=batch_size, compile="on", progress=False),
                           runner=TimedStreams())
        seconds = time.perf_counter() - t0
    if not clock.images:
        raise SystemExit("the run did not go through the CPU streams (a GPU, or no compile?)")
    return report, seconds, clock


def breakdown(root: Path, name: str, weights: str | None, n: int, batch_size: int) -> dict:
    # Load once first, as throughput.py's naive loop does: the timed run then starts with the
    # imports done and the weights file read, and its steady rate compares with that script's.
    load_backbone(resolve_spec(name, weights=weights))
    report, seconds, clock = timed_run(root, name, weights, batch_size)
    streams = torch.get_num_threads()
    ceil = ceiling(name, weights, batch_size, min(n, 1024), report.precision, True,
                   streams=streams)
    per_image = {k: v / clock.images for k, v in clock.totals.items()}
    steady = clock.images / (seconds - report.compile_seconds)
    forward_ceiling_ms = 1000 * streams / ceil
    decode_ms = 1000 * per_image["decode_cpu"]
    row: dict[str, Any] = {
        "backbone": name, "weights": weights or "pretrained", "n_images": clock.images,
        "streams": streams, "precision": report.precision, "steady_img_s": steady,
        "ceiling_streams_img_s": ceil, "fraction_of_ceiling": steady / ceil,
        "forward_ceiling_ms": forward_ceiling_ms,
    }
    for stage in STAGES:
        row[f"{stage}_cpu_ms"] = 1000 * per_image[f"{stage}_cpu"]
        row[f"{stage}_wait_ms"] = 1000 * (per_image[f"{stage}_wall"] - per_image[f"{stage}_cpu"])
        row[f"{stage}_faults"] = per_image[f"{stage}_faults"]
    row["stream_ms"] = 1000 * sum(per_image[f"{s}_wall"] for s in STAGES)
    row["cap_fraction"] = forward_ceiling_ms / (forward_ceiling_ms + decode_ms)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backbones", default="efficientnet_lite0,torchvision:resnet50")
    ap.add_argument("--random-weights-for", default="torchvision:resnet50",
                    help="backbones timed with random weights (no download; speed is the same)")
    ap.add_argument("--images", default=None, help="image folder to use/keep (default: temp)")
    ap.add_argument("--name", default="stream-breakdown-cpu")
    args = ap.parse_args()
    if torch.cuda.is_available():
        raise SystemExit("the per-core streams run on CPU only; hide the GPU "
                         "(CUDA_VISIBLE_DEVICES=) to measure them")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.images) if args.images else Path(tmp) / "images"
        make_photo_folder(root, args.n_images)
        random_for = set(filter(None, args.random_weights_for.split(",")))
        rows = []
        for name in args.backbones.split(","):
            rows.append(breakdown(root, name, "random" if name in random_for else None,
                                  args.n_images, args.batch_size))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})
    cols = ["backbone", "streams", "steady_img_s", "ceiling_streams_img_s",
            "fraction_of_ceiling", "cap_fraction", "forward_ceiling_ms", "forward_cpu_ms",
            "forward_wait_ms", "decode_cpu_ms", "decode_wait_ms", "stream_ms",
            "forward_faults", "decode_faults"]
    md = (f"# Where a compiled CPU run's time goes ({rows[0]['n_images']} JPEG files, 500x375, "
          f"batch {args.batch_size})\n\n"
          + markdown_table(rows, cols)
          + "\n\nPer image, in one stream (one thread per core, `featurepipe.cpu_streams`), "
            "during `featurepipe.embed(compile=\"on\")`: `*_cpu_ms` = the thread's CPU time "
            "(user + system) in the stage; `*_wait_ms` = its wall time less that (waiting for "
            "the GIL or a core); `*_faults` = minor page faults; `stream_ms` = both stages' "
            "wall time. steady = the run's images/s less the compile; ceiling_streams = the "
            "forward pass alone in the same streams on uint8 batches in memory; "
            "`forward_ceiling_ms` = streams / ceiling. cap_fraction = forward_ceiling_ms / "
            "(forward_ceiling_ms + decode_cpu_ms): the most of the ceiling a run can reach "
            "while each core also decodes its images, even with no other cost.")
    write_results(args.name, {"machine": machine(), "args": vars(args), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()

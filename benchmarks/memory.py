"""Peak memory of `featurepipe embed` does not grow with the dataset: 2,000 vs 20,000 images.

Each size runs in a fresh process (the CLI, as a user would run it); peak RSS is that process's
``ru_maxrss`` plus the largest of its DataLoader workers' (``RUSAGE_CHILDREN``).

    python -m benchmarks.memory --sizes 2000,20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, make_photo_folder, write_results
from featurepipe.report import markdown_table

CHILD = """
import json, resource, sys, time
from featurepipe.cli import main
t = time.perf_counter()
code = main(sys.argv[1:])
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("RESULT " + json.dumps({"code": code, "self_mb": self_kb / 1024,
                             "workers_max_mb": kids_kb / 1024,
                             "seconds": time.perf_counter() - t}))
"""


def run_one(images: Path, n: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", CHILD, "embed", str(images), "--out", f"{tmp}/s.h5", "--quiet",
               "--batch-size", str(args.batch_size)]
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        cmd += ["--compile", args.compile]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    result.update(n_images=n, peak_mb=result["self_mb"] + result["workers_max_mb"],
                  img_s=n / result["seconds"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=None,
                    help="crop size (default: the backbone's own, 224)")
    ap.add_argument("--images", default=None, help="folder to create/reuse (default: temp)")
    ap.add_argument("--compile", default="on", choices=["auto", "on", "off"],
                    help="the same for every size (default on): with auto only runs of 6,000+ "
                         "images compile, and inductor's compile worker processes would then "
                         "count against the larger size alone")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(args.images or tempfile.mkdtemp())
    rows = []
    for n in sizes:
        folder = base / f"n{n}"
        t = time.perf_counter()
        make_photo_folder(folder, n, size=(160, 120))
        print(f"{n} images ready in {time.perf_counter() - t:.0f}s", flush=True)
        rows.append(run_one(folder, n, args))
        print(rows[-1], flush=True)
    growth = rows[-1]["peak_mb"] - rows[0]["peak_mb"]
    md = (f"# Peak memory of `featurepipe embed` ({' vs '.join(map(str, sizes))} JPEG files)\n\n"
          + markdown_table(rows, ["n_images", "peak_mb", "self_mb", "workers_max_mb", "seconds",
                                  "img_s"])
          + f"\n\nGrowth from {sizes[0]} to {sizes[-1]} images: {growth:.0f} MB "
          "(target: within 300 MB). Default backbone efficientnet_lite0, "
          f"crop {args.image_size or 224}, batch {args.batch_size}, 160x120 JPEG files, "
          f"--compile {args.compile}. peak = the main process's peak RSS + the largest child's "
          "(inductor's compile workers; the decoding runs in threads).")
    write_results("memory", {"machine": machine(), "args": vars(args), "rows": rows,
                             "growth_mb": growth}, md)
    print(md)


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: a photo-like image folder, machine facts, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def make_photo_folder(root: str | os.PathLike, n: int, *, size: tuple[int, int] = (500, 375),
                      classes: int = 2, seed: int = 0, quality: int = 90) -> Path:
    """Write n JPEG files cut from scikit-image's bundled photos (realistic decode cost).

    ImageNet's average image is about 400x350; 500x375 keeps decoding honest. Files already
    present are kept, so the folder can be reused between runs.
    """
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(),
              data.immunohistochemistry()]
    photos = [Image.fromarray(p).convert("RGB") for p in photos]
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)

    def write(i: int, scale: float, fx: float, fy: float, flip: bool) -> None:
        path = root / f"class_{i % classes}" / f"img_{i:06d}.jpg"
        if path.exists():
            return
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(fx * (w - cw + 1)), int(fy * (h - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch)).resize(size)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(path, quality=quality)

    # The random draws happen here, in order, so the files do not depend on thread timing.
    draws = [(i, rng.uniform(0.5, 1.0), rng.random(), rng.random(), rng.random() < 0.5)
             for i in range(n)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL resizes and encodes GIL-free
        list(pool.map(lambda d: write(*d), draws))
    return root


def machine() -> dict[str, Any]:
    """Hardware and library versions, recorded beside every result."""
    import torch

    from featurepipe.embed import cpu_has_native_bf16, library_versions

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "gpu": gpu,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write results/<name>.json and results/<name>.md (Markdown gets a machine footer)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    m = payload.get("machine", {})
    footer = (f"\n\nMeasured {m.get('date')} on {m.get('cpu')} ({m.get('cores')} cores, "
              f"{m.get('memory_gib')} GiB RAM, GPU: {m.get('gpu') or 'none'}); "
              f"torch {m.get('versions', {}).get('torch')}, "
              f"featurepipe {m.get('versions', {}).get('featurepipe')} "
              f"(commit {m.get('git_commit')}).\n")
    md.write_text(markdown.rstrip() + footer)
    return js, md

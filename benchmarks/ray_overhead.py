"""Ray engine vs local engine on one machine: what Ray costs where there is no cluster to win.

Same JPEG files, backbone, batch size, shard size and precision; a fresh store for each engine.

- local: ``featurepipe.embed.embed`` end to end (backbone load, decode workers, commit).
- ray: ``featurepipe.engines.ray.embed_ray`` end to end on an already running local Ray instance
  (actors start and load the backbone inside the call); ``ray_init_s`` is the instance start,
  paid once per driver. overhead = ray / local, with and without the instance start.
- result path: driver-writes (the engine's design: actors return feature rows, the driver writes
  the shards) vs worker-writes (actors write the shard files, return only their names), measured
  on a Ray Data pipeline that moves ``--result-rows`` random feature rows without a model, so the
  difference is only the cost of shipping features to the driver.

    python -m benchmarks.ray_overhead --n-images 512 --backbone efficientnet_lite0
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, make_photo_folder, write_results

SHARD = 1024  # rows per shard in the result-path measurement (the engine's default size)


# --------------------------------------------------------------------------- engines end to end


def bench_engines(root: Path, tmp: Path, args: argparse.Namespace, ray: Any) -> dict:
    """Local then Ray on the same files; returns seconds, throughput and the feature difference."""
    from featurepipe.embed import embed
    from featurepipe.engines.ray import embed_ray
    from featurepipe.store import FeatureStore

    common = dict(weights=args.weights, batch_size=args.batch_size, precision=args.precision,
                  dtype="float32", progress=False)
    t0 = time.perf_counter()
    local = embed(root, tmp / "local.h5", args.backbone, **common)
    local_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
             logging_level="warning")
    init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        remote = embed_ray(root, tmp / "ray.h5", args.backbone, concurrency=args.concurrency,
                           **common)
        ray_s = time.perf_counter() - t0
        result_path = bench_result_path(ray, tmp, args)
    finally:
        ray.shutdown()
    a, b = FeatureStore(tmp / "local.h5").load(), FeatureStore(tmp / "ray.h5").load()
    assert a.ids == b.ids and remote.key == local.key
    n = args.n_images
    return {
        "n_images": n, "backbone": args.backbone, "precision": local.precision,
        "batch_size": args.batch_size, "ray_workers": args.concurrency or args.ray_cpus,
        "local_s": local_s, "ray_init_s": init_s, "ray_s": ray_s,
        "local_img_s": n / local_s, "ray_img_s": n / ray_s,
        "overhead": ray_s / local_s, "overhead_with_init": (init_s + ray_s) / local_s,
        "max_abs_diff": float(np.abs(a.features - b.features).max()),
        "result_path": result_path,
    }


# --------------------------------------------------------------------------- result path


class _ShardRows:
    """Stands in for an embedding actor: one shard per row, random float16 feature rows."""

    def __init__(self, dim: int, out_dir: str | None) -> None:
        self.dim, self.out_dir = dim, out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name, n = str(batch["name"][0]), int(batch["n"][0])
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        feats = rng.standard_normal((n, self.dim)).astype(np.float16)
        ids = np.array([f"class_{i % 2}/img_{i:06d}.jpg" for i in range(n)])
        if self.out_dir is None:  # driver-writes: the rows travel to the driver
            return {"name": np.array([name] * n), "id": ids, "feature": feats}
        tmp = os.path.join(self.out_dir, f"{name}.npz.tmp")  # worker-writes: only the name does
        with open(tmp, "wb") as fh:
            np.savez(fh, features=feats, ids=ids, fingerprints=ids)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(self.out_dir, f"{name}.npz"))
        return {"name": np.array([name])}


def bench_result_path(ray: Any, tmp: Path, args: argparse.Namespace) -> dict:
    """Driver-writes vs worker-writes on the same rows: seconds and MB moved to the driver."""
    from featurepipe.store import FeatureStore

    n_shards = max(1, args.result_rows // SHARD)
    items = [{"name": f"{k:06d}", "n": SHARD} for k in range(n_shards)]
    out: dict[str, Any] = {"rows": n_shards * SHARD, "dim": args.dim, "shards": n_shards}

    def pipeline(out_dir: str | None) -> Any:
        ds = ray.data.from_items(items, override_num_blocks=n_shards)
        return ds.map_batches(_ShardRows, batch_size=1, fn_constructor_args=(args.dim, out_dir),
                              compute=ray.data.ActorPoolStrategy(size=args.ray_cpus))

    ray.data.DataContext.get_current().enable_progress_bars = False
    store = FeatureStore(tmp / "result-path.h5")
    t0 = time.perf_counter()
    moved = 0
    with store.writer("bench", {"dtype": "float16", "dim": args.dim}) as writer:
        rows: dict[str, list[dict]] = {}
        for b in pipeline(None).iter_batches(batch_size=None, batch_format="numpy"):
            moved += b["feature"].nbytes
            for name in np.unique(b["name"]):
                mask = b["name"] == name
                rows.setdefault(str(name), []).append(
                    {"id": b["id"][mask], "feature": b["feature"][mask]})
                if sum(len(r["id"]) for r in rows[str(name)]) == SHARD:
                    parts = rows.pop(str(name))
                    ids = np.concatenate([r["id"] for r in parts]).tolist()
                    writer.write_shard(name, ids, ids,
                                       np.concatenate([r["feature"] for r in parts]))
        writer.discard_parts()
    out["driver_writes_s"] = time.perf_counter() - t0
    out["mb_to_driver"] = moved / 2**20

    shard_dir = tmp / "worker-shards"
    shard_dir.mkdir()
    t0 = time.perf_counter()
    names = [str(n) for b in pipeline(str(shard_dir)).iter_batches(batch_size=None)
             for n in b["name"]]
    out["worker_writes_s"] = time.perf_counter() - t0
    assert len(names) == n_shards
    out["driver_minus_worker_us_per_row"] = (
        (out["driver_writes_s"] - out["worker_writes_s"]) / out["rows"] * 1e6)
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--concurrency", type=int, default=None,
                    help="Ray actors (default: one per Ray CPU)")
    ap.add_argument("--result-rows", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=1280, help="feature width (efficientnet_lite0)")
    ap.add_argument("--note", default="", help="free text recorded with the result")
    ap.add_argument("--name", default="ray_overhead")
    args = ap.parse_args()

    from featurepipe.engines.ray import import_ray
    from featurepipe.report import markdown_table

    ray = import_ray()
    tmp = Path(tempfile.mkdtemp())
    try:
        root = make_photo_folder(tmp / "images", args.n_images)
        row = bench_engines(root, tmp, args, ray)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rp = row.pop("result_path")
    print(row, rp)
    engines = markdown_table([row], ["n_images", "backbone", "precision", "ray_workers",
                                     "local_s", "ray_init_s", "ray_s", "local_img_s",
                                     "ray_img_s", "overhead", "overhead_with_init",
                                     "max_abs_diff"])
    path = markdown_table([rp], ["rows", "dim", "shards", "mb_to_driver", "driver_writes_s",
                                 "worker_writes_s", "driver_minus_worker_us_per_row"])
    md = (f"# Ray engine overhead on one machine ({args.n_images} JPEG files, 500x375, "
          f"batch {args.batch_size})\n\n{engines}\n\n"
          "overhead = ray_s / local_s (Ray instance already running; actor start and backbone "
          "load included); overhead_with_init adds starting the local Ray instance. "
          "max_abs_diff: local vs Ray features of the same files (the local engine's torch "
          "threads differ from the workers' one thread each, so fp32 need not be bit-equal here; "
          "tests/test_ray_engine.py checks bit equality at equal thread counts).\n\n"
          "## Result path: driver-writes vs worker-writes\n\n"
          f"{path}\n\nRandom float16 feature rows, no model: the same actors either return the "
          "rows to the driver, which writes the shards through the store writer (the engine's "
          "design), or write the shard files themselves and return only the names.\n"
          + (f"\nNote: {args.note}\n" if args.note else ""))
    write_results(args.name, {"machine": machine(), "args": vars(args), "engines": row,
                              "result_path": rp}, md)
    print(md)


if __name__ == "__main__":
    main()

"""Command-line interface: parse, call the library, print, exit.

Every handler is a thin wrapper over the public API. A :class:`FeaturePipeError` becomes one
clear line on stderr and exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from featurepipe.cli_common import DefaultsHelpFormatter, add_output_args, check_output
from featurepipe.display import escape
from featurepipe.exceptions import FeaturePipeError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

EXIT_ERROR = 1
#: 128 + SIGPIPE, what a shell reports for a writer whose reader went away.
EXIT_BROKEN_PIPE = 141


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------- embed / inspect / models


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="efficientnet_lite0 (offline default), torchvision:NAME, timm:NAME, "
                        "or a fine-tuned model folder (see `featurepipe models`)")
    p.add_argument("--weights", default=None,
                   help="weights: a torchvision enum name (e.g. IMAGENET1K_V2), a local file, "
                        "or 'random'; default: the backbone's pretrained weights")
    p.add_argument("--layer", default=None,
                   help="take features from this named layer (globally average-pooled)")
    p.add_argument("--image-size", type=int, default=None,
                   help="override the crop size (keeps the weights' mean/std and crop ratio)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 where the hardware has it; fp32 = exact mode")
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"],
                   help="skip bad images and report them (default), or stop at the first one")


def cmd_embed(args: argparse.Namespace) -> int:
    from featurepipe.exceptions import ConfigError

    check_output(args.out)
    if args.layers is not None and args.layer is not None:
        raise ConfigError("--layer and --layers exclude each other; give one layer with "
                          "--layer NAME or several with --layers A,B,penultimate")
    many: dict[str, Any] = {} if args.layers is None else {"layers": args.layers}

    common: dict[str, Any] = dict(
        weights=args.weights, layer=args.layer, image_size=args.image_size,
        batch_size=args.batch_size, device=args.device, precision=args.precision,
        dtype=args.dtype, on_error=args.on_error, content_hash=args.content_hash,
        progress=not args.quiet, shard_size=args.shard_size, lock_timeout=args.lock_timeout,
        log=_say,
        other_entries="replace" if args.replace else "keep" if args.add_entry else "error",
    )
    if args.engine == "ray":
        from featurepipe.engines.ray import embed_ray

        if args.workers is not None:
            raise ConfigError("--workers is for the local engine; with --engine ray each worker "
                              "decodes its own batches (size the pool with --concurrency)")
        if args.compile != "auto":
            raise ConfigError("--compile is for the local engine; Ray workers run eager")
        if args.decoder != "pil":
            raise ConfigError("--decoder nvjpeg is for the local engine; Ray workers decode "
                              "with Pillow")
        if many:
            raise ConfigError("--layers is for the local engine; with --engine ray embed one "
                              "--layer per run")
        report = embed_ray(args.source, args.out, args.backbone, address=args.address,
                           concurrency=args.concurrency,
                           gpus_per_worker=args.gpus_per_worker or 0.0, **common)
    else:
        from featurepipe.embed import embed

        ray_only = [flag for flag, value in (("--address", args.address),
                                             ("--concurrency", args.concurrency),
                                             ("--gpus-per-worker", args.gpus_per_worker))
                    if value is not None]
        if ray_only:
            raise ConfigError(f"{', '.join(ray_only)} need --engine ray")
        report = embed(args.source, args.out, args.backbone, workers=args.workers,
                       compile=args.compile, decoder=args.decoder, **common, **many)
    reports = report if isinstance(report, list) else [report]
    if args.json:
        _print_json([r.to_dict() for r in reports] if many else reports[0].to_dict())
        return 0
    for one in reports:
        _print_embed_line(one, args.quiet, layer=bool(many))
    for sid, reason in reports[0].skipped:
        print(f"  skipped {escape(sid)}: {escape(reason)}")
    return 0


def _print_embed_line(report: Any, quiet: bool, layer: bool) -> None:
    """One summary line of an embed report; ``layer`` names the entry's layer in it."""
    shown = f", layer {report.layer or 'penultimate'}" if layer else ""
    if not quiet or report.n_skipped:
        print(f"{report.store}: {report.n_rows} rows ({report.backbone}{shown}, "
              f"key {report.key}); "
              f"computed {report.n_computed}, reused {report.n_reused}, "
              + (f"resumed {report.n_resumed} (from an interrupted run), "
                 if report.n_resumed else "")
              + f"dropped {report.n_dropped}, skipped {report.n_skipped} "
              f"in {report.seconds:.1f}s"
              + (f" ({report.images_per_second:.1f} img/s on {report.device}, {report.precision}"
                 + (", compiled" if report.compiled else "") + ")"
                 if report.n_computed else ""))


_SHOWN = ("n_rows", "dim", "dtype", "backbone", "layer", "precision", "weights_sha256",
          "n_labelled", "created", "updated")


def _short(value: Any, width: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_inspect(args: argparse.Namespace) -> int:
    from featurepipe.store_tools import describe_store

    desc = describe_store(args.store, args.key)
    if args.json:
        _print_json(desc)
        return 0
    entries = desc["entries"]
    print(f"{desc['path']}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for info in entries:
        print(f"entry {info['key']}")
        for name in _SHOWN:
            if name in info:
                print(f"  {name:15s} {info[name]}")
        if info.get("preprocess"):
            print(f"  {'preprocess':15s} {_short(info['preprocess'])}")
        print(f"  {'classes':15s} {', '.join(map(escape, info.get('classes', []))) or '-'}")
        print(f"  {'n_skipped':15s} {info['n_skipped']}")
        for item in info["skipped"][:50]:
            print(f"    {escape(item['id'])}: {escape(item['reason'])}")
    if desc["differs"]:
        print("what differs between the entries:")
        for name, values in desc["differs"].items():
            print(f"  {name}:")
            for key, value in values.items():
                print(f"    {key}  {_short(value)}")
    if len(entries) > 1:
        print("pick one with --key KEY (a unique prefix will do) in fit, export and load()")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from featurepipe.store_tools import export_entry

    check_output(args.out)
    result = export_entry(args.store, args.out, args.format, args.key)
    if args.json:
        _print_json(result)
    else:
        print(f"{result['out']}: {result['n_rows']} rows x {result['dim']} features "
              f"(entry {result['key']}, {result['format']})")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from featurepipe.backbones import backbone_layers

    rows = backbone_layers(args.backbone, depth=args.depth)
    if args.json:
        _print_json(rows)
        return 0
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['type']}")
    if not args.quiet:
        _say(f"{len(rows)} layers of {args.backbone} (depth {args.depth}); pass one as --layer "
             "NAME (pooled over space), several as --layers A,B,penultimate; without --layer: "
             "the penultimate layer")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from featurepipe.backbones import list_backbones

    rows = list_backbones()
    if args.json:
        _print_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        status = "offline" if r["offline"] else "download"
        print(f"{r['name']:<{width}}  {status:8s}  {r.get('note', '')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from featurepipe.demo import run_demo

    check_output(args.out, folder=True)
    t = time.perf_counter()
    result = run_demo(out_dir=args.out, dataset=args.dataset, data_dir=args.data_dir,
                      progress=not args.quiet, log=None if args.quiet else _say)
    result["seconds"] = time.perf_counter() - t
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['dataset']}: accuracy on {result['n_test']} test images, "
          f"standardised ridge classifier, alpha chosen by leave-one-out CV on the training "
          f"images only")
    print(result["table"])
    print(result["summary"])
    if not args.quiet:
        _say(f"demo took {result['seconds']:.0f}s")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from featurepipe import __version__

    parser = argparse.ArgumentParser(
        prog="featurepipe",
        description="Transfer learning on images: embed once, cache in HDF5, train heads.")
    parser.add_argument("--version", action="version", version=f"featurepipe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("embed", help="embed images into an HDF5 feature store")
    p.add_argument("source", help="class-per-subfolder folder, CSV manifest, IDX file or folder")
    p.add_argument("--out", required=True, help="the feature store (.h5)")
    _add_backbone_args(p)
    _add_engine_args(p)
    p.add_argument("--layers", default=None,
                   help="several layers from one pass, comma-separated (e.g. "
                        "blocks.4,blocks.5,penultimate): one store entry per layer, each "
                        "keyed like a --layer run (not with --layer)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="how features are stored")
    p.add_argument("--content-hash", action="store_true",
                   help="fingerprint files by sha256 of their bytes instead of size+mtime")
    p.add_argument("--shard-size", type=int, default=None,
                   help="rows per resumable shard (default: about 1024)")
    p.add_argument("--lock-timeout", type=float, default=3600.0,
                   help="seconds to wait for another writer of the same store (0 = fail at once)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--replace", action="store_true",
                       help="drop features made with another spec or from another source "
                            "folder from the store; rebuild a damaged store")
    group.add_argument("--add-entry", action="store_true",
                       help="keep features made with another spec beside the new ones")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the backbone: auto = on CPU under bf16 for runs of "
                        "6,000+ images (about 1.6x faster after a 10-25 s compile); on = also "
                        "under fp32 (about 2x)")
    p.add_argument("--decoder", default="pil", choices=["pil", "nvjpeg"],
                   help="pil: decode on the CPU (default); nvjpeg: decode JPEGs on the CUDA GPU "
                        "in batches (other files still use Pillow; part of the store key)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this machine (default); ray: Ray Data actors on a Ray cluster "
                        '(needs pip install "featurepipe[ray]"; see docs/ray.md)')
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT "
                        "(default: start a local Ray instance for this run)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="Ray embedding workers (default: one per CPU, or per GPU share)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker, fractions share a GPU (default: 0, CPU workers)")
    add_output_args(p, "the report")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("inspect", help="describe a feature store")
    p.add_argument("store", help="the feature store (.h5)")
    p.add_argument("--key", default=None,
                   help="describe only this entry (default: every entry in the file)")
    add_output_args(p, "the description")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a store entry's features as npy (npz), parquet "
                                      "or csv")
    p.add_argument("store", help="the feature store (.h5)")
    p.add_argument("--format", default="npy", choices=["npy", "parquet", "csv"],
                   help="npy: a numpy .npz with features, labels, ids, class_names; parquet "
                        "(needs pyarrow) and csv: one row per image: id, label, f0..fD")
    p.add_argument("--key", default=None,
                   help="entry key or unique prefix (default: the only entry)")
    p.add_argument("--out", required=True, help="file to write")
    add_output_args(p, "a summary")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("layers", help="list the layer names --layer accepts for a backbone")
    p.add_argument("backbone", nargs="?", default="efficientnet_lite0",
                   help="efficientnet_lite0, torchvision:NAME, timm:NAME or a fine-tuned model "
                        "folder (built with random weights: nothing is downloaded)")
    p.add_argument("--depth", type=int, default=2,
                   help="1 = top-level modules, 2 adds their children (deeper names work too)")
    add_output_args(p, "the list")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("models", help="list backbones: what works offline, what needs a download")
    add_output_args(p, "the list")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="frozen features vs raw pixels with few labels "
                                    "(Fashion-MNIST if installed, else digits)")
    p.add_argument("--out", default="featurepipe-demo", help="folder for the demo's store")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "digits"],
                   help="auto: Fashion-MNIST when its IDX files are in --data-dir, else "
                        "scikit-learn's digits")
    p.add_argument("--data-dir", default=FASHION_MNIST_DIR,
                   help="folder holding Fashion-MNIST's IDX files (apt-get install "
                        "dataset-fashion-mnist puts them here)")
    add_output_args(p, "the result")
    p.set_defaults(func=cmd_demo)

    from featurepipe import cli_heads

    cli_heads.register(sub)
    from featurepipe import cli_compare

    cli_compare.register(sub)
    for sub_parser in sub.choices.values():
        sub_parser.formatter_class = DefaultsHelpFormatter
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """featurepipe's own warnings read as one line; others keep Python's format."""
    from featurepipe.exceptions import FeaturePipeWarning

    if issubclass(category, FeaturePipeWarning):
        return f"featurepipe: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at exit
        return code
    except BrokenPipeError:
        # `featurepipe ... --json | head`: the reader has gone; say nothing, like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except FeaturePipeError as exc:
        if args.debug:
            raise
        print(f"featurepipe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("featurepipe: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

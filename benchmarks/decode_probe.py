"""Where does GPU embedding time go? Read, CPU decode (processes), nvjpeg decode, GPU resize,
and the bf16 forward ceilings, each alone, on the throughput benchmark's JPEG files."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import ImageReadMode, decode_jpeg


def cpu_decode(path: str) -> int:
    from PIL import Image
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC),
                     v2.CenterCrop(224), v2.PILToTensor()])
    with Image.open(path) as im:
        return int(tf(im.convert("RGB")).shape[-1])


def rate(n: int, t0: float) -> float:
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    root = Path(sys.argv[1])
    paths = sorted(str(p) for p in root.rglob("*.jpg"))[:4096]
    n = len(paths)
    print("torch", torch.__version__, "torchvision", torchvision.__version__, "n", n)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        datas = list(pool.map(torchvision.io.read_file, paths))
    print(f"read_file (16 threads): {n / (time.perf_counter() - t0):.0f} img/s")
    for procs in (8, 15):
        t0 = time.perf_counter()
        with Pool(procs) as pool:
            pool.map(cpu_decode, paths, chunksize=16)
        ips = n / (time.perf_counter() - t0)
        print(f"PIL decode+resize+crop, {procs} processes: {ips:.0f} img/s")
    for bs in (64, 256):
        decode_jpeg(datas[:bs], device="cuda", mode=ImageReadMode.RGB)
        t0 = time.perf_counter()
        for s in range(0, n, bs):
            decode_jpeg(datas[s:s + bs], device="cuda", mode=ImageReadMode.RGB)
        print(f"nvjpeg batched decode bs={bs}: {rate(n, t0):.0f} img/s")
    imgs = decode_jpeg(datas[:256], device="cuda", mode=ImageReadMode.RGB)
    t0 = time.perf_counter()
    for _ in range(n // 256):
        out = []
        for im in imgs:
            x = F.interpolate(im[None].float(), size=(256, 341), mode="bicubic", antialias=True)
            out.append(x[..., 16:240, 58:282])
        torch.stack(out).clamp_(0, 255).round_().to(torch.uint8)
    print(f"GPU resize+crop per image: {rate(n, t0):.0f} img/s")
    from featurepipe.backbones import load_backbone, resolve_spec
    from featurepipe.embed import prepare_model

    for name, w in (("efficientnet_lite0", None), ("torchvision:resnet50", "random")):
        model = prepare_model(load_backbone(resolve_spec(name, weights=w)), torch.device("cuda"))
        for bs in (64, 256):
            x = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8, device="cuda")
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    model(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                reps = max(4, 4096 // bs)
                for _ in range(reps):
                    model(x)
                print(f"ceiling {name} bf16 bs={bs}: {rate(reps * bs, t0):.0f} img/s")


if __name__ == "__main__":
    main()

"""Cost of building the image bank (sec. 3.2): feature extraction (images/s) and spherical K-means (eq. 1) vs bank size.

    python benchmarks/bank.py [--json OUT] [--encoder imagenet-efficientnet-lite0] [--tiles 16] [--extract-n 0]
                              [--sizes 1000,5000,20000] [--k 3] [--iters 100] [--restarts 5] [--dim 0] [--device cpu]

Extraction runs ``pbip_core.engine.bank.encode_images`` (PNG read, white share, encoder forward without a graph) on
``--tiles`` synthetic 224 px H&E tiles written by ``pbip_core.data.synth``, repeated until ``--extract-n`` images
have been encoded (0 = 4 passes over the tiles). Its cost per image does not depend on the bank size (no image is
compared with another), so the seconds for 1k / 5k / 20k images are the measured rate extrapolated linearly, and the
output says so. The encoder is an offline one with its real weights when they are installed (else the same
architecture with random weights; the time is the same).

Spherical K-means (``pbip_core.method.bank.spherical_kmeans``, the bank's K, iterations and restarts) runs on synthetic
unit features for each size: ``--classes`` clusters of points around random directions on the sphere, K-means on
``n / classes`` points per class as the bank does (one K-means per class), timed for all classes together. With CUDA
the same function is timed on GPU tensors (it runs on the features' device); without, the output says "no GPU".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

from pbip_core.data.synth import render_tile, tile_rng  # noqa: E402
from pbip_core.engine.bank import encode_images  # noqa: E402
from pbip_core.errors import PBIPError  # noqa: E402
from pbip_core.method.bank import spherical_kmeans  # noqa: E402
from pbip_core.nets.encoders import get_encoder  # noqa: E402


def write_tiles(folder: Path, n: int, size: int = 224, seed: int = 0) -> list[Path]:
    """``n`` synthetic H&E tiles (pbip_core.data.synth) as PNG files in ``folder``."""
    from PIL import Image

    paths = []
    for i in range(n):
        rgb, _, _ = render_tile(tile_rng(seed, "train", i), size=size)
        p = folder / f"tile{i:04d}.png"
        Image.fromarray(rgb, mode="RGB").save(p, format="PNG", compress_level=1)
        paths.append(p)
    return paths


def load_encoder(name: str, device: str) -> tuple[Any, bool]:
    """The encoder with its real weights if installed, else random weights (same architecture). -> (encoder, real?)."""
    try:
        return get_encoder(name, device=device), True
    except PBIPError as e:
        print(f"{name}: no weights here ({str(e).splitlines()[0][:120]}); timing the random-init architecture")
        return get_encoder(name, device=device, random_init=True), False


def bench_extraction(encoder: Any, paths: list[Path], n_images: int, batch_size: int, device: str) -> dict[str, Any]:
    """Images/s of encode_images over ``n_images`` images (the tile list repeated), after one warm-up batch."""
    encode_images(paths[:batch_size], encoder, batch_size=batch_size, device=device, progress=False)
    reps = max(1, -(-n_images // len(paths)))
    todo = (paths * reps)[:n_images]
    C.sync(device)
    t0 = time.perf_counter()
    feats, _ = encode_images(todo, encoder, batch_size=batch_size, device=device, progress=False)
    C.sync(device)
    dt = time.perf_counter() - t0
    assert feats.shape[0] == n_images
    return {"images": n_images, "seconds": round(dt, 3), "images_per_s": round(n_images / dt, 2)}


def synthetic_features(n: int, dim: int, classes: int, kind: str = "clustered", seed: int = 0) -> list[torch.Tensor]:
    """Per class, n / classes unit vectors: ``clustered`` = around 3 random directions (noise of the same norm as the
    direction: K-means converges in a few iterations), ``uniform`` = uniform on the sphere (no structure: K-means
    runs many more iterations, the harder case)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    per = max(3, n // classes)
    for _ in range(classes):
        noise = torch.randn(per, dim, generator=gen) / dim ** 0.5
        if kind == "uniform":
            x = noise
        else:
            centres = F.normalize(torch.randn(3, dim, generator=gen), dim=-1)
            x = centres[torch.randint(0, 3, (per,), generator=gen)] + noise
        out.append(F.normalize(x, dim=-1))
    return out


def bench_kmeans(feats: list[torch.Tensor], k: int, iters: int, restarts: int, device: str) -> float:
    """Seconds for one spherical K-means per class (the bank's work for one bank), features on ``device``."""
    xs = [f.to(device) for f in feats]
    spherical_kmeans(xs[0][: max(k, 64)], k, iters=2, restarts=1)      # warm-up (kernels, threads)
    C.sync(device)
    t0 = time.perf_counter()
    for i, x in enumerate(xs):
        spherical_kmeans(x, k, iters=iters, restarts=restarts, seed=i)
    C.sync(device)
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--encoder", default="imagenet-efficientnet-lite0", help="an offline encoder (or any, random init)")
    p.add_argument("--tiles", type=int, default=16, help="synthetic tiles written to disk")
    p.add_argument("--extract-n", type=int, default=0, help="images to encode (0 = 4 passes over the tiles)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sizes", default="1000,5000,20000", help="bank sizes (images) for K-means and the extrapolation")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--dim", type=int, default=0, help="feature size for K-means (0 = the encoder's)")
    p.add_argument("--device", default="cpu", help="extraction device: cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--skip-extraction", action="store_true")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes must be a comma list of integers, got {args.sizes!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"load_average_before": C.load_average(), "machine": C.machine_info(args.device)}
    dim = args.dim
    if not args.skip_extraction:
        enc, real = load_encoder(args.encoder, args.device)
        dim = dim or enc.dim
        with tempfile.TemporaryDirectory(prefix="pbip-bank-bench-") as tmp:
            paths = write_tiles(Path(tmp), args.tiles)
            n = args.extract_n or 4 * args.tiles
            ex = bench_extraction(enc, paths, n, args.batch_size, args.device)
        ex.update({"encoder": args.encoder, "weights": "real" if real else "random (same architecture)",
                   "device": args.device, "tile_px": 224, "distinct_tiles": args.tiles,
                   "seconds_for": {str(s): round(s / ex["images_per_s"], 1) for s in args.sizes},
                   "seconds_for_is": "measured images/s x size (linear: the per-image cost does not depend on the "
                                     "bank size)"})
        out["extraction"] = ex
        print(f"extraction: {args.encoder} ({ex['weights']}) on {args.device}: {ex['images_per_s']:.1f} images/s "
              f"({n} images in {ex['seconds']:.1f} s)")
        for s in args.sizes:
            how = "measured rate x size" if s != n else "measured"
            print(f"  {s:>6} images: {ex['seconds_for'][str(s)]:>8.1f} s ({how})")
    dim = dim or 1280
    km: dict[str, Any] = {"k": args.k, "iters": args.iters, "restarts": args.restarts, "dim": dim,
                          "classes": args.classes, "cpu_s": {}, "gpu_s": "no GPU"}
    gpu = torch.cuda.is_available()
    if gpu:
        km["gpu_s"] = {}
    print(f"spherical K-means (k={args.k}, <= {args.iters} iterations, {args.restarts} restarts, d={dim}, "
          f"one per class over {args.classes} classes), seconds:")
    for kind in ("clustered", "uniform"):
        km["cpu_s"][kind] = {}
        if gpu:
            km["gpu_s"][kind] = {}
        for s in args.sizes:
            feats = synthetic_features(s, dim, args.classes, kind)
            km["cpu_s"][kind][str(s)] = round(bench_kmeans(feats, args.k, args.iters, args.restarts, "cpu"), 3)
            line = f"  {kind:>9} {s:>6} images: cpu {km['cpu_s'][kind][str(s)]:.2f}"
            if gpu:
                km["gpu_s"][kind][str(s)] = round(bench_kmeans(feats, args.k, args.iters, args.restarts, "cuda"), 3)
                line += f", gpu {km['gpu_s'][kind][str(s)]:.2f}"
            print(line)
    if not gpu:
        print("  no GPU: the CUDA path (the same function on GPU tensors) was not timed")
    out["kmeans"] = km
    out["load_average_after"] = C.load_average()
    print(f"load average before {out['load_average_before']}, after {out['load_average_after']}")
    if args.json:
        C.write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

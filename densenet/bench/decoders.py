"""The JPEG decoders the device-decode mode can use, side by side: torchcodec, torchvision, PIL.

    python -m densenet.bench decoders                  # the ImageNet sample, on the CPU (and CUDA if present)
    python -m densenet.bench decoders --samples DIR --repeats 5

Full-size decodes of the same files to RGB uint8, one intra-op thread on the CPU (as a decode thread
runs), best of --repeats passes: images/s, and how many files each decoder gives exactly PIL's
pixels (the CPU pipeline's decoder). On CUDA the batched call of each decoder, synchronised.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from . import jpeg_tree
from .common import print_table, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("decoders", help="torchcodec vs torchvision vs PIL JPEG decoding (CPU, and CUDA if present)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default=None, help="folder of JPEG files (default: 100 synthetic "
                   "JPEGs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.set_defaults(run=run)


def _decoders() -> Dict[str, Callable]:
    """The device-decode mode's own decoders (those that load here), and PIL, the CPU pipeline's."""
    import numpy as np
    import torch
    from PIL import Image

    from data.device_decode import jpeg_decoder

    found: Dict[str, Callable] = {}
    for backend in ("torchcodec", "torchvision"):
        try:
            found[backend] = jpeg_decoder(backend)[1]
        except RuntimeError:  # torchcodec not installed, or built for another torch
            pass

    def pil(files, device):
        return [torch.from_numpy(np.array(Image.open(io.BytesIO(f.numpy().tobytes())).convert("RGB")))
                .permute(2, 0, 1) for f in files]

    found["PIL"] = pil
    return found


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(args.samples) if args.samples else None
        if samples is None:
            samples = jpeg_tree.write_synthetic_samples(Path(tmp) / "samples", count=100)
        paths = jpeg_tree.sample_files(samples)
        files = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    decoders = _decoders()
    torch.set_num_threads(1)
    reference = decoders["PIL"](files, "cpu")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: List[Dict[str, Any]] = []
    for device in devices:
        for name, decode in decoders.items():
            if device == "cuda" and name == "PIL":
                continue
            per_file = device == "cpu"  # the decode thread's CPU path is per file; CUDA takes the batch

            def one_pass():
                out = [decode([f], device)[0] for f in files] if per_file else decode(files, device)
                if device == "cuda":
                    torch.cuda.synchronize()
                return out

            out = one_pass()  # warm-up (nvJPEG handles, first allocations)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                one_pass()
                best = min(best, time.perf_counter() - t0)
            same = sum(torch.equal(a.cpu(), b) for a, b in zip(out, reference))
            rows.append({"device": device, "decoder": name, "files": len(files), "images_per_s": len(files) / best,
                         "equal_to_pil": same})
    print(f"{len(files)} JPEGs from {samples}, full-size RGB decodes, one CPU thread, best of {args.repeats}")
    print_table(["device", "decoder", "img/s", "equal to PIL"],
                [[r["device"], r["decoder"], f"{r['images_per_s']:.0f}", f"{r['equal_to_pil']}/{r['files']}"]
                 for r in rows])
    write_json(args.json, rows)
    return rows

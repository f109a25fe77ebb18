"""python -m densenet.bench decoders on a few real JPEGs: a row per decoder, each giving PIL's pixels."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _data_util import sample_files, small_jpeg

REPO = Path(__file__).resolve().parents[1]


def test_decoders_benchmark_rows_and_pixel_agreement(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, src in enumerate(sample_files()[:4]):
        small_jpeg(src, samples / f"n0000000{i}_{i}.JPEG", short_side=64)
    out = tmp_path / "decoders.json"
    proc = subprocess.run([sys.executable, "-m", "densenet.bench", "decoders", "--samples", str(samples),
                           "--repeats", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["device"], r["decoder"]): r for r in json.loads(out.read_text())["rows"]}
    assert {d for dev, d in rows if dev == "cpu"} == {"torchcodec", "torchvision", "PIL"}
    for row in rows.values():
        assert row["files"] == 4 and row["images_per_s"] > 0 and row["equal_to_pil"] == 4, row

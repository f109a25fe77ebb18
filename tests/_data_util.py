"""Helpers for the data tests: small real image trees built from the shared ImageNet sample and
deliberately broken files written to disk."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "imagenet-sample"
if not SAMPLE_DIR.is_dir():
    SAMPLE_DIR = Path("/work/shared/imagenet-sample")


def sample_files() -> list[Path]:
    files = sorted(SAMPLE_DIR.glob("n*.JPEG"))
    assert len(files) == 100, f"expected the 100 ImageNet sample images in {SAMPLE_DIR}"
    return files


def sample_wnid(path: Path) -> str:
    return path.name.split("_", 1)[0]


def small_jpeg(src: Path, dst: Path, short_side: int = 48, quality: int = 90) -> Path:
    """A real ImageNet photo, shrunk so that tests decode it quickly."""
    with Image.open(src) as image:
        image = image.convert("RGB")
        w, h = image.size
        scale = short_side / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    dst.parent.mkdir(parents=True, exist_ok=True)
    image.save(dst, "JPEG", quality=quality)
    return dst


def build_imagefolder(root: Path, num_classes: int = 4, per_class: int = 6, val_per_class: int = 2,
                      short_side: int = 48) -> list[str]:
    """ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG from real sample photos (several
    different photos per class, reused round-robin). Returns the wnids."""
    files = sample_files()
    wnids = [sample_wnid(f) for f in files[:num_classes]]
    k = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for wnid in wnids:
            for i in range(count):
                small_jpeg(files[k % len(files)], root / split / wnid / f"{wnid}_{split}{i}.JPEG", short_side)
                k += 1
    return wnids


def copy_sample(dst: Path, index: int = 0) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample_files()[index], dst)
    return dst


def write_greyscale(dst: Path) -> Path:
    small_jpeg(sample_files()[1], dst)
    Image.open(dst).convert("L").save(dst, "JPEG")
    return dst


def write_cmyk(dst: Path) -> Path:
    small_jpeg(sample_files()[2], dst)
    Image.open(dst).convert("CMYK").save(dst, "JPEG")
    return dst


def write_png_named_jpeg(dst: Path) -> Path:
    small_jpeg(sample_files()[3], dst)
    Image.open(dst).save(dst, "PNG")  # the name still ends in .JPEG, as n02105855_2933 does
    return dst


def write_truncated(dst: Path, keep: float = 0.5) -> Path:
    data = (small_jpeg(sample_files()[4], dst)).read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def write_zero_byte(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"")
    return dst


def write_not_an_image(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("<html>404 Not Found</html>\n")
    return dst


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_undefined_huffman_table(dst: Path) -> Path:
    """A JPEG whose header and end-of-image marker are intact but whose scan uses a Huffman table the
    file never defines: every check short of decoding passes, and every decoder refuses it."""
    data = bytearray(small_jpeg(sample_files()[5], dst).read_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 6] = 0x33  # the first component's DC/AC table selectors
    dst.write_bytes(bytes(data))
    return dst


def folder_samples(split_dir: Path, label_of=None) -> list[dict]:
    """The images of an ImageFolder split as WebDataset samples (``__key__``, ``jpg`` with the
    file's bytes, ``cls``), in sorted order; ``label_of(wnid)`` is the label (default: the class's
    position among the split's sorted class folders)."""
    classes = sorted(p.name for p in split_dir.iterdir())
    label_of = label_of or classes.index
    return [{"__key__": f"{wnid}/{path.stem}", "jpg": path.read_bytes(), "cls": label_of(wnid)}
            for wnid in classes for path in sorted((split_dir / wnid).iterdir())]


def write_webdataset(samples: list[dict], pattern: str, maxcount: int) -> list[Path]:
    """Shards written by the ``webdataset`` library itself: ``pattern`` like DIR/train-%06d.tar."""
    import webdataset as wds

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    prefix = Path(pattern).name.split("%", 1)[0]
    return sorted(Path(pattern).parent.glob(f"{prefix}*.tar"))

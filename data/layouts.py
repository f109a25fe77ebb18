"""Where the images of a split are and which class each belongs to.

Recognised layouts of ``ROOT/<split>``:

* ``imagefolder``: ``ROOT/<split>/<wnid>/*.JPEG`` (torchvision's ImageFolder layout);
* ``ilsvrc-val``: the raw ILSVRC2012 validation folder, 50,000 flat ``ILSVRC2012_val_XXXXXXXX.JPEG``
  files, labelled by the Kaggle layout's ``LOC_val_solution.csv`` or by the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat`` (unpacked, or the devkit tarball).
  The label files are looked for in the split folder, ROOT, and up to three folders above ROOT, which
  covers the Kaggle tree (``.../ILSVRC/Data/CLS-LOC/val`` with the CSV at the top).

ROOT may also be the top of the Kaggle download; ``ILSVRC/Data/CLS-LOC`` is then used.

Class indices follow the sorted class folder names of the train split (ImageNet: sorted wnids, the
order published weights use). Without a train folder they come from the val folders; val folders that
are all ILSVRC2012 wnids, and a raw val folder alone, get the 1000 ILSVRC2012 classes. A class-defining
split that mixes wnid folders with other folders (a stray ``backup/``) is refused, as is a split that
still holds unextracted per-class ``<wnid>.tar`` archives.

The result is a ``SampleTable`` of numpy arrays, not a list of Python tuples: DataLoader workers
read it without touching reference counts, so their copy-on-write memory stays flat.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shlex
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classes import imagenet_wnids, is_wnid

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
RAW_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.(jpeg|jpg|png)$", re.IGNORECASE)
KAGGLE_SUBDIR = Path("ILSVRC", "Data", "CLS-LOC")
KAGGLE_LABELS = "LOC_val_solution.csv"
DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_TARBALL = "ILSVRC2012_devkit_t12.tar.gz"
CLASS_ARCHIVE = re.compile(r"^n\d{8}\.tar$")  # inside ILSVRC2012_img_train.tar: one archive per class

EXPECTED_LAYOUTS = (
    "expected one of: ROOT/<split>/<class>/*.JPEG (ImageFolder); ROOT/val/ILSVRC2012_val_*.JPEG "
    f"(raw ILSVRC2012 val, labelled by {KAGGLE_LABELS} or the devkit's {DEVKIT_LABELS} + "
    f"{DEVKIT_META}); a Kaggle download containing {KAGGLE_SUBDIR}; a folder of tar shards (written "
    "by `python -m data.shards`, or WebDataset's: ROOT/<split>-*.tar, ROOT/<split>/*.tar or timm's "
    "_info.json); or 'demo'"
)


class DataLayoutError(ValueError):
    """The data on disk is missing or not in a layout we can read; the message says what was found."""


@dataclass(frozen=True)
class SampleTable:
    """One split: ``paths[i]`` (bytes, relative to ``root``) has class ``targets[i]``."""

    root: str
    paths: np.ndarray
    targets: np.ndarray
    classes: tuple[str, ...]
    layout: str

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.paths[index].decode())


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def describe_dir(path: Path, limit: int = 5) -> str:
    """A short account of a folder's contents for error messages."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not entries:
        return "an empty folder"
    dirs = [e.name + "/" for e in entries if e.is_dir()]
    files = [e.name for e in entries if not e.is_dir()]
    shown = ", ".join((dirs + files)[:limit])
    more = len(entries) - min(len(entries), limit)
    return f"{len(dirs)} folders and {len(files)} files ({shown}{f', ... {more} more' if more else ''})"


def dataset_root(root: str | os.PathLike) -> Path:
    """Check that ROOT exists and holds splits; step into a Kaggle download's CLS-LOC folder."""
    path = Path(root).expanduser()
    _check_root_folder(path)
    if _is_kaggle_download(path):
        return path / KAGGLE_SUBDIR
    return path


def _check_root_folder(path: Path) -> None:
    if not path.exists():
        raise DataLayoutError(f"data root {path} does not exist; pass the folder that holds train/ "
                              f"and val/ ({EXPECTED_LAYOUTS})")
    if not path.is_dir():
        raise DataLayoutError(f"data root {path} is a file, not a folder; {EXPECTED_LAYOUTS}")


def _is_kaggle_download(path: Path) -> bool:
    return not (path / "train").is_dir() and not (path / "val").is_dir() and (path / KAGGLE_SUBDIR).is_dir()


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _image_names(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if is_image_file(e.name) and e.is_file())


def find_classes(root: Path) -> tuple[str, ...]:
    """Class names in index order for the whole dataset (shared by train and val): train's class
    folders; without them val's, or all 1000 ILSVRC2012 wnids when val's are ILSVRC2012 wnids (a
    subset evaluated with 1000-class weights); and those 1000 for a raw val folder alone."""
    for split in ("train", "val"):
        split_dir = root / split
        if split_dir.is_dir():
            names = _class_dirs(split_dir)
            if names:
                _refuse_stray_folders(split_dir, names)
                if split == "val" and set(names) <= set(imagenet_wnids()):
                    return imagenet_wnids()
                return tuple(names)
    return imagenet_wnids()


def _refuse_stray_folders(split_dir: Path, class_dirs: list[str]) -> None:
    """Among wnid class folders, any other folder would become a class and shift every index after it."""
    strays = [name for name in class_dirs if not is_wnid(name)]
    if strays and len(strays) < len(class_dirs):
        raise DataLayoutError(
            f"{split_dir} holds folders that are not ImageNet class folders ({', '.join(strays[:5])}"
            f"{', ...' if len(strays) > 5 else ''}) next to {len(class_dirs) - len(strays)} wnid class folders: each "
            f"would become a class and shift the indices of the others; move them out of {split_dir}")


def _refuse_class_archives(split_dir: Path, file_names: list[str]) -> None:
    archives = sorted(name for name in file_names if CLASS_ARCHIVE.match(name))
    if archives:
        raise DataLayoutError(
            f"{split_dir} holds {len(archives)} unextracted per-class archives ({', '.join(archives[:3])}"
            f"{', ...' if len(archives) > 3 else ''}); extract each into a folder of its name and remove it: "
            f"cd {shlex.quote(str(split_dir))} && for f in n*.tar; do mkdir -p \"${{f%.tar}}\" && tar -xf \"$f\" -C "
            f"\"${{f%.tar}}\" && rm \"$f\"; done")


def load_split(root: str | os.PathLike, split: str, classes: tuple[str, ...] | None = None) -> SampleTable:
    """Read the file list and labels of ``ROOT/<split>`` in whichever layout it is; ROOT as given
    (``dataset_root`` checks it, and steps into a Kaggle download)."""
    return read_split(dataset_root(root), split, classes)


def read_split(root: Path, split: str, classes: tuple[str, ...] | None = None) -> SampleTable:
    """``load_split`` of a root ``dataset_root`` (or ``resolve_data_root``) returned, taken as it is."""
    root = Path(root)
    _check_root_folder(root)
    split_dir = root / split
    if not split_dir.is_dir():
        if _is_kaggle_download(root):
            raise DataLayoutError(f"{root} is a Kaggle download with no {split}/ folder of its own: pass "
                                  f"{root / KAGGLE_SUBDIR}, which resolve_data_root({str(root)!r}) returns")
        raise DataLayoutError(f"{root} has no {split}/ folder; found {describe_dir(root)}; "
                              f"{EXPECTED_LAYOUTS}")
    _refuse_class_archives(split_dir, [e.name for e in os.scandir(split_dir) if not e.is_dir()])
    classes = find_classes(root) if classes is None else tuple(classes)
    class_dirs = _class_dirs(split_dir)
    flat_images = _image_names(split_dir)
    if class_dirs and flat_images:
        raise DataLayoutError(
            f"{split_dir} mixes class folders and loose images ({describe_dir(split_dir)}); "
            "keep either one folder per class or only the raw ILSVRC2012_val_*.JPEG files")
    if class_dirs:
        table = _load_imagefolder(split_dir, class_dirs, classes)
    elif flat_images:
        table = _load_raw_val(root, split_dir, flat_images, classes)
    else:
        raise DataLayoutError(f"no images in {split_dir}: found {describe_dir(split_dir)}; "
                              f"{EXPECTED_LAYOUTS}")
    if len(table) == 0:
        raise DataLayoutError(f"no images in {split_dir}: found {describe_dir(split_dir)} but no "
                              f"*.JPEG/*.jpg/*.png files of known classes; {EXPECTED_LAYOUTS}")
    log.info("%s: %d images in %d classes (%s layout)", split_dir, len(table), len(classes), table.layout)
    return table


def check_split(root: Path, split: str) -> str:
    """A quick look at ``ROOT/<split>`` that catches wrong paths and layouts without listing a
    million files: returns the layout name or raises ``DataLayoutError``."""
    split_dir = root / split
    with os.scandir(split_dir) as entries:
        sample = [e for _, e in zip(range(2000), entries)]
    _refuse_class_archives(split_dir, [e.name for e in sample if not e.is_dir()])
    class_dirs = sorted(e.name for e in sample if e.is_dir() and not e.name.startswith("."))
    images = [e.name for e in sample if is_image_file(e.name)]
    if class_dirs and not images:
        find_classes(root)  # refuses stray folders among the class folders, as read_split does
        if not _image_names(split_dir / class_dirs[0]):
            raise DataLayoutError(f"{split_dir / class_dirs[0]} holds no *.JPEG/*.jpg/*.png images: "
                                  f"found {describe_dir(split_dir / class_dirs[0])}; {EXPECTED_LAYOUTS}")
        return "imagefolder"
    if images and not class_dirs:
        strays = [n for n in images if not RAW_VAL_NAME.match(n)]
        if strays:
            raise DataLayoutError(f"{split_dir} holds loose images that are not ILSVRC2012_val_XXXXXXXX.JPEG "
                                  f"files ({', '.join(strays[:5])}); {EXPECTED_LAYOUTS}")
        _raw_val_labels(root, split_dir)
        return "ilsvrc-val"
    if class_dirs and images:
        raise DataLayoutError(
            f"{split_dir} mixes class folders and loose images ({describe_dir(split_dir)}); "
            "keep either one folder per class or only the raw ILSVRC2012_val_*.JPEG files")
    raise DataLayoutError(f"no images in {split_dir}: found {describe_dir(split_dir)}; {EXPECTED_LAYOUTS}")


def _load_imagefolder(split_dir: Path, class_dirs: list[str], classes: tuple[str, ...]) -> SampleTable:
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in class_dirs if name not in index]
    if unknown:
        log.warning("%s: skipping %d class folders that the train split does not have: %s",
                    split_dir, len(unknown), ", ".join(unknown[:5]))
    paths: list[str] = []
    targets: list[int] = []
    empty: list[str] = []
    for name in class_dirs:
        if name not in index:
            continue
        files = _image_names(split_dir / name)
        if not files:
            empty.append(name)
        paths.extend(f"{name}/{f}" for f in files)
        targets.extend([index[name]] * len(files))
    if empty and len(empty) < len(class_dirs):
        raise DataLayoutError(
            f"{split_dir}: {len(empty)} class folders hold no *.JPEG/*.jpg/*.png images "
            f"({', '.join(empty[:5])}); class indices would shift, so fill or remove them")
    return _table(split_dir, paths, targets, classes, "imagefolder")


def _table(split_dir: Path, paths: list[str], targets: list[int], classes, layout: str) -> SampleTable:
    return SampleTable(
        root=str(split_dir),
        paths=np.array([p.encode() for p in paths], dtype=np.bytes_) if paths else np.zeros(0, "S1"),
        targets=np.asarray(targets, dtype=np.int64),
        classes=tuple(classes),
        layout=layout,
    )


def _load_raw_val(root: Path, split_dir: Path, names: list[str], classes: tuple[str, ...]) -> SampleTable:
    numbered = [(int(m.group(1)), name) for name in names if (m := RAW_VAL_NAME.match(name))]
    if len(numbered) != len(names):
        strays = [n for n in names if not RAW_VAL_NAME.match(n)]
        raise DataLayoutError(
            f"{split_dir} holds loose images that are not ILSVRC2012_val_XXXXXXXX.JPEG files "
            f"({', '.join(strays[:5])}); {EXPECTED_LAYOUTS}")
    labels, source = _raw_val_labels(root, split_dir)
    index = {name: i for i, name in enumerate(classes)}
    paths, targets, unlabelled, foreign = [], [], [], 0
    for number, name in numbered:
        wnid = labels.get(number)
        if wnid is None:
            unlabelled.append(name)
        elif wnid not in index:
            foreign += 1
        else:
            paths.append(name)
            targets.append(index[wnid])
    if unlabelled:
        raise DataLayoutError(f"{source} has no label for {len(unlabelled)} images in {split_dir} "
                              f"(e.g. {unlabelled[0]}); is it the ILSVRC2012 label file?")
    if foreign:
        log.warning("%s: skipping %d images of classes the train split does not have", split_dir, foreign)
    return _table(split_dir, paths, targets, classes, "ilsvrc-val")


def _label_search_dirs(root: Path, split_dir: Path) -> list[Path]:
    dirs = [split_dir, root, *list(root.resolve().parents)[:3]]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _raw_val_labels(root: Path, split_dir: Path) -> tuple[dict[int, str], Path]:
    """Image number -> wnid for the raw val folder, from whichever label file is found first."""
    searched = _label_search_dirs(root, split_dir)
    lone_ground_truth: list[Path] = []  # the devkit's ground truth without the meta.mat it needs
    for d in searched:
        if (d / KAGGLE_LABELS).is_file():
            return read_kaggle_labels(d / KAGGLE_LABELS), d / KAGGLE_LABELS
        for data_dir in (d, d / "data", d / "ILSVRC2012_devkit_t12" / "data"):
            if (data_dir / DEVKIT_LABELS).is_file() and (data_dir / DEVKIT_META).is_file():
                labels = read_devkit_labels((data_dir / DEVKIT_LABELS).read_bytes(),
                                            (data_dir / DEVKIT_META).read_bytes())
                return labels, data_dir / DEVKIT_LABELS
            if (data_dir / DEVKIT_LABELS).is_file():
                lone_ground_truth.append(data_dir / DEVKIT_LABELS)
        if (d / DEVKIT_TARBALL).is_file():
            return read_devkit_tarball(d / DEVKIT_TARBALL), d / DEVKIT_TARBALL
    if lone_ground_truth:
        raise DataLayoutError(
            f"{lone_ground_truth[0]} was found but no {DEVKIT_META} next to it: the ground truth numbers classes "
            f"in {DEVKIT_META}'s order, so copy {DEVKIT_META} from the devkit's data/ folder next to it (or put "
            f"{DEVKIT_TARBALL} or {KAGGLE_LABELS} next to val/)")
    raise DataLayoutError(
        f"{split_dir} holds raw ILSVRC2012_val_*.JPEG files but no labels were found: looked for "
        f"{KAGGLE_LABELS}, {DEVKIT_LABELS} + {DEVKIT_META} (also under data/ and "
        f"ILSVRC2012_devkit_t12/data/) and {DEVKIT_TARBALL} in {', '.join(map(str, searched))}. "
        "Put one of them next to val/")


def read_kaggle_labels(csv_path: Path) -> dict[int, str]:
    """``LOC_val_solution.csv``: ImageId, then boxes as 'wnid x0 y0 x1 y1 ...'; the class is the
    first box's wnid (all boxes of an ILSVRC2012 val image share it)."""
    labels: dict[int, str] = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise DataLayoutError(f"{csv_path} does not start with the header ImageId,PredictionString")
        for row in reader:
            if not row:
                continue
            match = re.match(r"ILSVRC2012_val_(\d{8})$", row[0])
            if not match or len(row) < 2 or not row[1].split():
                raise DataLayoutError(f"{csv_path}: cannot read the row {row!r}")
            labels[int(match.group(1))] = row[1].split()[0]
    return labels


def read_devkit_labels(ground_truth: bytes, meta_mat: bytes) -> dict[int, str]:
    """The devkit's ground truth lists ILSVRC2012_IDs (1..1000, meta.mat's own class order, not the
    sorted-wnid order), one per val image in file-number order; meta.mat maps those IDs to wnids."""
    id_to_wnid = read_devkit_meta(meta_mat)
    labels: dict[int, str] = {}
    for number, line in enumerate(ground_truth.decode().split(), start=1):
        ilsvrc_id = int(line)
        if ilsvrc_id not in id_to_wnid:
            raise DataLayoutError(f"{DEVKIT_LABELS} line {number}: class id {ilsvrc_id} is not in {DEVKIT_META}")
        labels[number] = id_to_wnid[ilsvrc_id]
    return labels


def read_devkit_meta(meta_mat: bytes) -> dict[int, str]:
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise DataLayoutError(
            f"reading the devkit's {DEVKIT_META} needs scipy (`pip install scipy`); or use the "
            f"Kaggle {KAGGLE_LABELS} instead") from err
    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    # meta.mat lists the whole WordNet subtree; the 1000 classes are its leaves.
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def read_devkit_tarball(path: Path) -> dict[int, str]:
    members: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if member.isfile() and name in (DEVKIT_LABELS, DEVKIT_META):
                members[name] = tar.extractfile(member).read()
    missing = {DEVKIT_LABELS, DEVKIT_META} - set(members)
    if missing:
        raise DataLayoutError(f"{path} lacks {', '.join(sorted(missing))}; is it the ILSVRC2012 devkit?")
    return read_devkit_labels(members[DEVKIT_LABELS], members[DEVKIT_META])

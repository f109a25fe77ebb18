"""Training batches decoded on the device: workers read the encoded bytes and draw each sample's
crop; the device (a GPU, through nvJPEG) decodes the batch and crops, resizes and flips it there.

With about two CPU cores per GPU, decoding JPEG on the CPU cannot keep a modern GPU busy with
DenseNet-121. In this mode a worker does per sample only what needs no pixels: read the file, parse
its header (PIL, no decode), and draw the crop box, flip and random-erasing rectangle from the
sample's key exactly as the CPU path does (``TrainTransform.crop`` / ``.erasure``). A thread of the
training process decodes each batch on the device, a few batches ahead of the training step and on
its own CUDA stream, and finishes it there: crop, antialiased resize (same interpolation), flip,
erasing. The same keys give the same crop boxes, flips and erasures as the CPU path; pixels differ
only by the decoder and the resize kernel's rounding (no ``Image.draft`` either: the device decodes
at full size).

The decoder is torchcodec's ``decode_jpeg`` (the successor of torchvision's image decoders, which
are deprecated from torchvision 0.29), or torchvision's where torchcodec is not installed. Neither is
trusted to order its writes against the caller's stream (torchvision's nvJPEG path does not; nvJPEG's
hardware engine is reported not to either), so the ordering is ours (``DecodeAhead``): the thread's
stream serves only the decoder, every earlier decode on it has finished (a host wait in the thread,
not in the training loop) before the next call, so the allocator never hands the decoder a block that
queued kernels still read, and each finished batch reaches the training stream through an event and
``record_stream``, so its memory is not reused while the training step still reads it.

Files the device should not see are decoded by the CPU path in the worker, with the same generator,
so their pixels, replacements and ``bad`` flags are exactly the CPU path's: anything whose header
does not say a baseline RGB or greyscale JPEG (CMYK, progressive, PNG saved as .JPEG, unreadable
headers, zero-byte and non-image files) and JPEGs without their end-of-image marker (truncated
files). A file that passes these checks but that the device decoder still raises on is decoded on
the CPU from its bytes, with the same crop and flip (identical to the CPU path's pixels), without
losing the rest of the batch. If the CPU cannot decode it either, it is replaced by another image of
the same batch (rather than the CPU path's random draw), flagged ``bad`` and logged like every
unreadable file.

The same code runs with ``decode_on="cpu"`` (the decoders' CPU path), which is how it is tested.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .decode import Source, UnreadableImage, open_image
from .sample import Sample, too_many_unreadable
from .transforms import Erasure, TrainTransform

log = logging.getLogger(__name__)

# A JPEG ends with the EOI marker. Entropy-coded data cannot contain it (0xFF is always stuffed), so
# its absence near the end means the file was cut short; the tail allows for padding after it.
JPEG_EOI = b"\xff\xd9"
EOI_TAIL = 64

# torchvision 0.29 deprecates its image decoders (in favour of torchcodec) and warns on every call;
# they are used only where torchcodec is not installed.
_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"

# How many finished batches the decode thread keeps ready: one being trained on, one waiting, one
# being decoded covers a step's jitter; each costs a batch of uint8 images in device memory.
DECODE_AHEAD = 2


class EncodedCrop(NamedTuple):
    """One sample for the device: the file's bytes and every random choice made for it."""
    data: bytes
    crop: tuple[int, int, int, int]  # top, left, height, width in the full-size image
    flip: bool
    erasure: Erasure | None
    name: str
    size: int  # the output size of the sample's epoch (progressive resizing changes it)


def device_decodable(image_format: str | None, mode: str, data: bytes, progressive: bool = False) -> bool:
    """A baseline JPEG in a colour model the device decoders convert to RGB, and not cut short.

    Progressive JPEGs are left to the workers: nvJPEG's hardware engine takes baseline files only,
    and its software path would decode them on the training process's CPU instead."""
    return (image_format == "JPEG" and mode in ("RGB", "L") and not progressive
            and JPEG_EOI in data[-EOI_TAIL:])


def is_progressive(image: Any) -> bool:
    """What PIL's JPEG header parser says of a file (no pixels decoded)."""
    return bool(image.info.get("progressive") or image.info.get("progression"))


def read_source(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read()
    return source.read()


class EncodedTrainTransform:
    """The worker's half: file -> ``EncodedCrop``, or the CPU path's pixels for a file the device
    should not decode. Called like ``TrainTransform`` (both are ``TrainSampleTransform``s) and
    drawing from the generator in the same order, so datasets, shard streams and their replacement
    of unreadable files work unchanged."""

    def __init__(self, transform: TrainTransform):
        if transform.augment is not None:
            raise ValueError("auto_augment policies work on PIL images in the loader workers, which leave "
                             "decoding to the device when decode_on is set; use decode_on=None (--decode cpu) "
                             "with auto_augment")
        self.transform = transform
        self._by_epoch_size: dict[int, EncodedTrainTransform] = {}

    def at_epoch(self, epoch: int) -> "EncodedTrainTransform":
        """The worker's half of ``transform.at_epoch(epoch)`` (its crops are drawn for that size)."""
        sized = self.transform.at_epoch(epoch)
        if sized is self.transform:
            return self
        if sized.size not in self._by_epoch_size:
            self._by_epoch_size[sized.size] = EncodedTrainTransform(sized)
        return self._by_epoch_size[sized.size]

    def __call__(self, source: Source, name: str, generator: torch.Generator) -> np.ndarray | EncodedCrop:
        data = None
        try:
            data = read_source(source)
            with open_image(data, name) as image:
                if device_decodable(image.format, image.mode, data, is_progressive(image)):
                    crop, flip = self.transform.crop(*image.size, generator)
                    return EncodedCrop(data, crop, flip, self.transform.erasure(generator), name, self.transform.size)
        except (OSError, UnreadableImage):
            pass  # the CPU path below raises its own error for it, naming the file
        # A path is handed over as it is (read again, from the page cache), so that the CPU path
        # decodes, fails and complains exactly as it does when the workers decode; a stream, as the bytes read.
        by_path = isinstance(source, (str, os.PathLike)) or data is None
        return self.transform(source if by_path else data, name, generator)


@dataclass
class EncodedImages:
    """A batch's images as they leave the workers. A plain dataclass, so DataLoader's pinning
    passes it by: nvjpeg reads the bytes from pageable memory itself."""
    data: torch.Tensor  # uint8: the encoded files back to back (one shared-memory block)
    offsets: list[int]  # file i is data[offsets[i]:offsets[i + 1]]
    positions: list[int]  # batch position of each encoded file
    crops: list[tuple[int, int, int, int]]
    flips: list[bool]
    erasures: list[Erasure | None]
    names: list[str]
    pixels: torch.Tensor  # uint8 [m, 3, S, S]: samples the workers decoded on the CPU
    pixel_positions: list[int]
    batch_size: int
    size: int  # every image of the batch comes out size x size

    def files(self) -> list[torch.Tensor]:
        return [self.data[a:b] for a, b in zip(self.offsets, self.offsets[1:])]


def collate_encoded(samples: Sequence[Sample]) -> tuple[EncodedImages, torch.Tensor, torch.Tensor, list]:
    """Like ``loader.collate``, with the images left encoded: (EncodedImages, targets, bad, unreadable)."""
    encoded = [(i, s.pixels) for i, s in enumerate(samples) if isinstance(s.pixels, EncodedCrop)]
    decoded = [(i, s.pixels) for i, s in enumerate(samples) if not isinstance(s.pixels, EncodedCrop)]
    offsets = np.cumsum([0] + [len(e.data) for _, e in encoded]).tolist()
    data = torch.empty(offsets[-1], dtype=torch.uint8)
    view = data.numpy()
    for (_, e), start, end in zip(encoded, offsets, offsets[1:]):
        view[start:end] = np.frombuffer(e.data, dtype=np.uint8)
    pixels = (torch.from_numpy(np.stack([p for _, p in decoded])) if decoded
              else torch.empty(0, dtype=torch.uint8))
    # One epoch per batch, so one size: the workers' crops were drawn for it, the CPU path made it.
    sizes = {e.size for _, e in encoded} | {p.shape[-1] for _, p in decoded}
    if len(sizes) != 1:
        raise ValueError(f"a batch mixes output sizes {sorted(sizes)}; its samples must come from one epoch")
    images = EncodedImages(data, offsets, [i for i, _ in encoded], [e.crop for _, e in encoded],
                           [e.flip for _, e in encoded], [e.erasure for _, e in encoded],
                           [e.name for _, e in encoded], pixels, [i for i, _ in decoded], len(samples), sizes.pop())
    targets = torch.tensor([s.target for s in samples], dtype=torch.int64)
    bad = torch.tensor([bool(s.unreadable) for s in samples], dtype=torch.bool)
    return images, targets, bad, [report for s in samples for report in s.unreadable]


@contextmanager
def _quiet_decoder() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        yield


@contextmanager
def _no_uninitialized_fill(device: torch.device) -> Iterator[None]:
    """Under ``torch.use_deterministic_algorithms`` PyTorch fills every new CUDA tensor with a kernel
    on the current stream; the decoder allocates its outputs and writes them from a stream of its own,
    so the fill could land after the pixels. Nothing here reads memory before writing it, so the fill
    is switched off around the decoder's call (a global switch: at worst another thread's allocation
    goes unfilled meanwhile, which changes no result)."""
    deterministic = getattr(torch.utils, "deterministic", None)
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled() or deterministic is None \
            or not hasattr(deterministic, "fill_uninitialized_memory"):
        yield
        return
    previous = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        deterministic.fill_uninitialized_memory = previous


JPEG_BACKENDS = ("auto", "torchcodec", "torchvision")


def jpeg_decoder(backend: str = "auto") -> tuple[str, Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]]:
    """(name, decode): ``decode(files, device)`` turns 1-d uint8 CPU tensors of JPEG bytes into
    3 x H x W uint8 RGB tensors on ``device``, or raises if any file fails. torchcodec where it is
    installed (``auto``), torchvision's deprecated decoder otherwise."""
    if backend not in JPEG_BACKENDS:
        raise ValueError(f"JPEG decoder {backend!r} is not one of {JPEG_BACKENDS}")
    if backend in ("auto", "torchcodec"):
        try:
            from torchcodec.decoders import decode_jpeg as codec_decode_jpeg
        except (ImportError, OSError, RuntimeError) as err:  # not installed, or built for another torch
            if backend == "torchcodec":
                raise RuntimeError(f"torchcodec's JPEG decoder cannot be loaded ({type(err).__name__}: {err}); "
                                   "pip install torchcodec, or use torchvision's") from err
        else:
            def decode_with_torchcodec(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
                return list(codec_decode_jpeg(files, mode="RGB", device=device))
            return "torchcodec", decode_with_torchcodec
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode_with_torchvision(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        with _quiet_decoder():
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    return "torchvision", decode_with_torchvision


def check_decode_on(decode_on: torch.device | str | None) -> None:
    """``decode_on`` names where training images are decoded: None for the loader workers (on the
    CPU), else the device that decodes each batch: ``"auto"`` (the current CUDA device, else the
    CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``. Only the form is checked here;
    ``resolve_device`` says whether this machine has the device."""
    if decode_on is None or decode_on == "auto" or isinstance(decode_on, torch.device):
        return
    try:
        torch.device(decode_on)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"decode_on {decode_on!r} is neither None (the loader workers decode), 'auto' nor a "
                         "device such as 'cpu', 'cuda' or 'cuda:1'") from err


def resolve_device(device: torch.device | str) -> torch.device:
    """The decode device: as given, or for ``"auto"`` the current CUDA device (the rank's GPU once
    the trainer has called ``torch.cuda.set_device``), or the CPU without CUDA."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"decode device {device} requested, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"decode device {device}: JPEG is decoded on 'cuda' or 'cpu' only")
    return device


class DeviceDecoder:
    """The training process's half: a worker batch -> (images uint8 [B,3,S,S] on ``device``, targets,
    bad, unreadable reports). ``counts`` tallies where images were decoded: on the device, by the
    workers' CPU path, or by the CPU after the device decoder refused them. ``backend`` names the
    JPEG decoder. Called directly it works on the caller's stream; ``DecodeAhead`` runs it ahead of
    training on a stream of its own (``decode_ahead`` / ``hand_over``)."""

    def __init__(self, transform: TrainTransform, device: torch.device, backend: str = "auto"):
        self.backend, self._decode_jpeg = jpeg_decoder(backend)
        self.transform = transform
        self.device = device
        self.counts = {"device": 0, "workers": 0, "fallback": 0}
        self.refused: set[str] = set()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._decoded: torch.cuda.Event | None = None  # the last decode queued on self.stream
        self._check_decoder()

    def _check_decoder(self) -> None:
        """Fail before training starts, not with every batch falling back to the CPU, where the
        device cannot decode JPEG at all (a build without nvJPEG, for instance)."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 100, 50)).save(buffer, "JPEG")
        probe = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        try:
            (image,) = self._decode_jpeg([probe], self.device)
        except Exception as err:
            raise RuntimeError(f"decoding on the device needs {self.backend}'s decode_jpeg on {self.device}, which "
                               f"failed on a test image ({type(err).__name__}: {err}); let the loader workers "
                               "decode (decode_on=None, --decode cpu)") from err
        if tuple(image.shape) != (3, 8, 16) or image.device.type != self.device.type:
            raise RuntimeError(f"decode_jpeg on {self.device} returned {tuple(image.shape)} on {image.device} "
                               "for a 16x8 RGB test image; let the loader workers decode "
                               "(decode_on=None, --decode cpu)")

    def _decode(self, files: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Each file decoded to 3xHxW uint8 on the device, or the decoder's complaint. The batched
        call returns nothing when any file fails, so then each file is tried on its own."""
        try:
            with _no_uninitialized_fill(self.device):
                return self._decode_jpeg(files, self.device)
        except Exception:  # which file (or files) the decoder refused is found below
            pass
        results: list[torch.Tensor | str] = []
        for data in files:
            try:
                with _no_uninitialized_fill(self.device):
                    results.extend(self._decode_jpeg([data], self.device))
            except Exception as err:
                results.append(f"{type(err).__name__}: {err}")
        return results

    # --- ordering against the training stream ------------------------------------------------------

    @contextmanager
    def decode_thread(self) -> Iterator[None]:
        """The settings of a thread that decodes ahead. On the CUDA device: this rank's GPU (the
        current device is per thread). On the CPU device: one intra-op thread, since the per-image ops
        are small and the pool's threads cost more in waking and spinning than they save (12x slower on
        a busy 2-core machine); the setting is the thread's own, the training thread keeps its own."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                yield
            return
        torch.set_num_threads(1)
        yield

    def decode_ahead(self, batch: tuple[EncodedImages, torch.Tensor, torch.Tensor, list]):
        """``self(batch)`` on the decoder's own stream, and the event that marks its end (None on the
        CPU). The host first waits for the previous batch's decode to finish: the decoder writes from
        a stream of its own without waiting for ours, so no block the allocator hands it may still
        have queued readers. This wait is in the decode thread; the training loop never waits here."""
        if self.stream is None:
            return self(batch), None
        if self._decoded is not None:
            self._decoded.synchronize()
        with torch.cuda.stream(self.stream):
            result = self(batch)
            decoded = torch.cuda.Event()
            decoded.record(self.stream)
        self._decoded = decoded
        return result, decoded

    def hand_over(self, images: torch.Tensor, decoded: torch.cuda.Event | None) -> None:
        """Make the caller's (the training) stream wait for the batch's decode without blocking the
        host, and tell the allocator the images are used there, so that their memory is not given to
        the next decode while the training step still reads it."""
        if decoded is None:
            return
        training = torch.cuda.current_stream(self.device)
        training.wait_event(decoded)
        images.record_stream(training)

    def _resize(self, image: torch.Tensor, crop: tuple[int, int, int, int], flip: bool, size: int) -> torch.Tensor:
        """The crop, resized with antialiasing and mirrored if ``flip``: float 3 x size x size, unrounded
        (the device kernels are float only)."""
        top, left, height, width = crop
        region = image[:, top:top + height, left:left + width].unsqueeze(0).float()
        if (height, width) != (size, size):
            region = F.interpolate(region, size=(size, size), mode=self.transform.interpolation,
                                   antialias=True, align_corners=False)
        return region[0].flip(-1) if flip else region[0]

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor onto the device without making the host wait for queued GPU work: a copy from
        pageable memory would block until the stream (the previous training step) drains."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _refused(self, name: str, reason: str) -> None:
        if name not in self.refused:
            self.refused.add(name)
            log.info("the device decoder refused %s (%s); decoding it on the CPU", name, reason)

    def _cpu_fallback(self, encoded: EncodedImages, j: int, data: torch.Tensor) -> np.ndarray:
        """The CPU path's pixels for encoded file j, from its bytes and the crop already drawn."""
        name = encoded.names[j]
        transform = self.transform.at_size(encoded.size)
        with open_image(data.numpy().tobytes(), name) as image:
            return transform.resized_crop(image, encoded.crops[j], encoded.flips[j], name)

    def __call__(self, batch: tuple[EncodedImages, torch.Tensor, torch.Tensor, list]):
        return self._finish(*batch)

    def _finish(self, encoded: EncodedImages, targets: torch.Tensor, bad: torch.Tensor, unreadable: list):
        """Decode, crop, resize and flip on the device. In the usual batch (every file decoded there)
        nothing waits for the device: indices stay on the host and uploads come from pinned memory."""
        size = encoded.size
        cpu_pixels = list(zip(encoded.pixel_positions, encoded.pixels))  # finished on the CPU
        self.counts["workers"] += len(cpu_pixels)
        failed: dict[int, tuple[str, str]] = {}  # position -> (name, reason): no decoder could read it
        files = encoded.files()
        resized = torch.empty(len(files), 3, size, size, dtype=torch.float32, device=self.device)
        on_device: list[int] = []
        for j, (data, image) in enumerate(zip(files, self._decode(files) if files else [])):
            top, left, height, width = encoded.crops[j]
            if isinstance(image, torch.Tensor) and (
                    image.shape[0] != 3 or top + height > image.shape[1] or left + width > image.shape[2]):
                image = f"decoded to {tuple(image.shape)}, but the header promised an RGB image holding the crop"
            if isinstance(image, torch.Tensor):
                resized[j] = self._resize(image, encoded.crops[j], encoded.flips[j], size)
                on_device.append(j)
                continue
            self._refused(encoded.names[j], image)
            try:
                cpu_pixels.append((encoded.positions[j], torch.from_numpy(self._cpu_fallback(encoded, j, data))))
                self.counts["fallback"] += 1
            except UnreadableImage as err:
                failed[encoded.positions[j]] = (err.path, err.reason)
        self.counts["device"] += len(on_device)
        decoded = resized.round_().clamp_(0, 255).to(torch.uint8)
        if len(on_device) == encoded.batch_size:  # every sample was encoded, in order, and decoded here
            out = decoded
        else:
            out = torch.empty(encoded.batch_size, 3, size, size, dtype=torch.uint8, device=self.device)
            for j in on_device:
                out[encoded.positions[j]] = decoded[j]
        if cpu_pixels:
            uploaded = self._upload(torch.stack([p for _, p in cpu_pixels]))
            for k, (position, _) in enumerate(cpu_pixels):
                out[position] = uploaded[k]
        erasures = [(encoded.positions[j], e) for j, e in enumerate(encoded.erasures)
                    if e is not None and encoded.positions[j] not in failed]
        if erasures:
            noise = self._upload(torch.from_numpy(np.concatenate([e.noise.ravel() for _, e in erasures])))
            start = 0
            for position, e in erasures:
                _, h, w = e.noise.shape
                out[position, :, e.top:e.top + h, e.left:e.left + w] = noise[start:start + e.noise.size].view(3, h, w)
                start += e.noise.size
        if failed:
            self._replace(out, targets, bad, unreadable, failed)
        return out, targets, bad, unreadable

    @staticmethod
    def _replace(out: torch.Tensor, targets: torch.Tensor, bad: torch.Tensor, unreadable: list,
                 failed: dict[int, tuple[str, str]]) -> None:
        """Each sample no decoder could read takes the image and label of the next good sample of
        the batch, and is flagged."""
        good = [i for i in range(len(targets)) if i not in failed]
        if not good:
            raise too_many_unreadable(list(failed.values()))
        for position, report in sorted(failed.items()):
            source = next((i for i in good if i > position), good[0])
            out[position] = out[source]
            targets[position] = targets[source]
            bad[position] = True
            unreadable.append(report)


class _Failed(NamedTuple):
    error: BaseException


_END = object()


class _Handoff:
    """What the decode thread and the training thread share: the queue of finished batches and the
    flag that tells the thread to stop. The thread holds this, not the ``DecodeAhead``, so that an
    abandoned iterator is collected and its thread stopped."""

    def __init__(self, depth: int):
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

    def put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _decode_batches(batches: Iterator, decoder: DeviceDecoder, handoff: _Handoff) -> None:
    try:
        with decoder.decode_thread():
            for batch in batches:
                if handoff.stop.is_set() or not handoff.put(decoder.decode_ahead(batch)):
                    return
        handoff.put(_END)
    except BaseException as err:  # re-raised in the training thread, where it can be reported
        handoff.put(_Failed(err))


class DecodeAhead:
    """Worker batches -> finished device batches (images, targets, bad, unreadable), decoded by a
    thread up to ``depth`` batches ahead of the consumer, so that decoding batch k+1 overlaps
    training step k instead of following it. Batches come out in the workers' order, so the run is
    the same as decoding in line. ``close()`` (also on garbage collection) stops the thread and waits
    for it: it must not be reading the DataLoader iterator when the next epoch resets it."""

    def __init__(self, batches: Iterator, decoder: DeviceDecoder, depth: int = DECODE_AHEAD):
        self._decoder = decoder
        self._handoff = _Handoff(depth)
        self._thread = threading.Thread(target=_decode_batches, args=(batches, decoder, self._handoff),
                                        name="device-decode", daemon=True)
        self._thread.start()

    def __iter__(self) -> "DecodeAhead":
        return self

    def __next__(self):
        if self._handoff.stop.is_set():  # closed, ended or failed: nothing more will come
            raise StopIteration
        item = self._handoff.ready.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        batch, decoded = item
        self._decoder.hand_over(batch[0], decoded)
        return batch

    def close(self) -> None:
        self._handoff.stop.set()
        while True:  # unblock a thread waiting to put
            try:
                self._handoff.ready.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to stop
            pass

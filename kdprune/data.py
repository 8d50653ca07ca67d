"""Data sources -> one prepared file of uint8 tensors.

Every source (scikit-learn's digits, CIFAR-10, an image folder or archive) ends as the same dict:
``{split}_x`` uint8 N x C x H x W and ``{split}_y`` int64 for train / val / test, the class names, per-channel
mean/std of train (for normalisation on the device) and a `dataset_id` fingerprint. The validation split is
carved from train with the seed; test is only ever used for the final report.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from kdprune.config import DataParams
from kdprune.errors import DownloadError, KdpruneError
from kdprune.io import atomic_path

Prepared = dict  # the prepared file's content, see module docstring
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------------- sources
DEFAULT_MAX_PIXELS = 40_000_000  # DataParams.max_pixels
MIN_IMAGE_SIZE = 4  # DataParams.image_size's least value: the smallest image the models and augmentation take

def load_digits_source(test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """scikit-learn's 8x8 digits (shipped with the package): 0..16 grey levels scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(np.clip(np.rint(digits.images * 255.0 / 16.0), 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    test, train = _split_indices(len(y), test_fraction, seed + 1)
    return x[train], y[train], x[test], y[test], [str(i) for i in range(10)]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, md5: str) -> None:
    """Download `url` to `target` through a temporary name, renamed only once the md5 matches: a dropped connection
    leaves nothing behind, so a retry starts clean. Every failure here is a retryable DownloadError."""
    from torchvision.datasets.utils import download_url

    with atomic_path(target) as tmp:
        try:
            download_url(url, str(tmp.parent), tmp.name)
        except Exception as error:  # noqa: BLE001 - any network failure is reported the same way
            raise DownloadError(f"{url}: download failed ({(str(error).splitlines() or [type(error).__name__])[0]})") from None
        if _md5(tmp) != md5:  # e.g. a connection closed early without an error
            raise DownloadError(f"{url}: checksum mismatch after download (md5 should be {md5})")


def load_cifar10_source(cache: Path, md5: str = CIFAR10_MD5, url: str = CIFAR10_URL):
    """CIFAR-10's python archive: downloaded into `cache` once (md5 checked), then read without extracting."""
    archive = cache / Path(url).name
    if archive.exists():
        if _md5(archive) != md5:
            raise KdpruneError(f"{archive}: checksum mismatch (md5 should be {md5}); delete it to download again")
    else:
        download(url, archive, md5)
    batches: dict[str, dict] = {}
    for name, read in _tar_members(archive):
        stem = PurePosixPath(name).name
        if stem.startswith(("data_batch_", "test_batch")):
            # pickle is CIFAR-10's own format; the archive's md5 was verified above.
            batches[stem] = pickle.loads(read(), encoding="latin1")

    def stack(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [n for n in names if n not in batches]
        if missing:
            raise KdpruneError(f"{archive}: missing {missing[0]}")
        x = np.concatenate([batches[n]["data"] for n in names]).reshape(-1, 3, 32, 32)
        y = np.concatenate([batches[n]["labels"] for n in names])
        return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = stack([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = stack(["test_batch"])
    return train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES)


def _safe_member_name(archive: Path, name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise KdpruneError(f"{archive}: member {name!r} escapes the target folder")
    return path


def _tar_members(archive: Path) -> Iterator[tuple[str, callable]]:
    """Regular files of a tar archive as (name, read) without extracting; unsafe names are an error."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                _safe_member_name(archive, member.name)
                if member.issym() or member.islnk():
                    raise KdpruneError(f"{archive}: member {member.name!r} is a link; links are not allowed")
                if member.isfile():
                    data = tar.extractfile(member).read()  # read now: the archive is closed when the caller reads
                    yield member.name, (lambda d=data: d)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:  # corrupt, truncated, bad gzip stream
        raise KdpruneError(f"{archive}: not a readable tar archive ({(str(error).splitlines() or [type(error).__name__])[0]})") from None


def _image_files(root: Path) -> Iterator[tuple[str, callable]]:
    """Every file under `root`, following symlinked folders (a class folder linked in from elsewhere is data, as in
    torchvision's ImageFolder), each real folder once (a link cycle ends)."""
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / name for name in names if (Path(folder) / name).is_file()]
    for file in sorted(found):
        yield file.relative_to(root).as_posix(), file.read_bytes


def _split_of(parts: tuple[str, ...]) -> int | None:
    """Index of the `train`/`test` part in a member's path: 0, or 1 under one top-level folder; None if neither."""
    for start in (0, 1):
        if len(parts) > start + 1 and parts[start] in ("train", "test"):
            return start
    return None


def load_imagefolder_source(path: Path, image_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """`train/<class>/*` and `test/<class>/*` from a folder or a .tar / .tar.gz archive (optionally one top folder).

    Files beside train/ and test/ (a README, a LICENSE) are ignored; a file inside them at any other depth
    (`train/stray.png`, `train/cat/more/x.png`) is an error naming the first few, never silently skipped.
    Each image is resized to `image_size` as soon as it is decoded, so only the decoding threads' images are ever
    held at full size; a file over `max_pixels` is refused from its header, before decoding."""
    if not path.exists():
        raise KdpruneError(f"{path}: dataset path does not exist")
    members = _tar_members(path) if path.is_file() else _image_files(path)
    files: dict[str, dict[str, list[tuple[str, callable]]]] = {"train": {}, "test": {}}
    misplaced = []
    for name, read in members:
        parts = PurePosixPath(name).parts
        if any(part.startswith(".") for part in parts):
            continue  # hidden files (.DS_Store, ._foo) are not data
        start = _split_of(parts)
        if start is None:
            continue
        if len(parts) != start + 3:
            misplaced.append(name)
            continue
        files[parts[start]].setdefault(parts[start + 1], []).append((f"{path}/{name}" if path.is_file() else str(path / name), read))
    if misplaced:
        more = f" and {len(misplaced) - 3} more" if len(misplaced) > 3 else ""
        raise KdpruneError(f"{path}: {len(misplaced)} file(s) not at <split>/<class>/<file>: "
                           f"{', '.join(misplaced[:3])}{more}; move or delete them")
    if not files["train"]:
        raise KdpruneError(f"{path}: no train/<class>/ images found (expected train/<class>/, and test/<class>/ "
                           f"unless data.test_fraction of train is to be the test split)")
    classes = sorted(files["train"])
    for cls in files["test"]:
        if cls not in files["train"]:
            raise KdpruneError(f"{path}: test class {cls!r} is absent from train/")
    # sorted within each class too: a folder and an archive of the same images (any member order) give one dataset
    listed = {split: [(where, read, classes.index(cls)) for cls, items in sorted(files[split].items())
                      for where, read in sorted(items, key=lambda item: item[0])]
              for split in files}
    # Pillow releases the GIL while it decodes, so threads decode on several cores (Pillow is slower per small JPEG
    # than torchvision's deprecated decoder was). map keeps the order: the first bad file in file order is reported.
    decoded = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for split, items in listed.items():
            images = pool.map(lambda item: _decode(item[0], item[1], image_size, max_pixels), items)
            decoded[split] = [(image, label) for image, (_, _, label) in zip(images, items)]
    images = [img for split in decoded.values() for img, _ in split]
    channels = 3 if any(img.shape[0] == 3 for img in images) else 1
    out = []
    for split in ("train", "test"):
        xs = [img.expand(channels, -1, -1) if img.shape[0] != channels else img for img, _ in decoded[split]]
        out += [xs, torch.tensor([label for _, label in decoded[split]], dtype=torch.int64)]
    if not files["test"]:  # train/ only: prepare carves the test split (data.test_fraction)
        out[2] = out[3] = None
    return out[0], out[1], out[2], out[3], classes


GREY_MODES = {"1", "L", "LA", "La"}


def _to_uint8(image: Image.Image) -> np.ndarray:
    """A Pillow image in any mode -> uint8 C x H x W, C = 1 for grey modes, else 3. Alpha is dropped (the stored
    colour, as torchvision's ImageFolder loader does); 16-bit grey (Pillow mode I;16, or I as some readers give it)
    is scaled to 8 bits, not clipped."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):  # 16-bit PNG / TIFF / PGM grey: 0..65535 -> 0..255
        array = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)[None]
    if mode == "F":  # float grey: taken as 0..255, as Pillow's own conversion does
        return np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)[None]
    if mode in GREY_MODES:
        return np.asarray(image.convert("L"))[None]
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's advice for palettes with transparency
    # palette -> its colours (not the indices), CMYK / YCbCr / LAB -> RGB, RGBA -> RGB
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")  # what Pillow's Image.reduce takes


def _shrink_while_decoding(image: Image.Image, size: int) -> Image.Image:
    """An image far larger than `size`, shrunk in Pillow before it becomes an array: a JPEG is decoded at a reduced
    scale (`draft`), then any image is box-averaged by an integer factor (`reduce`, on its 8-bit pixels), keeping
    at least twice `size` on its short side so the antialiased resize after it still does the filtering. The full
    image is then only ever held once, as Pillow decoded it (about 4 bytes per pixel), never as float tensors."""
    width, height = image.size
    if image.format == "JPEG" and min(width, height) >= 4 * size:
        image.draft(image.mode, (width * 2 * size // min(width, height), height * 2 * size // min(width, height)))
    factor = min(image.size) // (2 * size)
    if factor >= 2 and image.mode in REDUCIBLE_MODES:
        image = image.reduce(factor)
    return image


def decode_image(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, size: int | None = None) -> torch.Tensor:
    """The bytes of one image file -> uint8 C x H x W (C = 1 or 3); any failure is one error line naming `where`.

    The one decoding path of the project (Pillow with explicit conversions); EXIF orientation is applied. The size
    is checked against `max_pixels` (data.max_pixels) from the header, before any pixel is decoded. With `size`
    (the side it will be resized to), an image much larger is shrunk while decoding (`_shrink_while_decoding`)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise KdpruneError(f"{where}: {width}x{height} = {width * height:,} pixels, over data.max_pixels "
                                   f"({max_pixels:,}); shrink the image or raise data.max_pixels")
            shrunk = _shrink_while_decoding(image, size) if size is not None else image
            array = _to_uint8(ImageOps.exif_transpose(shrunk))
    except KdpruneError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises several types for corrupt or unsupported files
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise KdpruneError(f"{where}: unreadable image ({reason})") from None
    return torch.from_numpy(np.array(array))  # a writable, contiguous copy


def _decode(where: str, read, size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read, decode and (with `size`) resize one image, so that a full-size image lives only while it is resized."""
    if PurePosixPath(where).suffix.lower() not in IMAGE_SUFFIXES:
        raise KdpruneError(f"{where}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        data = read()
    except OSError as error:
        raise KdpruneError(f"{where}: cannot read ({error.strerror or error})") from None
    image = decode_image(data, where, max_pixels, size)
    del data  # the file's bytes, before the resize allocates
    if size is not None and tuple(image.shape[-2:]) != (size, size):
        image = TF.resize(image, [size, size], antialias=True)  # as _to_batch would: the same op, done earlier
    return image


def read_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """One image file as the prepared data holds images: uint8 `channels` x `size` x `size`.

    Decoded as `prepare` decodes (alpha dropped), grey expanded to RGB as in a mixed folder, RGB converted to grey
    (ITU-R 601 luma) for a grey model, and resized with antialiasing as `data.image_size` resizes.
    """
    path = Path(path)
    if not path.is_file():
        raise KdpruneError(f"{path}: image file not found")
    image = _decode(str(path), path.read_bytes, size)  # shrunk while decoding exactly as `prepare` does
    if image.shape[0] != channels:
        image = image.expand(channels, -1, -1) if image.shape[0] == 1 else TF.rgb_to_grayscale(image, channels)
    if tuple(image.shape[-2:]) != (size, size):
        image = TF.resize(image, [size, size], antialias=True)
    return image.contiguous()


# ---------------------------------------------------------------------------------------------- prepare
def _split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(round(n * fraction)))
    if cut >= n:
        raise KdpruneError(f"{n} images are too few to split off a fraction of {fraction}")
    return order[:cut], order[cut:]


def _to_batch(images, size: int | None, field: str) -> torch.Tensor:
    """A list of C x H x W uint8 images (or a ready N x C x H x W tensor) -> N x C x size x size."""
    if isinstance(images, torch.Tensor):
        images = list(images) if size is not None and images.shape[-1] != size else images
    if isinstance(images, list):
        shapes = Counter(tuple(img.shape[-2:]) for img in images)
        if size is None and len(shapes) > 1:
            (a, _), (b, _) = shapes.most_common(2)
            raise KdpruneError(f"{field}: images differ in size ({a[0]}x{a[1]} and {b[0]}x{b[1]}); set data.image_size")
        if size is not None:
            images = [img if tuple(img.shape[-2:]) == (size, size) else TF.resize(img, [size, size], antialias=True) for img in images]
        images = torch.stack(images)
    elif size is not None and tuple(images.shape[-2:]) != (size, size):
        images = TF.resize(images, [size, size], antialias=True)
    return images.contiguous()


def check_source(params: DataParams) -> None:
    """The cheap checks of the data source (path exists, is readable, archive opens), before any server starts."""
    if params.source == "digits" or params.path is None:
        return
    path = Path(params.path)
    if params.source == "cifar10":
        if path.exists() and not path.is_dir():
            raise KdpruneError(f"{path}: data.path of cifar10 must be a cache folder, not a file")
        return
    if not path.exists():
        raise KdpruneError(f"{path}: dataset path does not exist")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise KdpruneError(f"{path}: dataset path is not readable (permission denied)")
    if path.is_dir():
        if not any(path.iterdir()):
            raise KdpruneError(f"{path}: dataset folder is empty (expected train/<class>/ and test/<class>/)")
        return
    if path.stat().st_size == 0:
        raise KdpruneError(f"{path}: dataset archive is empty (0 bytes)")
    try:
        with tarfile.open(path) as tar:
            tar.next()  # reads the first header: catches a file that is no archive at all
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise KdpruneError(f"{path}: not a readable tar archive ({(str(error).splitlines() or [type(error).__name__])[0]})") from None


def prepare(params: DataParams, seed: int) -> Prepared:
    """Read the configured source and return the prepared splits (nothing written)."""
    if params.source == "digits":
        train_x, train_y, test_x, test_y, classes = load_digits_source(params.test_fraction, seed)
    elif params.source == "cifar10":
        train_x, train_y, test_x, test_y, classes = load_cifar10_source(Path(params.path or "data/cache"))
    else:
        train_x, train_y, test_x, test_y, classes = load_imagefolder_source(Path(params.path), params.image_size,
                                                                            params.max_pixels)
        if test_x is None:  # a folder with train/ only: a seeded test split, apart from validation's
            train_x = _to_batch(train_x, params.image_size, "data.path")
            test, rest = _split_indices(len(train_y), params.test_fraction, seed + 1)
            train_x, train_y, test_x, test_y = train_x[rest], train_y[rest], train_x[test], train_y[test]
    train_x = _to_batch(train_x, params.image_size, "data.path")
    test_x = _to_batch(test_x, params.image_size or train_x.shape[-1], "data.path")
    if min(train_x.shape[-2:]) < MIN_IMAGE_SIZE:
        raise KdpruneError(f"data.path: images are {train_x.shape[-2]}x{train_x.shape[-1]} pixels, smaller than the "
                           f"models take ({MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}); set data.image_size")
    if train_x.shape[-1] != train_x.shape[-2]:
        raise KdpruneError(f"data.path: images are {train_x.shape[-2]}x{train_x.shape[-1]}, not square; set data.image_size")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise KdpruneError(f"data.path: test images are {tuple(test_x.shape[1:])}, train images {tuple(train_x.shape[1:])}")
    val, train = _split_indices(len(train_y), params.val_fraction, seed)
    train = train[:params.max_train]  # already a seeded random order; None keeps all
    if params.max_test is not None and params.max_test < len(test_y):
        keep = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(seed + 2))[:params.max_test]
        test_x, test_y = test_x[keep], test_y[keep]
    prepared = {
        "train_x": train_x[train].clone(), "train_y": train_y[train].clone(),
        "val_x": train_x[val].clone(), "val_y": train_y[val].clone(),
        "test_x": test_x, "test_y": test_y, "classes": classes, "source": params.source,
    }
    as_float = prepared["train_x"].float() / 255
    prepared["mean"] = as_float.mean(dim=(0, 2, 3))
    prepared["std"] = as_float.std(dim=(0, 2, 3)).clamp_min(1e-3)
    digest = hashlib.sha256()
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        digest.update(prepared[key].numpy().tobytes())
    digest.update("\n".join(classes).encode())
    prepared["dataset_id"] = digest.hexdigest()[:16]
    return prepared


def save_prepared(prepared: Prepared, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(prepared, tmp)


def load_prepared(path: Path) -> Prepared:
    if not Path(path).is_file():
        raise KdpruneError(f"{path}: prepared data not found; run the prepare stage first")
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated or foreign files
        raise KdpruneError(f"{path}: not a readable prepared-data file ({error.__class__.__name__}); "
                           "run the prepare stage again") from None


def describe(prepared: Prepared) -> dict:
    c, h, w = prepared["train_x"].shape[1:]
    return {
        "source": prepared["source"], "classes": len(prepared["classes"]), "channels": int(c), "image_size": int(h),
        "train": len(prepared["train_y"]), "val": len(prepared["val_y"]), "test": len(prepared["test_y"]),
        "dataset_id": prepared["dataset_id"],
    }

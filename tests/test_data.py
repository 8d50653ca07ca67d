"""Data sources -> prepared uint8 splits: digits, image folders and archives, CIFAR-10's format; bad data errors."""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import leftovers, make_imagefolder, make_tar, pattern_image
from kdprune import config, data
from kdprune.config import DataParams
from kdprune.errors import KdpruneError


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """Each (image, label) as bytes, sorted: a multiset that can be compared."""
    return sorted(img.numpy().tobytes() + int(label).to_bytes(2, "little") for img, label in zip(x, y))


# ------------------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits_prepared():
    return data.prepare(DataParams(source="digits", val_fraction=0.1, test_fraction=0.2), seed=0)


def test_digits_shapes_and_dtypes(digits_prepared):
    p = digits_prepared
    for split in ("train", "val", "test"):
        x, y = p[f"{split}_x"], p[f"{split}_y"]
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.ndim == 4 and tuple(x.shape[1:]) == (1, 8, 8)
        assert len(x) == len(y) > 0
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert p["classes"] == [str(i) for i in range(10)]
    assert int(p["train_x"].max()) == 255  # 0..16 grey levels scaled to the full byte range
    assert p["mean"].shape == (1,) and p["std"].shape == (1,)
    expected_mean = (p["train_x"].float() / 255).mean()
    assert torch.allclose(p["mean"], expected_mean.reshape(1), atol=1e-6)
    n = len(p["train_y"]) + len(p["val_y"]) + len(p["test_y"])
    assert n == 1797
    assert len(p["test_y"]) == round(1797 * 0.2)
    assert len(p["val_y"]) == round((1797 - len(p["test_y"])) * 0.1)
    assert data.describe(p)["image_size"] == 8


def test_digits_splits_partition_the_dataset(digits_prepared):
    """train + val + test is exactly the dataset, each image once: test never overlaps train or val."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(np.clip(np.rint(digits.images * 255.0 / 16.0), 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    p = digits_prepared
    xs = torch.cat([p["train_x"], p["val_x"], p["test_x"]])
    ys = torch.cat([p["train_y"], p["val_y"], p["test_y"]])
    assert _rows(xs, ys) == _rows(x, y)


def test_val_split_is_seeded(digits_prepared):
    params = DataParams(source="digits")
    same = data.prepare(params, seed=0)
    other = data.prepare(params, seed=1)
    assert torch.equal(same["val_x"], digits_prepared["val_x"])
    assert torch.equal(same["val_y"], digits_prepared["val_y"])
    assert same["dataset_id"] == digits_prepared["dataset_id"]
    assert not torch.equal(other["val_x"], digits_prepared["val_x"])
    assert other["dataset_id"] != digits_prepared["dataset_id"]


def test_save_and_load_prepared(tmp_path, digits_prepared):
    path = tmp_path / "data" / "prepared.pt"
    data.save_prepared(digits_prepared, path)
    loaded = data.load_prepared(path)
    for key in ("train_x", "val_y", "test_x", "mean"):
        assert torch.equal(loaded[key], digits_prepared[key])
    assert loaded["classes"] == digits_prepared["classes"]
    assert leftovers(tmp_path) == []


def test_load_prepared_missing(tmp_path):
    with pytest.raises(KdpruneError, match="prepare"):
        data.load_prepared(tmp_path / "prepared.pt")


# ------------------------------------------------------------------------------------------ imagefolder
def _as_set(x: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in x}


def _check_imagefolder(prepared: dict, expected_train: int, expected_test: int):
    assert prepared["classes"] == ["cat", "dog"]
    assert len(prepared["train_y"]) + len(prepared["val_y"]) == expected_train
    assert len(prepared["test_y"]) == expected_test
    assert prepared["train_x"].dtype == torch.uint8
    train = _as_set(prepared["train_x"]) | _as_set(prepared["val_x"])
    assert len(train) == expected_train  # every image distinct, none lost
    assert train.isdisjoint(_as_set(prepared["test_x"]))
    assert _as_set(prepared["train_x"]).isdisjoint(_as_set(prepared["val_x"]))


def test_imagefolder_from_folder(imagefolder):
    prepared = data.prepare(DataParams(source="imagefolder", path=str(imagefolder), val_fraction=0.25), seed=0)
    _check_imagefolder(prepared, 12, 6)
    assert tuple(prepared["train_x"].shape[1:]) == (1, 8, 8)
    assert prepared["source"] == "imagefolder"


def test_imagefolder_labels_follow_folders(tmp_path):
    """Each image comes back with its folder's label and its exact pixels."""
    root = make_imagefolder(tmp_path / "images", per_class={"train": 2, "test": 1})
    train_x, train_y, test_x, test_y, classes = data.load_imagefolder_source(root)
    assert classes == ["cat", "dog"]
    expected = {}
    for cls_index, cls in enumerate(classes):
        for file in (root / "train" / cls).iterdir():
            from PIL import Image

            expected[np.asarray(Image.open(file)).tobytes()] = cls_index
    got = {img[0].numpy().tobytes(): int(label) for img, label in zip(train_x, train_y)}
    assert got == expected


@pytest.mark.parametrize("top", [None, "mydata"])
def test_imagefolder_from_tar_gz(tmp_path, imagefolder, top):
    archive = make_tar(imagefolder, tmp_path / "images.tar.gz", top=top)
    from_tar = data.prepare(DataParams(source="imagefolder", path=str(archive), val_fraction=0.25), seed=0)
    from_folder = data.prepare(DataParams(source="imagefolder", path=str(imagefolder), val_fraction=0.25), seed=0)
    _check_imagefolder(from_tar, 12, 6)
    for key in ("train_x", "train_y", "val_x", "test_x", "test_y"):
        assert torch.equal(from_tar[key], from_folder[key])


def test_imagefolder_ignores_hidden_files(imagefolder):
    (imagefolder / "train" / "cat" / ".DS_Store").write_bytes(b"\x00junk")
    prepared = data.prepare(DataParams(source="imagefolder", path=str(imagefolder), val_fraction=0.25), seed=0)
    _check_imagefolder(prepared, 12, 6)


def test_grayscale_and_rgb_mixed_become_three_channels(tmp_path):
    root = make_imagefolder(tmp_path / "images", mode="L", modes={("train", "dog", 0): "RGB"})
    prepared = data.prepare(DataParams(source="imagefolder", path=str(root), val_fraction=0.25), seed=0)
    for split in ("train", "val", "test"):
        assert prepared[f"{split}_x"].shape[1] == 3
    # a grey image is repeated over the three channels
    grey = [img for img in torch.cat([prepared["train_x"], prepared["val_x"]])
            if torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])]
    assert len(grey) == 11
    assert prepared["mean"].shape == (3,)


def test_rgba_drops_alpha(tmp_path):
    from PIL import Image

    root = make_imagefolder(tmp_path / "images", mode="RGB")
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    rgba.save(root / "train" / "cat" / "0.png")
    x, _, _, _, _ = data.load_imagefolder_source(root)
    assert all(img.shape[0] == 3 for img in x)


def test_different_sizes_need_image_size(tmp_path):
    root = make_imagefolder(tmp_path / "images", sizes={("train", "cat", 0): (12, 10)})
    with pytest.raises(KdpruneError, match="data.image_size") as info:
        data.prepare(DataParams(source="imagefolder", path=str(root)), seed=0)
    assert "\n" not in str(info.value)


def test_different_sizes_resized_when_image_size_set(tmp_path):
    root = make_imagefolder(tmp_path / "images", sizes={("train", "cat", 0): (12, 10), ("test", "dog", 1): (5, 7)})
    prepared = data.prepare(DataParams(source="imagefolder", path=str(root), image_size=6, val_fraction=0.25), seed=0)
    for split in ("train", "val", "test"):
        assert tuple(prepared[f"{split}_x"].shape[1:]) == (1, 6, 6)
        assert prepared[f"{split}_x"].dtype == torch.uint8


def test_non_square_images_need_image_size(tmp_path):
    root = make_imagefolder(tmp_path / "images", size=(8, 6))
    with pytest.raises(KdpruneError, match="image_size"):
        data.prepare(DataParams(source="imagefolder", path=str(root)), seed=0)
    prepared = data.prepare(DataParams(source="imagefolder", path=str(root), image_size=8, val_fraction=0.25), seed=0)
    assert tuple(prepared["train_x"].shape[1:]) == (1, 8, 8)


# -------------------------------------------------------------------------------------------- bad data
def _load_error(path: Path) -> str:
    with pytest.raises(KdpruneError) as info:
        data.prepare(DataParams(source="imagefolder", path=str(path)), seed=0)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_dataset_path(tmp_path):
    assert str(tmp_path / "nowhere") in _load_error(tmp_path / "nowhere")


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _load_error(tmp_path / "empty")
    assert str(tmp_path / "empty") in message and "train/" in message


def test_archive_without_train(tmp_path):  # without test/ it is carved from train (see below)
    root = make_imagefolder(tmp_path / "images", splits=["test"])
    archive = make_tar(root, tmp_path / "images.tar.gz")
    message = _load_error(archive)
    assert str(archive) in message and "no train/" in message


def test_test_class_absent_from_train(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    (root / "test" / "bird").mkdir()
    pattern_image(99, (8, 8), "L").save(root / "test" / "bird" / "0.png")
    message = _load_error(root)
    assert "'bird'" in message and "train" in message


def test_unreadable_image_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    message = _load_error(root)
    assert str(bad) in message and "unreadable" in message


def test_non_image_file_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    notes = root / "train" / "cat" / "notes.txt"
    notes.write_text("hello")
    message = _load_error(root)
    assert str(notes) in message and "not an image" in message


def test_unreadable_image_in_archive_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    (root / "test" / "cat" / "broken.png").write_bytes(b"junk")
    archive = make_tar(root, tmp_path / "images.tar.gz")
    message = _load_error(archive)
    assert "test/cat/broken.png" in message and str(archive) in message


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _png_bytes() -> bytes:
    out = io.BytesIO()
    pattern_image(0, (8, 8), "L").save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("evil", ["../evil.png", "train/../../evil.png", "/tmp/evil.png"])
def test_tar_member_escaping_the_target(tmp_path, evil):
    root = make_imagefolder(tmp_path / "src" / "images")
    archive = tmp_path / "work" / "data.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
        _add_bytes(tar, evil, _png_bytes())
    message = _load_error(archive)
    assert repr(evil) in message and "escapes" in message
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "work" / "evil.png").exists()


def test_tar_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("train/cat/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    assert "link" in _load_error(archive)


def test_not_a_tar_archive(tmp_path):
    junk = tmp_path / "data.tar.gz"
    junk.write_bytes(b"not an archive at all")
    assert str(junk) in _load_error(junk)


# ------------------------------------------------------------------------------------------------ CIFAR-10
def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"batch_label": f"batch {seed}", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}


def make_cifar_archive(cache: Path, per_batch: int = 4) -> tuple[Path, dict]:
    """A tiny archive in CIFAR-10's own layout: cifar-10-batches-py/{data_batch_1..5,test_batch} pickles."""
    cache.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _cifar_batch(per_batch, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(per_batch + 1, 99)
    archive = cache / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _add_bytes(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        _add_bytes(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({"label_names": data.CIFAR10_CLASSES}))
        for name, batch in batches.items():
            _add_bytes(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch))
    return archive, batches


def test_cifar10_reader_on_a_tiny_archive(tmp_path):
    archive, batches = make_cifar_archive(tmp_path / "cache")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    train_x, train_y, test_x, test_y, classes = data.load_cifar10_source(tmp_path / "cache", md5=md5)
    assert classes == data.CIFAR10_CLASSES
    assert train_x.dtype == torch.uint8 and tuple(train_x.shape) == (20, 3, 32, 32)
    assert tuple(test_x.shape) == (5, 3, 32, 32) and train_y.dtype == torch.int64
    # rows are CIFAR's channel-major 3072 bytes, batches in order 1..5
    expected = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    assert np.array_equal(train_x.numpy().reshape(20, -1), expected)
    assert np.array_equal(train_x[0, 0].numpy(), expected[0, :1024].reshape(32, 32))  # red plane first
    assert train_y.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert test_y.tolist() == batches["test_batch"]["labels"]


def test_cifar10_missing_batch(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _add_bytes(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps(_cifar_batch(2, 1)))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(KdpruneError, match="data_batch_2"):
        data.load_cifar10_source(cache, md5=md5)


def test_cifar10_bad_checksum(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    junk = cache / "cifar-10-python.tar.gz"
    junk.write_bytes(b"definitely not CIFAR-10")
    with pytest.raises(KdpruneError, match="checksum") as info:
        data.load_cifar10_source(cache)  # the real md5: the junk file must be refused, with no download attempted
    assert str(junk) in str(info.value) and "\n" not in str(info.value)
    assert junk.read_bytes() == b"definitely not CIFAR-10"  # nothing overwritten


def test_max_train_and_max_test_keep_seeded_subsets(digits_prepared):
    params = DataParams(source="digits", max_train=100, max_test=50)
    small = data.prepare(params, seed=0)
    assert len(small["train_y"]) == 100 and len(small["test_y"]) == 50
    assert torch.equal(small["val_x"], digits_prepared["val_x"])  # validation is not cut
    assert _as_set(small["train_x"]) <= _as_set(digits_prepared["train_x"])
    assert _as_set(small["test_x"]) <= _as_set(digits_prepared["test_x"])
    again = data.prepare(params, seed=0)
    assert torch.equal(again["train_x"], small["train_x"]) and torch.equal(again["test_x"], small["test_x"])


@pytest.fixture
def flaky_server(tmp_path):
    """A local HTTP server for one fabricated CIFAR-10 archive; while `state["drop"]` it drops every connection
    halfway through the body (as a flaky network does)."""
    import http.server
    import threading

    archive, _ = make_cifar_archive(tmp_path / "served")
    payload = archive.read_bytes()
    state = {"drop": True, "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            state["requests"] += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if state["drop"]:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
        yield url, hashlib.md5(payload).hexdigest(), state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cifar10_download_dropped_then_retried(tmp_path, flaky_server):
    from kdprune.errors import DownloadError

    url, md5, state = flaky_server
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        data.load_cifar10_source(cache, md5=md5, url=url)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert list(cache.iterdir()) == []  # no partial archive: the retry starts clean
    state["drop"] = False  # the network recovers
    train_x, *_ = data.load_cifar10_source(cache, md5=md5, url=url)  # what Prefect's retry of prepare does
    assert tuple(train_x.shape) == (20, 3, 32, 32)
    assert [p.name for p in cache.iterdir()] == ["cifar-10-python.tar.gz"]


PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
from kdprune import config, data
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data.prepare(config.parse({"data": {"source": "imagefolder", "path": sys.argv[1], "image_size": 16}}).data, 0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def _big_images(root: Path, per_class: int, side: int) -> Path:
    from PIL import Image

    for split, n in (("train", per_class), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):  # flat colours: a few hundred bytes of PNG, `side`^2 bytes decoded
                Image.new("L", (side, side), color=(37 * i + 90 * (cls == "b")) % 256).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.slow
def test_peak_memory_of_prepare_does_not_grow_with_the_number_of_large_images(tmp_path):
    """Each image is resized as soon as it is decoded: 40 images of 16 Mpx take no more memory than 8 (holding them
    all at full size, as before, took 16 Mpx x 32 = 512 MB more)."""
    from conftest import VENV_BIN, subprocess_env

    def peak_mb(per_class: int) -> float:
        root = _big_images(tmp_path / f"n{per_class}", per_class, 4000)
        done = subprocess.run([str(VENV_BIN / "python"), "-c", PEAK_SCRIPT, str(root)], env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.strip().splitlines()[-1])

    few, many = peak_mb(4), peak_mb(20)
    assert many - few < 100, (few, many)


def test_an_image_over_max_pixels_is_refused_from_its_header(tmp_path):
    root = _big_images(tmp_path / "imgs", 2, 1100)  # 1.21 Mpx each
    params = config.parse({"data": {"source": "imagefolder", "path": str(root), "image_size": 8,
                                    "max_pixels": 1_000_000}}).data
    with pytest.raises(KdpruneError, match=r"a/0\.png: 1100x1100 = 1,210,000 pixels, over data\.max_pixels \(1,000,000\)"):
        data.prepare(params, 0)
    assert data.prepare(params.model_copy(update={"max_pixels": 1_210_000}), 0)["train_x"].shape[-1] == 8


def test_images_too_small_for_the_models_are_one_line_naming_the_field(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", size=(1, 1))
    with pytest.raises(KdpruneError, match=r"data.path: images are 1x1 pixels, smaller than the models take "
                                           r"\(4x4\); set data.image_size"):
        data.prepare(config.parse({"data": {"source": "imagefolder", "path": str(root)}}).data, 0)


def test_a_symlinked_class_folder_is_read_like_any_other(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", classes=("cat", "dog"))
    elsewhere = tmp_path / "elsewhere" / "dog"
    elsewhere.parent.mkdir()
    (root / "train" / "dog").rename(elsewhere)
    (root / "train" / "dog").symlink_to(elsewhere, target_is_directory=True)
    (root / "train" / "cat" / "loop").symlink_to(root / "train", target_is_directory=True)  # a cycle ends
    train_x, train_y, _, _, classes = data.load_imagefolder_source(root)
    assert classes == ["cat", "dog"] and sorted(set(train_y.tolist())) == [0, 1]


def test_a_train_only_folder_gets_a_seeded_test_split_apart_from_validation(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class={"train": 20}, splits=("train",))
    params = config.parse({"data": {"source": "imagefolder", "path": str(root), "test_fraction": 0.25}}).data
    prepared = data.prepare(params, 0)
    assert len(prepared["test_y"]) == 10 and len(prepared["train_y"]) + len(prepared["val_y"]) == 30
    every = torch.cat([prepared["train_x"], prepared["val_x"], prepared["test_x"]]).flatten(1)
    assert len({row.numpy().tobytes() for row in every}) == 40  # no image in two splits
    assert torch.equal(data.prepare(params, 0)["test_x"], prepared["test_x"])  # seeded
    assert not torch.equal(data.prepare(params, 1)["test_x"], prepared["test_x"])
    other = data.prepare(params.model_copy(update={"test_fraction": 0.5}), 0)
    assert len(other["test_y"]) == 20  # the option is read


def test_a_folder_and_an_archive_of_it_in_any_member_order_give_one_dataset(tmp_path):
    import tarfile

    root = make_imagefolder(tmp_path / "imgs", per_class={"train": 12, "test": 3})
    archive = tmp_path / "shuffled.tar"
    members = sorted(p for p in root.rglob("*.png"))
    with tarfile.open(archive, "w") as tar:  # reversed member order, as another archiver may write them
        for path in reversed(members):
            tar.add(path, arcname=path.relative_to(root).as_posix())
    from_folder = data.prepare(config.parse({"data": {"source": "imagefolder", "path": str(root)}}).data, 0)
    from_archive = data.prepare(config.parse({"data": {"source": "imagefolder", "path": str(archive)}}).data, 0)
    assert from_folder["dataset_id"] == from_archive["dataset_id"]
    for key in ("train_x", "val_x", "test_x", "train_y"):
        assert torch.equal(from_folder[key], from_archive[key])


@pytest.mark.slow
def test_peak_memory_of_a_large_image_is_about_what_pillow_decodes(tmp_path):
    """A 36 Mpx RGB image resized to 16x16 is shrunk in Pillow before it becomes an array: peak growth stays near
    Pillow's own decoded image (4 bytes per pixel, one per decoding thread), not the ~25 bytes per pixel of float
    tensors that a resize of the full image allocates (measured before: 1.7 GB for 4 such images)."""
    from PIL import Image

    from conftest import VENV_BIN, subprocess_env

    for split in ("train", "test"):
        for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (6000, 6000), color=colour).save(tmp_path / split / cls / f"{i}.png")
    done = subprocess.run([str(VENV_BIN / "python"), "-c", PEAK_SCRIPT, str(tmp_path)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 450  # MB; 2 threads x 36 Mpx x 4 bytes = 288


def test_an_image_shrunk_while_decoding_matches_a_direct_resize(tmp_path):
    """The shrink before the resize changes pixels by a few levels at most: a smooth 800x600 image resized to 16x16."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    yy, xx = np.mgrid[0:600, 0:800]
    array = np.stack([(xx * 255 // 800), (yy * 255 // 600), ((xx + yy) * 255 // 1400)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    shrunk = data.decode_image(buffer.getvalue(), "x.png", size=16)
    assert tuple(shrunk.shape) == (3, 34, 45)  # reduced by 18 = 600 // (2 * 16) before the resize (rounded up)
    direct = TF.resize(torch.from_numpy(array).permute(2, 0, 1).contiguous(), [16, 16], antialias=True)
    ours = TF.resize(shrunk, [16, 16], antialias=True)
    gap = (ours.int() - direct.int()).abs()
    assert gap.max() <= 6 and gap.float().mean() < 2.5  # the last, partial box shifts the edge by a fraction of a pixel

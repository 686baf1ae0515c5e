"""sources.py: folders, manifests, IDX files, path lists and arrays become one ImageSource."""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from featurepipe.exceptions import ConfigError, DecodeError, SourceError
from featurepipe.sources import (
    FASHION_MNIST_CLASSES,
    ImageSource,
    Sample,
    encode_labels,
    load_fashion_mnist,
    open_source,
    read_idx,
)


def png(path: pathlib.Path, value: int = 0, size: tuple[int, int] = (4, 4)) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def write_idx(path: pathlib.Path, arr: np.ndarray, *, compress: bool = False) -> pathlib.Path:
    """The IDX format: 0x00 0x00, type code, ndim, big-endian uint32 dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim])
    header += np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture
def class_folder(tmp_path) -> pathlib.Path:
    root = tmp_path / "pets"
    png(root / "dog" / "b.png", 10)
    png(root / "cat" / "z.png", 20)
    png(root / "cat" / "sub" / "a.PNG", 30)  # recursive, suffix case-insensitive
    (root / "cat" / "notes.txt").write_text("not an image")
    png(root / "cat" / ".hidden.png")
    png(root / ".cache" / "x.png")
    png(root / "dog" / ".thumbs" / "y.png")
    (root / "empty-dir").mkdir()
    return root


# -- folders -------------------------------------------------------------------------------


def test_class_folder(class_folder):
    src = open_source(class_folder)
    assert src.kind == "folder" and src.root == str(class_folder)
    assert src.class_names == ["cat", "dog"]
    assert [s.id for s in src.samples] == ["cat/sub/a.PNG", "cat/z.png", "dog/b.png"]
    assert src.labels.tolist() == [0, 0, 1] and src.labels.dtype == np.int64
    assert src.samples[2].path == str(class_folder / "dog" / "b.png")
    assert len(src) == 3 and src.ids == [s.id for s in src.samples]
    assert src.load(2).getpixel((0, 0)) == (10, 10, 10)


def test_class_folder_with_fixed_class_names(class_folder):
    src = open_source(class_folder, class_names=["dog", "cat", "fish"])
    assert src.class_names == ["dog", "cat", "fish"]
    assert src.labels.tolist() == [1, 1, 0]
    with pytest.raises(SourceError, match="not in class_names"):
        open_source(class_folder, class_names=["dog"])


def test_flat_folder(tmp_path):
    png(tmp_path / "b.jpg")
    png(tmp_path / "a.png")
    png(tmp_path / ".hidden.png")
    (tmp_path / "broken.jpg").write_bytes(b"")  # listed; decode reports it
    src = open_source(str(tmp_path))
    assert src.kind == "flat" and src.class_names == []
    assert src.ids == ["a.png", "b.jpg", "broken.jpg"]
    assert src.labels.tolist() == [-1, -1, -1]
    with pytest.raises(DecodeError, match="empty file"):
        src.load(2)


def test_images_next_to_class_folders_refused(class_folder):
    png(class_folder / "stray.png")
    with pytest.raises(SourceError, match=r"stray\.png.*class folder"):
        open_source(class_folder)


def test_empty_and_missing(tmp_path):
    (tmp_path / "only.txt").write_text("x")
    (tmp_path / ".h.png").write_bytes(b"")
    with pytest.raises(SourceError, match=rf"no images found in {tmp_path}.*\.jpg"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no such file or directory: .*nope"):
        open_source(tmp_path / "nope")


def test_symlinked_class_folder_loop(tmp_path):
    root = tmp_path / "root"
    png(root / "a" / "x.png")
    os.symlink(root / "a", root / "a" / "loop")
    os.symlink(tmp_path / "elsewhere", root / "b")
    png(tmp_path / "elsewhere" / "y.png")
    assert open_source(root).ids == ["a/x.png", "b/y.png"]


# -- manifests -----------------------------------------------------------------------------


def test_manifest_relative_paths_and_string_labels(tmp_path):
    png(tmp_path / "data" / "imgs" / "a.png", 1)
    png(tmp_path / "other" / "b.png", 2)
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text("path,label,note\n"
                        "imgs/a.png,dog,x\n"
                        "../other/b.png,cat,\n"
                        "./imgs//gone.png,dog,\n"
                        "\n")
    src = open_source(manifest)
    assert src.kind == "manifest" and src.root == str(tmp_path / "data")
    assert src.ids == ["imgs/a.png", "../other/b.png", "imgs/gone.png"]
    assert src.class_names == ["cat", "dog"] and src.labels.tolist() == [1, 0, 1]
    assert src.load(1).getpixel((0, 0)) == (2, 2, 2)
    assert src.fingerprint(2) == "missing"  # listed but absent: reported at decode time
    with pytest.raises(DecodeError, match="missing"):
        src.load(2)


def test_manifest_int_labels_and_no_labels(tmp_path):
    (tmp_path / "m.csv").write_text("label,path\n3,a.png\n5,b.png\n,c.png\n")
    src = open_source(tmp_path / "m.csv")
    assert src.labels.tolist() == [0, 1, -1] and src.class_names == ["3", "5"]
    (tmp_path / "n.csv").write_text("\ufeffPath\na.png\n")  # BOM, header case
    unlabelled = open_source(tmp_path / "n.csv", class_names=["x", "y"])
    assert unlabelled.labels.tolist() == [-1] and unlabelled.class_names == ["x", "y"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty manifest"),
        ("file,label\na.png,1\n", "line 1: no 'path' column"),
        ("path,label\n", "no rows after the header"),
        ("path,label\na.png,1\n,2\n", "line 3: empty path"),
        ("path\na.png\nb.png\n./a.png\n", "line 4: './a.png' already listed on line 2"),
        ("path,label\na.png,cat\nb.png,1\n", None),  # mixed: all read as class names
    ],
)
def test_manifest_errors(tmp_path, text, match):
    manifest = tmp_path / "bad.csv"
    manifest.write_text(text)
    if match is None:
        assert open_source(manifest).class_names == ["1", "cat"]
        return
    with pytest.raises(SourceError, match=match) as info:
        open_source(manifest)
    assert "bad.csv" in str(info.value)


# -- IDX -----------------------------------------------------------------------------------


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a-idx3-ubyte", arr)), arr)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b.gz", arr, compress=True)), arr)
    wide = np.array([[-2, 300]], dtype=np.int16)
    out = read_idx(write_idx(tmp_path / "w", wide))
    assert out.dtype == np.int16 and out.dtype.isnative and out.tolist() == [[-2, 300]]


def test_read_idx_errors(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x08\x03" + b"\x00" * 20)
    with pytest.raises(SourceError, match="bad-idx3-ubyte.*magic"):
        read_idx(bad)
    good = write_idx(tmp_path / "short-idx3-ubyte", np.zeros((2, 3, 4), dtype=np.uint8))
    good.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(SourceError, match="short-idx3-ubyte.*19 bytes.*needs 24"):
        read_idx(good)
    broken_gz = tmp_path / "broken-idx3-ubyte.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00" * 100)[:15])
    with pytest.raises(SourceError, match="broken-idx3-ubyte.gz"):
        read_idx(broken_gz)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_source_with_labels(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 255, (5, 4, 3), dtype=np.uint8)
    gz = ".gz" if compress else ""
    path = write_idx(tmp_path / f"train-images-idx3-ubyte{gz}", images, compress=compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{gz}", np.array([0, 2, 1, 2, 0], np.uint8),
              compress=compress)
    src = open_source(path)
    assert src.kind == "idx" and src.root == str(tmp_path)
    assert src.ids[1] == "train-images-idx3-ubyte[1]"  # same ids gzipped or not
    assert src.labels.tolist() == [0, 2, 1, 2, 0] and src.class_names == ["0", "1", "2"]
    assert src.samples[3] == Sample("train-images-idx3-ubyte[3]", 2, None, 3)
    img = src.load(4)
    assert img.mode == "RGB" and img.size == (3, 4)
    assert img.getpixel((2, 1))[0] == images[4, 1, 2]


def test_idx_without_labels_and_by_magic(tmp_path):
    path = write_idx(tmp_path / "pixels.bin", np.zeros((2, 5, 5), dtype=np.uint8))
    src = open_source(path)
    assert src.kind == "idx" and src.labels.tolist() == [-1, -1]
    labels_only = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(SourceError, match="not images"):
        open_source(labels_only)


def test_load_fashion_mnist(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8),
              compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3], np.uint8),
              compress=True)
    src = load_fashion_mnist(tmp_path, "test")
    assert src.class_names == FASHION_MNIST_CLASSES and src.labels.tolist() == [9, 0, 3]
    with pytest.raises(SourceError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(ConfigError):
        load_fashion_mnist(tmp_path, "valid")


# -- path lists and arrays -----------------------------------------------------------------


def test_paths_list_with_labels(tmp_path):
    a, b = png(tmp_path / "a.png", 5), png(tmp_path / "b.png", 6)
    src = open_source([str(a), b], labels=["y", "x"])
    assert src.kind == "paths" and src.root is None
    assert src.ids == [str(a), str(b)]
    assert src.class_names == ["x", "y"] and src.labels.tolist() == [1, 0]
    assert src.load(1).getpixel((0, 0)) == (6, 6, 6)
    assert open_source(a).ids == [str(a)]  # a single image file
    assert open_source([a]).labels.tolist() == [-1]


def test_label_length_mismatch(tmp_path):
    a = png(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="labels has 2 entries but the source has 1 samples"):
        open_source([a], labels=[0, 1])


def test_array_source(tmp_path):
    arr = np.zeros((3, 4, 5, 3), dtype=np.uint8)
    arr[1] = 9
    src = open_source(arr, labels=np.array([5, 1, 5]))
    assert src.kind == "array" and src.ids == ["array[0]", "array[1]", "array[2]"]
    assert src.class_names == ["1", "5"] and src.labels.tolist() == [1, 0, 1]
    assert src.load(1).getpixel((0, 0)) == (9, 9, 9) and src.load(0).size == (5, 4)
    fps = [src.fingerprint(i) for i in range(3)]
    assert fps[0] == fps[2] != fps[1] and fps[0].startswith("blake2b:") and len(fps[0]) == 24
    gray = open_source(np.zeros((2, 4, 5), dtype=np.uint8))
    assert gray.fingerprint(0) != open_source(np.zeros((2, 4, 5), np.uint16)).fingerprint(0)
    assert open_source([arr[0], arr[1]]).kind == "array"


@pytest.mark.parametrize(
    ("obj", "error", "match"),
    [
        (np.zeros((4, 5), dtype=np.uint8), ConfigError, r"arr\[None\]"),
        (np.zeros((2, 3, 8, 8), dtype=np.uint8), ConfigError, "channels first"),
        (np.full((2, 4, 4), 255.0), ConfigError, r"\[0, 1\]"),
        (np.zeros((0, 4, 4), dtype=np.uint8), ConfigError, "N >= 1"),
        (42, ConfigError, "int"),
        ({"a": 1}, ConfigError, "dict"),
        ([], SourceError, "empty"),
        ([1, 2], ConfigError, "file paths"),
    ],
)
def test_bad_objects(obj, error, match):
    with pytest.raises(error, match=match):
        open_source(obj)


def test_label_rules():
    assert encode_labels([0, 1, 1, -1])[0].tolist() == [0, 1, 1, -1]
    codes, names = encode_labels(["b", None, "a", ""])
    assert codes.tolist() == [1, -1, 0, -1] and names == ["a", "b"]
    assert encode_labels([2, 0], ["x", "y", "z"])[0].tolist() == [2, 0]
    with pytest.raises(ConfigError, match="0..1"):
        encode_labels([2], ["x", "y"])
    with pytest.raises(ConfigError, match="not in class_names"):
        encode_labels(["q"], ["x"])
    with pytest.raises(ConfigError, match="mix"):
        encode_labels(["a", 1])
    with pytest.raises(ConfigError, match="whole numbers"):
        open_source(np.zeros((1, 2, 2), np.uint8), labels=[0.5])


# -- ImageSource behaviour -----------------------------------------------------------------


def test_source_passthrough_and_relabel(class_folder):
    src = open_source(class_folder)
    assert open_source(src) is src
    relabelled = open_source(src, labels=["x", "y", "x"])
    assert relabelled.labels.tolist() == [0, 1, 0] and src.labels.tolist() == [0, 0, 1]
    reordered = open_source(src, class_names=["dog", "cat"])
    assert reordered.labels.tolist() == [1, 1, 0]


def test_labels_read_only(class_folder):
    src = open_source(class_folder)
    with pytest.raises(ValueError):
        src.labels[0] = 5


def test_subset(class_folder):
    src = open_source(class_folder)
    sub = src.subset([2, 0])
    assert sub.ids == ["dog/b.png", "cat/sub/a.PNG"] and sub.labels.tolist() == [1, 0]
    assert sub.class_names == src.class_names and sub.kind == "folder"
    assert sub.load(0).getpixel((0, 0)) == (10, 10, 10)
    assert src.subset(np.array([False, True, False])).ids == ["cat/z.png"]
    assert len(src.subset([])) == 0
    arr_src = open_source(np.arange(3 * 4, dtype=np.uint8).reshape(3, 2, 2))
    part = arr_src.subset([2])
    assert part.samples[0] == Sample("array[2]", -1, None, 2)
    assert part.fingerprint(0) == arr_src.fingerprint(2)


def test_pickle_round_trip(class_folder):
    for src in (open_source(class_folder),
                open_source(np.ones((2, 3, 3), np.uint8), labels=[1, 0])):
        src.samples  # noqa: B018 - builds the cached list, which must not travel
        data = pickle.dumps(src)
        clone = pickle.loads(data)
        assert clone.samples == src.samples and clone.class_names == src.class_names
        assert clone.kind == src.kind and clone.root == src.root
        assert clone.load(0).tobytes() == src.load(0).tobytes()
        assert b"Sample" not in data


def test_fingerprint_tracks_file_changes(tmp_path):
    path = png(tmp_path / "a.png", 1)
    src = open_source([path])
    first, first_hash = src.fingerprint(0), src.fingerprint(0, content_hash=True)
    size, mtime = (int(x) for x in first.split(":"))
    assert size == path.stat().st_size and mtime == path.stat().st_mtime_ns
    assert first_hash.startswith("sha256:") and len(first_hash) == 7 + 64

    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # touched: cheap fingerprint changes
    assert src.fingerprint(0) != first
    assert src.fingerprint(0, content_hash=True) == first_hash  # bytes did not

    png(path, 2, size=(6, 6))
    assert src.fingerprint(0) != first
    assert src.fingerprint(0, content_hash=True) != first_hash

    path.unlink()
    assert src.fingerprint(0) == "missing" == src.fingerprint(0, content_hash=True)


def test_image_source_constructor_validates():
    with pytest.raises(ConfigError, match="kind"):
        ImageSource([Sample("a", path="/a.png")], kind="zip")
    with pytest.raises(ConfigError, match="no path"):
        ImageSource([Sample("a")])
    src = ImageSource([Sample("a", 1, "/x/a.png")], ["n0", "n1"])
    assert repr(src) == "ImageSource(kind='paths', n=1, classes=2, root=None)"


# -- hostile folders, manifests and lists ---------------------------------------------------


def test_symlinked_folder_into_another_class_is_refused_naming_both(tmp_path):
    png(tmp_path / "cat" / "c.png", 1)
    png(tmp_path / "dog" / "d.png", 2)
    os.symlink("../dog", tmp_path / "cat" / "dogs")  # would give dog/d.png a second label
    with pytest.raises(SourceError, match=r"cat/dogs/d\.png and dog/d\.png are the same file"):
        open_source(tmp_path)


def test_symlinked_file_reached_twice_is_refused(tmp_path):
    png(tmp_path / "cat" / "c.png", 1)
    png(tmp_path / "dog" / "d.png", 2)
    os.symlink(tmp_path / "dog" / "d.png", tmp_path / "cat" / "also.png")
    with pytest.raises(SourceError, match=r"cat/also\.png and dog/d\.png are the same file"):
        open_source(tmp_path)


def test_symlinked_folder_outside_the_root_is_followed(tmp_path):
    png(tmp_path / "elsewhere" / "y.png", 3)
    png(tmp_path / "root" / "a" / "x.png", 1)
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "a" / "more")
    assert open_source(tmp_path / "root").ids == ["a/more/y.png", "a/x.png"]


def test_symlink_loop_and_fifo_in_a_class_folder_are_skipped_entries(tmp_path):
    png(tmp_path / "a" / "x.png", 1)
    png(tmp_path / "b" / "y.png", 2)
    os.symlink("loop2.jpg", tmp_path / "a" / "loop1.jpg")
    os.symlink("loop1.jpg", tmp_path / "a" / "loop2.jpg")
    os.mkfifo(tmp_path / "b" / "pipe.jpg")
    src = open_source(tmp_path)
    assert src.ids == ["a/loop1.jpg", "a/loop2.jpg", "a/x.png", "b/pipe.jpg", "b/y.png"]
    assert src.load(2).getpixel((0, 0)) == (1, 1, 1)
    for i, why in [(0, "symlink loop"), (1, "symlink loop"), (3, "not a regular file")]:
        with pytest.raises(DecodeError) as info:
            src.load_tensor(i)
        assert info.value.reason == why
    assert src.fingerprint(0) == "unreadable"  # os.stat cannot follow the loop either


def test_name_that_is_not_utf8_gets_a_utf8_id_and_keeps_its_path(tmp_path):
    folder = os.fsencode(tmp_path / "a")
    os.makedirs(folder)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(os.path.join(folder, b"caf\xe9.png"))
    png(tmp_path / "a" / "ok.png")
    src = open_source(tmp_path)
    assert src.ids == ["a/caf\\xe9.png", "a/ok.png"]
    src.ids[0].encode("utf-8")  # what HDF5's UTF-8 strings and the shard files need
    assert src.load(0).getpixel((0, 0)) == (9, 9, 9)
    os.rename(folder, os.fsencode(tmp_path / "a") + b"\xff")  # a class folder's name too
    src = open_source(tmp_path)
    assert src.class_names == ["a\\xff"] and src.ids == ["a\\xff/caf\\xe9.png", "a\\xff/ok.png"]
    assert src.load(0).getpixel((0, 0)) == (9, 9, 9)
    folder = os.fsencode(tmp_path / "a") + b"\xff"
    raw = os.fsdecode(os.path.join(folder, b"caf\xe9.png"))
    listed = open_source([raw])
    assert listed.ids == [os.fsencode(raw).decode("utf-8", "backslashreplace")]
    assert listed.load(0).getpixel((0, 0)) == (9, 9, 9)


def test_manifest_absolute_paths_are_used_as_they_are(tmp_path):
    png(tmp_path / "far" / "abs.png", 5)
    png(tmp_path / "data" / "rel.png", 6)
    png(tmp_path / "beside.png", 7)
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text(f"path\n{tmp_path / 'far' / 'abs.png'}\nrel.png\n../beside.png\n")
    src = open_source(manifest)
    assert src.ids == [str(tmp_path / "far" / "abs.png"), "rel.png", "../beside.png"]
    assert [src.load(i).getpixel((0, 0))[0] for i in range(3)] == [5, 6, 7]


def test_path_list_listing_a_file_twice_is_refused_before_a_store_is_written(tmp_path):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    src = open_source([str(a), str(b), str(a)])  # fine for prediction or resampling
    with pytest.raises(SourceError, match=rf"{a} is listed twice \(items 0 and 2\)"):
        src.require_unique_ids()
    open_source([str(a), str(b)]).require_unique_ids()


@pytest.mark.timeout(60)
def test_fifo_is_never_opened_to_sniff_or_hash(tmp_path):
    good = png(tmp_path / "a" / "x.png")
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    src = open_source([str(tmp_path / "a" / "pipe.jpg"), str(good)])
    assert src.fingerprint(0, content_hash=True) == "unreadable"  # --content-hash
    assert src.fingerprint(1, content_hash=True).startswith("sha256:")
    for name in ("pipe.csv", "pipe-idx3-ubyte", "pipe.jpg"):
        os.mkfifo(tmp_path / name)
        with pytest.raises(SourceError, match=f"{name}: not a folder or a regular file"):
            open_source(tmp_path / name)


# -- PIL images ----------------------------------------------------------------------------


def _pil_images() -> list[Image.Image]:
    """In-memory images of several modes and sizes, none of them plain RGB."""
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (5, 11), dtype=np.uint8), "L")
    deep = Image.fromarray(rng.integers(0, 65536, (6, 6)).astype(np.uint16))
    return [rgba, gray, gray.convert("P"), deep]


def test_pil_images_are_a_source_decoded_like_files(tmp_path):
    from featurepipe.decode import decode_image

    images = _pil_images()
    src = open_source(images, labels=["x", "y", "x", "y"])
    assert src.kind == "pil" and src.paths is None and src.array is None
    assert src.ids == ["image[0]", "image[1]", "image[2]", "image[3]"]
    assert src.labels.tolist() == [0, 1, 0, 1]
    for i, img in enumerate(images):  # the same pixels as the image written to a file and read
        path = tmp_path / f"{i}.png"
        img.save(path)
        from_file = np.asarray(decode_image(path))
        np.testing.assert_array_equal(np.asarray(src.load(i)), from_file)
        assert src.load_tensor(i).permute(1, 2, 0).numpy().tolist() == from_file.tolist()
    assert images[0].mode == "RGBA"  # the caller's image is left as it was
    part = pickle.loads(pickle.dumps(src.subset([3, 1])))
    assert part.kind == "pil" and part.ids == ["image[3]", "image[1]"]
    np.testing.assert_array_equal(np.asarray(part.load(0)), np.asarray(src.load(3)))


def test_pil_image_fingerprint_follows_the_pixels():
    a, b, _, _ = _pil_images()
    src = open_source([a, a.copy(), b, a.rotate(90, expand=True)])
    fps = [src.fingerprint(i) for i in range(4)]
    assert fps[0] == fps[1] and len(set(fps)) == 3 and fps[0].startswith("blake2b:")
    changed = a.copy()
    changed.putpixel((0, 0), (1, 2, 3, 4))
    assert open_source([changed]).fingerprint(0) != fps[0]


def test_pil_image_with_exif_orientation_is_turned_upright(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif.tobytes())
    with Image.open(tmp_path / "r.png") as opened:
        src = open_source([opened])
        upright = src.load(0)
        assert opened.size == (12, 8)
    assert upright.size == (8, 12)


def test_bad_pil_images_raise_decode_errors_naming_them(tmp_path):
    import io

    buf = io.BytesIO()
    noise = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")  # cut in half: the header stays whole
    cut = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))
    src = open_source([Image.new("RGB", (1010, 10)), cut])
    assert len({src.fingerprint(0), src.fingerprint(1)}) == 2  # hashing never raises
    with pytest.raises(DecodeError, match=r"^image\[0\]: aspect ratio 1010:10 over the limit"):
        src.load(0)
    with pytest.raises(DecodeError, match=r"^image\[1\]: truncated$"):
        src.load_tensor(1)


def test_a_list_mixing_pil_images_and_paths_is_refused(tmp_path):
    path = png(tmp_path / "a.png")
    with pytest.raises(ConfigError, match=r"holds a PosixPath at position 1; pass one kind"):
        open_source([Image.new("L", (3, 3)), path])
    with pytest.raises(ConfigError, match=r"one PIL image\? pass a list"):
        open_source(Image.new("L", (3, 3)))

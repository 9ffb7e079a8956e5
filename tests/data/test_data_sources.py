"""Image sources: Parquet tables of encoded images, class sub-folders, and the layout dispatch.

Images are tiny PNGs made here (every test knows the exact pixels it wrote), so the tests need no files;
the two that read ../shared use the ``shared_dir`` fixture and skip without it.

    python -m pytest tests/data/test_data_sources.py -q
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cap_dist.data import (
    ImageDecodeError,
    LabelledImageFolder,
    build_image_transform,
    iter_image_batches,
    preprocess_mnist,
)
from cap_dist.data.images import ClassImageFolder, scan_class_folders
from cap_dist.data.parquet import ParquetColumnError, ParquetImageDataset, write_image_parquet
from cap_dist.data.sources import MnistDataset, UnknownImageLayoutError, open_image_dataset

SPEC = {"size": 8, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(data: bytes, spec: dict = SPEC) -> torch.Tensor:
    return build_image_transform(spec)(Image.open(io.BytesIO(data)))


@pytest.fixture()
def memory_root() -> Iterator[str]:
    root = f"memory://capdist-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


# --------------------------------------------------------------------------------------------------------
# Parquet


@pytest.mark.parametrize("where", ["local", "file_uri", "memory"])
def test_parquet_round_trip(where: str, tmp_path: Path, memory_root: str) -> None:
    images = [_png(i) for i in range(10)]
    labels = [i % 4 for i in range(10)]
    uri = {"local": str(tmp_path / "set.parquet"), "file_uri": f"file://{tmp_path}/set.parquet",
           "memory": f"{memory_root}/set.parquet"}[where]
    write_image_parquet(uri, images, labels, row_group_size=3)
    data = ParquetImageDataset(uri, SPEC)
    assert len(data) == 10 and data.has_labels and data.num_rows == 10
    for i in (0, 4, 9):
        image, label = data[i]
        assert image.shape == (3, 8, 8) and label == labels[i]
        assert torch.equal(image, _expected(images[i]))
    batches = list(iter_image_batches(data, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == labels
    if where == "local":
        assert [p.name for p in tmp_path.iterdir()] == ["set.parquet"]  # no temporary file left behind
        assert pq.ParquetFile(uri).metadata.num_row_groups == 4


def test_parquet_row_subset_reads_only_needed_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = [_png(i) for i in range(12)]
    uri = str(tmp_path / "set.parquet")
    write_image_parquet(uri, images, list(range(12)), row_group_size=4)
    reads: list[tuple[int, list[str] | None]] = []
    original = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, columns: list[str] | None = None, **kw: object) -> pa.Table:
        reads.append((i, columns))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    data = ParquetImageDataset(uri, SPEC, indices=[5, 6, 4])
    assert len(data) == 3 and data.labels.tolist() == [5, 6, 4]
    for position, row in enumerate([5, 6, 4]):
        image, label = data[position]
        assert label == row and torch.equal(image, _expected(images[row]))
    assert reads == [(1, ["image"])]  # one image row group, one column, read once for all three rows
    with pytest.raises(IndexError, match="outside the 12 rows"):
        ParquetImageDataset(uri, SPEC, indices=[3, 12])


def test_parquet_folder_numbers_rows_across_sorted_files(tmp_path: Path, memory_root: str) -> None:
    images = [_png(i) for i in range(7)]
    for root in (str(tmp_path / "parts"), f"{memory_root}/parts"):
        write_image_parquet(f"{root}/part-1.parquet", images[4:], [4, 5, 6], row_group_size=2)
        write_image_parquet(f"{root}/part-0.parquet", images[:4], [0, 1, 2, 3], row_group_size=2)
        data = ParquetImageDataset(root, SPEC, indices=[6, 0, 3, 4])
        assert data.labels.tolist() == [6, 0, 3, 4] and data.num_rows == 7
        assert torch.equal(data[0][0], _expected(images[6])) and torch.equal(data[3][0], _expected(images[4]))
        assert data.records[0].file == "part-1.parquet#row2"


def test_parquet_without_labels_and_hugging_face_struct_column(tmp_path: Path) -> None:
    images = [_png(i) for i in range(3)]
    uri = str(tmp_path / "unlabelled.parquet")
    write_image_parquet(uri, images)
    data = ParquetImageDataset(uri, SPEC)
    assert not data.has_labels and data.labels.tolist() == [-1, -1, -1] and data[1][1] == -1
    hf = str(tmp_path / "hf.parquet")
    struct = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)])
    pq.write_table(pa.table({"image": struct, "label": pa.array([7, 8, 9], pa.int16())}), hf)
    data = ParquetImageDataset(hf, SPEC)
    assert data.labels.tolist() == [7, 8, 9] and torch.equal(data[2][0], _expected(images[2]))


def test_parquet_missing_column_names_the_existing_ones(tmp_path: Path) -> None:
    uri = str(tmp_path / "set.parquet")
    write_image_parquet(uri, [_png(0), _png(1)], [0, 1], image_column="jpeg", label_column="cls")
    with pytest.raises(ParquetColumnError, match=r"no image column 'image'; its columns are \['jpeg', 'cls'\]"):
        ParquetImageDataset(uri, SPEC)
    with pytest.raises(ParquetColumnError, match=r"no label column 'target'.*\['jpeg', 'cls'\]"):
        ParquetImageDataset(uri, SPEC, image_column="jpeg", label_column="target")
    assert ParquetImageDataset(uri, SPEC, image_column="jpeg", label_column="cls").labels.tolist() == [0, 1]
    with pytest.raises(ParquetColumnError, match="expected binary"):
        ParquetImageDataset(uri, SPEC, image_column="cls")


def test_parquet_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ParquetImageDataset(str(tmp_path / "absent.parquet"), SPEC)
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        ParquetImageDataset(str(tmp_path), SPEC)
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        ParquetImageDataset(str(tmp_path / "broken.parquet"), SPEC)


def test_parquet_undecodable_image_raises_or_is_skipped_and_counted(tmp_path: Path) -> None:
    images = [_png(0), _png(1), b"not an image", _png(3), _png(4)]
    uri = str(tmp_path / "set.parquet")
    write_image_parquet(uri, images, [0, 1, 2, 3, 4], row_group_size=2)
    data = ParquetImageDataset(uri, SPEC)
    with pytest.raises(ImageDecodeError, match=r"set.parquet#row2"):
        data[2]
    with pytest.raises(ImageDecodeError):
        list(iter_image_batches(data, batch_size=2))
    with pytest.warns(RuntimeWarning, match=r"skipped 1 undecodable image\(s\).*set.parquet#row2"):
        batches = list(iter_image_batches(data, batch_size=2, skip_bad=True))
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 3, 4]


def test_parquet_dataset_pickles_for_dataloader_workers(tmp_path: Path) -> None:
    images = [_png(i) for i in range(4)]
    uri = str(tmp_path / "set.parquet")
    write_image_parquet(uri, images, [0, 1, 2, 3])
    data = ParquetImageDataset(uri, SPEC, indices=[3, 1])
    data[0]  # opens the file and fills the row-group cache, neither of which may be pickled
    copy = pickle.loads(pickle.dumps(data))
    assert torch.equal(copy[1][0], _expected(images[1])) and copy[0][1] == 3


def test_write_image_parquet_rejects_bad_input(tmp_path: Path) -> None:
    uri = str(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no images"):
        write_image_parquet(uri, [])
    with pytest.raises(ValueError, match="2 labels for 1 images"):
        write_image_parquet(uri, [_png(0)], [0, 1])
    with pytest.raises(ValueError, match="not encoded bytes"):
        write_image_parquet(uri, ["a.png"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not integers"):
        write_image_parquet(uri, [_png(0)], [0.5])  # type: ignore[list-item]
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------
# Class sub-folders (ImageFolder layout)


def _class_folder(root: Path) -> dict[str, bytes]:
    written = {"cat/a.png": _png(10), "cat/sub/b.PNG": _png(11), "dog/c.png": _png(12), "emu/d.png": _png(13)}
    for name, data in written.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    (root / ".cache" / "e.png").write_bytes(_png(14))
    (root / "README.md").write_text("a file at the top level is ignored")
    return written


def test_class_image_folder(tmp_path: Path) -> None:
    written = _class_folder(tmp_path)
    data = ClassImageFolder(str(tmp_path), SPEC)
    assert data.classes == ["cat", "dog", "emu"] and data.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    assert [(r.file, r.label) for r in data.records] == [("cat/a.png", 0), ("cat/sub/b.PNG", 0),
                                                         ("dog/c.png", 1), ("emu/d.png", 2)]
    image, label = data[2]
    assert label == 1 and torch.equal(image, _expected(written["dog/c.png"]))
    assert [r.label for r in ClassImageFolder(str(tmp_path), SPEC, indices=[3, 0]).records] == [2, 0]
    images, labels = next(iter_image_batches(data, batch_size=8))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 2]
    (tmp_path / "cat" / "a.png").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match=r"skipped 1 .*cat/a.png"):
        assert len(torch.cat([b[1] for b in iter_image_batches(data, 8, skip_bad=True)])) == 3


def test_class_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_class_folders(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_class_folders(str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="hold no image files"):
        ClassImageFolder(str(tmp_path), SPEC)


# --------------------------------------------------------------------------------------------------------
# Dispatch


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _mnist_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    digits = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _idx(root / "t10k-images-idx3-ubyte.gz", 2051, digits)
    _idx(root / "t10k-labels-idx1-ubyte.gz", 2049, labels)
    return digits, labels


def test_open_image_dataset_picks_the_reader(tmp_path: Path, memory_root: str) -> None:
    write_image_parquet(str(tmp_path / "one.parquet"), [_png(0)], [0])
    assert isinstance(open_image_dataset(str(tmp_path / "one.parquet"), SPEC), ParquetImageDataset)
    write_image_parquet(f"{memory_root}/parts/p0.parquet", [_png(0), _png(1)], [0, 1])
    parts = open_image_dataset(f"{memory_root}/parts", SPEC, indices=[1])
    assert isinstance(parts, ParquetImageDataset) and parts.labels.tolist() == [1]

    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / "x.png").write_bytes(_png(5))
    with open(labelled / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "label"], ["x.png", "42"]])
    data = open_image_dataset(str(labelled), SPEC)
    assert type(data) is LabelledImageFolder and data[0][1] == 42

    _class_folder(tmp_path / "classes")
    assert isinstance(open_image_dataset(str(tmp_path / "classes"), SPEC), ClassImageFolder)

    digits, labels = _mnist_folder(tmp_path / "mnist")
    mnist_spec = {"size": 28, "channels": 1, "scale": "x/255", "mean": [0.1307], "std": [0.3081]}
    mnist = open_image_dataset(str(tmp_path / "mnist"), mnist_spec, indices=[4, 0])
    assert isinstance(mnist, MnistDataset) and len(mnist) == 2 and mnist[0][1] == 5
    native = preprocess_mnist(torch.from_numpy(digits), mnist_spec)
    assert torch.equal(mnist[1][0], native[0]) and mnist.records[0].file.endswith("#row4")
    rgb = MnistDataset(str(tmp_path / "mnist"), {"size": 32, "resize_short_side": 32, "mean": [0.5] * 3,
                                                 "std": [0.5] * 3})
    assert rgb[0][0].shape == (3, 32, 32)
    assert torch.cat([b[1] for b in iter_image_batches(mnist, 2)]).tolist() == [5, 3]


def test_open_image_dataset_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(UnknownImageLayoutError, match=r"matches no layout[\s\S]*labels.csv[\s\S]*<class>"):
        open_image_dataset(str(tmp_path), SPEC)
    with pytest.raises(UnknownImageLayoutError, match="not a .parquet file"):
        open_image_dataset(str(tmp_path / "notes.txt"), SPEC)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_image_dataset(str(tmp_path / "absent"), SPEC)
    write_image_parquet(str(tmp_path / "p" / "a.parquet"), [_png(0)])
    with pytest.raises(TypeError, match=r"ParquetImageDataset.*unexpected option\(s\) \['split'\]"):
        open_image_dataset(str(tmp_path / "p"), SPEC, split="train")
    with pytest.raises(ValueError, match="mean and std"):
        open_image_dataset(str(tmp_path / "p"), {"size": 8})


def test_shared_data_through_the_dispatch_and_parquet(shared_dir: Path, tmp_path: Path) -> None:
    spec = {"resize_short_side": 64, "interpolation": "bicubic", "center_crop": 56, "mean": [0.5] * 3,
            "std": [0.5] * 3}
    root = shared_dir / "data" / "imagenet-samples"
    folder = open_image_dataset(str(root), spec, indices=range(6))
    assert isinstance(folder, LabelledImageFolder)
    images = [(root / r.file).read_bytes() for r in folder.records]
    write_image_parquet(str(tmp_path / "samples.parquet"), images, [r.label for r in folder.records])
    packed = open_image_dataset(str(tmp_path / "samples.parquet"), spec)
    for i in range(6):
        assert torch.equal(packed[i][0], folder[i][0]) and packed[i][1] == folder[i][1]
    mnist = open_image_dataset(str(shared_dir / "data" / "mnist"), {"size": 28, "channels": 1, "scale": "x/255",
                                                                    "mean": [0.1307], "std": [0.3081]})
    assert isinstance(mnist, MnistDataset) and len(mnist) == 10000

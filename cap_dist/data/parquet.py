"""Encoded images (JPEG/PNG bytes) in Parquet tables, read from any fsspec URI.

Millions of small image files are slow to list and fetch from object stores; a few Parquet files holding the
encoded bytes are not, and a reader can fetch just one column of just the row groups it needs. This module
reads such tables (one file, or a folder of ``*.parquet`` parts) into a torch ``Dataset`` that decodes and
preprocesses exactly as :mod:`cap_dist.data.images` does, and writes them atomically.

    write_image_parquet("s3://bucket/calib.parquet", [open(p, "rb").read() for p in files], labels)
    data = ParquetImageDataset("s3://bucket/calib.parquet", spec.input, indices=sample_indices(n, 256, 0))
    for images, labels in iter_image_batches(data, batch_size=32, skip_bad=True):
        ...

Layout: a binary column of encoded images (default ``image``; a Hugging Face ``struct<bytes, path>`` image
column also works) and an optional integer column of class indices (default ``label``). Rows without a label
read as label ``-1``. Rows are numbered across the files of a folder in sorted path order.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from torch.utils.data import Dataset

from cap_dist.data.images import ImageRecord, build_image_transform, decode_image_bytes
from cap_dist.storage import atomic_write_bytes

DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_LABEL_COLUMN = "label"
PARQUET_SUFFIX = ".parquet"
UNLABELLED = -1
DEFAULT_ROW_GROUP_SIZE = 256


class ParquetColumnError(ValueError):
    """A Parquet table lacks a column the reader was told to use, or the column has the wrong type."""


class RowRecords(Sequence[ImageRecord]):
    """A lazy list of :class:`ImageRecord` (``file`` names the row) built from a label array on demand.

    Datasets of many rows keep only the integer labels in memory; :func:`~cap_dist.data.iter_image_batches`
    still sees ``dataset.records[i].file`` / ``.label`` as it does for a labelled folder.
    """

    def __init__(self, labels: np.ndarray, names: Sequence[str], name_of_row: np.ndarray, row_in_name: np.ndarray,
                 ) -> None:
        self._labels = labels
        self._names = names
        self._name_of_row = name_of_row
        self._row_in_name = row_in_name

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @overload
    def __getitem__(self, index: int) -> ImageRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[ImageRecord]: ...

    def __getitem__(self, index: int | slice) -> ImageRecord | list[ImageRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} is outside the {len(self)} rows")
        name = self._names[int(self._name_of_row[i])]
        return ImageRecord(f"{name}#row{int(self._row_in_name[i])}", int(self._labels[i]))

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self[i] for i in range(len(self)))


def _arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow's native clients where they exist: local files, and S3 (with the configured endpoint override,
    see :mod:`cap_dist.storage`), whose ranged row-group reads beat the fsspec bridge; the bridge otherwise."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:
        from cap_dist.storage import arrow_s3

        return arrow_s3()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _parquet_parts(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str], list[str], bool]:
    """``(fs, paths, names, single)``: the Parquet file at ``uri``, or every ``*.parquet`` under the folder
    ``uri`` (recursively, sorted; hidden and ``_``-prefixed entries skipped). ``names`` are relative to the
    folder (the base name for a single file).

    Raises:
        FileNotFoundError: nothing at ``uri``, or a folder without ``.parquet`` files.
    """
    fs, path = fsspec.core.url_to_fs(str(uri))
    if fs.isfile(path):
        return fs, [path], [path.rstrip("/").split("/")[-1]], True
    if not fs.isdir(path):
        raise FileNotFoundError(f"Parquet source {uri} does not exist; pass a .parquet file or a folder of them")
    base = path.rstrip("/")
    paths, names = [], []
    for found in sorted(fs.find(path)):
        relative = found[len(base):].lstrip("/") if found.startswith(base) else found.split("/")[-1]
        if relative.lower().endswith(PARQUET_SUFFIX) and not any(
                part.startswith((".", "_")) for part in relative.split("/")):
            paths.append(found)
            names.append(relative)
    if not paths:
        raise FileNotFoundError(f"folder {uri} holds no {PARQUET_SUFFIX} files")
    return fs, paths, names, False


def _image_bytes_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The encoded-bytes array of an image column (plain binary, or a struct with a ``bytes`` field)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(array.type):
        array = array.field("bytes")
    return array


def _check_image_type(kind: pa.DataType, column: str, where: str) -> None:
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        if index >= 0 and _is_binary(kind.field(index).type):
            return
    elif _is_binary(kind):
        return
    raise ParquetColumnError(f"column {column!r} of {where} has type {kind}; expected binary (encoded JPEG/PNG bytes) "
                     "or a struct with a binary 'bytes' field")


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


class ParquetImageDataset(Dataset):
    """Encoded images in Parquet, decoded with PIL and preprocessed per the model spec.

    ``dataset[i]`` returns ``(image [C, H, W] float32, label)`` (label ``-1`` for unlabelled rows) and raises
    :class:`~cap_dist.data.ImageDecodeError` for a null or undecodable image; :func:`iter_image_batches` with
    ``skip_bad=True`` leaves those out and warns once with their count, as for image folders.

    Only the image column of the row groups that hold the selected rows is read, one row group at a time,
    and the last one is kept: reading in index order (or any row-group-ordered order) fetches each needed
    row group once; random order may fetch a row group per item. The label column is read at construction,
    for the selected row groups only. The dataset pickles without open files, so DataLoader workers work.

    Args:
        uri: a ``.parquet`` file or a folder of them (local path, ``file://``, ``s3://``, ``memory://``, ...).
        input_spec: the model spec's ``input`` dict (see :func:`~cap_dist.data.build_image_transform`).
        image_column: the column of encoded image bytes.
        label_column: the integer label column; ``None`` ignores labels. The default name may be absent
            (the table is then unlabelled); any other name must exist.
        indices: global rows (numbered across files in sorted path order) to use, in this order (default all).
    """

    def __init__(self, uri: str, input_spec: Mapping[str, Any], image_column: str = DEFAULT_IMAGE_COLUMN,
                 label_column: str | None = DEFAULT_LABEL_COLUMN, indices: Sequence[int] | None = None) -> None:
        self.uri = str(uri)
        self.root = self.uri.rstrip("/") or self.uri
        self.image_column = image_column
        self.transform = build_image_transform(input_spec)
        self._fs, self.files, self._names, self._single = _parquet_parts(self.uri)
        self._arrow_fs = _arrow_filesystem(self._fs)
        metas = [self._open(i).metadata for i in range(len(self.files))]
        label_present = self._check_schema(label_column)
        self.label_column = label_column if label_present else None
        self.has_labels = label_present

        # Row numbering: where each file starts, and where each row group starts inside its file.
        file_start = np.concatenate([[0], np.cumsum([m.num_rows for m in metas])]).astype(np.int64)
        self._group_starts = [np.concatenate([[0], np.cumsum([m.row_group(g).num_rows
                                                              for g in range(m.num_row_groups)])]).astype(np.int64)
                              for m in metas]
        self.num_rows = int(file_start[-1])
        if indices is None:
            rows = np.arange(self.num_rows, dtype=np.int64)
        else:
            rows = np.asarray([int(i) for i in indices], dtype=np.int64).reshape(-1)
            bad = rows[(rows < 0) | (rows >= self.num_rows)]
            if bad.size:
                raise IndexError(f"indices {bad[:5].tolist()} are outside the {self.num_rows} rows of {self.uri}")
        self._file_of = (np.searchsorted(file_start, rows, side="right") - 1).astype(np.int64)
        local = rows - file_start[self._file_of]
        self._group_of = np.zeros_like(rows)
        self._offset_in_group = np.zeros_like(rows)
        for f in np.unique(self._file_of):
            mask = self._file_of == f
            groups = np.searchsorted(self._group_starts[f], local[mask], side="right") - 1
            self._group_of[mask] = groups
            self._offset_in_group[mask] = local[mask] - self._group_starts[f][groups]
        self.rows = rows
        self._row_in_file = local
        self.labels = self._read_labels(local)
        self.records = RowRecords(self.labels, self._names, self._file_of, local)
        self._cached_key: tuple[int, int] | None = None
        self._cached_images: pa.Array | None = None

    # -- construction helpers ------------------------------------------------------------------------------

    def _open(self, file_index: int) -> pq.ParquetFile:
        """The (cached) ParquetFile of one part; opened lazily so the dataset pickles without handles."""
        cache: dict[int, pq.ParquetFile] = self.__dict__.setdefault("_parquet_files", {})
        if file_index not in cache:
            path = self.files[file_index]
            try:
                cache[file_index] = pq.ParquetFile(path, filesystem=self._arrow_fs)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"Parquet file {self._where(file_index)} does not exist") from err
            except (pa.ArrowInvalid, OSError) as err:
                raise ValueError(f"{self._where(file_index)} is not a readable Parquet file: {err}") from err
        return cache[file_index]

    def _where(self, file_index: int) -> str:
        return self.uri if self._single else f"{self.root}/{self._names[file_index]}"

    def _check_schema(self, label_column: str | None) -> bool:
        """Check every part has the image column (and the label column); return whether labels exist."""
        label_found: list[bool] = []
        for i in range(len(self.files)):
            schema = self._open(i).schema_arrow
            names = schema.names
            if self.image_column not in names:
                raise ParquetColumnError(f"{self._where(i)} has no image column {self.image_column!r}; its columns "
                                         f"are {names}; pass image_column=<one of them>")
            _check_image_type(schema.field(self.image_column).type, self.image_column, self._where(i))
            if label_column is None:
                continue
            if label_column in names:
                kind = schema.field(label_column).type
                if not pa.types.is_integer(kind):
                    raise ParquetColumnError(f"label column {label_column!r} of {self._where(i)} has type {kind}; "
                                             "expected integer class indices (or pass label_column=None to ignore it)")
                label_found.append(True)
            elif label_column != DEFAULT_LABEL_COLUMN:
                raise ParquetColumnError(f"{self._where(i)} has no label column {label_column!r}; its columns are "
                                         f"{names}; pass label_column=<one of them>, or None for an unlabelled table")
            else:
                label_found.append(False)
        if any(label_found) and not all(label_found):
            missing = [self._where(i) for i, found in enumerate(label_found) if not found]
            raise ParquetColumnError(f"label column {label_column!r} is in some parts of {self.uri} but not in "
                                     f"{missing[:3]}; label all parts, or pass label_column=None")
        return bool(label_found) and all(label_found)

    def _read_labels(self, local_rows: np.ndarray) -> np.ndarray:
        """Labels of the selected rows, reading the label column of only the row groups that hold them."""
        labels = np.full(local_rows.shape[0], UNLABELLED, dtype=np.int64)
        if self.label_column is None:
            return labels
        for f in np.unique(self._file_of):
            in_file = np.flatnonzero(self._file_of == f)
            groups = np.unique(self._group_of[in_file])
            table = self._open(int(f)).read_row_groups(groups.tolist(), columns=[self.label_column])
            values = table.column(self.label_column).combine_chunks()
            values = values.fill_null(UNLABELLED).to_numpy(zero_copy_only=False).astype(np.int64)
            # Position of each selected row inside the concatenation of the groups read.
            group_sizes = np.diff(self._group_starts[f])[groups]
            group_base = np.concatenate([[0], np.cumsum(group_sizes)])[:-1]
            position = group_base[np.searchsorted(groups, self._group_of[in_file])] + self._offset_in_group[in_file]
            labels[in_file] = values[position]
        return labels

    # -- Dataset ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._position(index)
        return self.transform(self.open_image(index)), int(self.labels[index])

    def _position(self, index: int) -> int:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {index} is outside the {len(self)} rows of this dataset")
        return i + len(self) if i < 0 else i

    def image_bytes(self, index: int) -> bytes | None:
        """The encoded bytes of item ``index`` (``None`` for a null cell), as stored."""
        index = self._position(index)
        f, g = int(self._file_of[index]), int(self._group_of[index])
        if self._cached_key != (f, g) or self._cached_images is None:
            table = self._open(f).read_row_group(g, columns=[self.image_column])
            self._cached_images = _image_bytes_array(table.column(self.image_column))
            self._cached_key = (f, g)
        return self._cached_images[int(self._offset_in_group[index])].as_py()

    def open_image(self, index: int) -> Image.Image:
        """Decode item ``index`` fully; raises ImageDecodeError naming the file and row."""
        index = self._position(index)
        where = f"{self._where(int(self._file_of[index]))}#row{int(self._row_in_file[index])}"
        return decode_image_bytes(self.image_bytes(index), where)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_parquet_files", None)
        state["_cached_key"] = None
        state["_cached_images"] = None
        state["_arrow_fs"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arrow_fs = _arrow_filesystem(self._fs)


def write_image_parquet(uri: str, images: Sequence[bytes], labels: Sequence[int] | None = None, *,
                        image_column: str = DEFAULT_IMAGE_COLUMN, label_column: str = DEFAULT_LABEL_COLUMN,
                        row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> None:
    """Write encoded images (and labels) as one Parquet file at ``uri``, atomically.

    The table is built in memory and moved into place under its final name only when complete, so a reader
    never sees a half-written file. Small row groups (``row_group_size`` rows) keep reads of a few rows cheap.

    Raises:
        ValueError: no images, an image that is not bytes, labels of another length or not integers.
    """
    if len(images) == 0:
        raise ValueError(f"no images to write to {uri}; pass at least one encoded image")
    if row_group_size <= 0:
        raise ValueError(f"row_group_size={row_group_size} must be positive")
    bad = [i for i, data in enumerate(images) if not isinstance(data, (bytes, bytearray, memoryview))]
    if bad:
        raise ValueError(f"images {bad[:5]} are {type(images[bad[0]]).__name__}, not encoded bytes; "
                         "pass the file contents (e.g. open(path, 'rb').read())")
    columns: dict[str, pa.Array] = {image_column: pa.array([bytes(d) for d in images], type=pa.binary())}
    if labels is not None:
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images; pass one label per image")
        wrong = [i for i, y in enumerate(labels) if isinstance(y, bool) or not isinstance(y, (int, np.integer))]
        if wrong:
            raise ValueError(f"labels {wrong[:5]} are not integers (e.g. {labels[wrong[0]]!r}); pass class indices")
        if label_column == image_column:
            raise ValueError(f"image and label columns are both named {image_column!r}")
        columns[label_column] = pa.array([int(y) for y in labels], type=pa.int64())
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=row_group_size)
    atomic_write_bytes(str(uri), buffer.getvalue())

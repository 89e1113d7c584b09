"""Loaders for users' text-to-image training data.

(Over ~400 lines on purpose: one reader per accepted format, each short, behind the one
:func:`open_dataset` entry point whose spec grammar is documented here; splitting them into
files would scatter that one grammar.)

:func:`open_dataset` turns one *spec* string into a :class:`TextImageDataset`: an
iterable of ``(PIL.Image RGB, caption)`` pairs, every image resized so its shorter
side is ``resolution`` and then cropped to ``resolution x resolution``. Accepted specs,
tried in this order:

1. The built-in procedural set::

       scenes                  # slimsd.data.scenes, training split
       scenes:heldout          # held-out split

2. Webdataset tar shards (a path, glob or brace pattern ending in ``.tar``), always
   streamed; each sample's image is its ``jpg``/``jpeg``/``png``/``webp`` member and its
   caption the ``txt`` member or ``json["caption"]``::

       shards/{00000..00009}.tar
       /data/laion/*.tar

3. A ``.csv`` or ``.jsonl`` table with an image-path column (relative paths are resolved
   against the table's folder) and a caption column::

       captions.csv            # image,text\\nimgs/cat.png,a cat on a mat
       train.jsonl             # {"file_name": "a.jpg", "caption": "..."}

4. A folder of images, captioned either by a ``metadata.jsonl`` / ``metadata.csv``
   in the folder (Hugging Face *imagefolder* convention: a ``file_name`` column plus a
   caption column) or by a sidecar ``name.txt`` next to each ``name.png/jpg/jpeg/webp``::

       my_photos/

5. Anything else goes to Hugging Face ``datasets``: a directory written by
   ``Dataset.save_to_disk`` (it holds ``dataset_info.json`` / ``state.json``) is read with
   ``load_from_disk``; other names with ``load_dataset(spec, split=split,
   streaming=streaming)``, streamed by default so LAION-scale sets are never
   downloaded whole::

       ./my_saved_dataset
       lambdalabs/naruto-blip-captions

Column names are auto-detected (``image``, ``image_path``, ``file_name``, ``path``,
``img`` / ``text``, ``caption``, ``prompt``, case-insensitively) unless
``image_column`` / ``caption_column`` are given. Image URLs are refused: nothing is
downloaded at train time, fetch the images first (e.g. with img2dataset).

Local tables and folders are validated when opened (a missing file is an error that
names it and its row). Files that exist but cannot be decoded are skipped during
iteration with a warning naming them, counted in :attr:`TextImageDataset.skipped`,
so one bad file never ends an epoch.

``datasets`` and ``webdataset`` are optional: ``pip install "slimsd[data]"``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slimsd.data.scenes import SceneDataset, to_tensor

__all__ = ["TextImageDataset", "UnsupportedImageError", "collate", "open_dataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Candidate column names, most specific first; matched case-insensitively.
IMAGE_COLUMNS = ("image", "image_path", "file_name", "path", "img", "filename", "image_file")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions", "txt", "description")
# webdataset member suffixes
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_CAPTION_KEYS = ("txt", "caption", "text")
_URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "ftp://")
_INSTALL_HINT = 'pip install "slimsd[data]"'

# Errors that mean "this one image is unreadable". Decoders raise a zoo of them
# (truncated PNG: OSError; bad JPEG header: SyntaxError; some codecs: ValueError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnsupportedImageError(ValueError):
    """An image reference we refuse on principle (a URL), as opposed to a bad file.

    Not skipped like corrupt files: every row of such a dataset would fail, so the
    user must hear about it at once.
    """


@dataclass(frozen=True)
class _Record:
    """One undecoded sample: ``image`` is a PIL image, raw bytes or a file path."""

    image: Any
    caption: str
    where: str  # human-readable origin for warnings: a path, "shard.tar:key", "name[3]"


# --------------------------------------------------------------------------- images


def _require(module: str):
    """Import an optional dependency, or say how to install it."""
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"this dataset needs the optional package {module!r}: {_INSTALL_HINT}") from err


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(_URL_PREFIXES)


def _refuse_url(value: str, where: str) -> None:
    raise UnsupportedImageError(
        f"{where}: image is a URL ({value[:80]!r}); slimsd does not download images at train "
        "time. Download them first (e.g. with img2dataset, to webdataset shards) and point "
        "open_dataset at the result."
    )


def _image_source(value: Any, where: str) -> Any:
    """Normalise an image cell (PIL / bytes / path / HF ``{"bytes", "path"}`` dict)."""
    if isinstance(value, dict):  # datasets.Image(decode=False) cells
        value = value.get("bytes") or value.get("path")
    if _is_url(value):
        _refuse_url(value, where)
    return value


def _open_image(src: Any, resolution: int) -> Image.Image:
    """Decode ``src`` fully to an RGB image; raises one of ``_DECODE_ERRORS`` if unreadable."""
    if isinstance(src, Image.Image):
        im = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        try:
            im = Image.open(io.BytesIO(bytes(src)))
        except Image.UnidentifiedImageError:
            # PIL's message would name an anonymous BytesIO; the caller names the sample
            raise OSError("not a recognised image format") from None
    elif isinstance(src, (str, os.PathLike)):
        im = Image.open(src)
    else:
        raise ValueError(f"no image (got {type(src).__name__})")
    if im.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the
        # target: big photos then decode several times faster.
        scale = resolution / min(im.size)
        im.draft("RGB", (max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    im.load()  # decode now, so truncated files fail here and not in the trainer
    return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency composited over white (not the black ``convert`` gives)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _resize_crop(im: Image.Image, resolution: int, rng: np.random.Generator | None) -> Image.Image:
    """Shorter side to ``resolution``, then a centre crop (``rng`` None) or a random one."""
    w, h = im.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        if size != (w, h):
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        w, h = im.size
        if rng is None:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:
            left, top = int(rng.integers(w - resolution + 1)), int(rng.integers(h - resolution + 1))
        im = im.crop((left, top, left + resolution, top + resolution))
    return im


# --------------------------------------------------------------------------- dataset


class TextImageDataset:
    """Iterable of ``(PIL.Image RGB of resolution x resolution, caption)`` pairs.

    Map-style sets (``scenes``, local folders and tables, non-streamed HF sets) also
    have ``len()`` and ``ds[i]``; streamed ones (webdataset, streamed HF) raise
    ``TypeError`` for both. Each ``iter()`` is one epoch; with ``shuffle_buffer > 0``
    every epoch has a different, seed-determined order (map-style sets: a full
    permutation; streamed sets: a buffer of that many samples).
    """

    def __init__(
        self,
        source: "_Source",
        resolution: int,
        center_crop: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.source = source
        self.resolution = resolution
        self.center_crop = center_crop
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.skipped = 0  # unreadable images skipped so far, over all epochs
        self._epoch = 0

    @property
    def streaming(self) -> bool:
        return self.source.streaming

    @property
    def name(self) -> str:
        return self.source.name

    def __repr__(self) -> str:
        kind = "streaming" if self.streaming else f"{len(self)} samples"
        return f"TextImageDataset({self.name!r}, {kind}, resolution={self.resolution})"

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"{self.name} is streamed: its length is not known in advance")
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        """Sample ``index``; an unreadable image raises (there is nothing to skip to)."""
        if self.streaming:
            raise TypeError(f"{self.name} is streamed: it cannot be indexed")
        n = len(self.source)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        record = self.source.record(index)
        rng = None if self.center_crop else np.random.default_rng([self.seed, index])
        try:
            return self._load(record, rng), record.caption
        except UnsupportedImageError:
            raise
        except _DECODE_ERRORS as err:
            raise ValueError(f"cannot read image {record.where}: {err}") from err

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        rng = np.random.default_rng([self.seed, self._epoch])
        self._epoch += 1
        crop_rng = None if self.center_crop else rng
        for record in self._records(rng):
            try:
                image = self._load(record, crop_rng)
            except UnsupportedImageError:
                raise
            except _DECODE_ERRORS as err:
                self.skipped += 1
                warnings.warn(
                    f"skipping unreadable image {record.where}: {err} ({self.skipped} skipped so far)",
                    stacklevel=2,
                )
                continue
            yield image, record.caption

    def _records(self, rng: np.random.Generator) -> Iterator[_Record]:
        """Undecoded records of one epoch, in (maybe shuffled) order."""
        if not self.streaming:
            n = len(self.source)
            order = rng.permutation(n) if self.shuffle_buffer > 0 else range(n)
            return (self.source.record(int(i)) for i in order)
        records = self.source.stream(rng)
        if self.shuffle_buffer > 0:
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        return records

    def _load(self, record: _Record, rng: np.random.Generator | None) -> Image.Image:
        return _resize_crop(_open_image(record.image, self.resolution), self.resolution, rng)


def _buffer_shuffle(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Approximate shuffle of a stream holding at most ``size`` items in memory."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def collate(batch: Sequence[tuple[Image.Image, str]]):
    """``[(image, caption), ...]`` -> ``(tensor (B, 3, R, R) in [-1, 1], [caption, ...])``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    images, captions = zip(*batch)
    return to_tensor(list(images)), list(captions)


# --------------------------------------------------------------------------- sources


class _Source:
    """Where records come from. Map-style sources implement ``__len__`` / ``record``,
    streamed ones ``stream``."""

    name: str = ""
    streaming: bool = False

    def __len__(self) -> int:
        raise TypeError(f"{self.name} is streamed")

    def record(self, index: int) -> _Record:
        raise TypeError(f"{self.name} is streamed")

    def stream(self, rng: np.random.Generator) -> Iterator[_Record]:
        raise NotImplementedError


class _ScenesSource(_Source):
    def __init__(self, split: str, seed: int):
        self.scenes = SceneDataset(split=split, seed=seed)
        self.name = f"scenes:{split}"

    def __len__(self) -> int:
        return len(self.scenes)

    def record(self, index: int) -> _Record:
        # Rendered at the native 64 px and resized by the common pipeline, so every
        # resolution sees the same scenes (and rendering stays cheap).
        sample = self.scenes[index]
        return _Record(sample.image, sample.caption, f"{self.name}[{index}]")


class _ListSource(_Source):
    """Records already resolved (and validated) at open time: folders and tables."""

    def __init__(self, name: str, records: list[_Record]):
        if not records:
            raise ValueError(f"{name}: no samples found")
        self.name, self.records = name, records

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> _Record:
        return self.records[index]


class _WebDatasetSource(_Source):
    streaming = True

    def __init__(self, spec: str, image_key: str | None, caption_key: str | None, shuffle: bool):
        self.urls = _expand_shards(spec)
        self.name = spec
        self.image_keys = (image_key,) if image_key else WDS_IMAGE_KEYS
        self.caption_key = caption_key
        self.shuffle = shuffle  # also shuffle shard order
        _require("webdataset")  # fail at open time, not at the first batch

    def stream(self, rng: np.random.Generator) -> Iterator[_Record]:
        wds = _require("webdataset")
        pipeline = wds.WebDataset(
            self.urls,
            # a corrupt shard costs its samples, not the epoch
            handler=wds.warn_and_continue,
            shardshuffle=len(self.urls) if self.shuffle else False,
            seed=int(rng.integers(2**31)),
            # each DDP rank / DataLoader worker reads its own shards
            nodesplitter=wds.split_by_node,
            empty_check=False,
        )
        for sample in pipeline:
            record = self._record(sample)
            if record is not None:
                yield record

    def _record(self, sample: dict) -> _Record | None:
        members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
        where = f"{sample.get('__url__', self.name)}:{sample.get('__key__', '?')}"
        image = next((members[k] for k in self.image_keys if k in members), None)
        caption = self._caption(members)
        if image is None or caption is None:
            missing = "image" if image is None else "caption"
            warnings.warn(f"skipping {where}: no {missing} member (has {sorted(members)})", stacklevel=3)
            return None
        return _Record(image, caption, where)

    def _caption(self, members: dict) -> str | None:
        if self.caption_key:
            raw = members.get(self.caption_key)
            if raw is None:
                return None
            if self.caption_key == "json":
                return _caption_text(json.loads(raw).get("caption"))
            return raw.decode("utf-8").strip()
        for key in WDS_CAPTION_KEYS:
            if key in members:
                return members[key].decode("utf-8").strip()
        if "json" in members:
            meta = json.loads(members["json"])
            for key in ("caption", "text", "prompt"):
                if key in meta:
                    return _caption_text(meta[key])
        return None


class _HFSource(_Source):
    """A Hugging Face ``Dataset`` (map-style) or ``IterableDataset`` (streamed)."""

    def __init__(self, ds, name: str, image_column: str | None, caption_column: str | None):
        datasets = _require("datasets")
        self.name = name
        self.streaming = isinstance(ds, datasets.IterableDataset)
        columns, features = _hf_columns(ds)
        image_features = [c for c in columns if isinstance((features or {}).get(c), datasets.Image)]
        self.image_column = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", name, image_features)
        self.caption_column = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", name)
        ds = ds.select_columns([self.image_column, self.caption_column])
        if self.image_column in image_features:
            # Decode ourselves, so a corrupt image is skipped instead of raising
            # deep inside datasets' iterator.
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds = ds
        if not self.streaming and len(ds):
            self.record(0)  # refuses URL datasets now, not at the first batch

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, index: int) -> _Record:
        return self._row(self.ds[index], f"{self.name}[{index}]")

    def stream(self, rng: np.random.Generator) -> Iterator[_Record]:
        ds = self.ds
        for i, row in enumerate(ds):
            yield self._row(row, f"{self.name} row {i}")

    def _row(self, row: dict, where: str) -> _Record:
        value = row[self.image_column]
        if isinstance(value, dict) and value.get("path"):
            where = f"{where} ({value['path']})"
        caption = _caption_text(row[self.caption_column])
        # A missing caption becomes "" (an unconditional sample) rather than a crash.
        return _Record(_image_source(value, where), caption or "", where)


# --------------------------------------------------------------------------- helpers


def _caption_text(value: Any) -> str | None:
    """Caption cell -> str; lists (several captions per image) give their first one."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    return str(value).strip()


def _pick_column(
    columns: Sequence[str],
    given: str | None,
    candidates: Sequence[str],
    kind: str,
    source: str,
    fallback: Sequence[str] = (),
) -> str:
    """The column to use: ``given`` if it exists, else the first candidate name present
    (case-insensitive), else the single ``fallback`` column (e.g. the only HF Image feature)."""
    if given is not None:
        if given not in columns:
            raise ValueError(f"{source}: {kind} column {given!r} not found; columns are {list(columns)}")
        return given
    lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    if len(fallback) == 1:
        return fallback[0]
    hint = ""
    if kind == "image" and "url" in lower:
        hint = " (it has a URL column: download the images first, e.g. with img2dataset)"
    raise ValueError(
        f"{source}: cannot tell which column holds the {kind}; columns are {list(columns)}{hint}. "
        f"Looked for {list(candidates)}; pass {kind}_column=... to choose one."
    )


def _hf_columns(ds) -> tuple[list[str], dict | None]:
    """Column names and features; streamed sets may only know them after one row."""
    features = ds.features
    if features is not None:
        return list(features), features
    columns = ds.column_names
    if columns is None:
        columns = list(next(iter(ds)).keys())
    return list(columns), None


def _expand_shards(spec: str) -> list[str]:
    """Brace and glob patterns -> shard list; local shards must exist."""
    import braceexpand  # a webdataset dependency

    urls: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        if "://" in pattern or pattern.startswith("pipe:"):
            urls.append(pattern)  # remote shards stream; webdataset reads them
        elif glob.has_magic(pattern):
            urls.extend(sorted(glob.glob(pattern)))
        elif os.path.isfile(pattern):
            urls.append(pattern)
        else:
            raise FileNotFoundError(f"webdataset shard {pattern!r} (from {spec!r}) does not exist")
    if not urls:
        raise FileNotFoundError(f"no webdataset shards match {spec!r}")
    return urls


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Columns and ``(line number, row)`` pairs of a CSV or JSONL file."""
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            reader = csv.DictReader(f)
            for row in reader:
                rows.append((reader.line_num, row))
            return list(reader.fieldnames or []), rows
    columns: dict[str, None] = {}  # ordered union of keys
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            columns.update(dict.fromkeys(row))
            rows.append((lineno, row))
    return list(columns), rows


def _table_records(
    path: Path,
    base: Path,
    image_column: str | None,
    caption_column: str | None,
    image_candidates: Sequence[str] = IMAGE_COLUMNS,
) -> list[_Record]:
    """Records of a CSV/JSONL table whose image paths are relative to ``base``;
    every referenced file must exist."""
    columns, rows = _read_table(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    image_col = _pick_column(columns, image_column, image_candidates, "image", str(path))
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", str(path))
    records, missing = [], []
    for lineno, row in rows:
        where = f"{path}, line {lineno}"
        value = row.get(image_col)
        if value in (None, ""):
            raise ValueError(f"{where}: empty {image_col!r} cell")
        if _is_url(value):
            _refuse_url(value, where)
        file = base / str(value)
        if not file.is_file():
            missing.append((where, value, file))
            continue
        caption = _caption_text(row.get(caption_col))
        if caption is None:
            raise ValueError(f"{where}: no {caption_col!r} value")
        records.append(_Record(str(file), caption, str(file)))
    if missing:
        where, value, file = missing[0]
        raise FileNotFoundError(
            f"{where}: image {value!r} not found (looked for {file}); "
            f"{len(missing)} of {len(rows)} referenced images are missing"
        )
    return records


def _folder_records(folder: Path, image_column: str | None, caption_column: str | None) -> list[_Record]:
    """Records of an image folder: metadata.jsonl/.csv if present, else sidecar .txt files."""
    for meta in ("metadata.jsonl", "metadata.csv"):
        if (folder / meta).is_file():
            # imagefolder convention: file_name is the image column
            candidates = ("file_name",) + tuple(c for c in IMAGE_COLUMNS if c != "file_name")
            return _table_records(folder / meta, folder, image_column, caption_column, candidates)
    images = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not images:
        raise ValueError(f"{folder}: no images ({'/'.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl/metadata.csv")
    uncaptioned = [p for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        names = ", ".join(str(p.relative_to(folder)) for p in uncaptioned[:3])
        raise ValueError(
            f"{folder}: {len(uncaptioned)} of {len(images)} images have no caption file "
            f"(e.g. {names}); put a name.txt next to each image or add a metadata.jsonl"
        )
    return [_Record(str(p), p.with_suffix(".txt").read_text(encoding="utf-8").strip(), str(p)) for p in images]


def _is_saved_hf_dataset(path: Path) -> bool:
    """A directory written by ``save_to_disk`` (a Dataset, or a DatasetDict of them)."""
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return path.is_dir() and any((path / m).is_file() for m in markers)


def _has_data_files(path: Path) -> bool:
    """A local copy of a Hub dataset repo (parquet/arrow files) that load_dataset can read."""
    # only the top level and data/ (the Hub layout): an image folder may be huge
    return any(any(path.glob(p)) for p in ("*.parquet", "*.arrow", "data/*.parquet", "data/*.arrow"))


def _open_hf(spec: str, split: str, streaming: bool | None):
    """The HF dataset for ``spec``: load_from_disk for saved sets, else load_dataset."""
    datasets = _require("datasets")
    if _is_saved_hf_dataset(Path(spec)):
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{spec}: no split {split!r}; splits are {list(ds)}")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    # Remote sets stream unless asked otherwise: never download LAION by accident.
    if streaming is None:
        streaming = not Path(spec).exists()
    return datasets.load_dataset(spec, split=split, streaming=streaming)


# --------------------------------------------------------------------------- entry point


def open_dataset(
    spec: str,
    resolution: int = 512,
    split: str = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    streaming: bool | None = None,
    center_crop: bool = True,
    shuffle_buffer: int = 0,
    seed: int = 0,
) -> TextImageDataset:
    """Open the text-to-image data named by ``spec`` (see the module docstring).

    ``split`` picks the split of ``scenes`` and HF datasets; ``streaming`` applies to
    HF datasets only (None: stream remote ones, load local ones; webdataset shards
    always stream, local folders and tables never do). ``center_crop=False`` crops at
    random; ``shuffle_buffer > 0`` shuffles each epoch, seeded by ``seed``.
    """
    source = _make_source(str(spec), split, image_column, caption_column, streaming, shuffle_buffer > 0, seed)
    return TextImageDataset(source, resolution, center_crop=center_crop, shuffle_buffer=shuffle_buffer, seed=seed)


def _make_source(
    spec: str,
    split: str,
    image_column: str | None,
    caption_column: str | None,
    streaming: bool | None,
    shuffle: bool,
    seed: int,
) -> _Source:
    """Dispatch ``spec`` to a source, in the order the module docstring lists."""
    if spec == "scenes" or spec.startswith("scenes:"):
        scene_split = spec.partition(":")[2] or split
        return _ScenesSource(scene_split, seed)
    if spec.lower().endswith(".tar"):
        return _WebDatasetSource(spec, image_column, caption_column, shuffle)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return _ListSource(str(path), _table_records(path, path.parent, image_column, caption_column))
    if path.is_file():
        raise ValueError(f"{spec}: unsupported file type {path.suffix!r}; expected .csv, .jsonl or .tar")
    if path.is_dir() and not _is_saved_hf_dataset(path) and not _has_data_files(path):
        return _ListSource(str(path), _folder_records(path, image_column, caption_column))
    return _HFSource(_open_hf(spec, split, streaming), spec, image_column, caption_column)


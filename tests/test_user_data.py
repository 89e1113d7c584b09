"""Tests for slimsd.data.user: every spec form, built locally in tmp_path (no network)."""

from __future__ import annotations

import csv
import io
import json
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
from PIL import Image

from slimsd.data.scenes import HELDOUT_SCENES, parse_caption
from slimsd.data.user import TextImageDataset, UnsupportedImageError, collate, open_dataset

# Each test image is one flat colour and its caption names it, so a wrong
# image/caption pairing is visible in the pixels.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def make_png(path: Path, colour: str, size=(48, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def png_bytes(colour: str, size=(40, 40), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, format=fmt)
    return buf.getvalue()


def colour_of(image: Image.Image) -> str:
    """Name of the flat colour at the image centre (tolerant of JPEG noise)."""
    px = image.getpixel((image.width // 2, image.height // 2))
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], px)))


def check_pairs(ds, resolution: int) -> list[str]:
    """Iterate ``ds``; every image is RGB, square, and shows the colour its caption names."""
    captions = []
    for image, caption in ds:
        assert image.mode == "RGB" and image.size == (resolution, resolution)
        assert caption.startswith(colour_of(image)), (caption, colour_of(image))
        captions.append(caption)
    return captions


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Three PNGs of different shapes (wide, tall, square) in tmp_path/imgs."""
    return {
        "red": make_png(tmp_path / "imgs" / "r.png", "red", (48, 32)),
        "green": make_png(tmp_path / "imgs" / "g.png", "green", (20, 60)),
        "blue": make_png(tmp_path / "imgs" / "sub" / "b.png", "blue", (16, 16)),
    }


# --------------------------------------------------------------------------- scenes


def test_scenes_train_and_heldout_resized():
    ds = open_dataset("scenes", resolution=32)
    assert len(ds) == 50_000 and not ds.streaming
    image, caption = ds[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    parse_caption(caption)  # in the scene grammar
    held = open_dataset("scenes:heldout", resolution=64)
    for i in range(3):
        image, caption = held[i]
        assert image.size == (64, 64)
        assert parse_caption(caption) in set(HELDOUT_SCENES)
    # the split argument works too, and the spec suffix wins over it
    assert open_dataset("scenes", split="heldout").name == "scenes:heldout"
    assert open_dataset("scenes:train", split="heldout").name == "scenes:train"


def test_collate_makes_a_batch_in_range():
    ds = open_dataset("scenes", resolution=16)
    x, captions = collate([ds[0], ds[1], ds[2]])
    assert tuple(x.shape) == (3, 3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    assert captions == [ds[i][1] for i in range(3)]
    with pytest.raises(ValueError):
        collate([])


# --------------------------------------------------------------------------- folders


def test_folder_with_sidecar_txt(tmp_path, images):
    for colour, path in images.items():
        path.with_suffix(".txt").write_text(f"{colour} square\n")
    ds = open_dataset(str(tmp_path / "imgs"), resolution=24)
    assert len(ds) == 3
    assert sorted(check_pairs(ds, 24)) == ["blue square", "green square", "red square"]
    image, caption = ds[-1]  # negative index
    assert caption == "blue square" and colour_of(image) == "blue"
    with pytest.raises(IndexError):
        ds[3]


def test_folder_sidecar_missing_caption_is_an_error(tmp_path, images):
    images["red"].with_suffix(".txt").write_text("red")
    with pytest.raises(ValueError, match=r"2 of 3 images have no caption file.*g\.png"):
        open_dataset(str(tmp_path / "imgs"))


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_dataset(str(tmp_path / "empty"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_with_metadata(tmp_path, images, fmt):
    rows = [{"file_name": str(p.relative_to(tmp_path / "imgs")), "text": f"{c} thing"} for c, p in images.items()]
    meta = tmp_path / "imgs" / f"metadata.{fmt}"
    if fmt == "jsonl":
        meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(meta, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    ds = open_dataset(str(tmp_path / "imgs"), resolution=16)
    assert [c for _, c in ds] == ["red thing", "green thing", "blue thing"]  # file order kept
    check_pairs(ds, 16)


# --------------------------------------------------------------------------- tables


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_autodetects_columns_and_resolves_relative_paths(tmp_path, images):
    rows = [[str(p.relative_to(tmp_path)), f"{c} photo", "x"] for c, p in images.items()]
    table = write_csv(tmp_path / "data.csv", ["Image_Path", "prompt", "other"], rows)
    ds = open_dataset(str(table), resolution=20)
    assert len(ds) == 3
    assert check_pairs(ds, 20) == ["red photo", "green photo", "blue photo"]


def test_jsonl_with_explicit_columns(tmp_path, images):
    table = tmp_path / "sub" / "t.jsonl"
    table.parent.mkdir()
    # relative to the table's folder, not the working directory
    lines = [json.dumps({"pic": f"../{p.relative_to(tmp_path)}", "alt": f"{c} x"}) for c, p in images.items()]
    table.write_text("\n".join(lines) + "\n\n")  # blank lines are ignored
    ds = open_dataset(str(table), resolution=8, image_column="pic", caption_column="alt")
    assert check_pairs(ds, 8) == ["red x", "green x", "blue x"]


def test_column_detection_failure_names_file_and_columns(tmp_path, images):
    table = write_csv(tmp_path / "odd.csv", ["picture", "words"], [[str(images["red"]), "red"]])
    with pytest.raises(ValueError) as err:
        open_dataset(str(table))
    msg = str(err.value)
    assert "odd.csv" in msg and "'picture'" in msg and "'words'" in msg and "image_column" in msg
    with pytest.raises(ValueError, match=r"caption column 'nope' not found.*'words'"):
        open_dataset(str(table), image_column="picture", caption_column="nope")
    # with both named it opens
    assert len(open_dataset(str(table), image_column="picture", caption_column="words")) == 1


def test_csv_missing_file_names_file_and_line(tmp_path, images):
    rows = [[str(images["red"]), "red"], ["imgs/gone.png", "lost"], ["imgs/also_gone.png", "lost"]]
    table = write_csv(tmp_path / "m.csv", ["image", "caption"], rows)
    with pytest.raises(FileNotFoundError, match=r"m\.csv, line 3: image 'imgs/gone\.png' not found.*2 of 3"):
        open_dataset(str(table))


def test_urls_are_refused(tmp_path):
    table = write_csv(tmp_path / "u.csv", ["url", "image", "text"], [["x", "https://example.com/a.jpg", "a"]])
    with pytest.raises(UnsupportedImageError, match="URL.*download"):
        open_dataset(str(table))


def test_bad_jsonl_line_names_line(tmp_path):
    table = tmp_path / "bad.jsonl"
    table.write_text('{"image": "a.png", "text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        open_dataset(str(table))


# --------------------------------------------------------------------------- corrupt images


def test_corrupt_images_are_skipped_with_a_warning(tmp_path, images):
    folder = tmp_path / "imgs"
    for colour, path in images.items():
        path.with_suffix(".txt").write_text(colour)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "broken.txt").write_text("broken")
    truncated = png_bytes("white", (64, 64))
    (folder / "trunc.png").write_bytes(truncated[: len(truncated) // 2])
    (folder / "trunc.txt").write_text("trunc")

    ds = open_dataset(str(folder), resolution=16)
    assert len(ds) == 5  # existence is checked at open time, decoding at iteration
    with pytest.warns(UserWarning) as record:
        captions = check_pairs(ds, 16)
    assert sorted(captions) == ["blue", "green", "red"]
    assert ds.skipped == 2
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "trunc.png" in messages
    # indexing a bad file has nothing to skip to: it raises, naming the file
    index = [record.caption for record in ds.source.records].index("broken")
    with pytest.raises(ValueError, match="broken.png"):
        ds[index]


# --------------------------------------------------------------------------- image handling


def test_resize_and_crops(tmp_path):
    # left half red, right half blue, 80x40: shorter side 40 -> 20, so 40x20 then a 20x20 crop
    im = Image.new("RGB", (80, 40), COLOURS["red"])
    im.paste(COLOURS["blue"], (40, 0, 80, 40))
    im.save(tmp_path / "half.png")
    (tmp_path / "half.txt").write_text("half")
    ds = open_dataset(str(tmp_path), resolution=20)
    image, _ = ds[0]
    assert image.size == (20, 20)
    # a centre crop straddles the boundary: red on the left, blue on the right
    assert colour_of(image.crop((0, 0, 4, 20))) == "red" and colour_of(image.crop((16, 0, 20, 20))) == "blue"
    # random crops differ between positions but are reproducible for a seed
    seen = set()
    for seed in range(8):
        rand = open_dataset(str(tmp_path), resolution=20, center_crop=False, seed=seed)
        a, b = rand[0][0], rand[0][0]
        assert a.tobytes() == b.tobytes()
        seen.add(a.tobytes())
    assert len(seen) > 1


def test_transparency_becomes_white(tmp_path):
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (10, 10), 255).save(tmp_path / "grey.png")
    for name in ("clear", "grey"):
        (tmp_path / f"{name}.txt").write_text("white")
    ds = open_dataset(str(tmp_path), resolution=10)
    assert all(image.getpixel((5, 5)) == (255, 255, 255) for image, _ in ds)


def test_shuffle_changes_order_per_epoch_deterministically(tmp_path):
    for i in range(12):
        make_png(tmp_path / f"{i:02d}.png", "red", (8, 8)).with_suffix(".txt").write_text(f"red {i}")
    plain = [c for _, c in open_dataset(str(tmp_path), resolution=8)]
    assert plain == [f"red {i}" for i in range(12)]
    ds = open_dataset(str(tmp_path), resolution=8, shuffle_buffer=4, seed=1)
    epoch1, epoch2 = [c for _, c in ds], [c for _, c in ds]
    assert sorted(epoch1) == sorted(plain) == sorted(epoch2)
    assert epoch1 != plain and epoch1 != epoch2
    again = open_dataset(str(tmp_path), resolution=8, shuffle_buffer=4, seed=1)
    assert [c for _, c in again] == epoch1


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.parquetish").write_text("")
    with pytest.raises(ValueError, match="unsupported file type"):
        open_dataset(str(tmp_path / "x.parquetish"))


# --------------------------------------------------------------------------- webdataset


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    import webdataset  # noqa: F401  (dev extra: missing is a failure, not a skip)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", {
        "a.png": png_bytes("red", (30, 20)), "a.txt": b"red one",
        "b.jpg": png_bytes("green", fmt="JPEG"), "b.json": json.dumps({"caption": "green two"}).encode(),
    })
    write_tar(shards / "00001.tar", {
        "c.webp": png_bytes("blue", fmt="WEBP"), "c.txt": b"blue three",
        "d.png": b"garbage", "d.txt": b"corrupt",
        "e.txt": b"no image here",
    })
    ds = open_dataset(str(shards / "{00000..00001}.tar"), resolution=16)
    assert ds.streaming
    with pytest.raises(TypeError, match="streamed"):
        len(ds)
    with pytest.raises(TypeError):
        ds[0]
    with pytest.warns(UserWarning) as record:
        captions = check_pairs(ds, 16)
    assert captions == ["red one", "green two", "blue three"]
    assert ds.skipped == 1
    messages = " ".join(str(w.message) for w in record)
    assert "00001.tar:d" in messages and "00001.tar:e" in messages  # corrupt, and no image
    # globs work, and a shuffled stream keeps every sample
    shuffled = open_dataset(str(shards / "*.tar"), resolution=16, shuffle_buffer=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sorted(c for _, c in shuffled) == sorted(captions)


def test_webdataset_missing_shard(tmp_path):
    import webdataset  # noqa: F401  (dev extra: missing is a failure, not a skip)
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        open_dataset(str(tmp_path / "{00003..00004}.tar"))


def test_missing_optional_package_says_how_to_install(tmp_path, monkeypatch):
    write_tar(tmp_path / "s.tar", {"a.txt": b"x"})
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import now fails
    with pytest.raises(ImportError, match=r'pip install "slimsd\[data\]"'):
        open_dataset(str(tmp_path / "s.tar"))


# --------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    import datasets  # dev extra: missing is a failure, not a skip
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (30, 20), COLOURS[c]) for c in ("red", "green", "blue")],
            "text": ["red cat", "green dog", "blue bird"],
            "extra": [1, 2, 3],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string"), "extra": datasets.Value("int32")}
        ),
    )
    path = tmp_path / "hf"
    ds.save_to_disk(str(path))
    return path


def test_hf_saved_dataset_map_style(hf_dir):
    ds = open_dataset(str(hf_dir), resolution=12)
    assert isinstance(ds, TextImageDataset) and not ds.streaming and len(ds) == 3
    image, caption = ds[1]
    assert caption == "green dog" and colour_of(image) == "green" and image.size == (12, 12)
    assert check_pairs(ds, 12) == ["red cat", "green dog", "blue bird"]


def test_hf_saved_dataset_streaming(hf_dir):
    ds = open_dataset(str(hf_dir), resolution=12, streaming=True)
    assert ds.streaming
    with pytest.raises(TypeError):
        len(ds)
    assert check_pairs(ds, 12) == ["red cat", "green dog", "blue bird"]


def test_hf_dataset_dict_split_and_corrupt_bytes(tmp_path):
    import datasets  # dev extra: missing is a failure, not a skip
    # image stored as a {"bytes", "path"} struct (what an Image feature holds), one corrupt
    feats = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    train = datasets.Dataset.from_dict(
        {"img": [{"bytes": png_bytes("red"), "path": None}, {"bytes": b"junk", "path": "junk.png"}],
         "caption": ["red a", "bad"]},
        features=feats,
    )
    test = datasets.Dataset.from_dict(
        {"img": [{"bytes": png_bytes("blue"), "path": None}], "caption": ["blue b"]}, features=feats
    )
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))

    ds = open_dataset(str(tmp_path / "dd"), resolution=8)
    with pytest.warns(UserWarning, match="junk.png"):
        assert check_pairs(ds, 8) == ["red a"]
    assert ds.skipped == 1
    assert check_pairs(open_dataset(str(tmp_path / "dd"), resolution=8, split="test"), 8) == ["blue b"]
    with pytest.raises(ValueError, match=r"no split 'validation'.*'train'"):
        open_dataset(str(tmp_path / "dd"), split="validation")


def test_hf_url_column_refused_and_detection_error(tmp_path):
    import datasets  # dev extra: missing is a failure, not a skip
    urls = datasets.Dataset.from_dict({"image": ["https://example.com/x.jpg"], "text": ["x"]})
    urls.save_to_disk(str(tmp_path / "u"))
    with pytest.raises(UnsupportedImageError, match="URL"):
        open_dataset(str(tmp_path / "u"))
    datasets.Dataset.from_dict({"URL": ["https://e.com/x.jpg"], "TEXT": ["x"]}).save_to_disk(str(tmp_path / "laion"))
    with pytest.raises(ValueError, match=r"holds the image.*'URL'.*img2dataset"):
        open_dataset(str(tmp_path / "laion"))


def test_hf_local_parquet_via_load_dataset_and_image_feature_fallback(tmp_path):
    import datasets  # dev extra: missing is a failure, not a skip
    ds = datasets.Dataset.from_dict(
        {"pixels": [Image.new("RGB", (9, 9), COLOURS["red"])], "prompt": ["red only"]},
        features=datasets.Features({"pixels": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000.parquet"))
    # a local Hub-style repo goes to load_dataset (not streamed: it is local);
    # "pixels" is found as the only Image feature
    opened = open_dataset(str(tmp_path / "repo"), resolution=4)
    assert not opened.streaming and len(opened) == 1
    assert check_pairs(opened, 4) == ["red only"]

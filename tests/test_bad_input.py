"""One test per kind of bad input: a clear error for a single file, and discovery that goes on."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import smooth_random_image
from PIL import Image
from test_dicom import write_ct

from cspine_utils import data


def good_images(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"ok_{seed}_{i}.png"
        smooth_random_image(seed * 10 + i, 48).save(path)
        paths.append(path)
    return paths


def dataset_with(tmp_path: Path, name: str, write) -> tuple[Path, Path]:
    """Two good classes plus one bad file ``fracture/<name>`` written by ``write(path)``."""
    root = tmp_path / "ds"
    good_images(root / "fracture", seed=1)
    good_images(root / "normal", seed=2)
    bad = root / "fracture" / name
    write(bad)
    return root, bad


def assert_rejected_and_rest_kept(root: Path, bad: Path, reason: str, **kwargs) -> None:
    disc = data.discover(root, **kwargs)
    rejected = dict(zip(disc.rejected["path"], disc.rejected["reason"]))
    assert bad.absolute().as_posix() in rejected, disc.rejected
    assert reason in rejected[bad.absolute().as_posix()]
    assert len(disc.manifest) == 6 and bad.as_posix() not in set(disc.manifest["path"])


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid-looking 1-bit PNG header announcing width x height pixels, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )
    return path


def write_truncated_png(path: Path) -> Path:
    whole = path.with_name("whole.tmp")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(whole, "PNG")
    payload = whole.read_bytes()
    whole.unlink()
    path.write_bytes(payload[: len(payload) // 2])
    return path


# ------------------------------------------------------------------------ single files
def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(data.ImageReadError, match=r"empty\.png.*empty \(0 bytes\)"):
        data.read_image(path)
    root, bad = dataset_with(tmp_path, "empty.png", lambda p: p.touch())
    assert_rejected_and_rest_kept(root, bad, "0 bytes")


def test_truncated_png(tmp_path):
    path = write_truncated_png(tmp_path / "cut.png")
    with pytest.raises(data.ImageReadError, match=r"cut\.png.*truncated"):
        data.read_image(path)
    with pytest.raises(data.ImageReadError, match="truncated"):
        data.probe_image(path)
    root, bad = dataset_with(tmp_path, "cut.png", write_truncated_png)
    assert_rejected_and_rest_kept(root, bad, "truncated")


def test_text_file_named_png(tmp_path):
    def write(p):
        p.write_text("this is a note, not an X-ray\n")

    path = tmp_path / "note.png"
    write(path)
    with pytest.raises(data.ImageReadError, match=r"note\.png.*text file, not an image"):
        data.read_image(path)
    root, bad = dataset_with(tmp_path, "note.png", write)
    assert_rejected_and_rest_kept(root, bad, "text file")


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    img = data.read_image(path)
    assert img.dtype == np.float32
    np.testing.assert_allclose(img, values / 65535.0, rtol=1e-6)
    assert 0.0 < img[0, 1] < 0.02  # 1000/65535, not clipped to 255


def test_rgba_png_is_composited_on_black(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[255, 0], [128, 255]]
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    img = data.read_image(path)
    np.testing.assert_allclose(img, [[200 / 255, 0.0], [200 / 255 * 128 / 255, 200 / 255]], atol=1e-5)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    big = write_bomb_png(tmp_path / "bomb.png", 10_000, 10_000)  # 10^8 px announced, ~100 bytes on disk
    assert big.stat().st_size < 2000
    with pytest.raises(data.ImageReadError, match="exceeds the limit") as err:
        data.read_image(big, max_pixels=1_000_000)
    assert "bomb.png" in str(err.value)
    with pytest.raises(data.ImageReadError, match="exceeds the limit"):
        data.read_image(big)  # 10^8 > the default 5 x 10^7
    huge = write_bomb_png(tmp_path / "huge.png", 100_000, 100_000)  # PIL's own bomb error
    with pytest.raises(data.ImageReadError, match="decompression bomb"):
        data.read_image(huge, max_pixels=10**12)
    root, bad = dataset_with(tmp_path, "bomb.png", lambda p: write_bomb_png(p, 5_000, 5_000))
    assert_rejected_and_rest_kept(root, bad, "exceeds the limit", max_pixels=1_000_000)


def test_dicom_without_pixel_data(tmp_path):
    path = write_ct(tmp_path / "header.dcm", None)
    with pytest.raises(data.ImageReadError, match=r"header\.dcm.*has no pixel data"):
        data.read_image(path)
    root, bad = dataset_with(tmp_path, "header.dcm", lambda p: write_ct(p, None))
    assert_rejected_and_rest_kept(root, bad, "no pixel data")


def test_unsupported_file_type_is_rejected(tmp_path):
    root, bad = dataset_with(tmp_path, "report.txt", lambda p: p.write_text("hello"))
    assert_rejected_and_rest_kept(root, bad, "unsupported file type '.txt'")


def test_missing_image_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        data.read_image(tmp_path / "ghost.png")


# ------------------------------------------------------------------------ datasets
def test_empty_class_folder_in_one_split_is_fine(tmp_path):
    root = tmp_path / "ds"
    good_images(root / "train" / "fracture", seed=1)
    good_images(root / "train" / "normal", seed=2)
    good_images(root / "val" / "fracture", seed=3)
    (root / "val" / "normal").mkdir(parents=True)
    disc = data.discover(root)
    assert len(disc.manifest) == 9 and disc.rejected.empty


def test_all_class_folders_empty(tmp_path):
    (tmp_path / "ds" / "fracture").mkdir(parents=True)
    (tmp_path / "ds" / "normal").mkdir()
    with pytest.raises(ValueError, match="no readable images found"):
        data.discover(tmp_path / "ds")


def test_only_unreadable_files(tmp_path):
    (tmp_path / "ds" / "fracture").mkdir(parents=True)
    (tmp_path / "ds" / "fracture" / "a.png").touch()
    (tmp_path / "ds" / "normal").mkdir()
    with pytest.raises(ValueError, match=r"no readable images found.*1 files rejected"):
        data.discover(tmp_path / "ds")


def test_single_class_dataset(tmp_path):
    good_images(tmp_path / "ds" / "normal", seed=1)
    (tmp_path / "ds" / "fracture").mkdir()  # present but empty
    with pytest.raises(ValueError, match=r"only one class found: 'normal' \(3 images\).*both"):
        data.discover(tmp_path / "ds")
    disc = data.discover(tmp_path / "ds", require_two_classes=False)  # what the audit does
    assert set(disc.manifest["label"]) == {"normal"}


def test_unknown_class_folder_lists_what_was_found(tmp_path):
    good_images(tmp_path / "ds" / "fracture", seed=1)
    good_images(tmp_path / "ds" / "maybe", seed=2)
    with pytest.raises(ValueError, match=r"unknown class folder\(s\).*maybe.*found: fracture, maybe"):
        data.discover(tmp_path / "ds")
    good_images(tmp_path / "split" / "train" / "fracture", seed=3)
    good_images(tmp_path / "split" / "train" / "unsure", seed=4)
    with pytest.raises(ValueError, match="unsure"):
        data.discover(tmp_path / "split")


def test_missing_data_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        data.discover(tmp_path / "no such dataset")


def test_path_with_spaces_and_parentheses(tmp_path):
    root = tmp_path / "my data (copy)" / "cervical fracture"
    folder = root / "train" / "fracture"
    folder.mkdir(parents=True)
    smooth_random_image(1, 64).save(folder / "CSFDV1B10 (18)-sharpened-rotated3.png")
    smooth_random_image(2, 64).save(folder / "CSFDV1B10 (19).png")
    good_images(root / "train" / "normal", seed=5)
    img = data.read_image(folder / "CSFDV1B10 (18)-sharpened-rotated3.png")
    assert img.shape == (64, 64)
    disc = data.discover(tmp_path / "my data (copy)")
    assert disc.layout == "kaggle"
    assert {"CSFDV1B10 (18)", "CSFDV1B10 (19)"} <= set(disc.manifest["source"])
    assert "CSFDV1B10" in set(disc.manifest["group"])  # two slices of one scan: one patient, one group
    assert any("my data (copy)/cervical fracture/train/fracture/CSFDV1B10 (18)" in p for p in disc.manifest["path"])


def test_hidden_files_are_skipped_silently(tmp_path):
    root, bad = dataset_with(tmp_path, ".DS_Store", lambda p: p.write_bytes(b"\x00\x01junk"))
    disc = data.discover(root)
    assert len(disc.manifest) == 6 and disc.rejected.empty


def test_split_folders_mixed_with_other_folders(tmp_path):
    root = tmp_path / "kg" / "cervical fracture"
    good_images(root / "train" / "fracture", seed=1)
    good_images(root / "notes", seed=2)
    with pytest.raises(ValueError, match=r"mixes split folders \(train\) with other folders \(notes\)"):
        data.discover(root)

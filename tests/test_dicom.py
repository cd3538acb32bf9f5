"""DICOM reading: Hounsfield units, padding, windows, and clear errors for files we cannot use."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, generate_uid

from cspine_utils import data, dicom


def ct_small() -> Path:
    path = get_testdata_file("CT_small.dcm")
    if path is None:  # the pydicom wheel ships it: its absence is a broken install, not a reason to skip
        raise FileNotFoundError("pydicom's test file CT_small.dcm is missing: reinstall pydicom")
    return Path(path)


def write_ct(
    path: Path,
    stored: np.ndarray | None,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding: int | None = None,
    syntax=ExplicitVRLittleEndian,
    pixel_bytes: bytes | None = None,
    preamble: bool = True,
) -> Path:
    """Write a minimal CT slice with pydicom (signed 16-bit); ``stored=None`` leaves out PixelData."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = (8, 8) if stored is None else stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelSpacing = [0.5, 0.25]
    ds.SliceThickness = 1.0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if padding is not None:
        ds.PixelPaddingValue = padding
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
        ds["PixelData"].VR = "OB"
    elif stored is not None:
        ds.PixelData = stored.astype("<i2").tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def test_ct_small_hu_is_stored_times_slope_plus_intercept():
    path = ct_small()
    ds = pydicom.dcmread(path)
    hu, info = dicom.read_dicom_hu(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected[expected < dicom.MIN_VALID_HU] = dicom.AIR_HU
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, expected)
    assert info["pixel_spacing_mm"] == pytest.approx((0.661468, 0.661468))
    assert info["rescale_intercept"] == -1024.0 and info["modality"] == "CT"
    assert -1100 < hu.min() and hu.max() < 3000  # a plausible CT range in HU


def test_synthetic_ct_rescale_and_padding(tmp_path):
    stored = np.array([[-2000, 0, 500, 1000], [-600, 12, 3000, -2000]], dtype=np.int16)
    path = write_ct(tmp_path / "slice.dcm", stored, slope=2.0, intercept=-1000.0, padding=-2000)
    hu, info = dicom.read_dicom_hu(path)
    expected = np.array(
        [[-1024, -1000, 0, 1000], [-1024, -976, 5000, -1024]], dtype=np.float32
    )  # -600*2-1000 = -2200 < -2000 → air
    np.testing.assert_array_equal(hu, expected)
    assert info["n_padding_pixels"] == 3
    assert info["pixel_spacing_mm"] == (0.5, 0.25)
    assert info["rescale_slope"] == 2.0


def test_missing_rescale_tags_mean_slope_one_intercept_zero(tmp_path):
    path = write_ct(tmp_path / "raw.dcm", np.array([[10, -20]], dtype=np.int16))
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.save_as(path)
    hu, info = dicom.read_dicom_hu(path)
    np.testing.assert_array_equal(hu, [[10, -20]])
    assert (info["rescale_slope"], info["rescale_intercept"]) == (1.0, 0.0)


def test_is_dicom_by_suffix_or_magic(tmp_path):
    no_suffix = tmp_path / "1.2.840.113619"
    shutil.copy(ct_small(), no_suffix)
    assert dicom.is_dicom(ct_small())
    assert dicom.is_dicom(no_suffix)
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert not dicom.is_dicom(png)
    assert not dicom.is_dicom(tmp_path / "missing")


def test_file_without_preamble_is_read(tmp_path):
    stored = np.array([[100, 200]], dtype=np.int16)
    path = write_ct(tmp_path / "bare.dcm", stored, preamble=False)
    hu, _ = dicom.read_dicom_hu(path)
    np.testing.assert_array_equal(hu, stored - 1024.0)


def test_no_pixel_data_is_a_clear_error(tmp_path):
    path = write_ct(tmp_path / "header only.dcm", None)
    with pytest.raises(dicom.DicomError, match=r"has no pixel data \(PixelData element missing\)") as err:
        dicom.read_dicom_hu(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(dicom.DicomError, match="no pixel data"):
        dicom.read_dicom_header(path)


@pytest.mark.parametrize("syntax, name", [(JPEG2000Lossless, "JPEG 2000"), (JPEGLSLossless, "JPEG-LS")])
def test_undecodable_transfer_syntax_is_named(tmp_path, syntax, name):
    garbage = encapsulate([b"\x00\x01\x02\x03 definitely not a codestream " * 4])
    path = write_ct(tmp_path / "compressed.dcm", np.zeros((8, 8), np.int16), syntax=syntax, pixel_bytes=garbage)
    with pytest.raises(dicom.DicomError) as err:
        dicom.read_dicom_hu(path)
    message = str(err.value)
    assert str(path) in message and name in message and str(syntax) in message
    assert "cannot decode the pixel data" in message
    assert ("no decoder plugin is installed" in message) or ("corrupt" in message)


def test_not_a_dicom_file_named_dcm(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient list, not an image\n" * 20)
    with pytest.raises(dicom.DicomError, match="notes.dcm"):
        dicom.read_dicom_hu(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.dcm"):
        dicom.read_dicom_hu(tmp_path / "nowhere.dcm")


def test_max_pixels_refuses_before_decoding():
    with pytest.raises(dicom.DicomError, match="exceeds the limit"):
        dicom.read_dicom_hu(ct_small(), max_pixels=100)


def test_window_maps_level_and_edges():
    hu = np.array([-500.0, 500.0, 1500.0, -3000.0, 4000.0])
    out = dicom.window(hu, *dicom.WINDOWS["bone"])  # width 2000, level 500 → [-500, 1500] HU
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="width"):
        dicom.window(hu, 0, 40)


def test_multi_window_channels_are_bone_soft_wide():
    hu, _ = dicom.read_dicom_hu(ct_small())
    stack = dicom.multi_window(hu)
    assert stack.shape == (128, 128, 3) and stack.dtype == np.float32
    assert 0.0 <= stack.min() and stack.max() <= 1.0
    for channel, name in enumerate(("bone", "soft", "wide")):
        np.testing.assert_array_equal(stack[..., channel], dicom.window(hu, *dicom.WINDOWS[name]))
    with pytest.raises(ValueError, match="2-D"):
        dicom.multi_window(stack)


def test_read_image_uses_the_bone_window():
    img = data.read_image(ct_small())
    hu, _ = dicom.read_dicom_hu(ct_small())
    np.testing.assert_array_equal(img, dicom.window(hu, 2000, 500))
    assert data.probe_image(ct_small())["mode"] == "DICOM"

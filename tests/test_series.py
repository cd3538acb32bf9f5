"""CT series: reading a study folder, NIfTI masks, RSNA labels, and the prepared cache (resume, shards, bad input)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from cspine_utils import cli, dicom, phantom3d, series

SIZE, CROP_MM, SPACING_MM = 32, 128.0, 5.0
SETTINGS = {"size": SIZE, "crop_mm": CROP_MM, "spacing_mm": SPACING_MM}


@pytest.fixture(scope="session")
def rsna(tmp_path_factory) -> Path:
    """Four synthetic studies in the RSNA layout (helper A's 3-D phantom), 64 px, 5 mm slices."""
    out = tmp_path_factory.mktemp("rsna") / "rsna"
    phantom3d.write_rsna_dataset(out, 4, seed=3, matrix=64, slice_mm=5.0, progress=False)
    return out


@pytest.fixture(scope="session")
def cache(rsna, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cache") / "cache"
    return out, series.prepare(rsna, out, **SETTINGS, workers=1, progress=False)


def uids(rsna: Path) -> list[str]:
    return sorted(p.name for p in (rsna / "train_images").iterdir())


def copy_dataset(rsna: Path, dst: Path) -> Path:
    shutil.copytree(rsna, dst)
    return dst


def rewrite(folder: Path, edit) -> None:
    """Apply ``edit(ds, k)`` to every slice file of a study (k = index in file-name order) and save it."""
    for k, path in enumerate(sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))):
        ds = pydicom.dcmread(path)
        edit(ds, k)
        ds.save_as(path)


def is_compressed(folder: Path) -> bool:
    return pydicom.dcmread(next(folder.glob("*.dcm"))).file_meta.TransferSyntaxUID.is_compressed


def uncompressed_study(rsna: Path) -> str:
    for uid in uids(rsna):
        if not is_compressed(rsna / "train_images" / uid):
            return uid
    raise AssertionError("the fixture has no uncompressed study")


def add_copy(ds_dir: Path, uid: str, new_uid: str, *, label: bool = True) -> Path:
    """Copy study ``uid`` to ``new_uid`` (and its train.csv row when ``label``); the new folder."""
    dst = ds_dir / "train_images" / new_uid
    shutil.copytree(ds_dir / "train_images" / uid, dst)
    if label:
        labels = pd.read_csv(ds_dir / "train.csv", dtype={"StudyInstanceUID": str})
        row = labels[labels["StudyInstanceUID"] == uid].assign(StudyInstanceUID=new_uid)
        pd.concat([labels, row]).to_csv(ds_dir / "train.csv", index=False)
    return dst


# Pieces that need no dataset
def test_window_maps_named_windows_to_uint8():
    hu = np.array([-500.0, 500.0, 1500.0])
    np.testing.assert_array_equal(series.window(hu, "bone"), [0, 128, 255])
    assert series.window(hu, "soft").dtype == np.uint8
    with pytest.raises(ValueError, match="unknown window"):
        series.window(hu, "lung")


def test_resample_z_linear_for_images_nearest_for_labels():
    z = np.array([10.0, 8.0, 6.0, 4.0, 2.0])
    vol = np.broadcast_to(z[:, None, None], (5, 2, 2)).astype(np.float32)
    out, z_new = series.resample_z(vol, z, 2.6)
    np.testing.assert_allclose(z_new, [10.0, 7.4, 4.8, 2.2], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], [10.0, 7.4, 4.8, 2.2], rtol=1e-6)
    labels, _ = series.resample_z(np.arange(5, dtype=np.uint8), z, 2.6, nearest=True)
    assert labels.dtype == np.uint8 and labels.tolist() == [0, 1, 3, 4]  # the nearest slice: 8, 4 and 2 mm
    with pytest.raises(ValueError, match="spacing_mm"):
        series.resample_z(vol, z, 0.0)


def test_crop_resize_pads_with_air_beyond_a_small_image():
    vol = np.full((2, 10, 10), 100.0, dtype=np.float32)
    out, (r0, c0, sy, sx) = series.crop_resize(vol, (1.0, 1.0), 20.0, 8)
    assert out.shape == (2, 8, 8) and (r0, c0, sy, sx) == (-5, -5, 2.5, 2.5)
    assert out[0, 0, 0] == pytest.approx(dicom.AIR_HU) and out[0, 4, 4] == pytest.approx(100.0)


def test_the_crop_follows_the_spine_not_the_image_centre():
    vol = np.full((6, 100, 100), -1000.0, dtype=np.float32)
    vol[:, 60:70, 20:30] = 1000.0  # the "spine": the largest bone region, off-centre
    vol[:2, 5:8, 90:93] = 1000.0  # a smaller bone (a mandible, a shoulder) on two slices only
    row, col = series.spine_center(vol)
    assert (row, col) == pytest.approx((64.5, 24.5))
    out, (r0, c0, _, _) = series.crop_resize(vol, (1.0, 1.0), 20.0, 20, center=(row, col))
    assert (r0, c0) == (55, 15) and out[0, 5:15, 5:15].min() == pytest.approx(1000.0)
    assert series.spine_center(np.full((3, 8, 8), -1000.0)) == (3.5, 3.5)  # no bone: the image centre


@pytest.mark.parametrize("bad", ["0/2", "3/2", "2", "a/b"])
def test_cli_prepare_bad_shard_is_a_usage_error(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "c"), "--shard", bad])
    assert exc.value.code == 2 and "--shard" in capsys.readouterr().err


def test_prepare_refuses_a_folder_that_is_not_rsna(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv and train_images"):
        series.prepare(tmp_path, tmp_path / "c", **SETTINGS, progress=False)


def test_train_csv_without_a_label_column_names_the_file(rsna, tmp_path):
    ds_dir = copy_dataset(rsna, tmp_path / "d")
    pd.read_csv(ds_dir / "train.csv").drop(columns="C7").to_csv(ds_dir / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"train.csv: missing column\(s\) C7"):
        series.read_rsna_labels(ds_dir)


# Reading a study
def test_read_study_orders_slices_by_position_and_gives_hu(rsna):
    for uid in uids(rsna):
        study = series.read_study(rsna / "train_images" / uid)
        assert study.uid == uid and study.hu.dtype == np.float32 and study.hu.ndim == 3
        assert np.all(np.diff(study.z_mm) < 0), "superior (larger z) first"
        assert study.spacing_mm[0] == pytest.approx(5.0) and len(study.slice_numbers) == len(study.hu)
        assert np.percentile(study.hu, 5) < -900 and study.hu.max() > 500  # air and bone in HU


def test_reversed_slice_numbering_is_sorted_by_position(rsna, tmp_path):
    ds_dir = copy_dataset(rsna, tmp_path / "d")
    uid = uncompressed_study(rsna)
    folder = ds_dir / "train_images" / uid
    before = series.read_study(folder)
    files = sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))
    n = len(files)
    for path in files:  # swap the numbering: file k becomes n + 1 - k
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = n + 1 - int(path.stem)
        path.unlink()
        ds.save_as(folder / f"r{ds.InstanceNumber}.tmp")
    for path in folder.glob("r*.tmp"):
        path.rename(folder / f"{path.stem[1:]}.dcm")
    after = series.read_study(folder)
    np.testing.assert_array_equal(after.hu, before.hu)
    np.testing.assert_array_equal(after.z_mm, before.z_mm)
    np.testing.assert_array_equal(after.slice_numbers, n + 1 - before.slice_numbers)


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, 0.0), (1.0, -1024.0), (0.5, -2048.0)])
def test_rescale_variants_give_the_same_hu(rsna, tmp_path, slope, intercept):
    ds_dir = copy_dataset(rsna, tmp_path / "d")
    folder = ds_dir / "train_images" / uncompressed_study(rsna)
    before = series.read_study(folder)

    def edit(ds, k):
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ds.PixelData = np.rint((hu - intercept) / slope).astype(np.int16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    rewrite(folder, edit)
    np.testing.assert_allclose(series.read_study(folder).hu, before.hu, atol=1e-3)


def test_segmentation_lies_on_bone_and_a_naive_transpose_does_not(rsna):
    masked = [u for u in uids(rsna) if (rsna / "segmentations" / f"{u}.nii").is_file()]
    assert masked, "the fixture has vertebra masks"
    for uid in masked:
        study = series.read_study(rsna / "train_images" / uid)
        nii = rsna / "segmentations" / f"{uid}.nii"
        mask = series.read_segmentation(nii, study)
        assert mask.shape == study.hu.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) - {0} <= set(range(1, 8)) and mask.max() > 0
        on_bone = (study.hu[mask > 0] > 150).mean()
        naive = np.asarray(nibabel.load(nii).dataobj).transpose(2, 1, 0)
        naive_on_bone = (study.hu[naive > 0] > 150).mean()
        assert on_bone > 0.6 and naive_on_bone < on_bone - 0.2, (uid, on_bone, naive_on_bone)


def test_segmentation_with_another_geometry_is_refused(rsna, tmp_path):
    uid = next(u for u in uids(rsna) if (rsna / "segmentations" / f"{u}.nii").is_file())
    img = nibabel.load(rsna / "segmentations" / f"{uid}.nii")
    moved = img.affine.copy()
    moved[:3, 3] += 1000.0  # a metre away from the slices
    nibabel.save(nibabel.Nifti1Image(np.asarray(img.dataobj), moved), tmp_path / "moved.nii")
    with pytest.raises(series.SeriesError, match="geometry does not match"):
        series.read_segmentation(tmp_path / "moved.nii", series.read_study(rsna / "train_images" / uid))


# The prepared cache
def test_cache_matches_the_contract(rsna, cache):
    out, report = cache
    labels = pd.read_csv(rsna / "train.csv", dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    boxes = pd.read_csv(rsna / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    assert report["counts"] == {"studies": 4, "prepared": 4, "already_done": 0, "failed": 0, "in_cache": 4}
    assert report["skipped"] == [] and report["label_problems"] == [] and report["slices_per_s"] > 0
    assert series.is_cache(out) and not series.is_cache(rsna) and series.is_rsna_dir(rsna)
    manifest = series.load_manifest(out)
    assert manifest["StudyInstanceUID"].tolist() == uids(rsna)
    for uid in uids(rsna):
        s = series.load_cached_study(out, uid)
        n_win, z, h, w = s["windows"].shape
        assert (n_win, h, w) == (3, SIZE, SIZE) and s["windows"].dtype == np.uint8
        assert s["z_mm"].shape == (z,) and np.allclose(np.diff(s["z_mm"]), -SPACING_MM)
        np.testing.assert_allclose(s["spacing_mm"], [SPACING_MM, CROP_MM / SIZE, CROP_MM / SIZE])
        np.testing.assert_array_equal(s["labels"], labels.loc[uid, list(series.LABEL_COLUMNS)].to_numpy(float))
        assert s["vertebrae"].shape == (z, 7) and s["box_slices"].shape == (z,)
        assert s["mask"].shape == ((z, SIZE, SIZE) if s["has_mask"] else (0, SIZE, SIZE))
        if s["has_mask"]:
            assert s["vertebrae"].any(axis=0).sum() >= 5  # most of C1..C7 appear on some slice
            bone = s["windows"][0][s["mask"] > 0].mean()
            assert bone > s["windows"][0][s["mask"] == 0].mean() + 40  # masks sit on bright bone
        some = series.load_cached_study(out, uid, keys=("box_slices", "has_boxes"))  # only these arrays
        assert set(some) == {"box_slices", "has_boxes"} and some["has_boxes"] is s["has_boxes"]
        np.testing.assert_array_equal(some["box_slices"], s["box_slices"])
        study_boxes = boxes[boxes["StudyInstanceUID"] == uid]
        assert s["has_boxes"] == (len(study_boxes) > 0) and len(s["boxes"]) == len(study_boxes)
        if len(study_boxes):
            study = series.read_study(rsna / "train_images" / uid)
            z_box = [study.z_mm[list(study.slice_numbers).index(n)] for n in study_boxes["slice_number"]]
            k = np.rint((s["z_mm"][0] - np.array(z_box)) / SPACING_MM).astype(int)
            assert np.flatnonzero(s["box_slices"]).tolist() == sorted(set(k))  # source and cache both 5 mm
            np.testing.assert_array_equal(s["boxes"][:, 0], k)
        else:
            assert not s["box_slices"].any()
    assert labels["patient_overall"].nunique() == 2  # normal and fractured studies both present


def test_resume_does_no_work_and_redoes_a_removed_study(cache, rsna, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache[0], out)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "studies").glob("*.npz")}
    again = series.prepare(rsna, out, **SETTINGS, workers=1, progress=False)
    assert again["counts"]["prepared"] == 0 and again["counts"]["already_done"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in (out / "studies").glob("*.npz")} == stamps
    redo = uids(rsna)[1]
    (out / "studies" / f"{redo}.json").unlink()
    third = series.prepare(rsna, out, **SETTINGS, workers=1, progress=False)
    assert third["counts"]["prepared"] == 1 and third["counts"]["already_done"] == 3
    changed = [n for n, t in stamps.items() if (out / "studies" / n).stat().st_mtime_ns != t]
    assert changed == [f"{redo}.npz"]
    before = (out / "prepare.json").read_text()
    with pytest.raises(ValueError, match="other settings"):  # another size
        series.prepare(rsna, out, size=48, crop_mm=CROP_MM, spacing_mm=SPACING_MM, progress=False)
    with pytest.raises(ValueError, match="other settings"):  # the same windows in another order
        series.prepare(rsna, out, **SETTINGS, windows=("soft", "bone", "wide"), progress=False)
    assert (out / "prepare.json").read_text() == before


@pytest.mark.slow
def test_two_shards_equal_one_full_run(cache, rsna, tmp_path):
    out = tmp_path / "sharded"
    first = series.prepare(rsna, out, **SETTINGS, workers=2, shard=(1, 2), progress=False)
    second = series.prepare(rsna, out, **SETTINGS, workers=1, shard=(2, 2), progress=False)
    assert first["counts"]["prepared"] == second["counts"]["prepared"] == 2
    assert pd.read_csv(out / "manifest.csv").equals(pd.read_csv(cache[0] / "manifest.csv"))
    for uid in uids(rsna):
        a, b = series.load_cached_study(cache[0], uid), series.load_cached_study(out, uid)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{uid} {key}")


# Bad input: each a clear error or a skipped study, and the other studies go on
def bad_dataset(rsna: Path, dst: Path) -> Path:
    """A copy of the fixture plus broken studies, labels and boxes (see the test below)."""
    ds_dir = copy_dataset(rsna, dst)
    good = uncompressed_study(rsna)
    files = lambda f: sorted(f.glob("*.dcm"), key=lambda p: int(p.stem))  # noqa: E731
    files(add_copy(ds_dir, good, "9.9.1"))[2].unlink()  # a missing slice
    dup = files(add_copy(ds_dir, good, "9.9.2"))
    shutil.copy(dup[2], dup[0].with_name("999.dcm"))  # duplicated position
    rewrite(
        add_copy(ds_dir, good, "9.9.3"),
        lambda ds, k: setattr(ds, "SeriesInstanceUID", f"{ds.SeriesInstanceUID[:60]}.{k % 2}"),
    )
    rewrite(add_copy(ds_dir, good, "9.9.4"), lambda ds, k: setattr(ds, "Modality", "MR"))
    add_copy(ds_dir, good, "9.9.5", label=False)  # a folder that train.csv does not name
    add_copy(ds_dir, good, "9.9.7")
    add_copy(ds_dir, good, "9.9.8")
    (ds_dir / "segmentations" / "9.9.8.nii").write_bytes(b"not a NIfTI file")  # a broken mask
    labels = pd.read_csv(ds_dir / "train.csv", dtype={"StudyInstanceUID": str})
    labels.loc[labels["StudyInstanceUID"] == "9.9.7", ["patient_overall", "C1"]] = [0, 1]  # inconsistent labels
    ghost = labels.iloc[[0]].assign(StudyInstanceUID="9.9.6")  # a study with no folder
    pd.concat([labels, ghost]).to_csv(ds_dir / "train.csv", index=False)
    boxes = pd.read_csv(ds_dir / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    first = int(files(ds_dir / "train_images" / good)[0].stem)
    bad_boxes = pd.DataFrame(
        [["9.9.6", 1, 1, 4, 4, 1], [good, 1, 1, 4, 4, 9999], [good, 40, 40, 30, 30, first]], columns=boxes.columns
    )
    pd.concat([boxes, bad_boxes]).to_csv(ds_dir / "train_bounding_boxes.csv", index=False)
    return ds_dir


@pytest.mark.slow
def test_bad_studies_labels_and_boxes_are_reported_and_the_rest_prepared(rsna, tmp_path, capsys):
    ds_dir = bad_dataset(rsna, tmp_path / "bad")
    sizes = ["--size", "32", "--crop-mm", "128", "--spacing-mm", "5"]
    code = cli.main(["data", "prepare", str(ds_dir), "--out", str(tmp_path / "c"), *sizes, "--workers", "2", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 1
    report = json.loads((tmp_path / "c" / "prepare.json").read_text())
    reasons = {item["study"]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {"9.9.1", "9.9.2", "9.9.3", "9.9.4", "9.9.8"}
    assert "cannot read the mask" in reasons["9.9.8"] and "9.9.8.nii" in reasons["9.9.8"]
    assert "missing slice" in reasons["9.9.1"] and "duplicated slice position" in reasons["9.9.2"]
    assert "999.dcm" in reasons["9.9.2"] and "mixes 2 series" in reasons["9.9.3"] and "modality MR" in reasons["9.9.4"]
    assert all(reason.startswith(str(ds_dir / "train_images" / uid)) for uid, reason in reasons.items())
    problems = "\n".join(report["label_problems"])
    assert "9.9.6 has no folder" in problems and "9.9.5: not in train.csv" in problems
    assert "9.9.6, slice 1: unknown study" in problems and "slice_number 9999 is not a slice" in problems
    assert "lies outside the 64x64 image" in problems
    manifest = series.load_manifest(tmp_path / "c")
    assert "9.9.7 has patient_overall != max(C1..C7); its labels are not used" in problems
    assert set(manifest["StudyInstanceUID"]) == set(uids(rsna)) | {"9.9.5", "9.9.7"}
    assert (
        manifest.set_index("StudyInstanceUID")
        .loc[["9.9.5", "9.9.7"], list(series.LABEL_COLUMNS)]
        .isna()
        .to_numpy()
        .all()
    )
    assert "skipped 9.9.1:" in printed and "label problem:" in printed


NO_DECODER = """
import json, sys
from cspine_utils import series
for name in ("pylibjpeg", "openjpeg", "libjpeg", "PIL", "gdcm"):
    sys.modules[name] = None  # as on a machine without the decoder plugins
report = series.prepare(sys.argv[1], sys.argv[2], size=32, crop_mm=128.0, spacing_mm=5.0, workers=1, progress=False)
print(json.dumps(report["skipped"]))
"""


@pytest.mark.slow
def test_compressed_study_without_decoder_names_the_syntax_and_packages(rsna, tmp_path):
    ds_dir = copy_dataset(rsna, tmp_path / "d")
    for uid in uids(rsna):  # no study of the copy stays compressed but one
        if is_compressed(ds_dir / "train_images" / uid):
            rewrite(ds_dir / "train_images" / uid, lambda ds, k: ds.decompress())
    j2k = uids(rsna)[0]
    before = series.read_study(ds_dir / "train_images" / j2k).hu
    rewrite(ds_dir / "train_images" / j2k, lambda ds, k: ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg"))
    np.testing.assert_array_equal(series.read_study(ds_dir / "train_images" / j2k).hu, before)  # lossless here
    command = [sys.executable, "-c", NO_DECODER, str(ds_dir), str(tmp_path / "c")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    skipped = json.loads(run.stdout.strip().splitlines()[-1])
    assert [s["study"] for s in skipped] == [j2k]
    assert "JPEG 2000 Image Compression (Lossless Only)" in skipped[0]["reason"]
    assert series.DECODER_PACKAGES in skipped[0]["reason"]
    assert len(series.load_manifest(tmp_path / "c")) == len(uids(rsna)) - 1


def test_cli_prepare_prints_a_summary_and_exits_0(rsna, tmp_path, capsys):
    args = ["data", "prepare", str(rsna), "--out", str(tmp_path / "c"), "--profile", "smoke", "--workers", "1"]
    assert cli.main([*args, "--quiet"]) == 0
    assert "prepared 4 of 4 studies (shard 1/1; 0 already done, 0 skipped)" in capsys.readouterr().out
    assert cli.main([*args, "--quiet", "--shard", "2/2"]) == 0
    assert "prepared 0 of 2 studies (shard 2/2; 2 already done, 0 skipped)" in capsys.readouterr().out

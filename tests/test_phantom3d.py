"""Phantom CT studies in the RSNA 2022 layout: files, DICOM geometry, masks, labels, continuity."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from cspine_utils import cli, phantom3d
from cspine_utils import series as ct_series

LEVELS = phantom3d.LEVELS
SMALL = {"seed": 6, "matrix": 64, "slice_mm": 5.0, "workers": 2, "progress": False}  # 4 studies: 1 in J2K


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("rsna") / "studies"
    info = phantom3d.write_rsna_dataset(out, 4, **SMALL)
    return out, info


def _series(folder):
    """DICOM datasets of a study folder sorted by ImagePositionPatient z, superior first."""
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: -float(d.ImagePositionPatient[2]))


def _hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _mask_on_slices(nii_path, series) -> np.ndarray:
    """Vertebra labels (Z, H, W) on the DICOM slices: every DICOM voxel's LPS position -> RAS -> the NIfTI
    voxel through the inverse affine (nearest neighbour)."""
    img = nib.load(nii_path)
    data, inv = np.asarray(img.dataobj), np.linalg.inv(img.affine)
    out = []
    for ds in series:
        (x0, y0, z), (dy, dx) = map(float, ds.ImagePositionPatient), map(float, ds.PixelSpacing)
        r, c = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        ras = np.stack([-(x0 + c * dx), -(y0 + r * dy), np.full(r.shape, z), np.ones(r.shape)])
        ijk = np.rint(np.tensordot(inv, ras, axes=1)[:3]).astype(int)
        out.append(data[ijk[0], ijk[1], ijk[2]])
    return np.stack(out)


def test_layout_labels_and_marker(small_set):
    out, info = small_set
    assert sorted(p.name for p in out.iterdir()) == [
        "phantom.json",
        "segmentations",
        "train.csv",
        "train_bounding_boxes.csv",
        "train_images",
    ]
    labels = pd.read_csv(out / "train.csv")
    assert list(labels.columns) == ["StudyInstanceUID", "patient_overall", *LEVELS]
    assert (labels["patient_overall"] == labels[list(LEVELS)].max(axis=1)).all()
    assert labels["patient_overall"].sum() == info["fractured"] == 2
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert set(boxes["StudyInstanceUID"]) == set(labels.loc[labels["patient_overall"] == 1, "StudyInstanceUID"])
    uids = set(labels["StudyInstanceUID"])
    assert {p.name for p in (out / "train_images").iterdir()} == uids
    assert {p.name.removesuffix(".nii") for p in (out / "segmentations").iterdir()} == uids
    marker = json.loads((out / "phantom.json").read_text())
    assert marker["fingerprint"] == phantom3d.fingerprint() and marker["params"]["n_studies"] == 4
    assert marker["j2k_studies"] == 1 and marker["slices"] == sum(
        len(list(p.glob("*.dcm"))) for p in (out / "train_images").iterdir()
    )


def test_dicom_tags_geometry_and_j2k_decoding(small_set):
    out, _ = small_set
    syntaxes, intercepts, directions = set(), set(), set()
    for folder in (out / "train_images").iterdir():
        series = _series(folder)
        numbers = [int(ds.InstanceNumber) for ds in series]
        assert sorted(numbers) == list(range(1, len(series) + 1))
        assert {f"{n}.dcm" for n in numbers} == {p.name for p in folder.glob("*.dcm")}
        directions.add(numbers[0] == 1)
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in series])
        assert np.allclose(np.diff(z), -5.0, atol=1e-3), "evenly spaced, one position per slice"
        for ds in series[:2]:
            assert ds.Modality == "CT" and ds.StudyInstanceUID == folder.name
            assert ds.PixelRepresentation == 1 and ds.BitsStored == 16 and ds.pixel_array.dtype == np.int16
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(ds.SliceThickness) == 5.0 and float(ds.PixelSpacing[0]) > 0
            assert float(ds.RescaleSlope) == 1.0
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
            intercepts.add(float(ds.RescaleIntercept))
        assert len({ds.SeriesInstanceUID for ds in series}) == 1
        hu = _hu(series[len(series) // 2])
        assert (np.abs(hu) < 100).sum() > 500 and hu.max() > 400 and hu.min() < -1900, "tissue, bone, padding"
    assert syntaxes == {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.JPEG2000Lossless}
    assert intercepts == {-1024.0, 0.0} and directions == {True, False}


def test_masks_sit_on_bone_and_labels_match(small_set):
    out, _ = small_set
    labels = pd.read_csv(out / "train.csv").set_index("StudyInstanceUID")
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    for uid, row in labels.iterrows():
        series = _series(out / "train_images" / uid)
        hu = np.stack([_hu(ds) for ds in series])
        seg = _mask_on_slices(out / "segmentations" / f"{uid}.nii", series)
        assert set(np.unique(seg)) == set(range(8)), "all seven vertebrae labelled"
        assert np.median(hu[seg > 0]) > 250 > np.median(hu[(seg == 0) & (hu > -500)])
        levels_by_slice = [np.median(seg[s][seg[s] > 0]) for s in range(len(seg)) if (seg[s] > 0).any()]
        assert np.all(np.diff(levels_by_slice) >= 0), "C1 -> C7 from superior to inferior"
        study = ct_series.read_study(out / "train_images" / uid)  # the course's reader agrees
        assert np.array_equal(ct_series.read_segmentation(out / "segmentations" / f"{uid}.nii", study), seg)
        assert np.allclose(study.hu[hu > -2000], hu[hu > -2000]), "same HU (the reader turns padding into air)"
        naive = np.asarray(nib.load(out / "segmentations" / f"{uid}.nii").dataobj).transpose(2, 1, 0)
        assert not np.array_equal(naive, seg), "stored in another orientation than the slices"
        numbers, hit_levels = [int(ds.InstanceNumber) for ds in series], set()
        for _, b in boxes[boxes["StudyInstanceUID"] == uid].iterrows():
            s = numbers.index(int(b["slice_number"]))
            box = seg[s][int(b["y"]) : int(b["y"] + b["height"]), int(b["x"]) : int(b["x"] + b["width"])]
            hit = set(np.unique(box)) - {0}
            assert hit & {k + 1 for k, lv in enumerate(LEVELS) if row[lv]}, "each box lies on a fractured vertebra"
            hit_levels |= {LEVELS[k - 1] for k in hit}
            assert 0 <= b["x"] and b["x"] + b["width"] <= series[s].Columns and b["y"] + b["height"] <= series[s].Rows
        assert {lv for lv in LEVELS if row[lv]} <= hit_levels, "every fractured vertebra has boxes on it"


def test_fracture_spans_contiguous_slices_inside_its_vertebra():
    study = phantom3d.plan_study(0, 0, 96, 2.5, {"C5": "linear", "C1": "burst"}, 0.5)
    vol = phantom3d.render_study(study)
    for level in ("C1", "C5"):
        k = LEVELS.index(level) + 1
        slices = np.where((vol["mask"] & np.isin(vol["seg"], [k])).any(axis=(1, 2)))[0]
        assert len(slices) >= 2 and np.all(np.diff(slices) == 1), (level, slices)
        assert all((vol["seg"][s] == k).any() for s in slices)
    assert set(np.unique(vol["seg"][vol["mask"]])) <= {0, 1, 2, 5}, "fracture voxels lie on the broken vertebrae"


def test_volume_is_continuous_along_z():
    """Neighbouring slices of the true HU volume are alike (lowest where a disc meets a body), unlike the
    same slice of another patient."""
    vol, other = (phantom3d.render_study(phantom3d.plan_study(i, 0, 96, 2.5, {}, 0.5)) for i in (1, 2))
    t, u = vol["hu_true"].clip(-200, 1500), other["hu_true"].clip(-200, 1500)
    corr = [np.corrcoef(t[s].ravel(), t[s + 1].ravel())[0, 1] for s in range(len(t) - 1)]
    assert np.median(corr) > 0.95 and min(corr) > 0.75, np.round(corr, 3)
    across = [np.corrcoef(t[s].ravel(), u[s].ravel())[0, 1] for s in range(min(len(t), len(u)))]
    assert np.median(across) < 0.8, np.round(across, 3)
    spine = (vol["seg"] > 0).sum(axis=(1, 2))
    assert (spine[3:-3] > 0).all(), "bone on every slice of the spine (discs lie between posterior elements)"


def test_same_seed_same_bytes(tmp_path):
    def digest(folder):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    opts = {"seed": 6, "matrix": 64, "slice_mm": 5.0, "progress": False}
    a = digest(tmp_path / "a") if phantom3d.write_rsna_dataset(tmp_path / "a", 2, workers=1, **opts) else None
    b = digest(tmp_path / "b") if phantom3d.write_rsna_dataset(tmp_path / "b", 2, workers=2, **opts) else None
    assert a == b and len(a) > 20
    assert not list(tmp_path.glob(".*tmp*")), "no temporary folder left"


def test_cli_round_trip_reuse_and_refusal(tmp_path, capsys):
    out = tmp_path / "rsna set"
    args = ["data", "synth", "--format", "rsna", "--studies", "2", "--matrix", "64", "--slice-mm", "5"]
    args += ["--out", str(out), "--quiet", "--workers", "1"]
    assert cli.main(args) == 0
    assert "wrote 2 CT studies" in capsys.readouterr().out
    stamp = (out / "train.csv").stat().st_mtime_ns
    assert cli.main(args) == 0 and "up to date" in capsys.readouterr().out
    assert (out / "train.csv").stat().st_mtime_ns == stamp
    user = tmp_path / "mine"
    user.mkdir()
    (user / "scan.dcm").write_text("x")
    assert cli.main([*args[:-5], "--out", str(user), "--quiet"]) == 1
    assert "without our phantom.json" in capsys.readouterr().err and (user / "scan.dcm").read_text() == "x"
    assert cli.main([*args[:-5], "--out", str(user / "scan.dcm" / "set"), "--quiet"]) == 1
    assert "cannot write the studies" in capsys.readouterr().err
    assert cli.main([*args[:4], "--studies", "0", "--out", str(tmp_path / "z"), "--quiet"]) == 1
    assert "positive number of studies" in capsys.readouterr().err
    assert cli.main([*args[:6], "--matrix", "32", "--out", str(tmp_path / "z"), "--quiet"]) == 1
    assert "need --matrix >= 64" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_label_plan_follows_rsna_shares():
    plans = phantom3d.plan_labels(4000, 1)
    fractured = [p for p in plans if p]
    assert len(fractured) == 2000
    assert abs(np.mean([len(p) == 1 for p in fractured]) - 0.7) < 0.03
    counts = pd.Series([lv for p in fractured for lv in p]).value_counts(normalize=True)
    assert np.allclose(counts.reindex(LEVELS).to_numpy(), phantom3d.LEVEL_SHARES, atol=0.03), counts
    c1_types = pd.Series([p["C1"] for p in fractured if "C1" in p]).value_counts(normalize=True)
    assert c1_types["burst"] > 0.3, "Jefferson-type ring breaks are common at C1"


def test_scan_and_subject_do_not_depend_on_the_label():
    """The label stream never reaches subject, scan or geometry: same study with and without a fracture, and
    a cross-validated model on the scan metadata cannot tell the classes apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    a = phantom3d.plan_study(3, 0, 64, 2.5, {"C5": "burst"}, 0.5)
    b = phantom3d.plan_study(3, 0, 64, 2.5, {}, 0.5)
    assert a["subject"] == b["subject"] and a["scan"] == b["scan"] and np.array_equal(a["depths"], b["depths"])
    plans = phantom3d.plan_labels(300, 2)
    rows, y = [], []
    for i, fractures in enumerate(plans):
        st = phantom3d.plan_study(i, 2, 128, 2.5, fractures, 0.5)
        sub, scan = st["subject"], st["scan"]
        rows.append([sub.fov_mm, sub.dose, sub.kernel_sigma_mm, sub.kernel_boost, *sub.shift_mm, len(st["depths"])])
        rows[-1] += [scan["intercept"], scan["j2k"], scan["ascending"], scan["z_top"], scan["kvp"], sub.window[0]]
        y.append(bool(fractures))
    x = np.asarray(rows, dtype=float)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    auc = cross_val_score(LogisticRegression(max_iter=1000), x, y, cv=5, scoring="roc_auc").mean()
    assert 0.38 < auc < 0.62, auc


def test_interrupted_write_leaves_no_half_dataset(tmp_path, monkeypatch):
    opts = {"seed": 6, "matrix": 64, "slice_mm": 5.0, "workers": 1, "progress": False}
    out = tmp_path / "set"
    phantom3d.write_rsna_dataset(out, 1, **opts)
    before = (out / "train.csv").read_text()
    real = phantom3d.write_study

    def fail_on_second(root, study):
        if study["index"] == 1:
            raise RuntimeError("disk full")
        return real(root, study)

    monkeypatch.setattr(phantom3d, "write_study", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        phantom3d.write_rsna_dataset(out, 3, **opts)
    assert (out / "train.csv").read_text() == before, "the previous set is kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"], "no temporary folder left"

"""Data discovery in every layout, source groups, grouped splits and leakage."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import kaggle_layout
import numpy as np
import pandas as pd
import pytest
from conftest import KAGGLE_LEAKY, KAGGLE_SOURCES, smooth_random_image
from PIL import Image

from cspine_utils import data


def write_images(folder: Path, n: int, seed: int, size: int = 64, mode: str = "L", ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{seed}_{i}{ext}"
        smooth_random_image(seed * 100 + i, size).convert(mode).save(path)
        paths.append(path)
    return paths


def synthetic_split_frame(n_groups: int = 300, seed: int = 0) -> pd.DataFrame:
    """A manifest of groups of 1-5 images (no files needed for splitting)."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "fracture" if rng.random() < 0.3 else "normal"
        rows += [
            {"path": f"/d/{g}_{i}.png", "label": label, "group": f"G{g:03d}"} for i in range(int(rng.integers(1, 6)))
        ]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ synthetic layout
def test_discover_synthetic_layout(synthetic_dataset):
    disc = data.discover(synthetic_dataset)
    table = pd.read_csv(synthetic_dataset / "manifest.csv", keep_default_na=False)
    m = disc.manifest
    assert disc.layout == "synthetic" and disc.root == synthetic_dataset.resolve()
    assert len(m) == len(table) and disc.rejected.empty
    assert list(m.columns[:8]) == data.MANIFEST_COLUMNS
    assert {"subject_id", "level", "fracture_type", "difficulty", "mask_path"} <= set(m.columns)
    assert (m["group"] == m["subject_id"]).all()
    assert set(m["split"]) == {"train", "val"}
    assert m["label"].value_counts().to_dict() == table["label"].value_counts().to_dict()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m["path"])
    fractures = m[m["label"] == "fracture"]
    assert (fractures["mask_path"] != "").all() and all(Path(p).is_file() for p in fractures["mask_path"])
    assert (m.loc[m["label"] == "normal", "mask_path"] == "").all()
    assert (m["width"] > 0).all() and (m["mode"] == "L").all()
    assert data.cross_split_leakage(m) == []


def test_choose_split_keeps_clean_folders_and_carves_test(synthetic_dataset):
    disc = data.discover(synthetic_dataset)
    out, message = data.choose_split(disc, seed=0)
    assert "kept the dataset's own train/val folders" in message and "carved test" in message
    assert set(out["split"]) == {"train", "val", "test"}
    # val is untouched; test comes only from train, whole subjects at a time
    np.testing.assert_array_equal(out["split"] == "val", disc.manifest["split"] == "val")
    assert (out.loc[out["split"] == "test", "folder_split"] == "train").all()
    assert data.cross_split_leakage(out) == []


# ------------------------------------------------------------------------ Kaggle layout
def test_discover_kaggle_from_parent_and_from_the_folder_itself(kaggle_dataset):
    from_parent = data.discover(kaggle_dataset)
    itself = data.discover(kaggle_dataset / "cervical fracture")
    for disc in (from_parent, itself):
        assert disc.layout == "kaggle"
        assert disc.root.name == "cervical fracture"
        assert disc.rejected.empty
    pd.testing.assert_frame_equal(from_parent.manifest, itself.manifest)
    m = from_parent.manifest
    n_sources = sum(len(v) for v in KAGGLE_SOURCES.values())
    assert len(m) == 4 * n_sources
    assert set(m["mode"]) == {"L", "RGB"}
    assert set(zip(m["width"], m["height"])) == {(512, 512), (224, 224)}
    assert set(m["split"]) == {"train", "val"}
    assert m["label"].value_counts().to_dict() == {"fracture": 24, "normal": 24}
    names = m["path"].map(lambda p: Path(p).name)
    assert "CSFDV1B10 (18)-sharpened-rotated3.png" in set(names)
    assert m["phash"].str.len().eq(256).all()


def test_kaggle_sources_are_stems_and_groups_are_scans(kaggle_dataset):
    m = data.discover(kaggle_dataset).manifest
    expected = {s for stems in KAGGLE_SOURCES.values() for s in stems}
    assert set(m["source"]) == expected
    assert (m.groupby("source").size() == 4).all()
    # "CSFDV1B10 (18)" is slice 18 of scan CSFDV1B10: the scan is the patient and the group
    assert (m["patient"] == m["source"].str.split(" (", regex=False).str[0]).all()
    assert (m["group"] == m["patient"]).all()
    assert m.groupby("group")["source"].nunique().to_dict()["CSFDV1B10"] == 2


def test_leakage_detection_finds_shared_stems_and_scans(kaggle_dataset):
    m = data.discover(kaggle_dataset).manifest
    assert data.cross_split_leakage(m.assign(group=m["source"])) == sorted(KAGGLE_LEAKY)
    # by scan, NCSV1B9 leaks too: its slice (2) is in train, its slice (3) in val
    assert data.cross_split_leakage(m) == ["CSFDV1B10", "NCSV1B1", "NCSV1B9"]
    assert "CSFDV1B8" not in data.cross_split_leakage(m)  # its only slice is in val only


def test_choose_split_resplits_when_the_folders_leak(kaggle_dataset):
    disc = data.discover(kaggle_dataset)
    out, message = data.choose_split(disc, seed=0)
    assert "leak" in message and "re-split by group" in message
    assert "'CSFDV1B10'" in message
    assert data.cross_split_leakage(out) == []
    assert data.cross_split_leakage(out.assign(group=out["patient"])) == []
    assert set(out["split"]) == {"train", "val", "test"}
    assert (out["folder_split"] == disc.manifest["split"]).all()
    kept, kept_message = data.choose_split(disc, policy="keep")
    assert "optimistic" in kept_message and data.cross_split_leakage(kept) == ["CSFDV1B10", "NCSV1B1", "NCSV1B9"]


def test_renamed_and_reencoded_copies_join_their_source_group(kaggle_copy):
    root = kaggle_copy / "cervical fracture"
    source = root / "train" / "fracture" / "CSFDV1B7 (1).png"
    shutil.copy(source, root / "val" / "fracture" / "IMG_0001.png")  # renamed exact copy
    small = Image.open(source).convert("RGB").resize((224, 224))
    small.save(root / "val" / "fracture" / "scan 7.jpg", quality=90)  # re-encoded, resized copy
    m = data.discover(kaggle_copy).manifest
    by_name = m.set_index(m["path"].map(lambda p: Path(p).name))
    assert by_name.at["IMG_0001.png", "source"] == "CSFDV1B7 (1)"
    assert by_name.at["scan 7.jpg", "source"] == "CSFDV1B7 (1)"
    # no name gives their patient, but their copy joins them to scan CSFDV1B7's group
    assert by_name.at["IMG_0001.png", "patient"] == "" and by_name.at["scan 7.jpg", "group"] == "CSFDV1B7"
    assert "CSFDV1B7" in data.cross_split_leakage(m)
    name_only = data.assign_groups(m, "name")
    assert name_only.loc[name_only["path"].str.endswith("IMG_0001.png"), "group"].item() == "IMG_0001"
    assert name_only.loc[name_only["path"].str.endswith("IMG_0001.png"), "source"].item() == "IMG_0001"


def test_near_duplicate_clusters_without_stored_hashes(kaggle_dataset):
    m = data.discover(kaggle_dataset).manifest.drop(columns="phash")
    clusters = data.near_duplicate_clusters(m)
    assert len(clusters) == len(m) and (clusters.index == m.index).all()
    # the original and its sharpened copy are one cluster; unrelated sources never share one
    for source, part in m.groupby("source"):
        plain = part["path"].str.endswith(f"{source}.png")
        sharp = part["path"].str.endswith(f"{source}-sharpened.png")
        assert clusters[part.index[plain]].item() == clusters[part.index[sharp]].item()
    assert (pd.crosstab(clusters, m["source"]).gt(0).sum(axis=1) == 1).all()


# ------------------------------------------------------------------------ other layouts
def test_class_folders_with_aliases(tmp_path):
    write_images(tmp_path / "ds" / "Abnormal", 5, seed=1)
    write_images(tmp_path / "ds" / "healthy", 6, seed=2, mode="RGB", ext=".jpg")
    disc = data.discover(tmp_path / "ds")
    assert disc.layout == "class-folders"
    m = disc.manifest
    assert m["label"].value_counts().to_dict() == {"normal": 6, "fracture": 5}
    assert (m["split"] == "").all()
    assert m["group"].nunique() == 11  # unrelated images: each its own group
    out, message = data.choose_split(disc)
    assert "no split folders" in message
    assert set(out["split"]) <= {"train", "val", "test"} and "train" in set(out["split"])


def test_pre_split_folders_any_case(tmp_path):
    root = tmp_path / "xr"
    for split, seed in (("Train", 1), ("VALID", 3), ("test", 5)):
        write_images(root / split / "fracture", 3, seed=seed)
        write_images(root / split / "normal", 3, seed=seed + 1, ext=".bmp")
    disc = data.discover(root)
    assert disc.layout == "split-folders"
    assert disc.manifest["split"].value_counts().to_dict() == {"train": 6, "val": 6, "test": 6}
    out, message = data.choose_split(disc)
    assert "kept the dataset's own train/val/test folders" in message
    assert (out["split"] == disc.manifest["split"]).all()


def test_wrapper_folder_is_entered(tmp_path):
    write_images(tmp_path / "download" / "dataset" / "fracture", 2, seed=1)
    write_images(tmp_path / "download" / "dataset" / "normal", 2, seed=2)
    disc = data.discover(tmp_path / "download")
    assert disc.layout == "class-folders" and disc.root.name == "dataset"


def test_csv_layout_relative_and_absolute_paths(tmp_path):
    frac = write_images(tmp_path / "img" / "a", 3, seed=1)
    norm = write_images(tmp_path / "img" / "b", 3, seed=2, ext=".tif")
    rows = [
        {"path": p.relative_to(tmp_path).as_posix(), "label": "1", "group": f"P{i // 2}"} for i, p in enumerate(frac)
    ]
    rows += [{"path": str(p), "label": "Negative", "group": f"Q{i}"} for i, p in enumerate(norm)]
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    for given in (csv, tmp_path):
        disc = data.discover(given)
        assert disc.layout == "csv"
        m = disc.manifest
        assert m["label"].tolist() == ["fracture"] * 3 + ["normal"] * 3
        assert m["group"].tolist() == ["P0", "P0", "P1", "Q0", "Q1", "Q2"]  # the CSV's own groups
        assert (m["split"] == "").all()


def test_csv_with_unknown_label_lists_it(tmp_path):
    write_images(tmp_path, 1, seed=1)
    csv = tmp_path / "my.csv"
    csv.write_text("path,label\nimg_1_0.png,maybe\n")
    with pytest.raises(ValueError, match="'maybe'"):
        data.discover(csv)


def test_saved_manifest_round_trips_and_can_be_rediscovered(kaggle_dataset, tmp_path, monkeypatch):
    m = data.discover(kaggle_dataset).manifest
    m.loc[0, "group"] = "007"  # must stay text
    path = data.save_manifest(m, tmp_path / "out" / "manifest.csv")
    back = data.load_manifest(path)
    assert back["group"].iloc[0] == "007" and back["split"].eq(m["split"]).all()
    assert back["width"].dtype.kind == "i"
    assert back["path"].tolist() == m["path"].tolist()
    again = data.discover(path)
    assert again.layout == "csv" and len(again.manifest) == len(m)
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "art"))
    assert data.artifacts_manifest_path() == tmp_path / "art" / "data" / "manifest.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        data.load_manifest(tmp_path / "nope.csv")


def test_course_manifest_is_notebook_02s_product_or_says_run_02(kaggle_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "art"))
    expected = str(tmp_path / "art" / "data" / "manifest.csv")
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load_course_manifest()
    assert expected in str(excinfo.value)
    assert "run notebooks/02_preprocessing_augmentation.ipynb first" in str(excinfo.value)
    m = data.discover(kaggle_dataset).manifest
    data.save_manifest(m, data.artifacts_manifest_path())
    back = data.load_course_manifest()
    assert back["path"].tolist() == m["path"].tolist() and back["split"].tolist() == m["split"].tolist()


# ------------------------------------------------------------------------ groups and splits
@pytest.mark.parametrize(
    "name, stem",
    [
        ("CSFDV1B10 (18)-sharpened-rotated3.png", "CSFDV1B10 (18)"),
        ("CSFDV1B10 (18)-rotated1.png", "CSFDV1B10 (18)"),
        ("CSFDV1B10 (18).png", "CSFDV1B10 (18)"),
        ("/some dir/NCSV1B1 (4)-sharpened.PNG", "NCSV1B1 (4)"),
        ("S00001_C4.png", "S00001_C4"),
        ("IM-0001-0023.dcm", "IM-0001-0023"),
        ("scan_012_aug3.jpg", "scan_012"),
        ("scan 5 - Copy.png", "scan 5"),
    ],
)
def test_source_group_from_name(name, stem):
    assert data.source_group_from_name(name) == stem


def test_perceptual_hash_is_stable_across_formats_and_separates_images():
    base = smooth_random_image(1)
    grey = data._pil_to_unit(base)
    rgb_small = data._pil_to_unit(base.convert("RGB").resize((224, 224)))
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=80)
    jpeg = data._pil_to_unit(Image.open(buf))
    other = data._pil_to_unit(smooth_random_image(2))
    h = data.perceptual_hash(grey)
    assert 0 <= h < 2 ** (data.DEFAULT_HASH_SIZE**2)

    def dist(a, b):
        return bin(data.perceptual_hash(a) ^ data.perceptual_hash(b)).count("1")

    assert dist(grey, grey) == 0
    assert dist(grey, rgb_small) <= data.DEFAULT_HASH_DISTANCE
    assert dist(grey, jpeg) <= data.DEFAULT_HASH_DISTANCE
    assert dist(grey, other) > 4 * data.DEFAULT_HASH_DISTANCE
    assert data.perceptual_hash(grey, hash_size=8) < 2**64


def test_grouped_split_no_group_in_two_splits_roughly_80_10_10():
    df = synthetic_split_frame()
    out = data.grouped_stratified_split(df, fractions=(0.8, 0.1, 0.1), seed=0)
    assert (out.index == df.index).all() and (out["path"] == df["path"]).all()
    assert out.groupby("group")["split"].nunique().max() == 1
    assert data.cross_split_leakage(out) == []
    share = out["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.8, abs=0.03)
    assert share["val"] == pytest.approx(0.1, abs=0.03)
    assert share["test"] == pytest.approx(0.1, abs=0.03)
    overall = (df["label"] == "fracture").mean()
    for _, part in out.groupby("split"):
        assert (part["label"] == "fracture").mean() == pytest.approx(overall, abs=0.05)


def test_grouped_split_is_deterministic_for_a_seed():
    df = synthetic_split_frame()
    a = data.grouped_stratified_split(df, seed=3)
    b = data.grouped_stratified_split(df, seed=3)
    c = data.grouped_stratified_split(df, seed=4)
    assert (a["split"] == b["split"]).all()
    assert not (a["split"] == c["split"]).all()


def test_grouped_split_small_dataset_fills_every_split():
    df = pd.DataFrame(
        {
            "path": [f"/{i}" for i in range(24)],
            "label": ["fracture", "normal"] * 12,
            "group": [f"g{i // 2}" for i in range(24)],
        }
    )
    df["label"] = np.where(df["group"].str[1:].astype(int) < 6, "fracture", "normal")
    out = data.grouped_stratified_split(df, seed=0)
    assert set(out["split"]) == {"train", "val", "test"}


def test_grouped_split_input_errors():
    df = synthetic_split_frame(10)
    with pytest.raises(ValueError, match="sum"):
        data.grouped_stratified_split(df, fractions=(0.8, 0.3))
    with pytest.raises(ValueError, match="assign_groups"):
        data.grouped_stratified_split(df.drop(columns="group"))


def test_cross_split_leakage_ignores_unsplit_rows():
    df = pd.DataFrame({"group": ["a", "a", "b", "b", "c"], "split": ["train", "val", "train", "", "test"]})
    assert data.cross_split_leakage(df) == ["a"]


def test_read_image_grey_and_rgb_copies_agree(tmp_path):
    base = smooth_random_image(7, 64)
    base.save(tmp_path / "g.png")
    base.convert("RGB").save(tmp_path / "c.png")
    base.convert("P").save(tmp_path / "p.png")
    g = data.read_image(tmp_path / "g.png")
    assert g.dtype == np.float32 and g.shape == (64, 64) and 0 <= g.min() and g.max() <= 1
    np.testing.assert_allclose(data.read_image(tmp_path / "c.png"), g, atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(data.read_image(tmp_path / "p.png"), g, atol=1 / 255 + 1e-6)


def test_check_two_classes():
    data.check_two_classes(pd.DataFrame({"label": ["fracture", "normal"]}))
    with pytest.raises(ValueError, match="only one class found: 'normal'"):
        data.check_two_classes(pd.DataFrame({"label": ["normal", "normal"]}))


# ------------------------------------------------------------------------ patients
def test_patient_keys_from_names_columns_and_subjects():
    m = pd.DataFrame(
        {
            "path": ["/d/CSFDV1B10 (18)-sharpened-rotated3.png", "/d/a (2).png", "/d/IMG_7.png", "/d/x.png"],
            "label": ["fracture"] * 4,
            "patient_id": ["", "P9", "", ""],
            "subject_id": ["", "S1", "S2", ""],
        }
    )
    assert data.patient_keys(m).tolist() == ["CSFDV1B10", "P9", "S2", ""]
    assert data.patient_from_name("scan 7 (3) - Copy.png") == "scan 7"
    assert data.patient_from_name("IM-0001-0023.dcm") == ""


def test_grouped_split_never_separates_a_patient(tmp_path):
    disc = data.discover(kaggle_layout.write_scans(tmp_path, kaggle_layout.BALANCED))
    m = disc.manifest
    assert m["patient"].nunique() == 10 and (m["group"] == m["patient"]).all()
    assert data.cross_split_leakage(m) == sorted(m["patient"].unique())  # each scan's last slice is in val
    out, message = data.choose_split(disc, seed=0, fractions=(0.6, 0.2, 0.2))
    assert "re-split by group" in message
    assert out.groupby("patient")["split"].nunique().max() == 1
    assert out.groupby("source")["split"].nunique().max() == 1
    assert set(out["split"]) == {"train", "val", "test"}


def test_csv_patient_column_makes_the_groups(tmp_path):
    paths = write_images(tmp_path / "img", 6, seed=4)
    rows = [
        {"path": p.name, "label": "fracture" if i < 3 else "normal", "Patient_ID": f"P{i % 2}"}
        for i, p in enumerate(paths)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "img" / "labels.csv", index=False)
    m = data.discover(tmp_path / "img" / "labels.csv").manifest
    assert m["patient"].tolist() == ["P0", "P1", "P0", "P1", "P0", "P1"]
    assert (m["group"] == m["patient"]).all()
    out = data.grouped_stratified_split(m, seed=0)
    assert out.groupby("patient")["split"].nunique().max() == 1

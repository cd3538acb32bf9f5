"""Tests of cspine_utils.audit and `cspine audit` on real files written to tmp_path.

Two datasets:
* a small copy of the public Kaggle layout built from the phantom, with that set's flaws (several
  augmented copies of each source slice, the same sources in train and val, an exact copy, a
  broken file, and classes that differ by anatomical level: fractures from C1-C2, normals from
  C6-C7) - the audit must name the leaking sources and raise the shortcut alarm;
* our default synthetic dataset - no alarm, no leakage.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import kaggle_layout
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from cspine_utils import audit, cli, phantom

N_SOURCES_PER_CLASS = 10
LEAKING_EVERY = 2  # every second source slice has copies in both train and val


def _copies(im: Image.Image) -> dict[str, Image.Image]:
    """Six augmented copies of a 512x512 'L' slice, named as in the Kaggle set."""
    sharp = im.filter(ImageFilter.SHARPEN)
    return {
        "": im,
        "-sharpened": sharp,
        "-rotated3": im.rotate(3),
        "-sharpened-rotated3": sharp.rotate(3),
        "-rotated-4": im.rotate(-4),
        "-resized": im.resize((224, 224), Image.Resampling.BILINEAR).convert("RGB"),
    }


def build_kaggle_fixture(parent: Path) -> dict:
    """Write ``<parent>/cervical fracture/{train,val}/{fracture,normal}/`` and return what was put there."""
    root = parent / "cervical fracture"
    rng = np.random.default_rng(0)
    leaking, clean = [], []
    plan = (("fracture", ("C1", "C2"), "CSFDV1B"), ("normal", ("C6", "C7"), "CSNDV1B"))
    for label, levels, prefix in plan:
        for k in range(N_SOURCES_PER_CLASS):
            subject = dataclasses.replace(phantom.sample_subject(rng, f"{prefix}{k}"), matrix=512)
            ftype = phantom.FRACTURE_TYPES[k % 3] if label == "fracture" else "none"
            spec = phantom.SliceSpec(
                subject=subject, level=levels[k % 2], fracture_type=ftype, difficulty=0.3, seed=100 + k
            )
            image = Image.fromarray(phantom.render_slice(spec).image, mode="L")
            stem = f"{prefix}{10 + k} ({18 + 3 * k})"
            leaks = k % LEAKING_EVERY == 0
            (leaking if leaks else clean).append(stem)
            for j, (suffix, copy) in enumerate(_copies(image).items()):
                split = "val" if leaks and j >= 4 else "train"
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                copy.save(folder / f"{stem}{suffix}.png")
    # an exact byte copy under another name, and a file that is not a PNG at all
    src = root / "train" / "normal" / "CSNDV1B11 (21).png"
    shutil.copyfile(src, root / "train" / "normal" / "CSNDV1B11 (21) - Copy.png")
    (root / "train" / "fracture" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return {"root": root, "leaking": leaking, "clean": clean}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> dict:
    info = build_kaggle_fixture(tmp_path_factory.mktemp("kaggle"))
    info["report"] = audit.audit_dataset(info["root"], seed=0)
    return info


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "synthetic"
    phantom.generate_dataset(out, phantom.SynthConfig(n=100, seed=3), workers=1, progress=False)
    return out


# --------------------------------------------------------------------------------------------
# The flawed Kaggle-like set
# --------------------------------------------------------------------------------------------
def test_kaggle_fixture_counts_and_sizes(kaggle):
    rep = kaggle["report"]
    n_expected = 2 * N_SOURCES_PER_CLASS * 6 + 1
    assert rep.n_files == n_expected
    assert rep.n_rejected == 1
    assert "broken.png" in rep.tables["rejected"]["path"].iloc[0]
    counts = rep.tables["counts"]
    assert counts.loc["total", "total"] == n_expected
    assert set(counts.columns) >= {"train", "val"}
    sizes = rep.tables["sizes"]
    assert {"512x512", "224x224"} <= set(sizes["size"])
    assert set(sizes.loc[sizes["size"] == "224x224", "mode"]) == {"RGB"}


def test_kaggle_fixture_groups_and_copies(kaggle):
    rep = kaggle["report"]
    assert rep.n_groups == 2 * N_SOURCES_PER_CLASS
    assert rep.copies_per_group["median"] >= 6
    assert any("pre-augmented" in w for w in rep.warnings)
    assert rep.n_exact_duplicates == 1
    assert any("exact duplicates" in w for w in rep.warnings)
    assert any("rejected" in w for w in rep.warnings)


def test_kaggle_fixture_names_the_leaking_groups(kaggle):
    rep = kaggle["report"]
    leaking = rep.leaking_groups
    assert len(leaking) == len(kaggle["leaking"])
    for stem in kaggle["leaking"]:
        assert any(stem in g for g in leaking), f"{stem} not reported as leaking: {leaking}"
    for stem in kaggle["clean"]:
        assert not any(stem in g for g in leaking), f"{stem} wrongly reported as leaking"
    warning = next(w for w in rep.warnings if "leakage" in w)
    assert kaggle["leaking"][0] in warning
    assert set(rep.tables["leakage"]["group"]) == set(leaking)


def test_kaggle_fixture_raises_the_shortcut_alarm(kaggle):
    rep = kaggle["report"]
    assert rep.shortcut_auc is not None
    assert rep.shortcut_auc >= audit.SHORTCUT_AUC_THRESHOLD
    assert rep.shortcut_alarm
    assert "StratifiedGroupKFold" in rep.shortcut_method
    assert any(w.startswith("SHORTCUT ALARM") for w in rep.warnings)
    text = rep.to_text()
    assert "ALARM" in text and "Cross-split leakage" in text


def test_text_report_shows_no_machine_path(kaggle):
    text = str(kaggle["report"])
    assert text == kaggle["report"].to_text()
    assert text.startswith("Dataset audit: …/") and str(kaggle["root"].parent) not in text
    assert "not a flaw by itself" in text, "near-duplicate clusters are explained beside their count"


def test_report_is_deterministic(kaggle):
    again = audit.audit_dataset(kaggle["root"], seed=0)
    assert again.to_dict() == kaggle["report"].to_dict()


# --------------------------------------------------------------------------------------------
# The default synthetic set: no false alarms
# --------------------------------------------------------------------------------------------
def test_synthetic_dataset_is_clean(synthetic):
    rep = audit.audit_dataset(synthetic, seed=0)
    assert rep.layout == "synthetic"
    assert rep.n_files == 100
    assert rep.leaking_groups == []
    assert rep.shortcut_auc is not None
    assert rep.shortcut_auc < audit.SHORTCUT_AUC_THRESHOLD
    assert not rep.shortcut_alarm
    assert not any("SHORTCUT" in w or "leakage" in w for w in rep.warnings)
    assert not any("pre-augmented" in w for w in rep.warnings)
    assert rep.n_patients == rep.n_groups == 20  # the phantom's subjects, 5 slices each
    assert not rep.labels_confounded_with_patients and rep.leaking_patients == []


def test_single_class_dataset_warns_and_goes_on(tmp_path, synthetic):
    root = tmp_path / "only_normal"
    for split in ("train", "val"):
        shutil.copytree(synthetic / split / "normal", root / split / "normal")
    rep = audit.audit_dataset(root, seed=0)
    assert rep.labels == ["normal"]
    assert rep.shortcut_auc is None
    assert any("one class" in w for w in rep.warnings)
    json.dumps(rep.to_dict())


def test_shortcut_auc_is_near_chance_on_noise():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 40))
    y = np.tile([0, 1], 60)
    groups = np.repeat(np.arange(40), 3)
    auc, method = audit.shortcut_auc(X, y, groups, seed=0)
    assert 0.3 < auc < 0.7
    assert "StratifiedGroupKFold" in method
    assert audit.shortcut_auc(X, np.zeros(120, dtype=int), groups)[0] is None


def test_thumbnail_features_shape_and_values():
    img = np.zeros((100, 60), dtype=np.float32)
    img[:, 30:] = 1.0
    f = audit.thumbnail_features(img, mode="RGB")
    assert f.shape == (audit.THUMBNAIL_SIZE**2 + len(audit.STAT_FEATURES),)
    stats = dict(zip(audit.STAT_FEATURES, f[-len(audit.STAT_FEATURES) :]))
    assert stats["mean"] == pytest.approx(0.5, abs=0.01)
    assert stats["width"] == 60 and stats["height"] == 100 and stats["colour_mode"] == 1
    with pytest.raises(ValueError):
        audit.thumbnail_features(np.zeros((4, 4, 3)))


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        audit.audit_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="seed"):
        audit.audit_dataset(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="max_files"):
        audit.audit_dataset(tmp_path, max_files=1)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def test_cli_json_round_trip(kaggle, capsys):
    assert cli.main(["audit", str(kaggle["root"]), "--json", "--seed", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "n_files",
        "n_rejected",
        "n_groups",
        "leaking_groups",
        "shortcut_auc",
        "warnings",
        "counts",
        "sizes",
        "duplicates",
        "rejected",
    ):
        assert key in report, key
    assert report == json.loads(json.dumps(kaggle["report"].to_dict()))
    assert isinstance(report["leaking_groups"], list) and report["shortcut_auc"] >= 0.9


def test_cli_text_report(synthetic, capsys):
    assert cli.main(["audit", str(synthetic)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Dataset audit:") and "Shortcut check" in out


def test_cli_missing_folder_exits_1_naming_it(tmp_path, capsys):
    missing = tmp_path / "no such folder"
    assert cli.main(["audit", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1


def test_to_dict_tables_are_records(kaggle):
    d = kaggle["report"].to_dict()
    assert isinstance(d["counts"], list) and isinstance(d["counts"][0], dict)
    assert pd.DataFrame(d["sizes"]).shape[0] == len(kaggle["report"].tables["sizes"])


# --------------------------------------------------------------------------------------------
# Patients, not slices (Kaggle layout whose labels follow the scans)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def confounded(tmp_path_factory) -> audit.AuditReport:
    return audit.audit_dataset(kaggle_layout.write_scans(tmp_path_factory.mktemp("scans"), kaggle_layout.CONFOUNDED))


def test_labels_confounded_with_patients_are_reported(confounded):
    rep = confounded
    assert rep.n_patients == 4 and rep.n_groups == 18  # 4 scans, 18 slices, 3 copies each
    table = rep.tables["patients"].set_index("label")
    assert table.loc["normal", ["slices", "patients", "top1"]].tolist() == [27, 1, 1.0]
    assert table.loc["normal", "largest"] == "NCSV1B4"
    assert table.loc["fracture", ["slices", "patients"]].tolist() == [27, 3]
    assert table.loc["fracture", "top2"] == pytest.approx(8 / 9, abs=1e-4)
    assert table.loc["fracture", "top3"] == 1.0 and (table["shared"] == 0).all()
    warning = next(w for w in rep.warnings if w.startswith("labels confounded with patients"))
    assert "normal: 27 slices from 1 patient(s)" in warning and "fracture: 27 slices from 3 patient(s)" in warning
    assert f"<= {audit.FEW_PATIENTS} patients" in warning
    assert rep.labels_confounded_with_patients
    assert rep.leaking_patients == ["CSFDV1B10", "CSFDV1B7", "NCSV1B4"]  # their last slices are in val
    assert any(w.startswith("patient leakage: 3 patients") for w in rep.warnings)
    text = rep.to_text()
    assert "Patients (scans): 4, 3 with slices in more than one split" in text and "LABELS CONFOUNDED" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["labels_confounded_with_patients"] is True and d["n_patients"] == 4
    assert {r["label"]: r["patients"] for r in d["patients"]} == {"fracture": 3, "normal": 1}


def test_balanced_patients_raise_no_confounding_warning(tmp_path):
    rep = audit.audit_dataset(kaggle_layout.write_scans(tmp_path, kaggle_layout.BALANCED))
    assert rep.n_patients == 10
    assert rep.tables["patients"]["patients"].tolist() == [5, 5]
    assert rep.tables["patients"]["top2"].tolist() == [0.4, 0.4]
    assert not rep.labels_confounded_with_patients
    assert not any("confounded" in w for w in rep.warnings)
    assert "ok" in rep._patients_text()[-1]


def test_no_patient_key_says_so(tmp_path):
    for label in ("fracture", "normal"):
        (tmp_path / label).mkdir()
        for k in range(4):
            image = Image.new("L", (64, 64), 40 * k + (label == "fracture") * 20)
            image.save(tmp_path / label / f"img_{k}.png")
    rep = audit.audit_dataset(tmp_path)
    assert rep.n_patients == 0 and rep.tables["patients"].empty and not rep.labels_confounded_with_patients
    assert "none named" in rep.to_text()

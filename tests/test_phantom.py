"""The synthetic cervical-CT phantom: anatomy in HU, fractures and masks, CT formation, datasets."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cspine_utils import cli, phantom

T = phantom.TISSUE


def _spec(level="C4", ftype="none", difficulty=0.5, seed=3, **subject_overrides):
    subject = phantom.sample_subject(np.random.default_rng(seed), "T")
    if subject_overrides:
        subject = dataclasses.replace(subject, **subject_overrides)
    return phantom.SliceSpec(subject=subject, level=level, fracture_type=ftype, difficulty=difficulty, seed=seed)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    cfg = phantom.SynthConfig(n=40, seed=5, fracture_fraction=0.3)
    manifest = phantom.generate_dataset(out, cfg, workers=2, progress=False)
    return out, cfg, manifest


# --- anatomy --------------------------------------------------------------------------------
@pytest.mark.parametrize("level", phantom.LEVELS)
def test_tissue_hu_ranges_before_windowing(level):
    """Pure (eroded) regions of each tissue carry the HU of the phantom's tissue table (textbook CT values)."""
    spec = _spec(level=level, seed=11, matrix=512, fov_mm=180.0)
    hu, tissue, mask, px = phantom.render_anatomy(spec)
    assert not mask.any()
    expected = {  # label: (low, high) for the median of the tissue's core pixels
        "fat": (-120, -80),
        "muscle": (35, 55),
        "csf": (0, 15),
        "cord": (30, 40),
        "air": (-1001, -999),
        "airway": (-1001, -999),
        "cancellous": (60, 360),
    }
    for name, (lo, hi) in expected.items():
        core = ndimage.binary_erosion(tissue == T[name], iterations=2)
        if name in ("cord", "csf") and not core.any():
            core = tissue == T[name]
        assert core.sum() > 10, f"{level}: no {name} pixels"
        med = float(np.median(hu[core]))
        assert lo <= med <= hi, f"{level}: {name} median {med:.0f} HU outside [{lo}, {hi}]"
    cortical = hu[tissue == T["cortical"]]
    assert 800 <= np.percentile(cortical, 90) <= 2000, "cortical shell should reach 800-2000 HU"
    # the vertebra is inside the neck and the neck inside the field of view
    assert (tissue == T["cancellous"]).sum() > 100


def test_every_level_has_its_shape():
    """C1 has no body but a ring around the dens; C7's spinous process is longer than C4's."""

    def bone_extent(level):
        spec = _spec(level=level, seed=4, matrix=512, fov_mm=180.0, rotation_deg=0.0)
        _, tissue, _, px = phantom.render_anatomy(spec)
        ys, xs = np.nonzero(
            np.isin(tissue, [T["cortical"], T["cancellous"]]) & (np.abs(np.arange(512) - 256)[None, :] < 40)
        )
        return (ys.max() - ys.min()) * px

    assert bone_extent("C7") > bone_extent("C4") + 4  # long spinous process
    spec = _spec(level="C1", seed=4, matrix=512, fov_mm=180.0)
    _, tissue, _, _ = phantom.render_anatomy(spec)
    bone = np.isin(tissue, [T["cortical"], T["cancellous"]])
    labels, n = ndimage.label(bone)
    assert n >= 2, "C1 slice shows the atlas ring and the separate dens"


# --- fractures ------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["C1", "C2", "C5", "C7"])
@pytest.mark.parametrize("ftype", phantom.FRACTURE_TYPES)
def test_fracture_mask_lies_on_bone_and_only_fracture_differs(level, ftype):
    normal = _spec(level=level, ftype="none", seed=21)
    broken = dataclasses.replace(normal, fracture_type=ftype)
    hu0, tis0, m0, px = phantom.render_anatomy(normal)
    hu1, tis1, m1, _ = phantom.render_anatomy(broken)
    assert not m0.any() and m1.any()
    bone0 = ndimage.binary_dilation(np.isin(tis0, [T["cortical"], T["cancellous"]]), iterations=2)
    assert (m1 & bone0).sum() / m1.sum() >= 0.9, "mask must lie on (pre-fracture) bone"
    # everything that changed is close to the fracture (fragments move by a few mm at most)
    changed = np.abs(hu1 - hu0) > 50
    near = ndimage.binary_dilation(m1, iterations=int(np.ceil(12.0 / px)))  # warp radius 9 mm + shift
    assert changed.sum() > 0
    assert (changed & ~near).sum() <= 0.02 * changed.sum()


def test_difficulty_changes_gap_and_contrast():
    gaps = []
    for d in (0.0, 0.5, 1.0):
        hu, tissue, mask, px = phantom.render_anatomy(
            _spec(level="C5", ftype="linear", difficulty=d, seed=8, matrix=512, fov_mm=180.0)
        )
        gaps.append(mask.sum() * px * px)
    assert gaps[0] > gaps[1] > gaps[2] > 0


def test_fracture_visible_in_ct_at_default_difficulty():
    """The gap is darker than the bone around it in the final 8-bit image (a person can see it)."""
    spec = _spec(level="C5", ftype="linear", difficulty=0.5, seed=12, matrix=512, fov_mm=180.0)
    res = phantom.render_slice(spec)
    gap = res.mask & (res.tissue == T["haematoma"])
    ring = ndimage.binary_dilation(res.mask, iterations=4) & ~res.mask & (res.tissue >= T["cancellous"])
    assert gap.sum() > 5 and ring.sum() > 5
    assert res.image[ring].mean() - res.image[gap].mean() > 10


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="level"):
        phantom.render_anatomy(_spec(level="C9"))
    with pytest.raises(ValueError, match="fracture type"):
        phantom.render_anatomy(_spec(ftype="crushed"))
    with pytest.raises(ValueError, match="CT model"):
        phantom.simulate_ct(np.zeros((8, 8), np.float32), 0.5, _spec().subject, np.random.default_rng(0), model="x")


# --- CT formation ---------------------------------------------------------------------------
def _radial_profile(power: np.ndarray, n_bins: int) -> np.ndarray:
    n = power.shape[0]
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n)))
    bins = np.linspace(0.02, 0.5, n_bins + 1)
    idx = np.digitize(f, bins) - 1
    return np.array([power[idx == i].mean() for i in range(n_bins)])


@pytest.mark.slow
def test_nps_noise_model_matches_filtered_back_projection():
    """The fast noise model has the noise power spectrum of real FBP (radon → Poisson → iradon),
    and both scale with 1/sqrt(dose)."""
    from skimage.transform import iradon, radon

    n, px = 128, 1.0
    c = np.arange(n) - (n - 1) / 2
    disk = (np.hypot(*np.meshgrid(c, c)) < n * 0.42) * 0.02  # water, 1/mm
    theta = np.linspace(0, 180, 180, endpoint=False)
    sino = radon(disk * px, theta=theta, circle=True)
    clean = iradon(sino, theta=theta, filter_name="ramp", circle=True)
    rng = np.random.default_rng(0)
    core = np.hypot(*np.meshgrid(c, c)) < n * 0.3
    fbp_power, sds = np.zeros((n, n)), {}
    for dose in (1.0, 4.0):
        for _ in range(6):
            i0 = 1e4 * dose
            noisy = -np.log(np.maximum(rng.poisson(i0 * np.exp(-sino)), 1) / i0)
            diff = iradon(noisy, theta=theta, filter_name="ramp", circle=True) - clean
            sds.setdefault(dose, []).append(diff[core].std())
            if dose == 1.0:
                w = diff * core
                fbp_power += np.abs(np.fft.fft2(w - w[core].mean() * core)) ** 2
    model_power = np.zeros((n, n))
    for _ in range(6):
        nz = phantom.nps_noise((n, n), px, 1.0, sigma_mm=0.0, boost=0.0, rng=rng) * core
        model_power += np.abs(np.fft.fft2(nz)) ** 2
    a, b = _radial_profile(fbp_power, 16), _radial_profile(model_power, 16)
    corr = np.corrcoef(a / a.sum(), b / b.sum())[0, 1]
    assert corr > 0.95, f"noise power spectra differ (r = {corr:.3f})"
    ratio = np.mean(sds[1.0]) / np.mean(sds[4.0])
    assert 1.7 < ratio < 2.3, f"noise should halve at 4x dose, ratio {ratio:.2f}"


def test_fbp_model_runs_and_agrees_with_nps_model_on_anatomy():
    spec = _spec(level="C4", seed=2, matrix=256, fov_mm=200.0)
    hu_true, _, _, px = phantom.render_anatomy(spec)
    fbp = phantom.simulate_ct(hu_true, px, spec.subject, np.random.default_rng(0), model="fbp")
    nps = phantom.simulate_ct(hu_true, px, spec.subject, np.random.default_rng(0), model="nps")
    inside = phantom._fov_circle(256) & (hu_true > -500)
    assert abs(np.median(fbp[inside] - hu_true[inside])) < 30
    assert abs(np.median(nps[inside] - hu_true[inside])) < 30
    assert np.all(fbp[~phantom._fov_circle(256)] == phantom.HU["padding"])


def test_window_to_uint8():
    hu = np.array([-2000, -500, 500, 1500, 3000], dtype=np.float32)
    out = phantom.window_to_uint8(hu, 2000, 500)
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="width"):
        phantom.window_to_uint8(hu, 0, 500)


# --- datasets -------------------------------------------------------------------------------
def test_dataset_layout_and_manifest(small_dataset):
    out, cfg, manifest = small_dataset
    on_disk = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(on_disk) == len(manifest) == cfg.n
    required = {
        "file",
        "label",
        "split",
        "subject_id",
        "level",
        "fracture_type",
        "difficulty",
        "mask_file",
        "width",
        "height",
        "pixel_mm",
        "seed",
        "generator_version",
        "generator_params",
    }
    assert required <= set(on_disk.columns)
    for row in on_disk.itertuples():
        path = out / row.file
        assert path.is_file() and path.parts[-3] == row.split and path.parts[-2] == row.label
        with Image.open(path) as im:
            assert im.size == (row.width, row.height) and im.mode == "L"
        assert 256 <= row.width <= 512
        if row.label == "fracture":
            assert row.fracture_type in phantom.FRACTURE_TYPES and row.mask_file
            m = np.asarray(Image.open(out / row.mask_file))
            assert m.shape == (row.height, row.width) and (m > 0).sum() == row.mask_pixels > 0
        else:
            assert row.fracture_type == "none" and row.mask_file == "" and row.mask_pixels == 0
    assert json.loads(on_disk["generator_params"][0])["seed"] == cfg.seed
    marker = json.loads((out / "dataset.json").read_text())
    assert marker["params"]["n"] == cfg.n and marker["fingerprint"] == phantom.generator_fingerprint()


def test_class_ratio_and_subject_grouping(small_dataset):
    _, cfg, manifest = small_dataset
    assert (manifest["label"] == "fracture").sum() == round(cfg.fracture_fraction * cfg.n)
    for sid, grp in manifest.groupby("subject_id"):
        assert grp["split"].nunique() == 1, f"subject {sid} straddles splits"
        idx = sorted(phantom.LEVELS.index(lv) for lv in grp["level"])
        assert idx == list(range(idx[0], idx[0] + len(idx))), "a subject's slices are adjacent levels"
    assert set(manifest["split"]) == {"train", "val"}


def test_plan_keeps_levels_independent_of_label():
    rows = pd.DataFrame(phantom.plan_dataset(phantom.SynthConfig(n=3000, seed=1)))
    share = pd.crosstab(rows["level"], rows["label"], normalize="columns")
    assert (share["fracture"] - share["normal"]).abs().max() < 0.05


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    cfg = phantom.SynthConfig(n=8, seed=9)
    phantom.generate_dataset(tmp_path / "a", cfg, workers=2, progress=False)
    phantom.generate_dataset(tmp_path / "b", cfg, workers=1, progress=False)
    phantom.generate_dataset(tmp_path / "c", dataclasses.replace(cfg, seed=10), workers=1, progress=False)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b, "same seed and parameters must give byte-identical files (any number of workers)"
    assert a["manifest.csv"] != c["manifest.csv"]
    pngs_a = [v for k, v in a.items() if k.endswith(".png")]
    pngs_c = [v for k, v in c.items() if k.endswith(".png")]
    assert not set(pngs_a) & set(pngs_c)


def test_cli_round_trip_and_reuse(tmp_path, capsys):
    out = tmp_path / "cli ds (1)"
    args = ["data", "synth", "--out", str(out), "--n", "6", "--seed", "3", "--quiet", "--workers", "1"]
    assert cli.main(args) == 0
    assert "wrote 6 slices" in capsys.readouterr().out
    stamp = (out / "manifest.csv").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.csv").stat().st_mtime_ns == stamp, "an up-to-date dataset is reused"
    assert cli.main(args[:-2] + ["--difficulty", "0.9", "--quiet"]) == 0  # parameters changed → regenerated
    assert json.loads((out / "dataset.json").read_text())["params"]["difficulty"] == 0.9


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "--n must be a positive"),
        (["--n", "5", "--difficulty", "-0.1"], "--difficulty must lie in"),
        (["--n", "5", "--seed", "-1"], "--seed must be non-negative"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, extra, message):
    assert cli.main(["data", "synth", "--out", str(tmp_path / "x"), "--quiet", *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(["data", "synth", "--out", str(blocker / "ds"), "--n", "3", "--quiet"]) == 1
    assert "cannot write the dataset" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_refuses_to_overwrite_user_data(tmp_path, capsys):
    user = tmp_path / "my scans"
    (user / "train").mkdir(parents=True)
    (user / "train" / "patient.png").write_bytes(b"precious")
    assert cli.main(["data", "synth", "--out", str(user), "--n", "3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and str(user) in err
    assert (user / "train" / "patient.png").read_bytes() == b"precious"
    assert sorted(p.name for p in user.rglob("*")) == ["patient.png", "train"]


def test_failed_regeneration_keeps_previous_dataset(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    phantom.generate_dataset(out, phantom.SynthConfig(n=4, seed=1), workers=1, progress=False)
    before = (out / "manifest.csv").read_bytes()

    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(phantom, "_render_row", boom)
    with pytest.raises(RuntimeError):
        phantom.generate_dataset(out, phantom.SynthConfig(n=4, seed=2), workers=1, progress=False)
    assert (out / "manifest.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"], "no temporary folder left behind"


# --- the public dataset's flaw must not be in ours -------------------------------------------
@pytest.mark.slow
def test_thumbnail_model_cannot_separate_classes(tmp_path):
    """A logistic regression on 16×16 thumbnails + intensity statistics stays below AUC 0.65:
    normal and fracture slices differ only by the fracture, not by level, size or scanner."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = tmp_path / "ds"
    manifest = phantom.generate_dataset(out, phantom.SynthConfig(n=600, seed=123), workers=2, progress=False)
    feats = []
    for f in manifest["file"]:
        im = Image.open(out / f)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        thumb = np.asarray(im.resize((16, 16), Image.Resampling.BOX), dtype=np.float32).ravel() / 255.0
        stats = [arr.mean(), arr.std(), *np.percentile(arr, [50, 90, 99]), (arr > 0.5).mean(), arr.shape[0] / 512]
        feats.append(np.concatenate([thumb, stats]))
    X, y = np.array(feats), (manifest["label"] == "fracture").to_numpy().astype(int)
    groups = manifest["subject_id"].to_numpy()
    scores = np.zeros(len(y))
    for tr, te in StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(X, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        model.fit(X[tr], y[tr])
        scores[te] = model.predict_proba(X[te])[:, 1]
    auc = roc_auc_score(y, scores)
    assert auc < 0.65, f"coarse appearance predicts the label (AUC {auc:.3f})"

"""Tests of cspine_utils.tuning (the course's speed-up of notebook 04's search): the hypermodel, the
feature cache, explicit project state, failed trials, the best head in the full classifier, and a real
chief + two workers distributed search.

Everything runs real TensorFlow on tiny data: 32 px images of the 40-slice synthetic set
(25 train, 10 val), a randomly initialised (seeded) VGG16 base, 1-2 epochs per trial.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras_tuner
import numpy as np
import pandas as pd
import pytest

from cspine_utils import course, data, pretrained, tuning

SIZE = 32
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(synthetic_dataset) -> pd.DataFrame:
    m, _ = data.choose_split(data.discover(synthetic_dataset).manifest, seed=0)
    return m


@pytest.fixture(scope="module")
def tuning_data(manifest) -> tuning.TuningData:
    return tuning.TuningData(manifest, SIZE)


@pytest.fixture(scope="module")
def hypermodel(tmp_path_factory):
    cache = tuning.FeatureCache(SIZE, None, copies=2, seed=0, cache_dir=tmp_path_factory.mktemp("feature_cache"))
    return tuning.VGGHyperModel(SIZE, None, feature_cache=cache, seed=0)


@pytest.fixture(scope="module")
def searched(manifest, tmp_path_factory):
    """A 3-trial random search whose first trial raises (as a bug in a trial would), run ``fresh``
    over a project folder holding stale files."""
    root = tmp_path_factory.mktemp("search")
    project = root / "project"
    (project / "trial_99").mkdir(parents=True)
    (project / "stale.txt").write_text("from an older search")
    calls: list[dict] = []

    class FailingFirstTrial(tuning.VGGHyperModel):
        def fit(self, hp, model, data, **kwargs):
            calls.append(dict(hp.values))
            if len(calls) == 1:
                raise RuntimeError("this trial fails on purpose (a broken trial)")
            return super().fit(hp, model, data, **kwargs)

    table = tuning.run_search(
        manifest,
        "smoke",
        project_dir=project,
        mode="fresh",
        kind="random",
        max_trials=3,
        epochs=1,
        image_size=SIZE,
        weights=None,
        cache_dir=root / "cache",
        hypermodel_class=FailingFirstTrial,
    )
    return {"project": project, "table": table, "cache": root / "cache", "calls": calls}


def _resume_kwargs(searched: dict, **changes) -> dict:
    kwargs = dict(
        mode="resume", kind="random", max_trials=3, epochs=1, image_size=SIZE, weights=None, cache_dir=searched["cache"]
    )
    kwargs.update(changes)
    return kwargs


def _sample_values(hm, seed: int) -> dict:
    hp = keras_tuner.HyperParameters()
    hm.hyperparameter_values(hp)
    return {p.name: p.random_sample(seed) for p in hp.space}


def _hyperparameters(hm, values: dict) -> keras_tuner.HyperParameters:
    """The space of ``hm`` holding ``values``."""
    hp = keras_tuner.HyperParameters()
    hm.hyperparameter_values(hp)
    hp.values.update({k: v for k, v in values.items() if v is not None})
    return hp


# --------------------------------------------------------------------------------------------
# The hypermodel, the cache and the head
# --------------------------------------------------------------------------------------------
def test_hypermodel_builds_for_sampled_hyperparameters(hypermodel):
    assert isinstance(hypermodel, keras_tuner.HyperModel)
    seen_unfreeze = set()
    for seed in range(4):
        values = _sample_values(hypermodel, seed)
        hp = _hyperparameters(hypermodel, values)
        resolved = hypermodel.hyperparameter_values(hp)
        head = hypermodel.build(hp)
        assert head.input_shape == (None, tuning.FEATURE_DIM)
        assert head.output_shape == (None, 1)
        assert head.get_layer("head_dense").units == resolved["head_units"]
        assert head.get_layer("head_dropout").rate == pytest.approx(resolved["dropout"])
        assert 0.2 - 1e-9 <= resolved["dropout"] <= 0.6 + 1e-9
        assert 1e-4 <= resolved["lr_head"] <= 3e-3
        assert resolved["optimizer"] in ("adam", "sgd", "rmsprop")
        assert resolved["augment_strength"] in tuning.CACHED_STRENGTHS
        assert resolved["batch_size"] in (16, 32, 64)
        if resolved["unfreeze_blocks"] == 0:
            assert resolved["lr_finetune"] is None  # conditional: only when fine-tuning
        else:
            assert 1e-5 <= resolved["lr_finetune"] <= 3e-4
        seen_unfreeze.add(resolved["unfreeze_blocks"])
    full = hypermodel.build_full_model(resolved)
    for name in ("head_norm", "head_dense", "fracture_probability"):  # the head fits into the full classifier
        assert [w.shape for w in full.get_layer(name).weights] == [w.shape for w in head.get_layer(name).weights]


def test_cached_features_equal_the_base_output(hypermodel, tuning_data, tmp_path):
    x_train = tuning_data.arrays()[0]
    cache = hypermodel.feature_cache
    feats = cache.get(x_train, 0.0, fingerprint=tuning_data.train_fingerprint)
    assert feats.shape == (1, len(x_train), tuning.FEATURE_DIM) and feats.dtype == np.float32

    import keras

    full = hypermodel.build_full_model({"head_units": 64, "dropout": 0.2})
    base = keras.Model(full.inputs, full.get_layer("avg_pool").output)
    expected = base.predict(x_train, verbose=0)
    assert np.allclose(feats[0], expected, rtol=1e-4, atol=1e-5)
    assert float(np.abs(expected).max()) > 0  # not a trivially zero comparison

    augmented = cache.get(x_train, 1.0, fingerprint=tuning_data.train_fingerprint)
    assert augmented.shape == (2, len(x_train), tuning.FEATURE_DIM)
    assert not np.allclose(augmented[0], augmented[1])  # two different augmented copies
    assert not np.allclose(augmented[0], feats[0])

    hits = cache.stats["hits"]
    assert cache.get(x_train, 0.0, fingerprint=tuning_data.train_fingerprint) is feats
    assert cache.stats["hits"] == hits + 1

    # A new cache (another search, another process) reads the .npz files instead of computing.
    again = tuning.FeatureCache(SIZE, None, copies=2, seed=0, cache_dir=cache.cache_dir)
    np.testing.assert_array_equal(again.get(x_train, 1.0, fingerprint=tuning_data.train_fingerprint), augmented)
    assert again.stats["disk_hits"] == 1 and again.stats["misses"] == 0
    assert len(list(Path(cache.cache_dir).glob("*.npz"))) >= 2
    # Other settings are other keys.
    assert cache.key("abc", 0.5) != cache.key("abc", 1.0) != cache.key("abd", 1.0)
    other = tuning.FeatureCache(48, None, copies=2, seed=0)
    assert other.key("abc", 0.0) != cache.key("abc", 0.0)
    with pytest.raises(ValueError, match="shape"):
        cache.get(np.zeros((2, 48, 48, 1), np.float32))


def test_head_trained_on_features_transplants_into_the_full_model(hypermodel, tuning_data):
    values = {
        "head_units": 64,
        "dropout": 0.3,
        "optimizer": "adam",
        "lr_head": 1e-3,
        "unfreeze_blocks": 0,
        "augment_strength": 0.5,
        "batch_size": 16,
    }
    hp = _hyperparameters(hypermodel, values)
    head = hypermodel.build(hp)
    result = hypermodel.fit(hp, head, tuning_data, epochs=2)
    assert set(result) == {"val_auc", "val_auc_head"} and 0.0 <= result["val_auc"] <= 1.0

    x_val = tuning_data.arrays()[2]
    val_feats = hypermodel.feature_cache.get(x_val, 0.0, fingerprint=tuning_data.val_fingerprint)[0]
    full = course.transplant_head(head, hypermodel.build_full_model(values))
    np.testing.assert_allclose(full.predict(x_val, verbose=0), head.predict(val_feats, verbose=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="head_units"):
        course.transplant_head(head, hypermodel.build_full_model({"head_units": 128, "dropout": 0.3}))


def test_fine_tuning_trial_trains_the_full_model(hypermodel, tuning_data):
    values = {
        "head_units": 64,
        "dropout": 0.2,
        "optimizer": "sgd",
        "lr_head": 1e-3,
        "unfreeze_blocks": 1,
        "lr_finetune": 1e-5,
        "augment_strength": 0.0,
        "batch_size": 32,
    }
    hp = _hyperparameters(hypermodel, values)
    result = hypermodel.fit(hp, hypermodel.build(hp), tuning_data, epochs=1)
    assert set(result) == {"val_auc", "val_auc_head", "val_auc_finetune"}
    assert result["val_auc"] == pytest.approx(max(result["val_auc_head"], result["val_auc_finetune"]))


@pytest.mark.parametrize("kind", tuning.TUNER_KINDS)
def test_make_tuner_kinds(hypermodel, tmp_path, kind):
    tuner = tuning.make_tuner(
        hypermodel, kind, project_dir=tmp_path / kind, max_trials=2, max_epochs=2, max_consecutive_failed_trials=2
    )
    assert tuner.oracle.objective.name == "val_auc" and tuner.oracle.objective.direction == "max"
    assert tuner.oracle.max_consecutive_failed_trials == 2
    assert tuner.oracle.max_trials == 2
    assert Path(tuner.project_dir) == tmp_path / kind


def test_bad_arguments(hypermodel, manifest, tmp_path):
    with pytest.raises(ValueError, match="max_trials"):
        tuning.make_tuner(hypermodel, "random", project_dir=tmp_path / "p")
    with pytest.raises(ValueError, match="unknown tuner kind"):
        tuning.make_tuner(hypermodel, "grid", project_dir=tmp_path / "p", max_trials=2)
    with pytest.raises(ValueError, match="mode"):
        tuning.run_search(manifest, "smoke", project_dir=tmp_path / "p", mode="continue")
    with pytest.raises(ValueError, match="split == 'val'"):
        tuning.run_search(
            manifest[manifest["split"] != "val"], "smoke", project_dir=tmp_path / "p", image_size=SIZE, weights=None
        )
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        tuning.run_search(
            manifest,
            "smoke",
            project_dir=tmp_path / "none",
            mode="resume",
            image_size=SIZE,
            weights=None,
            cache_dir=None,
        )
    precious = tmp_path / "not_a_project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to delete"):
        tuning.run_search(manifest, "smoke", project_dir=precious, image_size=SIZE, weights=None, cache_dir=None)
    assert (precious / "notes.txt").is_file()
    with pytest.raises(ValueError, match="feature_cache is for"):
        tuning.VGGHyperModel(48, None, feature_cache=hypermodel.feature_cache)
    with pytest.raises(ValueError, match="strength"):
        tuning.VGGHyperModel(SIZE, None, strengths=(0.0, 3.0))


# --------------------------------------------------------------------------------------------
# Searches and their state
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_search_writes_results_csv(searched):
    project, table = searched["project"], searched["table"]
    csv = pd.read_csv(project / "results.csv")
    expected = [
        "trial_id",
        "status",
        "score",
        "seconds",
        "tuner_id",
        "head_units",
        "dropout",
        "optimizer",
        "lr_head",
        "unfreeze_blocks",
    ]
    assert list(csv.columns[: len(expected)]) == expected
    assert {"augment_strength", "batch_size", "error"} <= set(csv.columns)
    assert len(csv) == len(table) == 3
    assert list(csv["status"]) == list(table["status"])
    assert (csv["seconds"] > 0).all()
    settings = json.loads((project / "search_settings.json").read_text())
    for key in ("data_fingerprint", "image_size", "weights_source", "kind", "space_version"):
        assert key in settings
    assert settings["image_size"] == SIZE and settings["weights_source"] == "random"


@pytest.mark.slow
def test_fresh_wipes_the_project(searched):
    project = searched["project"]
    assert not (project / "stale.txt").exists()
    assert not (project / "trial_99").exists()


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_search_continues(searched):
    table = searched["table"]
    assert len(searched["calls"]) == 3  # the search went on after the failure
    assert table.loc[0, "status"] == "FAILED"
    assert "fails on purpose" in table.loc[0, "error"]
    assert np.isnan(table.loc[0, "score"])
    done = table.iloc[1:]
    assert (done["status"] == "COMPLETED").all()
    assert done["score"].between(0, 1).all()


@pytest.mark.slow
def test_resume_with_matching_settings_continues(searched, manifest, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(searched["project"], project)
    before = pd.read_csv(project / "results.csv")
    created = json.loads((project / "search_settings.json").read_text())["created"]
    table = tuning.run_search(manifest, "smoke", project_dir=project, **_resume_kwargs(searched, max_trials=4))
    assert len(table) == 4
    settings = json.loads((project / "search_settings.json").read_text())
    assert settings["created"] == created and "resumed" in settings and settings["max_trials"] == 4
    old = table.iloc[:3].reset_index(drop=True)
    assert list(old["trial_id"].astype(int)) == list(before["trial_id"])
    assert list(old["status"]) == list(before["status"])
    np.testing.assert_allclose(old["score"], before["score"])
    assert table.loc[3, "status"] == "COMPLETED"


@pytest.mark.slow
def test_resume_with_different_settings_raises(searched, manifest, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(searched["project"], project)
    before = (project / "results.csv").read_text()
    with pytest.raises(ValueError, match=r"image_size: recorded 32, now 48"):
        tuning.run_search(manifest, "smoke", project_dir=project, **_resume_kwargs(searched, image_size=48))
    with pytest.raises(ValueError, match=r"kind: recorded 'random', now 'bayesian'"):
        tuning.run_search(manifest, "smoke", project_dir=project, **_resume_kwargs(searched, kind="bayesian"))
    fewer = manifest.drop(index=manifest.index[manifest["split"] == "train"][:3])
    with pytest.raises(ValueError, match="data_fingerprint"):
        tuning.run_search(fewer, "smoke", project_dir=project, **_resume_kwargs(searched))
    assert (project / "results.csv").read_text() == before  # nothing was touched


@pytest.mark.slow
def test_best_head_model_puts_the_searched_head_into_the_classifier(searched, tuning_data):
    """The best trial's head (trained on cached features) is transplanted: the classifier's predictions
    equal that head's on the cached features, before any fine-tuning."""
    model, values, settings = tuning.best_head_model(searched["project"])
    table = searched["table"]
    assert values["score"] == pytest.approx(table["score"].max())
    assert values["trial_id"] == table.loc[table["score"].idxmax(), "trial_id"]
    assert settings["image_size"] == SIZE and model.input_shape == (None, SIZE, SIZE, 1)
    assert model.get_layer("head_dense").units == values["head_units"]
    assert not any(model.get_layer(n).trainable for n in pretrained.VGG16_CONV_LAYERS)
    head = course.build_head(int(values["head_units"]), float(values["dropout"]))
    head.load_weights(str(searched["project"] / f"trial_{values['trial_id']}" / "checkpoint.weights.h5"))
    x_val = tuning_data.arrays()[2]
    cache = tuning.FeatureCache(SIZE, None, copies=2, seed=0, cache_dir=searched["cache"])
    features = cache.get(x_val, 0.0, fingerprint=tuning_data.val_fingerprint)[0]
    assert cache.stats["disk_hits"] == 1  # the search's own features
    np.testing.assert_allclose(model.predict(x_val, verbose=0), head.predict(features, verbose=0), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_best_head_fine_tunes_with_the_cpu_recipe(searched, tuning_data):
    """Notebook 04's phase 2 on the best head: blocks 3-5 open, Adam at 2e-4, one epoch on images."""
    model, values, _ = tuning.best_head_model(searched["project"])
    x_train, y_train, x_val, y_val = tuning_data.arrays()
    assert course.unfreeze_top_blocks(model, 3) == [n for b in (3, 4, 5) for n in pretrained.VGG16_BLOCKS[b]]
    model.compile(
        optimizer=course.make_optimizer("Adam", 2e-4), loss="binary_crossentropy", metrics=course.classifier_metrics()
    )
    block2, block3 = (model.get_layer(n).get_weights()[0].copy() for n in ("block2_conv2", "block3_conv1"))
    train = tuning.image_dataset(x_train, y_train, int(values["batch_size"]), training=True, strength=1.0)
    history = model.fit(
        train, validation_data=tuning.image_dataset(x_val, y_val, 8, training=False), epochs=1, verbose=0
    )
    assert 0.0 <= history.history["val_auc"][0] <= 1.0
    np.testing.assert_array_equal(model.get_layer("block2_conv2").get_weights()[0], block2)
    assert not np.array_equal(model.get_layer("block3_conv1").get_weights()[0], block3)
    assert type(model.optimizer).__name__ == "Adam" and float(model.optimizer.learning_rate) == pytest.approx(2e-4)


@pytest.mark.slow
def test_hyperband_continues_its_best_trial(manifest, tmp_path):
    # max_epochs 3, factor 3 -> the first bracket runs 3 one-epoch trials, then continues the
    # best from its saved head to 3 epochs (the 4th trial; max_trials caps the rest).
    table = tuning.run_search(
        manifest,
        "smoke",
        project_dir=tmp_path / "hb",
        kind="hyperband",
        max_trials=4,
        epochs=3,
        image_size=SIZE,
        weights=None,
        cache_dir=tmp_path / "cache",
        hypermodel_options={"unfreeze_blocks": (0,)},
    )
    assert len(table) == 4 and (table["status"] == "COMPLETED").all()
    continued = table[table["tuner/trial_id"].notna()]
    assert len(continued) == 1
    parent = table[table["trial_id"] == str(continued["tuner/trial_id"].iloc[0])]
    assert int(continued["tuner/initial_epoch"].iloc[0]) == 1
    assert int(continued["tuner/epochs"].iloc[0]) == 3
    assert continued["head_units"].iloc[0] == parent["head_units"].iloc[0]


# --------------------------------------------------------------------------------------------
# Distributed search: one chief, two workers, for real
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_search_with_a_chief_and_two_workers(synthetic_dataset, tmp_path):
    project = tmp_path / "project"
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "cspine_utils.tuning",
        "--data",
        str(synthetic_dataset),
        "--profile",
        "smoke",
        "--project-dir",
        str(project),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--kind",
        "random",
        "--max-trials",
        "4",
        "--epochs",
        "1",
        "--image-size",
        str(SIZE),
        "--weights",
        "none",
        "--oracle-ip",
        "127.0.0.1",
        "--oracle-port",
        str(port),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CSPINE_ARTIFACTS=str(tmp_path / "artifacts"))
    roles = {
        "tuner0": ["--role", "worker", "--tuner-id", "tuner0"],
        "tuner1": ["--role", "worker", "--tuner-id", "tuner1"],
        "chief": ["--role", "chief"],
    }
    procs, logs = {}, {}
    deadline = time.monotonic() + 300
    try:
        # Workers first: they wait (gRPC wait_for_ready) until the chief serves, so both are
        # connected when the first trials are handed out.
        for name, extra in roles.items():
            logs[name] = open(tmp_path / f"{name}.log", "w")
            procs[name] = subprocess.Popen(
                command + extra, stdout=logs[name], stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
        for name in ("tuner0", "tuner1", "chief"):
            procs[name].wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for handle in logs.values():
            handle.close()
    report = "\n".join(
        f"--- {name} (rc {proc.returncode}) ---\n" + (tmp_path / f"{name}.log").read_text()[-3000:]
        for name, proc in procs.items()
    )
    assert all(proc.returncode == 0 for proc in procs.values()), report

    table = pd.read_csv(project / "results.csv", dtype={"trial_id": str})
    assert len(table) == 4 and (table["status"] == "COMPLETED").all(), report
    ran = table["tuner_id"].value_counts().to_dict()
    assert set(ran) == {"tuner0", "tuner1"}, (ran, report)  # both workers ran trials
    oracle = json.loads((project / "oracle.json").read_text())  # written by the chief
    assert sorted(oracle["end_order"]) == sorted(table["trial_id"])
    for tid in table["trial_id"]:
        trial = json.loads((project / f"trial_{tid}" / "trial.json").read_text())
        assert trial["status"] == "COMPLETED" and trial["score"] is not None
    assert "ran 1 trial" in report or "ran 2 trial" in report or "ran 3 trial" in report

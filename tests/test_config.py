"""Profiles, environment-driven paths and seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cspine_utils import config


def test_profiles_scale_up():
    smoke, cpu, gpu = (config.get_profile(n) for n in ("smoke", "cpu", "gpu"))
    assert smoke.image_size < cpu.image_size < gpu.image_size == 224
    assert smoke.n_synthetic < cpu.n_synthetic < gpu.n_synthetic
    assert cpu.n_synthetic >= 1000
    assert cpu.bootstrap_resamples >= 1000
    for p in (smoke, cpu, gpu):
        assert p.batch_size > 0 and p.epochs_cnn > 0 and p.tuner_trials > 0


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("CSPINE_PROFILE", "SMOKE")
    assert config.get_profile().name == "smoke"
    monkeypatch.delenv("CSPINE_PROFILE")
    assert config.get_profile().name == "cpu"
    with pytest.raises(ValueError, match="unknown profile 'tiny'"):
        config.get_profile("tiny")


def test_paths_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CSPINE_DATA_DIR", raising=False)
    monkeypatch.delenv("CSPINE_ARTIFACTS", raising=False)
    root = config.repo_root()
    assert (root / "pyproject.toml").is_file()
    assert config.data_dir("smoke") == root / "data" / "synthetic" / "smoke"
    assert config.artifacts_dir() == root / "artifacts"
    monkeypatch.setenv("CSPINE_DATA_DIR", str(tmp_path / "my data"))
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "art"))
    assert config.data_dir() == tmp_path / "my data"
    assert config.artifacts_dir() == tmp_path / "art"


def test_set_seed_makes_python_numpy_and_keras_repeatable():
    import keras

    def draw():
        return random.random(), np.random.rand(), float(keras.random.uniform((1,))[0])

    config.set_seed(42)
    first = draw()
    config.set_seed(42)
    assert draw() == first
    config.set_seed(43)
    assert draw() != first
    with pytest.raises(ValueError, match="seed"):
        config.set_seed(-1)

"""Profiles, environment-driven paths and seeding."""

from __future__ import annotations

import os
import random
import subprocess
import sys

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


def _run_python(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_quiet_tensorflow_start_with_real_tensorflow():
    code = (
        "import os, sys\n"
        "from cspine_utils import config\n"
        "held = config.quiet_tensorflow_start()\n"
        "assert 'tensorflow' in sys.modules and os.environ['TF_CPP_MIN_LOG_LEVEL'] == '2'\n"
        "print('held', len(held))\n"
        "assert config.quiet_tensorflow_start() == []\n"
        "os.write(2, b'stderr works again\\n')\n"
    )
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    assert "stderr works again" in out.stderr
    for notice in config.BENIGN_NATIVE_NOTICES:
        assert notice not in out.stderr


def test_quiet_tensorflow_start_passes_other_native_lines_through(tmp_path):
    """Only the known benign notices are held back: anything else TensorFlow writes is shown."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, types\n"
        "os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see ...\\n')\n"
        "os.write(2, b'W0000 dso_loader.cc] Could not load dynamic library libcudnn.so.9\\n')\n"
        "config = types.SimpleNamespace(list_physical_devices=lambda kind: [])\n"
    )
    code = (
        "from cspine_utils import config\n"
        "held = config.quiet_tensorflow_start()\n"
        "assert len(held) == 1 and 'oneDNN' in held[0], held\n"
    )
    out = _run_python(code, PYTHONPATH=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "Could not load dynamic library libcudnn.so.9" in out.stderr
    assert "oneDNN" not in out.stderr


def test_setup_starts_quietly_seeds_and_prints_versions_profile_and_device():
    """The notebooks' one Setup call, in a fresh interpreter as a notebook kernel starts."""
    code = (
        "import random, sys\n"
        "from cspine_utils import config\n"
        "profile = config.setup('smoke', 7, tuner=True)\n"
        "assert profile is config.PROFILES['smoke']\n"
        "first = random.random()\n"
        "config.set_seed(7)\n"
        "assert random.random() == first\n"
    )
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    import keras
    import keras_tuner
    import tensorflow as tf

    lines = out.stdout.splitlines()
    assert lines[0] == (
        f"TensorFlow {tf.__version__}, Keras {keras.__version__} ({keras.backend.backend()} backend), "
        f"KerasTuner {keras_tuner.__version__}"
    )
    assert lines[1].startswith("profile smoke: 64 px, batch 16, epochs: CNN 2,") and lines[1].endswith("seed 7")
    assert lines[2].startswith("device: CPU only") or lines[2].startswith("device: GPU")
    assert len(lines) == 3
    for notice in config.BENIGN_NATIVE_NOTICES:
        assert notice not in out.stderr
    plain = _run_python("from cspine_utils import config\nconfig.setup()\n", CSPINE_PROFILE="cpu")
    assert plain.returncode == 0, plain.stderr
    assert "KerasTuner" not in plain.stdout and "profile cpu: 96 px" in plain.stdout
    bad = _run_python("from cspine_utils import config\nconfig.setup('tiny')\n")
    assert bad.returncode != 0 and "unknown profile 'tiny'" in bad.stderr

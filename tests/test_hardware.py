"""Tests of cspine_utils.hardware: the device line, the precision chosen by measurement, float32 bundles."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from cspine_utils import config, course, hardware, modelbundle, records

# TensorFlow tensors meet NumPy 2's copy keyword inside Keras: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture
def policy_restored():
    """Put Keras's global dtype policy back after the test."""
    original = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(original)


@pytest.fixture
def cpu_with_bfloat16(monkeypatch):
    """A CPU-only machine whose CPU has bfloat16 instructions, whatever this one has; no override set."""
    monkeypatch.delenv(hardware.MIXED_PRECISION_ENV, raising=False)
    monkeypatch.setattr(hardware, "_gpu_devices", lambda: [])
    monkeypatch.setattr(hardware, "cpu_has_native_bfloat16", lambda: True)


def write_cache(path, float32_s: float, bfloat16_s: float, key: str | None = None) -> None:
    entry = {"float32_s": float32_s, "mixed_bfloat16_s": bfloat16_s, "speedup": float32_s / bfloat16_s}
    records.write_json(path, {key or hardware.machine_key(): entry})


def test_describe_device():
    text = hardware.describe_device()
    assert text.startswith(("CPU only", "GPU:")) and "TensorFlow" in text


def test_cpu_bfloat16_flag_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512vl\n")
    assert hardware.cpu_has_native_bfloat16(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512vl\n")
    assert hardware.cpu_has_native_bfloat16(info) is False
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # aarch64 (e.g. Graviton3)
    assert hardware.cpu_has_native_bfloat16(info) is True
    assert hardware.cpu_has_native_bfloat16(tmp_path / "missing") is False


def test_decision_rule_on_measured_times():
    # seconds per step; the two machines of the issue: AMD EPYC ~2x, Intel Xeon without AMX 0.55x
    amd = {"float32_s": 0.30, "mixed_bfloat16_s": 0.15}
    intel = {"float32_s": 1 / 13.8, "mixed_bfloat16_s": 1 / 7.5}
    assert hardware.choose_cpu_policy(amd) == "mixed_bfloat16"
    assert hardware.choose_cpu_policy(intel) == "float32"
    assert hardware.choose_cpu_policy({"float32_s": 1.1, "mixed_bfloat16_s": 1.0}) == "float32"  # 1.1x: not worth it
    assert hardware.choose_cpu_policy({"float32_s": 1.2, "mixed_bfloat16_s": 1.0}) == "mixed_bfloat16"
    assert hardware.choose_cpu_policy(amd, min_speedup=2.5) == "float32"


def test_cached_measurement_decides_and_is_reported(tmp_path, cpu_with_bfloat16, policy_restored, capsys):
    cache = tmp_path / "precision.json"
    write_cache(cache, 0.40, 0.20)
    assert hardware.enable_mixed_precision(cache) == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    line = capsys.readouterr().out
    assert line.startswith("precision: mixed_bfloat16") and "2.00x" in line and "cached" in line
    write_cache(cache, 1 / 13.8, 1 / 7.5)  # the Intel figures: bfloat16 at 0.54x
    policy, why = hardware.precision_choice(cache)
    assert policy == "float32" and "0.54x" in why
    assert hardware.enable_mixed_precision(cache, verbose=False) == "float32"
    assert keras.mixed_precision.global_policy().name == "float32" and capsys.readouterr().out == ""


def test_overrides_and_devices_need_no_measurement(tmp_path, monkeypatch, cpu_with_bfloat16, policy_restored):
    cache = tmp_path / "never_written.json"
    monkeypatch.setenv(hardware.MIXED_PRECISION_ENV, "off")
    assert hardware.precision_choice(cache) == ("float32", "CSPINE_MIXED_PRECISION=off")
    monkeypatch.setenv(hardware.MIXED_PRECISION_ENV, "on")
    assert hardware.precision_choice(cache)[0] == "mixed_bfloat16"
    monkeypatch.setenv(hardware.MIXED_PRECISION_ENV, "bf16")
    with pytest.raises(ValueError, match="CSPINE_MIXED_PRECISION='bf16'"):
        hardware.precision_choice(cache)
    monkeypatch.setenv(hardware.MIXED_PRECISION_ENV, "auto")
    monkeypatch.setattr(hardware, "cpu_has_native_bfloat16", lambda: False)
    assert hardware.precision_choice(cache) == ("float32", "this CPU has no bfloat16 instructions")
    monkeypatch.setattr(hardware, "_gpu_devices", lambda: ["fake GPU"])
    assert hardware.enable_mixed_precision(cache) == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert not cache.exists()


def test_real_measurement_is_cached_per_machine(tmp_path, cpu_with_bfloat16):
    cache = tmp_path / "precision.json"
    write_cache(cache, 1.0, 0.5, key="another CPU | 64 cores | TensorFlow 2.0")
    keras.utils.set_random_seed(0)
    expected_draw = keras.ops.convert_to_numpy(keras.random.uniform((4,)))
    keras.utils.set_random_seed(0)
    policy, why = hardware.precision_choice(cache)  # measures now: this machine is not in the cache
    assert keras.ops.convert_to_numpy(keras.random.uniform((4,))).tolist() == expected_draw.tolist()
    stored = json.loads(cache.read_text())
    assert set(stored) == {"another CPU | 64 cores | TensorFlow 2.0", hardware.machine_key()}
    measured = stored[hardware.machine_key()]
    assert measured["float32_s"] > 0 and measured["mixed_bfloat16_s"] > 0
    assert measured["speedup"] == pytest.approx(measured["float32_s"] / measured["mixed_bfloat16_s"])
    assert policy == hardware.choose_cpu_policy(measured) and "measured now" in why
    assert hardware.precision_choice(cache) == (policy, why.replace("measured now", "cached"))
    cache.write_text("{not json")  # a damaged cache is measured again, not trusted
    assert hardware.precision_choice(cache)[0] in ("float32", "mixed_bfloat16")
    assert hardware.machine_key() in json.loads(cache.read_text())


def test_a_model_trained_in_bfloat16_is_bundled_in_float32(tmp_path, policy_restored):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    config.set_seed(0)
    model, info = course.build_vgg16_classifier(32, weights=None, head_units=4)
    assert hardware.compute_dtypes(model) == {"bfloat16", "float32"}
    keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (8, 32, 32, 1)).astype("float32"), (np.arange(8) % 2).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    plain = hardware.as_float32(model)
    assert hardware.compute_dtypes(plain) == {"float32"}
    assert hardware.as_float32(plain) is plain
    assert plain.count_params() == model.count_params()
    p16 = np.asarray(model.predict(x, verbose=0)).ravel()
    p32 = np.asarray(plain.predict(x, verbose=0)).ravel()
    assert np.abs(p16 - p32).max() < 0.05  # bfloat16 keeps ~3 significant digits
    folder = modelbundle.save_bundle(model, tmp_path / "b", image_size=32, weights_info=info, profile="smoke")
    record = json.loads((folder / "bundle.json").read_text())
    assert record["compute_dtype"] == "float32"
    assert record["trained_compute_dtypes"] == ["bfloat16", "float32"]
    bundle = modelbundle.load_bundle(folder)
    assert hardware.compute_dtypes(bundle.model) == {"float32"}
    np.testing.assert_allclose(bundle.predict_proba(x), p32, atol=1e-6)

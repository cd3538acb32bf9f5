"""Device and numeric precision: where TensorFlow trains, which dtype policy pays, float32 bundles."""

from __future__ import annotations

import functools
import importlib
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import records

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

MIXED_PRECISION_ENV = "CSPINE_MIXED_PRECISION"  #: ``off`` (float32), ``on`` (16-bit) or ``auto`` (measure)
MIN_BFLOAT16_SPEEDUP = 1.2  #: bfloat16 on a CPU only when a measured fine-tuning step is this much faster
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 flags; "bf16" is the aarch64 feature


def _gpu_devices() -> list:
    """GPUs visible to the Keras backend in use (TensorFlow, JAX or PyTorch)."""
    import keras  # noqa: PLC0415

    backend = keras.backend.backend()
    if backend == "jax":
        return [d for d in importlib.import_module("jax").devices() if d.platform == "gpu"]
    if backend == "torch":
        return [f"cuda:{i}" for i in range(importlib.import_module("torch").cuda.device_count())]
    return list(importlib.import_module("tensorflow").config.list_physical_devices("GPU"))


def describe_device() -> str:
    """Where training runs, e.g. ``"CPU only: no GPU visible to TensorFlow 2.21.0; 2 CPU cores"`` or
    ``"GPU: 1 found (NVIDIA H100 80GB HBM3); TensorFlow 2.21.0; 16 CPU cores"``."""
    import keras  # noqa: PLC0415

    gpus, backend = _gpu_devices(), keras.backend.backend()
    if backend == "tensorflow":
        tf = importlib.import_module("tensorflow")
        names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
        version = f"TensorFlow {tf.__version__}"
    else:  # e.g. the JAX backend on a machine without TensorFlow
        names, version = [getattr(gpu, "device_kind", gpu) for gpu in gpus], f"Keras {keras.__version__} ({backend})"
    listed = ", ".join(sorted(set(map(str, names))))
    found = f"GPU: {len(gpus)} found ({listed}); " if gpus else "CPU only: no GPU visible to "
    return f"{found}{version}; {os.cpu_count()} CPU cores"


def _cpuinfo_field(name: str, cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The first value of a ``/proc/cpuinfo`` field (Linux), or None when absent or unreadable."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.search(rf"^{name}\s*:(.*)$", text, re.MULTILINE)
    return found.group(1).strip() if found else None


def cpu_has_native_bfloat16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when ``/proc/cpuinfo`` lists bfloat16 instructions: needed for bfloat16 to pay, not enough."""
    flags = _cpuinfo_field("flags", cpuinfo) or _cpuinfo_field("Features", cpuinfo) or ""
    return any(flag in flags.split() for flag in _CPU_BF16_FLAGS)


def precision_cache_file() -> Path:
    """Where measured decisions are kept: ``$XDG_CACHE_HOME/cspine/precision.json`` (default ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cspine" / "precision.json"


def machine_key() -> str:
    """What a measurement depends on: CPU model, core count, Keras backend and its version."""
    import keras  # noqa: PLC0415

    model = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    backend = keras.backend.backend()
    return f"{model} | {os.cpu_count()} cores | {backend} {importlib.import_module(backend).__version__}"


def _proxy_model(policy: str, size: int) -> keras.Model:
    """VGG16's blocks 3-5 at 96 px, one conv each, seeded (no draw from the global random state)."""
    import keras  # noqa: PLC0415

    conv = functools.partial(keras.layers.Conv2D, kernel_size=3, padding="same", activation="relu", dtype=policy)
    pool, seeded = functools.partial(keras.layers.MaxPooling2D, dtype=policy), keras.initializers.GlorotUniform
    layers = [keras.Input((size, size, 128)), conv(256, kernel_initializer=seeded(0)), pool()]
    layers += [conv(512, kernel_initializer=seeded(1)), pool(), conv(512, kernel_initializer=seeded(2))]
    layers += [keras.layers.GlobalAveragePooling2D(dtype=policy)]
    model = keras.Sequential([*layers, keras.layers.Dense(1, "sigmoid", kernel_initializer=seeded(3), dtype="float32")])
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    return model


def measure_bfloat16_speedup(batch_size: int = 16, rounds: int = 5, size: int = 24) -> dict[str, float]:
    """Median seconds per fine-tuning step (``float32_s``, ``mixed_bfloat16_s``) and ``speedup``, measured
    here in ~5 s on 2 cores: two warm-up steps each, then ``rounds`` interleaved timed steps."""
    import numpy as np  # noqa: PLC0415

    x = np.random.default_rng(0).uniform(0.0, 1.0, (batch_size, size, size, 128)).astype("float32")
    y = (np.arange(batch_size) % 2).astype("float32")
    models = {policy: _proxy_model(policy, size) for policy in ("float32", "mixed_bfloat16")}
    seconds: dict[str, list[float]] = {policy: [] for policy in models}
    for _ in range(2 + rounds):
        for policy, model in models.items():
            t0 = time.perf_counter()
            model.train_on_batch(x, y)
            seconds[policy].append(time.perf_counter() - t0)
    f32, bf16 = (statistics.median(seconds[policy][2:]) for policy in ("float32", "mixed_bfloat16"))
    return {"float32_s": f32, "mixed_bfloat16_s": bf16, "speedup": f32 / bf16}


def choose_cpu_policy(measured: dict[str, float], min_speedup: float = MIN_BFLOAT16_SPEEDUP) -> str:
    """``"mixed_bfloat16"`` when ``measured`` (as :func:`measure_bfloat16_speedup` returns) shows a step
    at least ``min_speedup`` times faster than float32, else ``"float32"``."""
    return "mixed_bfloat16" if measured["float32_s"] >= min_speedup * measured["mixed_bfloat16_s"] else "float32"


def _measured_cpu_choice(cache_file: Path) -> tuple[str, str]:
    """The CPU decision for this :func:`machine_key`: from ``cache_file``, or measured and stored there."""
    key = machine_key()
    try:
        cache = dict(records.read_json(cache_file))
    except (OSError, ValueError, TypeError):  # absent or damaged: measured again and rewritten
        cache = {}
    measured, note = cache.get(key), "cached"
    if not (isinstance(measured, dict) and {"float32_s", "mixed_bfloat16_s"} <= measured.keys()):
        measured, note = measure_bfloat16_speedup(), "measured now"
        records.write_json(cache_file, {**cache, key: measured})
    ratio, shown = measured["float32_s"] / measured["mixed_bfloat16_s"], str(cache_file).replace(str(Path.home()), "~")
    why = f"a fine-tuning step in mixed_bfloat16 ran {ratio:.2f}x as fast as in float32 on this CPU"
    return choose_cpu_policy(measured), f"{why}; needs >= {MIN_BFLOAT16_SPEEDUP}x; {note}, {shown}"


def precision_choice(cache_file: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(policy, why)``: the dtype policy that trains VGG16 fastest here, and why. ``CSPINE_MIXED_PRECISION``
    ``off``: float32; ``on``: 16-bit, unmeasured; ``auto`` (default): a GPU ``mixed_float16``; a CPU with
    bfloat16 instructions ``mixed_bfloat16`` only if :func:`measure_bfloat16_speedup` finds it
    :data:`MIN_BFLOAT16_SPEEDUP` x faster (2-core AMD EPYC ~2x; 2-core Xeon with avx512_bf16, no AMX, 0.55x),
    measured once per machine, kept in ``cache_file`` (default :func:`precision_cache_file`); else float32."""
    setting = os.environ.get(MIXED_PRECISION_ENV, "").strip().lower() or "auto"
    if setting not in ("auto", "on", "off", "1", "0", "true", "false", "yes", "no"):
        raise ValueError(f"{MIXED_PRECISION_ENV}={setting!r}: use on, off or auto (measure; the default)")
    if setting in ("0", "off", "false", "no"):
        return "float32", f"{MIXED_PRECISION_ENV}={setting}"
    gpu = bool(_gpu_devices())
    if setting != "auto":
        return ("mixed_float16" if gpu else "mixed_bfloat16"), f"{MIXED_PRECISION_ENV}={setting}, not measured"
    if gpu:
        return "mixed_float16", "GPU: float16 tensor cores"
    if not cpu_has_native_bfloat16():
        return "float32", "this CPU has no bfloat16 instructions"
    return _measured_cpu_choice(Path(cache_file) if cache_file is not None else precision_cache_file())


def enable_mixed_precision(cache_file: str | os.PathLike | None = None, verbose: bool = True) -> str:
    """Set Keras's global dtype policy to :func:`precision_choice` (before building models), print why,
    return its name. Weights stay float32, and bundles are saved in float32 (:func:`as_float32`)."""
    import keras  # noqa: PLC0415

    policy, reason = precision_choice(cache_file)
    keras.mixed_precision.set_global_policy(policy)
    if verbose:
        print(f"precision: {policy} ({reason})")
    return policy


def _float32_policies(node: Any) -> Any:
    """A copy of a Keras config with every mixed dtype policy replaced by float32."""
    if isinstance(node, list):
        return [_float32_policies(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {key: _float32_policies(value) for key, value in node.items()}
    dtype = out.get("dtype")
    if isinstance(dtype, dict) and "Policy" in str(dtype.get("class_name", "")):
        out["dtype"] = {**dtype, "config": {**dtype.get("config", {}), "name": "float32"}}
    elif isinstance(dtype, str) and dtype.startswith("mixed_"):
        out["dtype"] = "float32"
    return out


def compute_dtypes(model: keras.Model) -> set[str]:
    """The compute dtypes of a model's layers, e.g. ``{"float32"}`` or ``{"bfloat16", "float32"}``."""
    return {str(layer.dtype_policy.compute_dtype) for layer in model.layers}


def as_float32(model: keras.Model) -> keras.Model:
    """The same model and (float32) weights computing in float32 throughout; ``model`` itself if it does."""
    import keras  # noqa: PLC0415

    if compute_dtypes(model) <= {"float32"}:
        return model
    clone = keras.Model.from_config(_float32_policies(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone

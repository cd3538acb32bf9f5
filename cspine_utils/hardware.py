"""Device and numeric precision: what TensorFlow runs on, mixed precision, float32 bundles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

__all__ = [
    "describe_device",
    "cpu_has_native_bfloat16",
    "MIXED_PRECISION_ENV",
    "mixed_precision_policy",
    "enable_mixed_precision",
    "compute_dtypes",
    "as_float32",
]


def _gpu_devices() -> list:
    """GPUs visible to the Keras backend in use (TensorFlow, JAX or PyTorch)."""
    import keras  # noqa: PLC0415

    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # noqa: PLC0415

        return [d for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch  # noqa: PLC0415

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    import tensorflow as tf  # noqa: PLC0415

    return list(tf.config.list_physical_devices("GPU"))


def describe_device() -> str:
    """One line saying where TensorFlow will train: the GPUs found, or CPU only.

    Returns
    -------
    str
        E.g. ``"GPU: 1 found (NVIDIA H100 80GB HBM3); TensorFlow 2.21.0"`` or
        ``"CPU only: no GPU visible to TensorFlow 2.21.0; 2 CPU cores"``.
    """
    import keras  # noqa: PLC0415

    backend = keras.backend.backend()
    if backend != "tensorflow":  # e.g. the JAX backend on a machine without TensorFlow
        gpus = _gpu_devices()
        kinds = ", ".join(sorted({str(getattr(g, "device_kind", g)) for g in gpus}))
        found = f"GPU: {len(gpus)} found ({kinds})" if gpus else "CPU only: no GPU visible"
        return f"{found}; Keras {keras.__version__} on the {backend} backend; {os.cpu_count()} CPU cores"
    import tensorflow as tf  # noqa: PLC0415

    gpus = _gpu_devices()
    if not gpus:
        return f"CPU only: no GPU visible to TensorFlow {tf.__version__}; {os.cpu_count()} CPU cores"
    names = []
    for gpu in gpus:
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except Exception:  # noqa: BLE001 - details are optional
            details = {}
        names.append(str(details.get("device_name") or getattr(gpu, "name", gpu)))
    return f"GPU: {len(gpus)} found ({', '.join(names)}); TensorFlow {tf.__version__}"


#: Environment variable that switches mixed precision off (``0``/``off``/``false``/``no``).
MIXED_PRECISION_ENV = "CSPINE_MIXED_PRECISION"


_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bfloat16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (x86 flags ``avx512_bf16`` or ``amx_bf16``).

    Read from ``/proc/cpuinfo`` (Linux). Elsewhere, or when the file cannot be read, False: the
    safe answer, since emulated bfloat16 is *slower* than float32.
    """
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in _CPU_BF16_FLAGS)
    return False


def mixed_precision_policy() -> str:
    """The Keras dtype policy this machine trains VGG16 fastest with, without losing accuracy.

    * ``"mixed_float16"`` with a GPU (tensor cores; Keras scales the loss);
    * ``"mixed_bfloat16"`` on a CPU with native bfloat16 (:func:`cpu_has_native_bfloat16`).
      On the 2-core AMD EPYC this course is tested on, VGG16 at 96 px fine-tunes (blocks 3-5)
      1.7-2.1x and predicts 1.2-3.2x faster than in float32
      (``benchmarks/bench_vgg_precision.py``; the float32 prediction figure is noisy there);
    * ``"float32"`` otherwise, or when ``CSPINE_MIXED_PRECISION`` is ``0``/``off``/``false``/``no``.

    Weights stay float32 under both mixed policies; only the arithmetic is 16-bit.
    """
    if os.environ.get(MIXED_PRECISION_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return "float32"
    if _gpu_devices():
        return "mixed_float16"
    if cpu_has_native_bfloat16():
        return "mixed_bfloat16"
    return "float32"


def enable_mixed_precision() -> str:
    """Set Keras's global dtype policy to :func:`mixed_precision_policy` and return its name.

    Models built afterwards compute in 16 bits except their output layer, which both builders
    keep in float32 for a stable sigmoid and loss. Call it before building models; a bundle is
    always saved in float32 (:func:`as_float32`), so what predicts later does not depend on the
    machine that trained.

    Returns
    -------
    str
        ``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"float32"``.
    """
    import keras  # noqa: PLC0415

    policy = mixed_precision_policy()
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _float32_policies(node: Any) -> Any:
    """A copy of a Keras config with every mixed dtype policy replaced by float32."""
    if isinstance(node, list):
        return [_float32_policies(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "dtype" and isinstance(value, dict) and "Policy" in str(value.get("class_name", "")):
            value = {**value, "config": {**value.get("config", {}), "name": "float32"}}
        elif key == "dtype" and isinstance(value, str) and value.startswith("mixed_"):
            value = "float32"
        out[key] = _float32_policies(value)
    return out


def compute_dtypes(model: keras.Model) -> set[str]:
    """The compute dtypes of a model's layers, e.g. ``{"float32"}`` or ``{"bfloat16", "float32"}``."""
    return {str(layer.dtype_policy.compute_dtype) for layer in model.layers}


def as_float32(model: keras.Model) -> keras.Model:
    """The same model (architecture and weights) computing in float32 throughout.

    A model trained under a mixed policy (:func:`enable_mixed_precision`) keeps float32 weights,
    so the copy is exact up to the 16-bit rounding it no longer does. Returns ``model`` itself
    when it already computes in float32.
    """
    import keras  # noqa: PLC0415

    if compute_dtypes(model) <= {"float32"}:
        return model
    clone = keras.Model.from_config(_float32_policies(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone

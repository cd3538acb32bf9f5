"""Profiles, paths and seeds shared by every notebook, test and command, and the notebooks' setup call.

A *profile* fixes how big a run is (model image size, synthetic slices, epochs, tuner trials, batch):
``smoke`` (tiny, for tests), ``cpu`` (default; ``make run`` on a 2-core CPU) and ``gpu`` (224 px, the
VGG16 native size, and a full search). Paths come from the environment, so one notebook runs in a
test, for a student and on a GPU: ``CSPINE_PROFILE`` (default ``cpu``), ``CSPINE_DATA_DIR`` (default:
the profile's synthetic set), ``CSPINE_ARTIFACTS`` (default ``<repo>/artifacts``) and
``CSPINE_REPORT_DIR`` (default ``<repo>/report``).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Profile:
    """How large a run is. All sizes in pixels, counts in images or epochs."""

    name: str
    image_size: int  # side of the square model input, pixels
    n_synthetic: int  # slices in the generated default dataset
    batch_size: int
    epochs_cnn: int
    epochs_head: int  # VGG phase 1: frozen base, train the head
    epochs_finetune: int  # VGG phase 2: top block(s) unfrozen, low learning rate
    finetune_blocks: int  # VGG phase 2: how many top blocks are unfrozen (3 = blocks 3, 4 and 5)
    lr_finetune: float  # VGG phase 2 learning rate (Adam)
    tuner_trials: int
    tuner_epochs: int
    bootstrap_resamples: int
    # CT studies (notebook 07): the synthetic RSNA-layout set, its prepared cache and the 2.5D models
    n_studies: int  # synthetic studies (about half with a fracture)
    study_matrix: int  # in-plane pixels of the synthetic DICOM slices
    study_slice_mm: float  # slice spacing (= thickness) of the synthetic series, mm
    cache_size: int  # in-plane pixels of a prepared (cached) slice = the 2.5D model's input side
    cache_crop_mm: float  # side of the in-plane square kept around the spine before resizing, mm
    cache_spacing_mm: float  # slice spacing the cache is resampled to, mm
    epochs_slice: int  # 2.5D slice model: epochs of the head on the frozen VGG16 base
    epochs_sequence: int  # GRU over a study's slice features

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        image_size=64,
        n_synthetic=120,
        batch_size=16,
        epochs_cnn=2,
        epochs_head=1,
        epochs_finetune=1,
        finetune_blocks=1,
        lr_finetune=1e-4,
        tuner_trials=2,
        tuner_epochs=1,
        bootstrap_resamples=200,
        n_studies=12,
        study_matrix=64,
        study_slice_mm=5.0,
        cache_size=32,
        cache_crop_mm=128.0,
        cache_spacing_mm=5.0,
        epochs_slice=2,
        epochs_sequence=3,
    ),
    "cpu": Profile(
        name="cpu",
        image_size=96,
        n_synthetic=1200,
        batch_size=32,
        epochs_cnn=15,
        epochs_head=8,
        epochs_finetune=6,  # the cpu course reached its best validation AUC at epoch 6 of 8
        finetune_blocks=3,
        lr_finetune=1e-4,
        tuner_trials=6,
        tuner_epochs=6,
        bootstrap_resamples=1000,
        n_studies=80,
        study_matrix=256,  # 0.6-0.9 mm pixels over the phantom's 160-240 mm field: fracture gaps stay visible
        study_slice_mm=2.5,
        cache_size=96,  # 0.75 mm pixels over 72 mm around the spine (notebook 04's spine crop: about 0.7 mm)
        cache_crop_mm=72.0,
        cache_spacing_mm=2.5,  # the source spacing: coarser resampling would skip fractures one slice thick
        epochs_slice=10,
        epochs_sequence=40,
    ),
    "gpu": Profile(
        name="gpu",
        image_size=224,
        n_synthetic=4000,
        batch_size=32,
        epochs_cnn=40,
        epochs_head=15,
        epochs_finetune=15,
        finetune_blocks=3,
        lr_finetune=1e-4,
        tuner_trials=30,
        tuner_epochs=20,
        bootstrap_resamples=2000,
        n_studies=400,
        study_matrix=512,
        study_slice_mm=1.25,
        cache_size=128,
        cache_crop_mm=72.0,
        cache_spacing_mm=1.25,
        epochs_slice=20,
        epochs_sequence=60,
    ),
}

DEFAULT_PROFILE = "cpu"


def get_profile(name: str | None = None) -> Profile:
    """The named profile, or the one in ``CSPINE_PROFILE`` (default ``cpu``); ValueError for an unknown name."""
    chosen = (name or os.environ.get("CSPINE_PROFILE") or DEFAULT_PROFILE).strip().lower()
    if chosen not in PROFILES:
        raise ValueError(f"unknown profile {chosen!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[chosen]


def repo_root() -> Path:
    """The repository holding this (editable) package's ``pyproject.toml``, else the working directory."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd()


def synthetic_data_dir(profile: str | Profile | None = None) -> Path:
    """Where the generated synthetic dataset of a profile lives: ``<repo>/data/synthetic/<profile>``."""
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return repo_root() / "data" / "synthetic" / prof.name


def data_dir(profile: str | Profile | None = None) -> Path:
    """The dataset to use: ``CSPINE_DATA_DIR`` if set, else the profile's synthetic dataset."""
    env = os.environ.get("CSPINE_DATA_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    return synthetic_data_dir(profile)


def synthetic_studies_dir(profile: str | Profile | None = None) -> Path:
    """Where the generated RSNA-layout CT studies of a profile live: ``<repo>/data/synthetic/rsna_<profile>``."""
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return repo_root() / "data" / "synthetic" / f"rsna_{prof.name}"


def studies_dir(profile: str | Profile | None = None) -> Path:
    """The CT studies to use (notebook 07): ``CSPINE_STUDIES_DIR`` (an RSNA-layout folder or a prepared
    cache) if set, else the profile's synthetic studies."""
    env = os.environ.get("CSPINE_STUDIES_DIR", "").strip()
    return Path(env).expanduser() if env else synthetic_studies_dir(profile)


def artifacts_dir() -> Path:
    """Where models, splits, tuner state and metrics go (``CSPINE_ARTIFACTS`` or ``<repo>/artifacts``)."""
    env = os.environ.get("CSPINE_ARTIFACTS", "").strip()
    return Path(env).expanduser() if env else repo_root() / "artifacts"


def studies_cache_dir() -> Path:
    """Where notebook 07 prepares RSNA-layout studies into a windowed cache: ``<artifacts>/studies_cache``."""
    return artifacts_dir() / "studies_cache"


def report_dir() -> Path:
    """The rendered course for readers (``CSPINE_REPORT_DIR`` or ``<repo>/report``)."""
    env = os.environ.get("CSPINE_REPORT_DIR", "").strip()
    return Path(env).expanduser() if env else repo_root() / "report"


def figures_dir() -> Path:
    """Where figures for the rendered report are saved: ``<report>/figures``."""
    return report_dir() / "figures"


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and Keras (which seeds TensorFlow; imported here only)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed))
    os.environ["PYTHONHASHSEED"] = str(int(seed))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of notebooks
    import keras  # noqa: PLC0415 - deliberately lazy

    keras.utils.set_random_seed(int(seed))


#: TensorFlow's native start-up notices that say nothing a reader needs: absl's note that it logs
#: to stderr before it is initialised, the oneDNN notice, and "no CUDA driver" on a machine
#: without a GPU (``hardware.describe_device`` says that in words).
BENIGN_NATIVE_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
)


def quiet_tensorflow_start() -> list[str]:
    """Import TensorFlow and list its GPUs without printing its benign native notices; return those held back.

    TensorFlow's C++ code writes to stderr while it starts, before ``TF_CPP_MIN_LOG_LEVEL`` takes
    effect, and Jupyter shows those lines like errors. This sets ``TF_CPP_MIN_LOG_LEVEL=2`` (unless
    set) and imports TensorFlow with file descriptor 2 sent to a temporary file, then writes back
    every line that is not one of :data:`BENIGN_NATIVE_NOTICES` (a CUDA library that fails to load
    is still shown). Python errors and warnings are untouched; a second call does nothing.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return []
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):  # pragma: no cover - closed or unusual stderr
        pass
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf  # noqa: PLC0415 - the point of this function

            tf.config.list_physical_devices("GPU")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        lines = held.read().decode("utf-8", errors="replace").splitlines()
    benign = [line for line in lines if any(n in line for n in BENIGN_NATIVE_NOTICES)]
    other = [line for line in lines if line.strip() and line not in benign]
    if other:
        print("\n".join(other), file=sys.stderr)
    return benign


def setup(profile: str | Profile | None = None, seed: int = 0, *, tuner: bool = False) -> Profile:
    """The one Setup call of every notebook; returns the :class:`Profile` (``CSPINE_PROFILE`` when None).

    Runs :func:`quiet_tensorflow_start` (so call it before ``import tensorflow``/``keras``) and
    :func:`set_seed`, then prints the TensorFlow and Keras versions and backend (and KerasTuner's
    when ``tuner``), the profile (name, image size, batch, epochs, seed) and the device
    (:func:`cspine_utils.hardware.describe_device`).
    """
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    quiet_tensorflow_start()
    set_seed(seed)
    import keras  # noqa: PLC0415 - after the quiet start
    import tensorflow as tf  # noqa: PLC0415

    from cspine_utils import hardware  # noqa: PLC0415

    versions = f"TensorFlow {tf.__version__}, Keras {keras.__version__} ({keras.backend.backend()} backend)"
    if tuner:
        import keras_tuner  # noqa: PLC0415

        versions += f", KerasTuner {keras_tuner.__version__}"
    print(versions)
    print(
        f"profile {prof.name}: {prof.image_size} px, batch {prof.batch_size}, epochs: CNN {prof.epochs_cnn}, "
        f"VGG16 {prof.epochs_head} head + {prof.epochs_finetune} fine-tuning, tuner {prof.tuner_trials} trials "
        f"x {prof.tuner_epochs}; seed {seed}"
    )
    print("device:", hardware.describe_device())
    return prof

"""Notebook 07's exported code (cspine_utils.course): the RSNA 2022 weighted log loss, the 2.5D and
multi-window inputs, max/top-k aggregation, and the slice head trained under a tf.distribute strategy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cspine_utils import course

# Three studies, columns patient_overall, C1..C7; worked out by hand:
# A fractured at C2, every probability 0.5: every label costs ln 2 = 0.693147, whatever its weight.
# B normal, 0.2 for patient_overall (weight 7) and 0.1 for each vertebra (weight 1 each):
#   (7 x -ln 0.8 + 7 x -ln 0.9) / 14 = (7 x 0.223144 + 7 x 0.105361) / 14 = 0.164252.
# C fractured at C7: 0.8 for patient_overall (weight 14), 0.1 for C1..C6 (negative, weight 1 each),
#   0.5 for C7 (positive, weight 2): (14 x 0.223144 + 6 x 0.105361 + 2 x 0.693147) / 22 = 0.233749.
# Mean over the studies: (0.693147 + 0.164252 + 0.233749) / 3 = 0.363716.
Y = np.array([[1, 0, 1, 0, 0, 0, 0, 0], [0] * 8, [1, 0, 0, 0, 0, 0, 0, 1]])
P = np.array([[0.5] * 8, [0.2] + [0.1] * 7, [0.8] + [0.1] * 6 + [0.5]])


def test_weighted_log_loss_on_a_hand_computed_case():
    assert course.weighted_log_loss(Y, P, per_study=True) == pytest.approx([0.693147, 0.164252, 0.233749], abs=1e-6)
    assert course.weighted_log_loss(Y, P) == pytest.approx(0.363716, abs=1e-6)
    # the weights matter: the same probabilities with C's patient_overall weighted like a vertebra would differ
    assert course.weighted_log_loss(Y[2:], P[2:]) != pytest.approx(
        float(np.mean(-(Y[2] * np.log(P[2]) + (1 - Y[2]) * np.log(1 - P[2])))), abs=1e-3
    )


def test_weighted_log_loss_clips_certainty_and_refuses_bad_input():
    # a certain miss (p = 0 for a fractured study) is clipped to eps = 1e-15, as sklearn's log_loss did:
    # patient_overall costs -ln(1e-15) = 34.5388 with weight 14; the 7 correct zeros cost ~0
    y, p = np.array([[1, 0, 0, 0, 0, 0, 0, 0]]), np.zeros((1, 8))
    assert course.weighted_log_loss(y, p) == pytest.approx(14 * 34.538776 / 21, rel=1e-6)
    assert np.isfinite(course.weighted_log_loss(1 - y, np.ones((1, 8))))
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        course.weighted_log_loss(Y[:, :7], P[:, :7])  # no patient_overall column
    with pytest.raises(ValueError, match=r"same shape"):
        course.weighted_log_loss(Y, P[:2])
    with pytest.raises(ValueError, match="0 or 1"):
        course.weighted_log_loss(Y * 2, P)
    for bad in (1.2, -0.1, np.nan):
        q = P.copy()
        q[1, 3] = bad
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            course.weighted_log_loss(Y, q)


def test_slice_inputs_stack_neighbours_or_windows():
    windows = np.arange(3 * 4 * 2 * 2, dtype=np.uint8).reshape(3, 4, 2, 2) * 5  # (W, Z, S, S)
    neighbours = course.slice_inputs(windows, "2.5d")
    assert neighbours.shape == (4, 2, 2, 3) and neighbours.dtype == np.float32
    np.testing.assert_allclose(neighbours[2, ..., 0], windows[0, 1] / 255.0)  # z-1
    np.testing.assert_allclose(neighbours[2, ..., 2], windows[0, 3] / 255.0)  # z+1
    np.testing.assert_allclose(neighbours[0, ..., 0], windows[0, 0] / 255.0)  # the first slice repeats itself
    np.testing.assert_allclose(neighbours[3, ..., 2], windows[0, 3] / 255.0)
    stacked = course.slice_inputs(windows, "windows")
    np.testing.assert_allclose(stacked[1, ..., 2], windows[2, 1] / 255.0)  # third window of slice 1
    with pytest.raises(ValueError, match="mode"):
        course.slice_inputs(windows, "3d")
    with pytest.raises(ValueError, match="W >= 3"):
        course.slice_inputs(windows[:2], "windows")


def test_aggregate_slices_max_topk_and_missing_vertebrae():
    scores = np.array([0.0, 5.0, 1.0, 3.0, -2.0])
    presence = np.zeros((5, 7), dtype=int)
    presence[:2, 0] = 1  # C1 on slices 0-1
    presence[2:, 1] = 1  # C2 on slices 2-4; C3..C7 on none
    top = course.aggregate_slices(scores, presence, "max")
    np.testing.assert_allclose(top, [5.0, 5.0, 3.0] + [5.0] * 5)  # absent vertebrae get the study's score
    mean2 = course.aggregate_slices(scores, presence, "topk", k=2)
    np.testing.assert_allclose(mean2[:3], [4.0, 2.5, 2.0])
    with pytest.raises(ValueError):
        course.aggregate_slices(scores, presence[:, :6], "max")


def test_the_study_pools_only_slices_that_show_a_cervical_vertebra():
    scores = np.array([9.0, 1.0, 2.0, 8.0])  # slice 0 above C1, slice 3 below C7: outside the cervical spine
    presence = np.zeros((4, 7), dtype=int)
    presence[1:3, 4] = 1  # C5 on slices 1-2
    np.testing.assert_allclose(
        course.aggregate_slices(scores, presence, "max")[:2], [2.0, 2.0]
    )  # study: max of slices 1-2; C1 (absent) gets the study score
    without_mask = course.aggregate_slices(scores, np.zeros((4, 7), dtype=int), "max")
    np.testing.assert_allclose(without_mask, [9.0] * 8)  # no mask: every slice counts, every vertebra = study


def test_make_strategy_chooses_by_the_gpus_present():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    strategy = course.make_strategy()
    if len(gpus) > 1:
        assert isinstance(strategy, tf.distribute.MirroredStrategy)
        assert strategy.num_replicas_in_sync == len(gpus)
        assert "MirroredStrategy" in course.describe_strategy(strategy)
    else:  # this machine's case: TensorFlow's default strategy, one device (the GPU if there is one, else the CPU)
        assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
        assert course.describe_strategy(strategy) == (
            f"default strategy (no distribution), 1 replica on {gpus[0].name if gpus else 'the CPU'}"
        )


_MIRRORED = textwrap.dedent(
    """
    import json, os
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from cspine_utils import course

    keras.utils.set_random_seed(0)
    strategy = course.make_strategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(48), np.ones(16)].astype(int)
    x = (rng.normal(size=(64, 32)) + y[:, None]).astype("float32")  # separable: features shifted by the label
    head, history = course.fit_slice_head(
        strategy, (x, y), (x[::2], y[::2]), epochs=2, class_weight=course.balanced_class_weights(y), batch_size=8
    )
    print(json.dumps({
        "kind": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "devices": list(strategy.extended.worker_devices),
        "loss": [float(v) for v in history["loss"]],
        "p": head.predict(x[:4], verbose=0).ravel().tolist(),
    }))
    """
)


@pytest.mark.slow
def test_slice_head_trains_under_a_mirrored_strategy_on_two_logical_cpus():
    """Two logical CPU devices stand in for two GPUs: MirroredStrategy with 2 replicas, and notebook 07's
    training code (fit_slice_head: build and compile in strategy.scope(), fit) trains with a finite loss."""
    out = subprocess.run([sys.executable, "-c", _MIRRORED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kind"] == "MirroredStrategy" and result["replicas"] == 2
    assert len(result["devices"]) == 2 and all("CPU" in d for d in result["devices"])
    assert len(result["loss"]) == 2 and all(np.isfinite(result["loss"]))
    assert all(0.0 <= p <= 1.0 for p in result["p"])


def test_study_views_draws_three_planes_with_the_boxes_they_cross():
    from cspine_utils import plots

    volume = np.zeros((10, 32, 32), np.uint8)
    mask = np.zeros_like(volume)
    mask[1:5, 10:20, 12:22], mask[5:9, 10:20, 12:22] = 1, 2  # C1 above C2
    boxes = [(3, 12, 11, 6, 5), (4, 12, 11, 6, 5), (8, 0, 0, 3, 3)]  # z, x, y, width, height
    fig = plots.study_views(volume, mask, boxes, spacing_mm=(3.0, 1.0, 1.0))
    axial, sagittal, coronal = fig.axes[:3]
    # the planes cross at the middle box (slice 4, centre x 15, y 13): one box on that axial slice, the two
    # stacked boxes on the sagittal and coronal planes; the box in the corner is crossed by neither plane
    assert [len(ax.patches) for ax in (axial, sagittal, coronal)] == [1, 2, 2]
    assert axial.get_title().startswith("axial (slice 4") and sagittal.images[0].get_array().shape == (10, 32)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["C1", "C2"]
    with pytest.raises(ValueError, match="same shape"):
        plots.study_views(volume, mask[:5])

"""The 3-D street scenes: a world from its seed, rendered deterministically in every look."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from mas3_edge import synth, synth3d
from mas3_edge.errors import UserError
from mas3_edge.labels import IGNORE, NUM_CLASSES
from mas3_edge.synth3d.layout import BUILDING, ROAD, SIDEWALK, SKY, VEG

SIZE = (64, 128)  # small: a render takes a fraction of a second


def test_layout_depends_on_the_seed_alone_and_uses_label_ids():
    a, b, c = synth3d.layout(4), synth3d.layout(4), synth3d.layout(5)
    assert a == b and a.prims != c.prims
    assert {p.cls for p in a.prims} <= set(range(NUM_CLASSES))
    assert all(np.isfinite(p.pos).all() and min(p.size) >= 0 for p in a.prims)


def test_unknown_look_and_label_shift_are_refused():
    with pytest.raises(UserError, match="unknown 3-D look"):
        synth3d.render("r3d-snow", 1, SIZE)
    with pytest.raises(UserError, match="no label_shift"):
        synth.render("r3d-source", 1, SIZE, label_shift=0.5)
    with pytest.raises(UserError, match="unknown domain"):
        synth.render("r3d", 1, SIZE)


mitsuba = pytest.importorskip("mitsuba")  # the render tests need the render3d extra (in dev)


def test_same_seed_same_bytes_through_both_entry_points():
    img, lbl = synth3d.render("r3d-source", 3, SIZE)
    again, lbl2 = synth.render("r3d-source", 3, SIZE)  # the path the benchmarks use
    assert img.shape == (*SIZE, 3) and img.dtype == np.uint8 and lbl.shape == SIZE and lbl.dtype == np.uint8
    assert img.tobytes() == again.tobytes() and lbl.tobytes() == lbl2.tobytes()
    other, lbl3 = synth3d.render("r3d-source", 4, SIZE)
    assert not np.array_equal(lbl, lbl3) and not np.array_equal(img, other)


def test_the_render_does_not_depend_on_the_thread_count():
    import drjit as dr

    before = dr.thread_count()
    img, lbl = synth3d.render("r3d-dusk", 6, SIZE)
    try:
        dr.set_thread_count(1)  # Mitsuba renders in blocks; the pixels must not depend on who drew them
        one = synth3d.render("r3d-dusk", 6, SIZE)
    finally:
        dr.set_thread_count(before)
    assert img.tobytes() == one[0].tobytes() and lbl.tobytes() == one[1].tobytes()


def test_labels_are_train_ids_in_a_street_layout():
    for seed in range(3):
        _, lbl = synth3d.render("r3d-source", seed, SIZE)
        ids = set(np.unique(lbl).tolist())
        assert ids <= set(range(NUM_CLASSES)) | {IGNORE}
        assert np.mean(lbl == IGNORE) < 0.01  # back faces only, if any
        w = SIZE[1]
        bottom = lbl[-3:, w // 2 - 4:w // 2 + 4]  # under the camera: the ego lane
        assert np.mean(bottom == ROAD) > 0.8, f"seed {seed}: not road below the camera"
        assert {ROAD, SIDEWALK, SKY} <= ids and ids & {BUILDING, VEG}, f"seed {seed}: {ids}"


@pytest.mark.parametrize("look", [d for d in synth3d.DOMAINS if d != synth3d.SOURCE])
def test_a_target_look_changes_the_image_and_keeps_the_layout_unless_it_moves_the_camera(look):
    src_img, src_lbl = synth3d.render(synth3d.SOURCE, 2, SIZE)
    img, lbl = synth3d.render(look, 2, SIZE)
    assert np.abs(img.astype(np.int16) - src_img).mean() > 8, "the look barely changes the image"
    if look in synth3d.CAMERA_LOOKS:
        assert np.mean(lbl != src_lbl) > 0.05  # the camera moved: the labels move with it
    else:
        assert np.array_equal(lbl, src_lbl)  # same world, same camera: the same labels exactly


def test_fog_thickens_with_distance():
    from dataclasses import replace

    from mas3_edge.synth3d.scene import _film

    fog = replace(synth3d.LOOKS["r3d-fog"], noise=0.0)
    black = np.zeros((1, 4, 3), np.float32)  # a black object at 2, 10, 40 m and the sky (depth 0: a miss)
    out = _film(black, np.float32([[2, 10, 40, 0]]), fog, np.random.default_rng(0))[0, :, 0].astype(int)
    assert out[0] < out[1] < out[2] < out[3] and out[0] < 0.5 * out[3]  # towards the airlight with distance
    clear, _ = synth3d.render(synth3d.SOURCE, 1, SIZE)
    hazy, _ = synth3d.render("r3d-fog", 1, SIZE)
    assert hazy.std() < 0.7 * clear.std()  # the whole frame loses contrast


def test_night_is_darker_than_day_but_its_lights_are_seen():
    day, _ = synth3d.render(synth3d.SOURCE, 1, SIZE)
    night, _ = synth3d.render("r3d-night", 1, SIZE)
    assert night.mean() < 0.5 * day.mean() and night.max() > 200


def test_without_mitsuba_one_clear_error(monkeypatch):
    from mas3_edge.synth3d import scene

    scene._mi.cache_clear()
    monkeypatch.setitem(sys.modules, "mitsuba", None)  # import mitsuba now raises ModuleNotFoundError
    try:
        with pytest.raises(UserError, match="render3d"):
            synth3d.render(synth3d.SOURCE, 1, SIZE)
    finally:
        monkeypatch.undo()
        scene._mi.cache_clear()

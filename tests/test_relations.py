"""HamLearning spatial relation graph: every class, the boundaries, the symmetries."""

from __future__ import annotations

import numpy as np
import pytest

from mner.extract.relations import (
    COVER,
    DIRECTION_BASE,
    INSIDE,
    NONE,
    OVERLAP,
    RELATION_NAMES,
    direction_sector,
    relation_matrix,
)

# A 600 x 800 image has a 1000-pixel diagonal: a centre distance of 500 is rho = 0.5.
SIZE = (600, 800)


def rel(a, b, size=SIZE):
    """(label of b relative to a, label of a relative to b) for two boxes."""
    m = relation_matrix(np.array([a, b], dtype=np.float32), 2, size, max_objects=4)
    return int(m[1, 2]), int(m[2, 1])


def box_at(cx, cy, half=5):
    return [cx - half, cy - half, cx + half, cy + half]


def name(label):
    return RELATION_NAMES[label]


def test_relation_names_layout():
    assert len(RELATION_NAMES) == 12
    assert RELATION_NAMES[:4] == ("none", "inside", "cover", "overlap")
    assert RELATION_NAMES[DIRECTION_BASE] == "dir_000_045"
    assert RELATION_NAMES[-1] == "dir_315_360"
    assert len(set(RELATION_NAMES)) == 12


def test_inside_and_cover_are_paired():
    big, small = [10, 10, 200, 200], [50, 60, 100, 90]
    assert rel(big, small) == (INSIDE, COVER)  # small lies inside big
    assert rel(small, big) == (COVER, INSIDE)


def test_containment_is_closed_at_shared_borders():
    assert rel([0, 0, 100, 100], [0, 0, 100, 40]) == (INSIDE, COVER)


def test_identical_boxes_overlap_both_ways():
    assert rel([5, 5, 50, 50], [5, 5, 50, 50]) == (OVERLAP, OVERLAP)


def test_overlap_above_half_iou():
    # IoU = 25*10 / (30*10 + 30*10 - 250) = 250 / 350 > 0.5, neither contains the other.
    assert rel([0, 0, 30, 10], [5, 0, 35, 10]) == (OVERLAP, OVERLAP)


def test_iou_exactly_half_is_not_overlap():
    # inter = 200, union = 300 + 300 - 200 = 400: IoU == 0.5 exactly, which the paper's
    # strict "u > 0.5" excludes; centres 10 px apart to the right -> a direction.
    a, b = [0, 0, 30, 10], [10, 0, 40, 10]
    assert rel(a, b) == (DIRECTION_BASE + 0, DIRECTION_BASE + 4)
    # One pixel more overlap tips it over.
    assert rel([0, 0, 30, 10], [9, 0, 39, 10]) == (OVERLAP, OVERLAP)


@pytest.mark.parametrize(
    ("dx", "dy", "sector"),
    [
        (100, -30, 0),  # right, a little up (image y grows down)
        (30, -100, 1),  # up, a little right
        (-30, -100, 2),  # up, a little left
        (-100, -30, 3),  # left, a little up
        (-100, 30, 4),  # left, a little down
        (-30, 100, 5),  # down, a little left
        (30, 100, 6),  # down, a little right
        (100, 30, 7),  # right, a little down
    ],
)
def test_every_direction_class(dx, dy, sector):
    a = box_at(300, 400)
    b = box_at(300 + dx, 400 + dy)
    forward, backward = rel(a, b)
    assert forward == DIRECTION_BASE + sector
    assert backward == DIRECTION_BASE + (sector + 4) % 8


@pytest.mark.parametrize(
    ("dx", "dy", "sector"),
    [
        (100, 0, 0),  # straight right starts [0, 45)
        (100, -100, 1),  # up-right diagonal starts [45, 90)
        (0, -100, 2),  # straight up starts [90, 135)
        (-100, -100, 3),
        (-100, 0, 4),  # straight left starts [180, 225)
        (-100, 100, 5),
        (0, 100, 6),  # straight down starts [270, 315)
        (100, 100, 7),
    ],
)
def test_sector_boundaries_belong_to_the_sector_starting_there(dx, dy, sector):
    assert rel(box_at(300, 400), box_at(300 + dx, 400 + dy)) == (
        DIRECTION_BASE + sector,
        DIRECTION_BASE + (sector + 4) % 8,
    )


def test_direction_names_match_geometry():
    assert name(rel(box_at(300, 400), box_at(300, 300))[0]) == "dir_090_135"  # above
    assert name(rel(box_at(300, 400), box_at(200, 400))[0]) == "dir_180_225"  # left


def test_direction_sector_is_antisymmetric_everywhere():
    rng = np.random.default_rng(0)
    dx = np.concatenate([rng.integers(-50, 51, 2000), [1, 0, -1, 0, 3, -3, 3, -3]])
    dy = np.concatenate([rng.integers(-50, 51, 2000), [0, 1, 0, -1, 3, 3, -3, -3]])
    keep = (dx != 0) | (dy != 0)
    dx, dy = dx[keep], dy[keep]
    s = direction_sector(dx, dy)
    assert np.array_equal(direction_sector(-dx, -dy), (s + 4) % 8)
    # Agrees with the arctangent away from the boundaries.
    angle = np.degrees(np.arctan2(-dy, dx)) % 360
    rem = angle % 45
    off_boundary = np.minimum(rem, 45 - rem) > 1e-6
    assert np.array_equal(s[off_boundary], (angle[off_boundary] // 45).astype(int))


def test_distance_ratio_exactly_half_has_no_edge():
    # Centres 500 px apart on a 1000 px diagonal: rho == 0.5, no edge.
    a, b = box_at(50, 100), box_at(350, 500)  # offset (300, 400), length 500
    assert rel(a, b) == (NONE, NONE)
    # 499.x px apart: a direction (down-right, sector [270, 315)).
    assert rel(a, box_at(349, 499)) == (DIRECTION_BASE + 6, DIRECTION_BASE + 2)


def test_far_apart_has_no_edge():
    assert rel(box_at(10, 10), box_at(590, 790)) == (NONE, NONE)


def test_same_centre_without_containment_is_overlap():
    wide, tall = [0, 45, 100, 55], [45, 0, 55, 100]  # a cross, IoU = 100 / 1900
    assert rel(wide, tall) == (OVERLAP, OVERLAP)


def test_zero_area_boxes():
    point = [50, 50, 50, 50]
    line = [20, 70, 80, 70]
    frame = [0, 0, 100, 100]
    assert rel(frame, point) == (INSIDE, COVER)  # a point inside a box
    assert rel(point, point) == (OVERLAP, OVERLAP)  # identical, no 0/0 IoU
    # point (50, 50) vs line centre (50, 70): straight down, IoU 0.
    assert rel(point, line) == (DIRECTION_BASE + 6, DIRECTION_BASE + 2)
    m = relation_matrix(np.array([point, line], dtype=np.float32), 2, SIZE, 2)
    assert m.dtype == np.int8


def test_img_node_contains_every_object_and_diagonal_is_none():
    boxes = np.array([box_at(100, 100), box_at(120, 100), [-20, -20, 700, 900]], np.float32)
    m = relation_matrix(boxes, 3, SIZE, max_objects=5)
    assert m.shape == (6, 6)
    assert m.dtype == np.int8
    assert m[0, 1:4].tolist() == [INSIDE] * 3  # [IMG] -> o_j: o_j is inside the image
    assert m[1:4, 0].tolist() == [COVER] * 3
    assert np.all(np.diag(m) == NONE)
    assert m[1, 3] == COVER and m[3, 1] == INSIDE  # the spilling box covers object 1


def test_padding_stays_zero_and_count_zero():
    boxes = np.array([box_at(100, 100), box_at(130, 100), box_at(999, 999)], np.float32)
    m = relation_matrix(boxes, 2, SIZE, max_objects=4)
    assert np.all(m[3:, :] == 0) and np.all(m[:, 3:] == 0)
    assert m[1, 2] == DIRECTION_BASE + 0
    empty = relation_matrix(np.zeros((4, 4), np.float32), 0, SIZE, max_objects=4)
    assert empty.shape == (5, 5) and not empty.any()
    assert not relation_matrix(np.zeros((0, 4)), 0, SIZE, 15).any()


def test_count_equal_to_max_objects_fills_the_matrix():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 500, (15, 2))
    wh = rng.uniform(1, 120, (15, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    m = relation_matrix(boxes, 15, SIZE, max_objects=15)
    assert m.shape == (16, 16)
    assert m[0, 1:].tolist() == [INSIDE] * 15
    # Antisymmetry of the whole object block.
    obj = m[1:, 1:].astype(int)
    expected = obj.copy()
    expected[obj == INSIDE] = COVER
    expected[obj == COVER] = INSIDE
    d = obj >= DIRECTION_BASE
    expected[d] = DIRECTION_BASE + (obj[d] - DIRECTION_BASE + 4) % 8
    assert np.array_equal(obj.T, expected)
    assert len(np.unique(obj)) > 3  # the random layout exercises several classes


@pytest.mark.parametrize(
    ("boxes", "count", "size", "max_objects"),
    [
        (np.zeros((2, 4)), 3, SIZE, 4),  # more objects than boxes
        (np.zeros((5, 4)), 5, SIZE, 4),  # more than the graph holds
        (np.zeros((2, 4)), -1, SIZE, 4),
        (np.zeros((2, 3)), 1, SIZE, 4),
        (np.zeros((2, 4)), 1, (0, 10), 4),
    ],
)
def test_invalid_arguments(boxes, count, size, max_objects):
    with pytest.raises(ValueError):
        relation_matrix(boxes, count, size, max_objects)

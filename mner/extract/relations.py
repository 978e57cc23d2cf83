"""HamLearning's spatial relation graph over [IMG] and the detected objects.

Paper: P. Liu, H. Li, Y. Ren, J. Liu, S. Si, H. Zhu, L. Sun, "Hierarchical Aligned
Multimodal Learning for NER on Tweet Posts" (HamLearning), AAAI 2024, section "Spatial
Encoding" (after T. Yao, Y. Pan, Y. Li, T. Mei, "Exploring Visual Relationship for Image
Captioning", ECCV 2018). For a pair of objects o_i, o_j the paper computes
the centre distance d_ij, the IoU u_ij and the angle delta_ij of the vector
(x_j - x_i, y_j - y_i) to the positive x axis, then labels the edge o_i -> o_j:

* "inside"  if o_i includes o_j completely (o_j lies inside o_i);
* "cover"   if, conversely, o_i is contained by o_j (o_j covers o_i);
* "overlap" otherwise, if u_ij > 0.5;
* otherwise, with rho_ij = d_ij / image diagonal: no edge when rho_ij > 0.5, else one
  of eight direction classes "class1..class8" chosen by delta_ij;
* "By default, we think the I includes all the objects": [IMG] -> o_j is "inside".

How this module reads it (the matrix is what R-GCN eq. (5) consumes as r_{i<->j}):

* ``M[i, j]`` is the label of the edge i -> j, i.e. **where object j is relative to
  object i**: ``inside`` = j lies inside i, ``cover`` = j covers i, ``dir_*`` = the
  direction from i's centre to j's centre. Consequently ``M[i, j] == inside`` iff
  ``M[j, i] == cover``, and a direction ``d`` at ``M[i, j]`` is the opposite direction
  at ``M[j, i]``.
* Node 0 is [IMG]; objects are nodes 1..count. ``M[0, j] = inside`` (the object lies
  inside the image) and ``M[j, 0] = cover`` (the image covers the object), for every
  object j, whatever its box (boxes may spill past the image border).
* Containment is closed: a box touching the other's border from inside still counts.
  Two identical boxes contain each other; the paper's rule would call both edges
  "inside", which breaks the inside/cover pairing, so identical boxes are ``overlap``.
* IoU exactly 0.5 is not an overlap (the paper's ``u_ij > 0.5`` is strict) and falls
  through to the distance rule. Distance ratio exactly 0.5 gets no edge: the paper
  leaves ``rho == 0.5`` open and we require ``rho < 0.5`` for a direction. Both tests
  are done on exact products (``3 * inter > area_i + area_j``, ``4 d^2 < diag^2``), so
  the boundaries do not depend on rounding of a division or a square root.
* Angles: image y grows downwards, so the angle is measured in the *picture's* frame,
  counter-clockwise from "to the right" with "up" at 90 degrees:
  ``delta = atan2(-(y_j - y_i), x_j - x_i)`` in [0, 360). Class ``k`` (k = 0..7) is the
  half-open sector ``[45 k, 45 (k + 1))`` degrees, named ``dir_{45k:03d}_{45k+45:03d}``:
  ``dir_000_045`` is right and slightly up, ``dir_090_135`` up and to the left,
  ``dir_180_225`` left and slightly down, ``dir_270_315`` down and to the right. A
  vector exactly on a boundary belongs to the sector that *starts* there (straight
  right is ``dir_000_045``, straight up ``dir_090_135``, the up-right diagonal
  ``dir_045_090``, straight left ``dir_180_225``). Sectors are computed from exact
  sign/magnitude comparisons of the centre offset, not from a rounded arctangent, and
  because the sectors are half-open the opposite vector always lands in sector
  ``k + 4 (mod 8)``.
* Two boxes with the same centre that neither contain each other nor overlap by
  IoU > 0.5 (a cross of a wide and a tall box) have no direction; they do intersect
  around the shared centre, so they are labelled ``overlap`` rather than dropped.
* Zero-area boxes (points, lines) take part normally: area 0 gives IoU 0 (never a
  division by zero), containment and directions still apply.
* The diagonal ``M[i, i]`` is 0 ("none"): the paper defines no self relation; the R-GCN
  carries a node's own state through its residual gate, eq. (7).
* Rows and columns beyond ``count`` are 0 (padding).
"""

from __future__ import annotations

import numpy as np

NONE, INSIDE, COVER, OVERLAP = 0, 1, 2, 3
N_DIRECTIONS = 8
DIRECTION_BASE = 4  # label of sector k is DIRECTION_BASE + k

RELATION_NAMES: tuple[str, ...] = ("none", "inside", "cover", "overlap") + tuple(
    f"dir_{45 * k:03d}_{45 * (k + 1):03d}" for k in range(N_DIRECTIONS)
)
"""Relation label names; the index is the int8 value stored in ``relations/labels``."""


def direction_sector(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Direction class of centre offsets, with exact boundaries.

    Args:
        dx: (...) x offset from the source centre to the target centre (pixels).
        dy: (...) y offset in image coordinates (y grows downwards).

    Returns:
        (...) int64 sector index k in 0..7: the angle counter-clockwise from the +x
        axis in the picture (up = 90 degrees) lies in ``[45 k, 45 (k + 1))``. A zero
        offset returns 0; callers decide what a coincident centre means.
    """
    u = np.asarray(dx, dtype=np.float64)
    v = -np.asarray(dy, dtype=np.float64)  # flip so that "up" in the picture is +v
    au, av = np.abs(u), np.abs(v)
    # Each octant as a half-open cone, written with comparisons only so that a vector on
    # a boundary (u == 0, v == 0 or |u| == |v|) is assigned without rounding error.
    conditions = [
        (v >= 0) & (u > v),  # [0, 45)
        (u > 0) & (v >= u),  # [45, 90)
        (u <= 0) & (v > au),  # [90, 135)
        (v > 0) & (-u >= v),  # [135, 180)
        (v <= 0) & (-u > av),  # [180, 225)
        (u < 0) & (-v >= -u),  # [225, 270)
        (u >= 0) & (-v > u),  # [270, 315)
        (v < 0) & (u >= -v),  # [315, 360)
    ]
    return np.select(conditions, list(range(N_DIRECTIONS)), default=0).astype(np.int64)


def relation_matrix(
    boxes: np.ndarray,
    count: int,
    image_size: tuple[int, int],
    max_objects: int,
) -> np.ndarray:
    """The spatial relation graph of one image, [IMG] at node 0.

    Args:
        boxes: (O, 4) float boxes ``x1, y1, x2, y2`` in pixels; rows ``>= count`` are
            padding and ignored. O may be smaller or larger than ``max_objects`` as long
            as ``count <= min(O, max_objects)``.
        count: number of real objects (0..max_objects).
        image_size: ``(width, height)`` of the image in pixels; its diagonal scales the
            centre distance (rho in the paper).
        max_objects: O in the cache schema; the result has O + 1 nodes.

    Returns:
        (max_objects + 1, max_objects + 1) int8 matrix; ``M[i, j]`` is the index in
        :data:`RELATION_NAMES` of where node j is relative to node i (module docstring).

    Raises:
        ValueError: on a count outside ``0..min(len(boxes), max_objects)``, boxes not
            shaped (O, 4), or a non-positive image size. These are programming errors
            of the extractor, not user input.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (O, 4), got {boxes.shape}")
    if not 0 <= count <= min(len(boxes), max_objects):
        raise ValueError(
            f"count={count} must be in 0..min(len(boxes)={len(boxes)}, max_objects={max_objects})"
        )
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")

    out = np.zeros((max_objects + 1, max_objects + 1), dtype=np.int8)
    if count == 0:
        return out
    b = boxes[:count]
    x1, y1, x2, y2 = (b[:, k] for k in range(4))

    # j inside i: box j within box i on all four sides (closed). (i, j) indexing below:
    # axis 0 is the source i, axis 1 the target j.
    contains = (
        (x1[:, None] <= x1[None, :])
        & (y1[:, None] <= y1[None, :])
        & (x2[None, :] <= x2[:, None])
        & (y2[None, :] <= y2[:, None])
    )
    identical = contains & contains.T

    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    iw = np.clip(
        np.minimum(x2[:, None], x2[None, :]) - np.maximum(x1[:, None], x1[None, :]), 0, None
    )
    ih = np.clip(
        np.minimum(y2[:, None], y2[None, :]) - np.maximum(y1[:, None], y1[None, :]), 0, None
    )
    inter = iw * ih
    # IoU > 0.5  <=>  inter / (a_i + a_j - inter) > 1/2  <=>  3 inter > a_i + a_j;
    # zero areas give 0 > 0, i.e. no overlap, without dividing by a zero union.
    overlap = 3.0 * inter > area[:, None] + area[None, :]

    # Centres are doubled (x1 + x2 instead of (x1 + x2) / 2) so the distance test below
    # stays in exact arithmetic for integer pixel boxes: rho < 1/2 <=> 4 d^2 < diag^2,
    # and with doubled offsets (2d)^2 < diag^2.
    cx, cy = x1 + x2, y1 + y2
    dx = cx[None, :] - cx[:, None]
    dy = cy[None, :] - cy[:, None]
    near = dx * dx + dy * dy < float(width) ** 2 + float(height) ** 2
    same_centre = (dx == 0) & (dy == 0)
    sector = direction_sector(dx, dy)

    rel = np.select(
        [identical, contains, contains.T, overlap, same_centre, near],
        [OVERLAP, INSIDE, COVER, OVERLAP, OVERLAP, DIRECTION_BASE + sector],
        default=NONE,
    )
    np.fill_diagonal(rel, NONE)

    out[1 : count + 1, 1 : count + 1] = rel
    out[0, 1 : count + 1] = INSIDE  # [IMG] includes every object (paper, end of section)
    out[1 : count + 1, 0] = COVER
    return out

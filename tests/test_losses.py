"""mner.train.losses.info_nce against hand computations, masks, directions, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mner.train.losses import info_nce


def _ce(row: list[float], target: int) -> float:
    """-log softmax(row)[target], written out with math (the hand computation)."""
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


# a0=(1,0), a1=(0,1); b0=(1,0), b1=(0.6,0.8): cosines s00=1, s01=0.6, s10=0, s11=0.8.
A2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
B2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
S2 = [[1.0, 0.6], [0.0, 0.8]]


def test_two_by_two_matches_hand_computation_each_direction():
    tau = 0.5
    a2b = 0.5 * (_ce([S2[0][0] / tau, S2[0][1] / tau], 0) + _ce([S2[1][0] / tau, S2[1][1] / tau], 1))
    b2a = 0.5 * (_ce([S2[0][0] / tau, S2[1][0] / tau], 0) + _ce([S2[0][1] / tau, S2[1][1] / tau], 1))
    assert info_nce(A2, B2, tau, "a2b").item() == pytest.approx(a2b, rel=1e-5)
    assert info_nce(A2, B2, tau, "b2a").item() == pytest.approx(b2a, rel=1e-5)
    assert info_nce(A2, B2, tau, "both").item() == pytest.approx(0.5 * (a2b + b2a), rel=1e-5)
    assert a2b != pytest.approx(b2a)  # the case is asymmetric, so directions differ


def test_cosine_ignores_scale_of_rows():
    got = info_nce(A2 * torch.tensor([[3.0], [0.1]]), B2 * 7.0, 0.5, "both")
    assert got.item() == pytest.approx(info_nce(A2, B2, 0.5, "both").item(), rel=1e-5)


def test_three_by_three_dot_product_matches_hand_computation():
    a = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])
    b = torch.tensor([[0.5, 0.5], [1.0, -2.0], [-1.0, 1.0]])
    dots = [[sum(x * y for x, y in zip(ai, bj, strict=True)) for bj in b.tolist()] for ai in a.tolist()]
    tau = 2.0
    want = sum(_ce([d / tau for d in dots[i]], i) for i in range(3)) / 3
    got = info_nce(a, b, tau, "a2b", normalize=False)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # b2a is a2b with the roles swapped.
    swapped = info_nce(b, a, tau, "a2b", normalize=False)
    assert info_nce(a, b, tau, "b2a", normalize=False).item() == pytest.approx(swapped.item(), rel=1e-6)


def test_temperature_scales_logits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    # Without normalisation, dividing by tau is the same as scaling a.
    assert info_nce(a, b, 0.25, normalize=False).item() == pytest.approx(
        info_nce(a * 4.0, b, 1.0, normalize=False).item(), rel=1e-5
    )
    # Perfectly matched orthonormal pairs: the loss falls to 0 as tau falls.
    eye = torch.eye(4)
    losses = [info_nce(eye, eye, t).item() for t in (1.0, 0.1, 0.01)]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 1e-6
    assert losses[0] == pytest.approx(_ce([1.0, 0.0, 0.0, 0.0], 0), rel=1e-5)


def test_valid_rows_are_neither_anchors_nor_negatives():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    valid = torch.tensor([True, False, True, True, False])
    want = info_nce(a[valid], b[valid], 0.1, "both")
    assert info_nce(a, b, 0.1, "both", valid=valid).item() == pytest.approx(want.item(), rel=1e-6)
    # Garbage in an invalid row changes nothing.
    a2 = a.clone()
    a2[1] = 1e4
    assert info_nce(a2, b, 0.1, "both", valid=valid).item() == pytest.approx(want.item(), rel=1e-6)
    # A 0/1 integer mask selects rows like the bool mask (it must not index rows 0/1).
    got = info_nce(a, b, 0.1, "both", valid=valid.long())
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_fewer_than_two_valid_rows_give_zero_with_a_graph():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    loss = info_nce(a, b, 0.1, valid=torch.tensor([False, True, False]))
    assert loss.item() == 0.0
    loss.backward()  # the trainer may add it to the total loss
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_multi_positive_is_mean_over_positives():
    tau = 1.0
    positives = torch.tensor([[False, True], [False, False]])  # a0 also matches b1
    logp0 = [S2[0][0] - math.log(math.exp(S2[0][0]) + math.exp(S2[0][1])),
             S2[0][1] - math.log(math.exp(S2[0][0]) + math.exp(S2[0][1]))]
    row0 = -(logp0[0] + logp0[1]) / 2
    row1 = _ce([S2[1][0], S2[1][1]], 1)
    got = info_nce(A2, B2, tau, "a2b", positives=positives)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # b2a uses the transposed positives: b1 has a0 and a1 as positives.
    col1 = -((S2[0][1] - math.log(math.exp(S2[0][1]) + math.exp(S2[1][1])))
             + (S2[1][1] - math.log(math.exp(S2[0][1]) + math.exp(S2[1][1])))) / 2
    col0 = _ce([S2[0][0], S2[1][0]], 0)
    got = info_nce(A2, B2, tau, "b2a", positives=positives)
    assert got.item() == pytest.approx((col0 + col1) / 2, rel=1e-5)


def test_positives_follow_valid_rows():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    positives = torch.zeros(4, 4, dtype=torch.bool)
    positives[0, 3] = True  # kept: both rows valid
    positives[0, 1] = True  # dropped with row 1
    valid = torch.tensor([True, False, True, True])
    sub_pos = torch.zeros(3, 3, dtype=torch.bool)
    sub_pos[0, 2] = True
    want = info_nce(a[valid], b[valid], 0.2, "both", positives=sub_pos)
    got = info_nce(a, b, 0.2, "both", valid=valid, positives=positives)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_gradients_are_finite_for_hard_inputs():
    a = torch.tensor([[0.0, 0.0, 0.0], [1e3, -1e3, 2.0], [1e-8, 0.0, 0.0], [1.0, 1.0, 1.0]],
                     requires_grad=True)
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [-1.0, 2.0, 0.5]],
                     requires_grad=True)
    for direction in ("a2b", "b2a", "both"):
        a.grad = b.grad = None
        loss = info_nce(a, b, 0.01, direction)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        assert b.grad.abs().sum() > 0


def test_bad_arguments_raise():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="one shape"):
        info_nce(a, torch.randn(3, 5), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(a, a, 0.0)
    with pytest.raises(ValueError, match="direction"):
        info_nce(a, a, 0.1, direction="sideways")
    with pytest.raises(ValueError, match="valid"):
        info_nce(a, a, 0.1, valid=torch.ones(4, dtype=torch.bool))


def test_sum_of_positives_without_diagonal_matches_mgips_eq16():
    # MGIPS-CL eq. 16: -log(sum_{m in top-K} e^{s_im/tau} / sum_j e^{s_ij/tau}).
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    s = (a @ b.t()).tolist()  # rows are unit vectors: dots are cosines
    tau = 0.5
    positives = torch.tensor([[False, True, True], [True, False, False], [True, True, False]])
    want = []
    for i in range(3):
        num = sum(math.exp(s[i][j] / tau) for j in range(3) if positives[i, j])
        den = sum(math.exp(s[i][j] / tau) for j in range(3))
        want.append(-math.log(num / den))
    got = info_nce(a, b, tau, "a2b", positives=positives, multi_positive="sum",
                   diagonal_positive=False)
    assert got.item() == pytest.approx(sum(want) / 3, rel=1e-5)
    # With the diagonal added the own pair joins the sum, so the loss can only fall.
    with_diag = info_nce(a, b, tau, "a2b", positives=positives, multi_positive="sum")
    assert with_diag.item() < got.item()
    # The default ("mean") reading of the same positives is a different number.
    mean = info_nce(a, b, tau, "a2b", positives=positives, diagonal_positive=False)
    assert mean.item() != pytest.approx(got.item(), rel=1e-3)


def test_anchor_without_positive_is_skipped_with_finite_gradients():
    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    b = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)
    positives = torch.zeros(4, 4, dtype=torch.bool)
    positives[0, 2] = True
    positives[1, 3] = True  # column 3 is invalid: anchor 1 is left without a positive
    valid = torch.tensor([True, True, True, False])
    loss = info_nce(a, b, 0.3, "a2b", valid=valid, positives=positives,
                    multi_positive="sum", diagonal_positive=False)
    logits = torch.nn.functional.normalize(a[:3], dim=-1) @ torch.nn.functional.normalize(
        b[:3], dim=-1).t() / 0.3
    assert loss.item() == pytest.approx(-logits[0].log_softmax(-1)[2].item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad[1].abs().sum() == 0  # the skipped anchor
    assert b.grad[1].abs().sum() > 0  # b1 is still a negative of anchor 0
    # No positive anywhere: zero, still part of the graph.
    none = info_nce(a, b, 0.3, "a2b", positives=torch.zeros(4, 4, dtype=torch.bool),
                    diagonal_positive=False)
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="multi_positive"):
        info_nce(a, b, 0.3, positives=positives, multi_positive="max")


def _softmax_rows(m: list[list[float]]) -> list[list[float]]:
    out = []
    for row in m:
        z = sum(math.exp(v) for v in row)
        out.append([math.exp(v) / z for v in row])
    return out


def test_multi_positive_sum_is_log_of_summed_probability():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    positives = torch.zeros(3, 3, dtype=torch.bool)
    positives[0, 2] = True
    cos = (a @ b.t()).tolist()  # rows are unit vectors already
    p = _softmax_rows(cos)
    want = (-math.log(p[0][0] + p[0][2]) - math.log(p[1][1]) - math.log(p[2][2])) / 3
    got = info_nce(a, b, 1.0, "a2b", positives=positives, multi_positive="sum")
    assert got.item() == pytest.approx(want, rel=1e-5)
    mean = info_nce(a, b, 1.0, "a2b", positives=positives, multi_positive="mean")
    want_mean = (-(math.log(p[0][0]) + math.log(p[0][2])) / 2 - math.log(p[1][1]) - math.log(p[2][2])) / 3
    assert mean.item() == pytest.approx(want_mean, rel=1e-5)
    with pytest.raises(ValueError, match="multi_positive"):
        info_nce(a, b, 1.0, positives=positives, multi_positive="max")


def test_without_diagonal_only_listed_pairs_are_positive_and_empty_anchors_skipped():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    positives = torch.zeros(3, 3, dtype=torch.bool)
    positives[0, 1] = True
    positives[2, 0] = True  # anchor 1 has no positive: skipped, not NaN
    p = _softmax_rows((a.detach() @ b.t()).tolist())
    want = (-math.log(p[0][1]) - math.log(p[2][0])) / 2
    got = info_nce(a, b, 1.0, "a2b", positives=positives, diagonal_positive=False)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert torch.isfinite(a.grad).all()
    none = info_nce(a, b, 1.0, "a2b", positives=torch.zeros(3, 3, dtype=torch.bool),
                    diagonal_positive=False)
    assert none.item() == 0.0


def test_info_nce_sum_reduction_is_the_number_of_anchors_times_the_mean():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    valid = torch.tensor([True, True, False, True, True, True])
    for direction in ("a2b", "b2a", "both"):
        mean = info_nce(a, b, 0.1, direction, valid=valid)
        total = info_nce(a, b, 0.1, direction, valid=valid, reduction="sum")
        torch.testing.assert_close(total, 5 * mean)
    with pytest.raises(ValueError, match="reduction"):
        info_nce(a, b, 0.1, reduction="max")

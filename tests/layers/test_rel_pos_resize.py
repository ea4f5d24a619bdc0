"""BEiT relative-position tables resize as timm does (geometric source offsets, linear interpolation)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resize_rel_pos_bias_table as timm_resize

from tests.helpers import assert_close_scaled
from vitfast.layers import resize_rel_pos_bias_table
from vitfast.layers.rel_pos import num_relative_positions


@pytest.mark.parametrize(
    "old_window, new_window", [((14, 14), (24, 24)), ((14, 14), (7, 11)), ((7, 11), (14, 14)), ((14, 14), (16, 13))]
)
def test_resize_matches_timm(old_window, new_window) -> None:
    table = torch.randn(num_relative_positions(old_window), 4, generator=torch.Generator().manual_seed(0))
    expected = timm_resize(table, new_window, (num_relative_positions(new_window), 4), old_window_size=old_window)
    assert_close_scaled(resize_rel_pos_bias_table(table, old_window, new_window), expected, tol=1e-6)


def test_resize_is_differentiable_and_keeps_the_cls_rows() -> None:
    table = torch.randn(num_relative_positions((14, 14)), 2, requires_grad=True)
    resized = resize_rel_pos_bias_table(table, (14, 14), (10, 12))
    assert torch.equal(resized[-3:], table[-3:])
    resized.square().sum().backward()
    assert table.grad is not None and table.grad[:-3].abs().sum() > 0


def test_resize_rejects_a_table_of_another_window() -> None:
    with pytest.raises(ValueError, match="window needs"):
        resize_rel_pos_bias_table(torch.zeros(10, 2), (14, 14), (7, 7))

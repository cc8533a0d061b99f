"""Every id from outside is checked before MLX sees it (issue 14 item 2)."""

from __future__ import annotations

import numpy as np
import pytest

from permeant_tui.engine.errors import InvalidTokenIds
from permeant_tui.engine.token_ids import checked_ids


def test_valid_ids_pass_through():
    assert checked_ids([0, 5, 49151], 49152, "t") == [0, 5, 49151]
    assert checked_ids((), 10, "t") == []
    assert checked_ids(np.array([1, 2], np.uint32), 10, "t") == [1, 2]


@pytest.mark.parametrize("bad", [49152, 60000, 99999999, 2**40, -1, 1e20, 3.0, "7", None, True])
def test_bad_ids_are_refused_with_one_line(bad):
    with pytest.raises(InvalidTokenIds) as e:
        checked_ids([1, 2, bad], 49152, "transcript technical turn 3")
    msg = str(e.value)
    assert "transcript technical turn 3" in msg and "position 2" in msg and "\n" not in msg

"""Progress bars appear on a terminal only."""

from __future__ import annotations

import pytest

from scalespd import progress


def test_no_bar_off_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress.bar(range(5), 5, "graph row blocks", "block")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal


def test_bar_on_terminal(monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert list(progress.bar(range(3), 3, "graph row blocks", "block")) == [0, 1, 2]
    assert "graph row blocks" in capsys.readouterr().err

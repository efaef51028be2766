"""The ``qtee`` console script: ``demo`` runs the codec walk-through and its checks hold."""

from __future__ import annotations

import pytest

from qtee.__main__ import main


def test_demo_prints_trace_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    # One line per crossing, callbacks included, then every check and the empty tables.
    assert "NS -> QTEE  obj=0x00000001 op=2     IB0 OB0 IO1 OO1  invoke" in out
    assert "QTEE -> NS  obj=0x80000000 op=0     IB0 OB1 IO1 OO1  callback" in out
    assert "-- QTEE version 2.1.0" in out
    assert "[FAILED]" not in out
    assert out.count("[ok]") == 6
    assert out.rstrip().endswith(
        "tables: QTEE objects 0, NS ids 0, shm 0, context ids 0, requests 0"
    )


def test_unknown_verb_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-verb"])
    assert exc.value.code == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from qtee import __version__

    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__

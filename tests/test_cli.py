"""The ``qtee`` console script: ``demo`` runs the codec walk-through and its checks hold."""

from __future__ import annotations

import pytest

from qtee.__main__ import main


def test_demo_prints_trace_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "TEE_IOC_OBJECT_INVOKE = 0x8010a40a" in out
    assert "add(1, 2) = 3" in out
    assert "async release   ids=['0x80000002'] stop=end" in out
    assert out.rstrip().endswith("all checks held")


def test_unknown_verb_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-verb"])
    assert exc.value.code == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from qtee import __version__

    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__

"""The ``qtee`` console script: ``demo`` runs the codec walk-through and its checks hold."""

from __future__ import annotations

from pathlib import Path

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
    assert out.count("[ok]") == 12  # six in process, the same six against a device server
    assert "[ok] server: memory written by the TA" in out
    assert "[ok] server: every table empty" in out
    assert "   server | QTEE -> NS  obj=0x80000000 op=0     IB0 OB1 IO1 OO1  callback" in out
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


def test_version_option(capsys: pytest.CaptureFixture[str]) -> None:
    """``qtee --version`` is ``qtee version`` (a new user's first try gave a usage error)."""
    from qtee import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == __version__


def test_supplicant_check_calls_every_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``qtee supplicant --storage DIR --check``: time (0xB) and storage (0xA) registered
    (quic-teec.md §5.4), each answers a TA once (ret 0), everything unregistered after."""
    assert main(["supplicant", "--storage", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "listeners registered: 0xa, 0xb; TA autoload: off"
    assert out[1] == "  storage (0xA): StatusResponse(cmd_id=540, ret=0)"
    assert out[2].startswith("  time (0xB): TimeSpecResponse(cmd_id=770, tv_sec=")
    assert out[2].endswith(", ret=0)")
    assert out[3:] == ["requests served: {'0xb': 1, '0xa': 1}", "tables: empty"]


def test_supplicant_runs_for_a_duration_and_stops_clean(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["supplicant", "--no-time", "--duration", "0.1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "listeners registered: none; TA autoload: off",
        "requests served: {}",
        "tables: empty",
    ]


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--storage", __file__], "not a directory"),
        (["--ta-dir", "/nonexistent/tas"], "no such directory"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_supplicant_bad_arguments_exit_2(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["supplicant", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtee supplicant: ") and err.count("\n") == 1 and why in err


def test_supplicant_makes_a_missing_storage_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As tee-supplicant makes its file-system root: the README's
    ``--storage ./tzstorage`` works on a fresh machine."""
    storage = tmp_path / "tzstorage"
    assert main(["supplicant", "--storage", str(storage), "--check"]) == 0
    assert storage.is_dir()
    assert capsys.readouterr().out.splitlines()[-1] == "tables: empty"

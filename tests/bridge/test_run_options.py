"""``qtee run`` checks what the model will use before it starts the program.

The options of the model's own supplicant (``--storage``, ``--ta-dir``, ``--plugin``) are
checked as ``qtee supplicant`` checks them, by the same functions
(``supplicant/_options.py``): a bad one is one stderr line naming the option, its value
and why, exit status 2, and the program never starts (here it would make a marker file).
``qtee supplicant`` says the same words for the same mistake.  None of this needs the
preload library: the checks come before it is looked for.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from qtee.bridge import BridgeConfig
from tests.cli.test_cli_hygiene import qtee_cli

UUID = str(uuid.UUID(int=0x1234))

#: (options, the message after ``qtee VERB: ``), in ``{tmp}`` a file ``file``, the plugin
#: module ``my_tas`` (a function ``fn``) and ``broken`` (whose import raises).
CASES = [
    (["--ta-dir", "{tmp}/none"], "--ta-dir {tmp}/none: no such directory"),
    (["--ta-dir", "{tmp}/file"], "--ta-dir {tmp}/file: not a directory"),
    (["--storage", "{tmp}/file"], "--storage {tmp}/file: not a directory"),
    (["--storage", "{tmp}/file/x"], "--storage {tmp}/file/x: cannot create it: Not a directory"),
    (
        ["--plugin", f"{UUID}=my_tas:nofn"],
        f"--plugin {UUID}=my_tas:nofn: my_tas:nofn is not a callable",
    ),
    (
        ["--plugin", f"{UUID}=nomod:fn"],
        f"--plugin {UUID}=nomod:fn: nomod: no such module (looked in {{tmp}} first, then on "
        "sys.path)",
    ),
    (
        ["--plugin", f"{UUID}=broken:fn"],
        f"--plugin {UUID}=broken:fn: importing it failed: RuntimeError: no plugins today",
    ),
    (["--plugin", "xyz=my_tas:fn"], "--plugin xyz=my_tas:fn: 'xyz' is not a UUID"),
    (["--plugin", f"{UUID}=my_tas"], f"--plugin {UUID}=my_tas: not UUID=MODULE:FUNCTION"),
]
IDS = [" ".join(options) for options, _ in CASES]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "my_tas.py").write_text("def fn(cmd, sub_cmd, data):\n    return 0, data\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('no plugins today')\n")
    return tmp_path


def _filled(tmp: Path, options: list[str], message: str) -> tuple[list[str], str]:
    return [o.format(tmp=tmp) for o in options], message.format(tmp=tmp)


@pytest.mark.parametrize(("options", "message"), CASES, ids=IDS)
def test_a_bad_option_is_one_line_exit_2_and_the_program_never_starts(
    tmp: Path, options: list[str], message: str
) -> None:
    options, message = _filled(tmp, options, message)
    tee = ["--tee", "optee"] if options[0] == "--plugin" else []
    run = qtee_cli("run", *tee, *options, "--", "touch", "started", cwd=tmp)
    assert (run.returncode, run.stderr) == (2, f"qtee run: {message}\n")
    assert not (tmp / "started").exists()


@pytest.mark.parametrize(("options", "message"), CASES, ids=IDS)
def test_qtee_supplicant_says_the_same_for_the_same_mistake(
    tmp: Path, options: list[str], message: str
) -> None:
    """Checked before the supplicant connects (``--connect`` names no server here)."""
    options, message = _filled(tmp, options, message)
    optee = ["--tee", "optee", "--connect", str(tmp / "none.sock")]
    run = qtee_cli("supplicant", *optee, *options, "--duration", "0", cwd=tmp)
    assert (run.returncode, run.stderr) == (2, f"qtee supplicant: {message}\n")


def test_the_qtee_daemon_names_the_ta_dir_option(tmp: Path) -> None:
    """``qtee supplicant`` (QTEE) used to say ``DIR: no such directory``, without the option."""
    run = qtee_cli("supplicant", "--ta-dir", "tas", "--duration", "0", cwd=tmp)
    assert (run.returncode, run.stderr) == (2, "qtee supplicant: --ta-dir tas: no such directory\n")


def test_the_model_gets_absolute_paths_and_the_storage_is_made(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good ``--storage`` is made before the program starts (as the supplicant makes
    it), and the model gets both folders absolute: a program that changes directory
    before its first open still finds them."""
    import argparse

    from qtee.bridge import _cli

    (tmp / "tas").mkdir()
    monkeypatch.chdir(tmp)
    parser = argparse.ArgumentParser()
    _cli.add_arguments(parser)
    args = parser.parse_args(["--tee", "optee", "--storage", "a/b", "--ta-dir", "tas", "--", "x"])
    storage, ta_dir, plugins = _cli._supplicant_options(args)
    assert (storage, ta_dir, plugins) == (str(tmp / "a" / "b"), str(tmp / "tas"), ())
    assert (tmp / "a" / "b").is_dir()


def test_a_model_that_still_cannot_start_says_why_in_one_line(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """What no check foresaw (here a storage folder the configuration names directly):
    ``start`` gives the C side None, says one line, a ``PATH: strerror`` and no exception
    repr, and the report carries the same reason for ``qtee run``."""
    from qtee.bridge import _runtime

    config = BridgeConfig(tee="optee", storage=str(tmp / "file" / "x"), report_dir=str(tmp))
    monkeypatch.setenv("QTEE_BRIDGE_CONFIG", config.to_json())
    assert _runtime.start() is None
    why = f"{tmp / 'file' / 'x'}: Not a directory"
    assert capfd.readouterr().err == f"qtee bridge: cannot start the model: {why}\n"
    report = json.loads((tmp / f"{os.getpid()}.json").read_text())
    assert report == {"pid": os.getpid(), "error": why}

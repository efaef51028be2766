"""What a new user reads when something is missing or mistyped (issue 16's trial, points
8-12): messages that name the thing and the way out.  Model-only text: no byte, result
or exit status changes with them.
"""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtee
from qtee import DeviceServer, invoke_supp_plugin, register_ta_file, trusted_storage
from qtee.gp import TeecContext, TeecError, TeecResult
from qtee.secure import GpParam, GpSession, GpTA, register_gp_ta, unregister_gp_ta
from supplicant import OpteeSupplicant

REPO = Path(__file__).resolve().parent.parent
NOT_FOUND = int(TeecResult.TEEC_ERROR_ITEM_NOT_FOUND)


def qtee_cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtee", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class FiledTA(GpTA):
    """A GP TA known only as a real TA file (``register_ta_file``)."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000f1")

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        pass


class PluginCaller(GpTA):
    """Calls a plugin the supplicant does not have; the GpTaError goes back as is."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000f2")
    PLUGIN = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        invoke_supp_plugin(self, self.PLUGIN, 1, 2, bytearray(4))


class Writer(GpTA):
    """Writes one REE FS object: tee-supplicant answers FS RPCs (and SHM_ALLOC/FREE)."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000f3")

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        trusted_storage(self).create(b"obj", qtee.TEE_DATA_FLAG_OVERWRITE, b"data").close()


@pytest.fixture
def optee(tmp_path: Path) -> Iterator[tuple[qtee.OpteeDevice, OpteeSupplicant]]:
    (tmp_path / "tas").mkdir()
    device = qtee.OpteeDevice()
    sup = OpteeSupplicant(device, tmp_path / "tas", tmp_path / "ree")
    try:
        yield device, sup
    finally:
        sup.stop()
    assert device.leaks() == {}


def test_missing_image_of_a_ta_file_names_the_ta_directory(
    optee: tuple[qtee.OpteeDevice, OpteeSupplicant],
) -> None:
    """Issue 16 point 8: a TA registered as a file whose ``<uuid>.ta`` is not in the
    supplicant's TA directory is ITEM_NOT_FOUND (tee-supplicant's answer, unchanged), and
    the detail says the image is missing there instead of "registered GP TAs: none"."""
    device, _sup = optee
    with register_ta_file(FiledTA), TeecContext(device) as ctx, pytest.raises(TeecError) as caught:
        ctx.open_session(FiledTA.UUID)
    assert caught.value.code == NOT_FOUND
    detail = caught.value.detail
    assert f"the image {FiledTA.UUID}.ta is missing from the supplicant's TA directory" in detail
    assert "FiledTA is registered for a TA file" in detail
    assert "registered GP TAs" not in detail and "register_gp_ta" not in detail


def test_plugin_answer_is_named(optee: tuple[qtee.OpteeDevice, OpteeSupplicant]) -> None:
    """Issue 16 point 9: a plugin's non-success answer is raised with the TEEC result's
    name beside its number (the code itself is unchanged)."""
    device, _sup = optee
    register_gp_ta(PluginCaller)
    try:
        with (
            TeecContext(device) as ctx,
            ctx.open_session(PluginCaller.UUID) as session,
            pytest.raises(TeecError) as caught,
        ):
            session.invoke_command(0)
    finally:
        unregister_gp_ta(PluginCaller.UUID)
    assert caught.value.code == NOT_FOUND
    assert (
        f"plugin {PluginCaller.PLUGIN} answered TEEC_ERROR_ITEM_NOT_FOUND (0xffff0008)"
        in caught.value.detail
    )


@pytest.mark.parametrize(
    ("argv", "usage", "error"),
    [
        (["supplicant", "--storge", "x"], "usage: qtee supplicant ", "--storge x"),
        (["info", "--conect", "x"], "usage: qtee info ", "--conect x"),
        (["demo", "--foo"], "usage: qtee demo ", "--foo"),
        (["ta", "sign", "--name", "n", "--out", "o", "--bogus"], "usage: qtee ta sign ", "--bogus"),
    ],
)
def test_unknown_option_is_the_verbs_usage_error(argv: list[str], usage: str, error: str) -> None:
    """Issue 16 point 10: a bad option of a verb shows that verb's usage and
    ``qtee VERB: error: unrecognized arguments: ...``, exit 2."""
    done = qtee_cli(*argv)
    verb = usage.removeprefix("usage: ").strip()
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(usage), done.stderr
    assert done.stderr.splitlines()[-1] == f"{verb}: error: unrecognized arguments: {error}"


def test_run_still_passes_its_program_arguments() -> None:
    """Issue 16 point 10: ``qtee run PROG ARGS`` gives PROG its own options."""
    done = qtee_cli("run", "--", sys.executable, "-c", "import sys; print(sys.argv[1:])", "--x")
    assert (done.returncode, done.stdout) == (0, "['--x']\n"), done.stderr


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["ta", "sign", "--uuid", str(FiledTA.UUID), "--algo", "ecdsa", "--out", "x.ta"],
            "qtee ta sign: --algo ecdsa: algorithm TEE_ALG_ECDSA_SHA256 signs QTEE images "
            "(--name) only; an OP-TEE <uuid>.ta is signed with an RSA key (--algo pkcs1 or pss)",
        ),
        (
            ["ta", "sign", "--name", "n", "--algo", "ecdsa", "--out", "x.ta"],
            "qtee ta sign: --algo ecdsa: algorithm TEE_ALG_ECDSA_SHA256 signs with a P-256 "
            "ECDSA key, and the default model key is RSA: give --key PEM with an EC P-256 "
            "private key",
        ),
        (["vm", "--tee", "foo"], "qtee vm: --tee: foo: not a TEE (none, qtee or optee)"),
        (["ta"], "qtee ta: error: give a verb: sign (sign a model TA image; qtee ta sign --help)"),
    ],
)
def test_messages_name_what_was_wrong(argv: list[str], line: str, tmp_path: Path) -> None:
    """Issue 16 point 11: the algorithm by name and the key to give, the TEE that is not
    one, the verbs of ``qtee ta``; exit 2, nothing written."""
    done = qtee_cli(*argv)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == line, done.stderr
    assert not (REPO / "x.ta").exists()


def test_library_algorithm_mismatch_names_the_algorithm() -> None:
    """Issue 16 point 11: ``gp_ta_image(..., algo=ECDSA)`` with an RSA key says which
    algorithm and which key, not a bare number."""
    from objects import UsageError
    from qtee.secure import TEE_ALG_ECDSA_SHA256, default_model_key, ta_image

    with pytest.raises(UsageError) as caught:
        ta_image("x", b"", key=default_model_key(), algo=TEE_ALG_ECDSA_SHA256)
    assert str(caught.value) == (
        "algorithm TEE_ALG_ECDSA_SHA256 (0x70004041) signs with a P-256 ECDSA key, "
        "and the key given is an RSA key"
    )


def test_optee_supplicant_prints_requests_served(tmp_path: Path) -> None:
    """Issue 16 point 12: ``qtee supplicant --tee optee`` ends with ``requests served:``
    and the RPCs it answered by kind, as its --help says."""
    register_gp_ta(Writer)
    server = DeviceServer(tmp_path / "s", tee="optee").start()
    try:
        argv = [sys.executable, "-m", "qtee", "supplicant", "--tee", "optee"]
        argv += ["--connect", str(server.path)]
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "tee-supplicant attached\n"
            with (
                TeecContext(qtee.connect(server.path)) as ctx,
                ctx.open_session(Writer.UUID) as session,
            ):
                session.invoke_command(0)
            proc.send_signal(signal.SIGTERM)
            rest = proc.stdout.read()
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        server.stop()
        unregister_gp_ta(Writer.UUID)
    (line,) = rest.splitlines()
    assert line.startswith("requests served: {") and "'fs': " in line, line
    served = ast.literal_eval(line.removeprefix("requests served: "))
    assert served["fs"] >= 2 and set(served) <= {"fs", "shm_alloc", "shm_free"}, served
    assert server.device.leaks() == {}


def test_an_ec_key_for_an_optee_image_says_optee_signs_with_rsa() -> None:
    """Issue 16 point 11: OP-TEE's signed header carries RSA signatures only, and the
    error says so instead of a generic key-type complaint."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from objects import UsageError
    from qtee.secure import gp_ta_image

    with pytest.raises(UsageError) as caught:
        gp_ta_image(FiledTA.UUID, b"", key=ec.generate_private_key(ec.SECP256R1()))
    assert str(caught.value) == (
        "an OP-TEE TA image (gp_ta_image) is signed with an RSA private key (cryptography), "
        "not ECPrivateKey"
    )

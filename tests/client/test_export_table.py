"""The client's export table: the public seam the worker pool serves callback ids through.

Issue 17 (public seams): ``Client.exports`` is an :class:`qtee.ExportTable`; callback ids are
taken as libqcomtee takes them (round-robin in 1..1023, quic-teec.md §1.4), one reference
per send, and the last reference frees the id.
"""

from __future__ import annotations

import errno

import pytest

from objects import DriverError, UsageError
from qtee import ArgBlock, CallbackObject, Client, ExportTable, uapi


class Echo(CallbackObject):
    pass


def test_ids_references_and_release() -> None:
    table = ExportTable()
    a, b = Echo(), Echo()
    assert table.export(a) == 1
    assert table.export(a) == 1  # the same object keeps its id while referenced
    assert table.export(b) == 2
    assert len(table) == 2
    assert table.get(1) is a and table.get(2) is b and table.get(3) is None
    assert table.items() == [(1, a), (2, b)]
    table.hold(1)
    table.unexport(1)
    table.unexport(1)
    assert table.get(1) is a  # one reference left
    table.unexport(1)
    assert table.get(1) is None
    table.unexport(1)  # an id not exported: nothing happens (a late release notification)
    assert table.export(a) == 3  # round-robin: the freed id is not taken again at once
    table.unexport(3)
    table.unexport(2)
    assert len(table) == 0


def test_bad_input_is_refused_and_changes_nothing() -> None:
    table = ExportTable()
    with pytest.raises(TypeError):
        table.export(object())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        table.hold(5)
    assert len(table) == 0


def test_a_full_table_is_enospc() -> None:
    table = ExportTable()
    objs = [Echo() for _ in range(1023)]
    for obj in objs:
        table.export(obj)
    with pytest.raises(DriverError) as info:
        table.export(Echo())
    assert info.value.errno == errno.ENOSPC
    for uid, _obj in table.items():
        table.unexport(uid)
    assert len(table) == 0


def test_the_client_exports_through_its_table(qtee_client: Client) -> None:
    """What a send exports is in ``client.exports`` and ``from_param`` finds it by id."""
    cb = Echo()
    sent: list[int] = []
    attr, uid, flags, _c = qtee_client.to_param(cb, sent)
    assert (attr, flags) == (
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT,
        uapi.QCOMTEE_OBJREF_FLAG_USER,
    )
    assert sent == [uid] and qtee_client.exports.get(uid) is cb
    assert qtee_client.from_param(uid, uapi.QCOMTEE_OBJREF_FLAG_USER) is cb
    assert qtee_client.exported() == 1
    qtee_client.exports.unexport(uid)
    assert qtee_client.exported() == 0


def test_an_arg_block_is_pinned_and_checked(qtee_client: Client) -> None:
    blk = qtee_client.new_block()
    try:
        assert isinstance(blk, ArgBlock) and len(blk.buf) == uapi.TEE_MAX_ARG_SIZE
        with pytest.raises(UsageError):
            qtee_client.call(uapi.TEE_IOC_SUPPL_SEND, blk, uapi.TEE_MAX_ARG_SIZE + 1)
    finally:
        blk.close()
    with pytest.raises(TypeError):
        ArgBlock(bytearray(4))  # type: ignore[arg-type]


def test_an_invoke_that_fails_gives_back_every_reference_it_took(qtee_client: Client) -> None:
    """An invoke takes the send's reference and its own hold through the call at once
    (``to_param(..., refs=2)``); a call that fails before the ioctl, or on the errno
    channel, gives both back: nothing stays exported, and a later send starts afresh."""
    cb = Echo()
    env = qtee_client.client_env()
    before = qtee_client.exported()  # (QTEE keeps the credentials object)
    try:
        with pytest.raises(UsageError):  # too many arguments: before the ioctl
            env.invoke(0, cb, *([b"x"] * 200))
        assert qtee_client.exported() == before
        with pytest.raises(DriverError):  # RETAIN from userspace: EINVAL, the errno channel
            env.invoke(0xFFFE, cb)
        assert qtee_client.exported() == before
        sent: list[int] = []
        uid = qtee_client.to_param(cb, sent, 2)[1]
        assert qtee_client.exports._entries[uid][1] == 2
        qtee_client.exports.unexport(uid)
        qtee_client.exports.unexport(uid)
        assert qtee_client.exported() == before
    finally:
        env.release()

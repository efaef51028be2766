"""The errno table of qtee-kernel.md §5, row by row, through ``Context.ioctl`` and raw structs.

Each test names the §5 row it checks and the §1.5/§4.x text behind it.  Failing ioctls
must write nothing back and leave every table as it was (HABITS.md "Tests" 8: error paths
are no-ops); ``Device.leaks()`` is the snapshot, because it names every table.

Where the spec and the kernel disagree the test follows the kernel and names the kernel
function that decides it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from objects import CyclicAllocator, ObjectTable, QteeError, op
from qtee import Context, Device, Result, uapi, wire
from qtee._qcomtee.object import QCOMTEE_OBJECT_ID_START
from qtee.addrspace import CheckedMemory
from qtee.secure import NsObject, SecureObject, SecureWorld
from tests._helpers import (
    MEM,
    META_IN,
    META_OUT,
    NULL,
    OBJ_IN,
    OBJ_OUT,
    TEE,
    UB_IN,
    UB_OUT,
    USER,
    InvokeThread,
    buf_arg,
    expect_errno,
    expect_invoke_errno,
    invoke_block,
    raw_invoke,
    recv,
    recv_block,
    send,
    send_block,
    wait_until,
)

UNAVAIL = Result.ERROR_UNAVAIL & 0xFFFF_FFFF  # -96 as the u32 in arg.ret
BUSY = Result.ERROR_BUSY & 0xFFFF_FFFF  # -99
#: An address below TASK_SIZE that CheckedMemory never maps: access_ok passes, the copy faults.
UNMAPPED = 0x1000
#: An address above TASK_SIZE: access_ok fails.
NOT_USER = 1 << 48
PAYLOAD = b"0123456789abcdef"


class Leaf(SecureObject):
    pass


class Forwarder(SecureObject):
    """A TA that calls back the user object it is given (§4.2)."""

    @op(0, ib=(None,), io=1, ob=(None,))
    def forward(self, data: bytes, cb: NsObject) -> bytes:
        """Callback op 5 with this IB and an 8-byte OB; returns what the supplicant wrote."""
        res = cb.invoke(5, [data], [8])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(1, io=1, ob=(4,))
    def fetch_object(self, cb: NsObject) -> bytes:
        """Callback op 6 asking for one object back; answers its NS-bit flag."""
        res = cb.invoke(6, n_oo=1)
        if res.result:
            raise QteeError(res.result)
        got = res.oo[0]
        if isinstance(got, NsObject):
            got.release()
        return struct.pack("<I", 1 if isinstance(got, NsObject) else 0)

    @op(2)
    def nothing(self) -> None:
        """No arguments at all."""

    @op(3, ob=(None,))
    def small_answer(self) -> bytes:
        return b"ok"

    @op(4, ob=(4,), oo=1)
    def make(self) -> tuple[bytes, SecureObject]:
        return b"data", Leaf()

    @op(5, io=3)
    def take_three(self, a: object, b: object, c: object) -> None:
        pass


class Root(SecureObject):
    @op(0, oo=1)
    def open(self) -> SecureObject:
        return Forwarder()


@dataclass
class Env:
    dev: Device
    ctx: Context
    mem: CheckedMemory
    ta: int  # this context's id of a Forwarder


@pytest.fixture
def env() -> Iterator[Env]:
    mem = CheckedMemory()
    dev = Device(SecureWorld(Root()), memory=mem)
    ctx = dev.open()
    head, out = raw_invoke(ctx, mem, NULL, 0, [uapi.Param(OBJ_OUT)])
    assert head.ret == 0 and out[0].b == TEE
    yield Env(dev, ctx, mem, out[0].a)
    ctx.close()  # the conftest leak check wants every table empty afterwards


def forward(e: Env, out: bytearray, user_id: int = 77) -> InvokeThread:
    """A client thread in Forwarder.forward(PAYLOAD, user object); returns once it is queued."""
    t = InvokeThread(
        e.ctx,
        e.mem,
        e.ta,
        0,
        [
            uapi.Param(UB_IN, e.mem.map(bytearray(PAYLOAD)), len(PAYLOAD)),
            uapi.Param(OBJ_IN, user_id, USER),
            uapi.Param(UB_OUT, e.mem.map(out), len(out)),
        ],
    )
    assert wait_until(lambda: "context 0 request ids" in e.dev.leaks())
    return t


def answer(e: Env, params: tuple[uapi.Param, ...], data: bytes = b"pong") -> None:
    """The well-formed reply to a forward request: IB echoed, OB = ``data``."""
    send(
        e.ctx,
        e.mem,
        0,
        [
            uapi.Param(META_OUT, params[0].b),
            params[1],
            uapi.Param(UB_OUT, e.mem.map(bytearray(data)), len(data)),
        ],
    )


def take_request(e: Env) -> tuple[uapi.SuppRecvArg, tuple[uapi.Param, ...]]:
    head, params, _ = recv(e.ctx, e.mem, n=3, scratch_size=len(PAYLOAD))
    assert head.func == 5 and head.num_params == 3
    return head, params


def take_release(e: Env, user_id: int = 77) -> None:
    """RECV the release notification QTEE queued when it dropped the user object; it
    takes the lowest free request id, often the one just answered (§4.3)."""
    assert wait_until(lambda: "context 0 request ids" in e.dev.leaks())
    head, params, _ = recv(e.ctx, e.mem, n=3, scratch_size=len(PAYLOAD))
    assert (head.func, head.num_params, params[0].a) == (0xFFFF, 1, user_id)


# ---------------------------------------------------------------- §1.5 (TEE core) rows


INVOKE, RECV, SEND = uapi.TEE_IOC_OBJECT_INVOKE, uapi.TEE_IOC_SUPPL_RECV, uapi.TEE_IOC_SUPPL_SEND


@pytest.mark.parametrize(
    ("cmd", "head", "buf_len"),
    [
        (INVOKE, uapi.ObjectInvokeArg(0, 2, 0, 1).pack(), 24 + 32 + 8),  # != header+32n
        (INVOKE, uapi.ObjectInvokeArg(0, 2, 0, 1).pack(), 24),  # < header+32n
        (INVOKE, uapi.ObjectInvokeArg(0, 2, 0, 0).pack(), 16),  # < header
        (INVOKE, uapi.ObjectInvokeArg(0, 2, 0, 128).pack(), 24 + 32 * 128),  # > 4096
        (RECV, uapi.SuppRecvArg(0, 2).pack(), 8 + 32 * 3),  # != header+32n
        (RECV, uapi.SuppRecvArg(0, 0).pack(), 4),  # < header
        (SEND, uapi.SuppSendArg(0, 2).pack(), 8 + 32),  # < header+32n
        (SEND, uapi.SuppSendArg(0, 200).pack(), 4096 + 8),  # > 4096
    ],
)
def test_buf_len_rules_einval(env: Env, cmd: int, head: bytes, buf_len: int) -> None:
    """§5 "buf_len > 4096, < header, or ≠ header+32n (RECV/INVOKE) / < header+32n (SEND)"
    → EINVAL (§1.5)."""
    block = bytearray(max(buf_len, len(head)))
    block[: len(head)] = head
    before = env.dev.leaks()
    expect_errno(
        errno.EINVAL, env.ctx, cmd, bytearray(uapi.BufData(env.mem.map(block), buf_len).pack())
    )
    assert env.dev.leaks() == before


def test_suppl_send_accepts_a_longer_block(env: Env) -> None:
    """§5 "< header+32n (SEND)": SEND, unlike RECV/INVOKE, takes a block longer than
    header+32n (§1.5), so a reply padded with spare room is still delivered."""
    out = bytearray(8)
    t = forward(env, out)
    _, params = take_request(env)
    block = send_block(
        0,
        [
            uapi.Param(META_OUT, params[0].b),
            params[1],
            uapi.Param(UB_OUT, env.mem.map(bytearray(b"pong")), 4),
        ],
    )
    block += bytes(64)
    assert env.ctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, buf_arg(env.mem, block)) == 0
    head, outp = t.outcome()
    assert head.ret == 0 and outp[2].b == 4 and out[:4] == b"pong"


@pytest.mark.parametrize("attr", [0x200 | UB_IN, 0x1000, 4, 14, 0xFF])
@pytest.mark.parametrize("cmd", ["invoke", "recv", "send"])
def test_attr_bits_and_unknown_types_einval(env: Env, attr: int, cmd: str) -> None:
    """§5 "attr bits outside 0x1FF, or unknown type" → EINVAL, on all three buf_data
    ioctls (tee_core params_from_user / params_from_supp, §1.5)."""
    if cmd == "invoke":
        block = invoke_block(env.ta, 2, [uapi.Param(attr)])
        code = uapi.TEE_IOC_OBJECT_INVOKE
    elif cmd == "recv":
        block = recv_block(env.mem.map(bytearray(64)), 64, 2)
        struct.pack_into("<Q", block, 8 + 32, attr)
        code = uapi.TEE_IOC_SUPPL_RECV
    else:
        block = send_block(0, [uapi.Param(META_OUT, 0), uapi.Param(attr)])
        code = uapi.TEE_IOC_SUPPL_SEND
    before = env.dev.leaks()
    expect_errno(errno.EINVAL, env.ctx, code, buf_arg(env.mem, block), block)
    assert env.dev.leaks() == before


def test_ubuf_outside_user_space_efault(env: Env) -> None:
    """§5 "UBUF address range not accessible" → EFAULT (access_ok in tee_core), for an
    input and an output buffer of OBJECT_INVOKE."""
    for attr in (UB_IN, UB_OUT):
        expect_invoke_errno(
            errno.EFAULT, env.ctx, env.mem, env.ta, 3, [uapi.Param(attr, NOT_USER, 8)]
        )


# ---------------------------------------------------------------- OBJECT_INVOKE rows (§4.1)


@pytest.mark.parametrize("attr", [UB_IN, UB_OUT, OBJ_IN, OBJ_OUT])
def test_seventeen_of_a_type_einval(env: Env, attr: int) -> None:
    """§5 "OBJECT_INVOKE: >16 of a type" → EINVAL (qcomtee_params_check, §4.1 step 1)."""
    buf = env.mem.map(bytearray(8))
    p = uapi.Param(attr, buf, 8) if attr in (UB_IN, UB_OUT) else uapi.Param(attr, NULL, 0)
    expect_invoke_errno(errno.EINVAL, env.ctx, env.mem, env.ta, 2, [p] * 17)


@pytest.mark.parametrize(
    "attr",
    [
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_NONE,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INOUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INOUT,
        OBJ_OUT | uapi.TEE_IOCTL_PARAM_ATTR_META,
    ],
)
def test_unsupported_attr_einval(env: Env, attr: int) -> None:
    """§5 "OBJECT_INVOKE: unsupported attr (incl. NONE/INOUT/VALUE/MEMREF)" → EINVAL: types
    tee_core accepts but qcomtee_params_check does not (§4.1 step 1)."""
    before = env.dev.leaks()
    expect_invoke_errno(
        errno.EINVAL, env.ctx, env.mem, env.ta, 2, [uapi.Param(OBJ_IN, NULL, 0), uapi.Param(attr)]
    )
    assert env.dev.leaks() == before


def test_more_than_64_params_einval(env: Env) -> None:
    """§5 "OBJECT_INVOKE: >64 params" → EINVAL, even with at most 16 of each type."""
    buf = env.mem.map(bytearray(8))
    params = (
        [uapi.Param(UB_IN, buf, 8)] * 16
        + [uapi.Param(UB_OUT, buf, 8)] * 16
        + [uapi.Param(OBJ_IN, NULL, 0)] * 16
        + [uapi.Param(OBJ_OUT)] * 17
    )
    expect_invoke_errno(errno.EINVAL, env.ctx, env.mem, env.ta, 2, params)


def test_sixteen_of_a_type_passes_the_check_and_wraps_the_nibble(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§5 limits "16 per type nominal, 15 encodable" and §7: the kernel admits 16 inputs
    of a type (no errno) and qcomtee_msg_init writes ``16 & 0xF`` = 0 into that nibble."""
    seen: list[int] = []
    real = env.dev.world.invoke

    def spy(inbound: bytearray, outbound: bytearray, serve: object) -> int:
        seen.append(struct.unpack_from("<I", inbound, 8)[0])
        return real(inbound, outbound, serve)  # type: ignore[arg-type]

    monkeypatch.setattr(env.dev.world, "invoke", spy)
    buf = env.mem.map(bytearray(8))
    raw_invoke(env.ctx, env.mem, env.ta, 2, [uapi.Param(UB_IN, buf, 8)] * 16)
    raw_invoke(env.ctx, env.mem, env.ta, 2, [uapi.Param(OBJ_IN, NULL, 0)] * 16)
    assert seen == [0x0000, 0x0000]


def test_fifteen_of_a_type_reach_qtee_intact(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """§5 limits "15 encodable": 15 inputs of a type are sent with counts nibble 15
    (§3.3), and QTEE dispatches them (an op with no inputs refuses them: INVALID)."""
    seen: list[int] = []
    real = env.dev.world.invoke

    def spy(inbound: bytearray, outbound: bytearray, serve: object) -> int:
        seen.append(struct.unpack_from("<I", inbound, 8)[0])
        return real(inbound, outbound, serve)  # type: ignore[arg-type]

    monkeypatch.setattr(env.dev.world, "invoke", spy)
    buf = env.mem.map(bytearray(8))
    head, _ = raw_invoke(env.ctx, env.mem, env.ta, 2, [uapi.Param(UB_IN, buf, 8)] * 15)
    assert seen == [0x000F]
    assert head.ret == Result.ERROR_INVALID


def test_bad_shm_id_einval(env: Env) -> None:
    """§5 "OBJECT_INVOKE: bad ... shm id" → EINVAL: a MEM objref naming no shm."""
    before = env.dev.leaks()
    expect_invoke_errno(errno.EINVAL, env.ctx, env.mem, env.ta, 5, [uapi.Param(OBJ_IN, 9, MEM)] * 3)
    assert env.dev.leaks() == before


def test_input_buffer_copy_fault(env: Env) -> None:
    """§5 "OBJECT_INVOKE: IB copy fault during marshalling" (§4.1 step 5): the range passes
    access_ok but is not mapped; the ioctl fails, nothing is written back, and the user
    object passed alongside is dropped without a release notification (§4.1 step 7)."""
    before = env.dev.leaks()
    expect_invoke_errno(
        errno.EFAULT,
        env.ctx,
        env.mem,
        env.ta,
        0,
        [
            uapi.Param(UB_IN, UNMAPPED, 8),
            uapi.Param(OBJ_IN, 77, USER),
            uapi.Param(UB_OUT, env.mem.map(bytearray(8)), 8),
        ],
    )
    assert env.dev.leaks() == before


def test_inbound_message_over_4_mib_einval(env: Env) -> None:
    """§5 "OBJECT_INVOKE: inbound message > 4 MiB" → EINVAL; exactly 4 MiB is sent (§3.4:
    size = align8(12 + 8n) + Σ align8(buffers))."""
    out = bytearray(8)
    addr = env.mem.map(out)
    limit = wire.MAX_INBOUND_BUFFER_SIZE
    expect_invoke_errno(
        errno.EINVAL, env.ctx, env.mem, env.ta, 3, [uapi.Param(UB_OUT, addr, limit - 24 + 1)]
    )
    head, params = raw_invoke(env.ctx, env.mem, env.ta, 3, [uapi.Param(UB_OUT, addr, limit - 24)])
    assert head.ret == 0 and params[0].b == 2 and out[:2] == b"ok"


def test_ns_id_exhaustion_enospc(env: Env) -> None:
    """§5 "OBJECT_INVOKE: NS id table exhausted" → ENOSPC (qcomtee_prepare_msg /
    qcomtee_object_id_get): with two NS ids left, three user objects fail, nothing is
    written back, the two already numbered are given back without notification."""
    env.dev.ns = ObjectTable(
        CyclicAllocator(QCOMTEE_OBJECT_ID_START, QCOMTEE_OBJECT_ID_START + 1), name="ns ids"
    )
    users = [uapi.Param(OBJ_IN, uid, USER) for uid in (1, 2, 3)]
    before = env.dev.leaks()
    expect_invoke_errno(errno.ENOSPC, env.ctx, env.mem, env.ta, 5, users)
    assert env.dev.leaks() == before == {"secure objects": 1, "context 0 objects": 1}
    # Both ids are free again: two user objects and a NULL fit.
    head, _ = raw_invoke(env.ctx, env.mem, env.ta, 5, [*users[:2], uapi.Param(OBJ_IN, NULL, 0)])
    assert head.ret == 0


def test_ns_id_exhaustion_on_a_callback_reply_is_busy(env: Env) -> None:
    """§5 NS id exhaustion on the callback path: the supplicant's SEND succeeds, then
    qcomtee_update_msg cannot number the returned user object (-ENOSPC) and QTEE gets
    BUSY (§3.6); the object goes back to the supplicant as a release notification."""
    env.dev.ns = ObjectTable(
        CyclicAllocator(QCOMTEE_OBJECT_ID_START, QCOMTEE_OBJECT_ID_START), name="ns ids"
    )
    out = bytearray(4)
    t = InvokeThread(
        env.ctx,
        env.mem,
        env.ta,
        1,
        [uapi.Param(OBJ_IN, 77, USER), uapi.Param(UB_OUT, env.mem.map(out), 4)],
    )  # user object 77 takes the only NS id
    head, params, _ = recv(env.ctx, env.mem)
    assert head.func == 6 and (params[1].attr, params[1].a, params[1].b) == (OBJ_OUT, 0, 0)
    send(env.ctx, env.mem, 0, [uapi.Param(META_OUT, params[0].b), uapi.Param(OBJ_OUT, 88, USER)])
    assert t.outcome()[0].ret == BUSY
    released = sorted(recv(env.ctx, env.mem)[1][0].a for _ in range(2))
    assert released == [77, 88]


def test_output_conversion_failure_is_unavail(env: Env) -> None:
    """§5 "output conversion failure after QTEE success" → ioctl 0, ret -96: the OB copy
    to user faults (qcomtee_update_args); OO params come back 0/0 and the object QTEE
    returned is released, not left in this fd's IDR (§4.1 steps 6, 8)."""
    before = env.dev.leaks()
    head, params = raw_invoke(
        env.ctx, env.mem, env.ta, 4, [uapi.Param(UB_OUT, UNMAPPED, 4), uapi.Param(OBJ_OUT, 5, 5)]
    )
    assert head.ret == UNAVAIL
    assert (params[1].a, params[1].b) == (0, 0)
    assert env.dev.leaks() == before


# ---------------------------------------------------------------- SUPPL_RECV rows (§4.3)


def _bad_recv_blocks(mem: CheckedMemory) -> list[bytearray]:
    scratch = mem.map(bytearray(64))
    bad_meta = [
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT,  # META bit missing
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT | uapi.TEE_IOCTL_PARAM_ATTR_META,
        META_OUT,
    ]
    blocks = [
        bytearray(
            uapi.pack_arg(uapi.SuppRecvArg(0, 2), [uapi.Param(a, scratch, 64), uapi.Param(0)])
        )
        for a in bad_meta
    ]
    blocks.append(bytearray(uapi.pack_arg(uapi.SuppRecvArg(0, 0), [])))  # no meta at all
    blocks.append(recv_block(scratch + 4, 60, 2))  # unaligned scratch
    extra = recv_block(scratch, 64, 3)
    struct.pack_into("<Q", extra, 8 + 64, UB_OUT)  # a non-NONE extra param
    blocks.append(extra)
    return blocks


@pytest.mark.parametrize("which", range(6))
def test_recv_bad_meta_extra_params_unaligned_einval(env: Env, which: int) -> None:
    """§5 "SUPPL_RECV: bad meta / non-NONE extra params / unaligned scratch" → EINVAL
    (qcomtee_supp_recv), with a request queued that stays queued."""
    out = bytearray(8)
    t = forward(env, out)
    block = _bad_recv_blocks(env.mem)[which]
    before = env.dev.leaks()
    expect_errno(errno.EINVAL, env.ctx, uapi.TEE_IOC_SUPPL_RECV, buf_arg(env.mem, block), block)
    assert env.dev.leaks() == before and t.is_alive()
    _, params = take_request(env)
    answer(env, params)
    assert t.outcome()[0].ret == 0 and out[:4] == b"pong"


def test_recv_too_few_params_keeps_the_request_queued(env: Env) -> None:
    """§5 "SUPPL_RECV: too few params" → EINVAL and the request stays QUEUED
    (ureq_select check (1)): a later RECV with room for its IB and OB gets it, id 0."""
    out = bytearray(8)
    t = forward(env, out)
    block = recv_block(env.mem.map(bytearray(64)), 64, 2)  # room for 1 of 2 args
    before = env.dev.leaks()
    expect_errno(errno.EINVAL, env.ctx, uapi.TEE_IOC_SUPPL_RECV, buf_arg(env.mem, block), block)
    assert env.dev.leaks() == before and t.is_alive()
    head, params, scratch = recv(env.ctx, env.mem, n=3, scratch_size=64)
    assert (head.func, head.num_params) == (5, 3)
    assert (params[0].attr, params[0].a, params[0].b, params[0].c) == (META_IN, 77, 0, 0)
    assert params[1].attr == UB_IN and params[1].b == 16 and scratch[48:64] == PAYLOAD
    assert (params[2].attr, params[2].a, params[2].b) == (UB_OUT, 0, 8)
    answer(env, params)
    assert t.outcome()[0].ret == 0 and out[:4] == b"pong"


def test_recv_scratch_too_small_keeps_the_request_queued(env: Env) -> None:
    """§5 "SUPPL_RECV: scratch too small" → EINVAL and the request stays QUEUED
    (ureq_select check (2), size_sub underflow): 15 bytes cannot hold the 16-byte IB;
    16 bytes can, and the IB lands at offset round_down(16 - 16, 8) = 0."""
    out = bytearray(8)
    t = forward(env, out)
    scratch = bytearray(16)
    addr = env.mem.map(scratch)
    block = recv_block(addr, 15, 4)
    before = env.dev.leaks()
    expect_errno(errno.EINVAL, env.ctx, uapi.TEE_IOC_SUPPL_RECV, buf_arg(env.mem, block), block)
    assert env.dev.leaks() == before and t.is_alive() and scratch == bytes(16)
    block = recv_block(addr, 16, 4)
    assert env.ctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, buf_arg(env.mem, block)) == 0
    head = uapi.SuppRecvArg.unpack(block)
    params = uapi.unpack_params(block, uapi.SuppRecvArg.SIZE, head.num_params)
    assert (head.func, params[0].b, params[1].a, params[1].b) == (5, 0, addr, 16)
    assert scratch == PAYLOAD
    answer(env, params)
    assert t.outcome()[0].ret == 0


def test_recv_conversion_failure_completes_the_request_unavail(env: Env) -> None:
    """§4.3 "If this conversion fails, the request is completed with -EINVAL (QTEE:
    UNAVAIL) and RECV keeps waiting": the scratch range is aligned and passes access_ok
    but is not mapped, so the IB copy faults; the RECV then returns the next request --
    the release notification of the user object QTEE dropped."""
    out = bytearray(8)
    t = forward(env, out)
    block = recv_block(UNMAPPED, 64, 4)
    try:
        env.ctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, buf_arg(env.mem, block))
        head = uapi.SuppRecvArg.unpack(block)
        params = uapi.unpack_params(block, uapi.SuppRecvArg.SIZE, head.num_params)
        assert (head.func, params[0].a) == (0xFFFF, 77)
        assert t.outcome()[0].ret == UNAVAIL
    finally:
        env.ctx.close()  # unblocks the client if the model left it waiting
        t.join(5)


# ---------------------------------------------------------------- SUPPL_SEND rows (§4.4)


@pytest.mark.parametrize(
    "meta",
    [
        META_IN,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT,  # META bit missing
        None,  # no params at all
    ],
)
def test_send_bad_meta_einval_request_stays_processing(env: Env, meta: int | None) -> None:
    """§5 "SUPPL_SEND: bad meta" → EINVAL (qcomtee_supp_send) before any request is
    looked up: the request stays PROCESSING and the proper SEND still completes it."""
    out = bytearray(8)
    t = forward(env, out)
    _, params = take_request(env)
    block = send_block(0, [] if meta is None else [uapi.Param(meta, params[0].b)])
    before = env.dev.leaks()
    expect_errno(errno.EINVAL, env.ctx, uapi.TEE_IOC_SUPPL_SEND, buf_arg(env.mem, block), block)
    assert env.dev.leaks() == before and t.is_alive()
    answer(env, params)
    assert t.outcome()[0].ret == 0 and out[:4] == b"pong"


def test_send_unknown_and_finished_request_ids_einval(env: Env) -> None:
    """§5 "SUPPL_SEND: unknown request id" → EINVAL: an id never issued, a negative one,
    and the id of a request already answered (ureq_dequeue finds nothing)."""
    out = bytearray(8)
    t = forward(env, out)
    _, params = take_request(env)
    answer(env, params)
    assert t.outcome()[0].ret == 0
    take_release(env)
    for req_id in (params[0].b, 5, 0xFFFF_FFFF_FFFF_FFFF):
        block = send_block(0, [uapi.Param(META_OUT, req_id)])
        expect_errno(errno.EINVAL, env.ctx, uapi.TEE_IOC_SUPPL_SEND, buf_arg(env.mem, block), block)


@pytest.mark.parametrize(
    "bad",
    ["ib_as_ub_out", "ob_as_ub_in", "ob_as_objref", "ob_larger_than_qtee_accepts"],
)
def test_send_param_mismatch_einval_and_qtee_sees_unavail(env: Env, bad: str) -> None:
    """§5 "SUPPL_SEND: param mismatch with ret==0" → EINVAL, and QTEE gets the callback
    error -EINVAL, which qcomtee_msg_set_result maps to UNAVAIL (-96, §3.6); the TA passes
    it on as its result.  The request is finished: the same id is now unknown."""
    out = bytearray(8)
    t = forward(env, out)
    _, params = take_request(env)
    data = env.mem.map(bytearray(b"pong" + bytes(12)))
    ib, ob = params[1], uapi.Param(UB_OUT, data, 4)
    if bad == "ib_as_ub_out":
        ib = uapi.Param(UB_OUT, data, 4)
    elif bad == "ob_as_ub_in":
        ob = uapi.Param(UB_IN, data, 4)
    elif bad == "ob_as_objref":
        ob = uapi.Param(OBJ_OUT, NULL, 0)
    else:
        ob = uapi.Param(UB_OUT, data, 9)  # QTEE offered 8
    block = send_block(0, [uapi.Param(META_OUT, params[0].b), ib, ob])
    with pytest.raises(OSError) as exc:
        env.ctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, buf_arg(env.mem, block))
    assert exc.value.errno == errno.EINVAL
    head, _ = t.outcome()
    assert head.ret == UNAVAIL and out == bytes(8)
    take_release(env)
    block = send_block(
        0, [uapi.Param(META_OUT, params[0].b), params[1], uapi.Param(UB_OUT, data, 4)]
    )
    expect_errno(errno.EINVAL, env.ctx, uapi.TEE_IOC_SUPPL_SEND, buf_arg(env.mem, block), block)


def test_send_ubuf_outside_user_space_efault_request_stays_processing(env: Env) -> None:
    """§5 "UBUF address range not accessible" → EFAULT on SUPPL_SEND, raised by tee_core
    before qcomtee sees the reply, so the request stays PROCESSING (§4.4) and a corrected
    SEND still delivers the answer."""
    out = bytearray(8)
    t = forward(env, out)
    _, params = take_request(env)
    block = send_block(
        0, [uapi.Param(META_OUT, params[0].b), params[1], uapi.Param(UB_OUT, NOT_USER, 4)]
    )
    try:
        expect_errno(errno.EFAULT, env.ctx, uapi.TEE_IOC_SUPPL_SEND, buf_arg(env.mem, block), block)
        answer(env, params)
        assert t.outcome()[0].ret == 0 and out[:4] == b"pong"
    finally:
        env.ctx.close()
        t.join(5)


def test_send_reply_copy_fault_einval_and_unavail(env: Env) -> None:
    """§5 "SUPPL_SEND: param mismatch with ret==0" family: a reply OB that cannot be
    copied fails the SEND with EINVAL and QTEE sees UNAVAIL (user_obj.c
    qcomtee_cb_params_to_args, out_failed)."""
    out = bytearray(8)
    t = forward(env, out)
    _, params = take_request(env)
    block = send_block(
        0, [uapi.Param(META_OUT, params[0].b), params[1], uapi.Param(UB_OUT, UNMAPPED, 4)]
    )
    try:
        with pytest.raises(OSError) as exc:
            env.ctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, buf_arg(env.mem, block))
        assert exc.value.errno == errno.EINVAL
        assert t.outcome()[0].ret == UNAVAIL
    finally:
        env.ctx.close()
        t.join(5)


def test_send_for_a_queued_request_completes_it(env: Env) -> None:
    """§5 "SUPPL_SEND: unknown request id" is only unknown ids: a request the supplicant
    has not received yet (QUEUED, id 0) is known, so an error reply completes it and QTEE
    sees the mapped result (12 passes through, §3.6)."""
    out = bytearray(8)
    t = forward(env, out)
    try:
        send(env.ctx, env.mem, 12, [uapi.Param(META_OUT, 0)])
        assert t.outcome()[0].ret == 12
    finally:
        env.ctx.close()
        t.join(5)

"""One message layout for every QTEE message encoder and output reader (qtee-kernel.md
§3.3, §3.4, §7).

The layout is computed here from the spec, not from the codec: arg ``k`` (IBs, then OBs,
IOs, OOs) is the 8-byte slot at ``header + 8k``; payloads start at ``align8(header +
8n)``; each IB, then each OB, takes ``align8(size)``; the counts word holds each count
masked to its nibble, so a kind with 16 args (which the kernel's check admits) reads 0.
Invariants: the driver's wrapped encoder and ``wire.encode_invoke`` give the same bytes
wherever both apply (at most 15 of a kind); both match the spec's layout; decoding what
was encoded gives back the arguments; outputs are read from the layout's slots.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objects import DecodeError, UsageError, op
from qtee import Counts, Device, uapi, wire
from qtee._qcomtee.call import _encode_wrapped, _wrapped_outputs
from qtee._qcomtee_msg import pack_counts, unpack_counts
from qtee.addrspace import CheckedMemory
from qtee.secure import SecureObject, SecureWorld
from tests._helpers import NULL, OBJ_OUT, TEE, UB_IN, raw_invoke

U32 = 2**32 - 1


@dataclass(frozen=True)
class Args:
    ib: list[bytes]
    ob: list[int]
    io: list[int]
    n_oo: int

    @property
    def most(self) -> int:
        return max(len(self.ib), len(self.ob), len(self.io), self.n_oo)


def args(most: int) -> st.SearchStrategy[Args]:
    kind = st.integers(0, most)
    return st.builds(
        Args,
        st.lists(st.binary(max_size=40), max_size=most),
        st.lists(st.integers(0, 40), max_size=most),
        st.lists(st.integers(0, U32), max_size=most),
        kind,
    )


@st.composite
def sixteen_of_a_kind(draw: st.DrawFn) -> Args:
    """Up to 16 of each kind, exactly 16 of at least one (the wrapped case, §7)."""
    a = draw(args(16))
    which = draw(st.sampled_from(["ib", "ob", "io", "oo"]))
    if which == "ib":
        return Args(a.ib + [b"x"] * (16 - len(a.ib)), a.ob, a.io, a.n_oo)
    if which == "ob":
        return Args(a.ib, a.ob + [8] * (16 - len(a.ob)), a.io, a.n_oo)
    if which == "io":
        return Args(a.ib, a.ob, a.io + [1] * (16 - len(a.io)), a.n_oo)
    return Args(a.ib, a.ob, a.io, 16)


def spec_layout(hdr: int, a: Args) -> tuple[list[int], list[int], int]:
    """(buffer offsets, arg slot offsets, total size), from §3.4."""
    n = len(a.ib) + len(a.ob) + len(a.io) + a.n_oo
    off = (hdr + 8 * n + 7) & ~7
    offsets = []
    for size in [len(d) for d in a.ib] + a.ob:
        offsets.append(off)
        off += (size + 7) & ~7
    return offsets, [hdr + 8 * k for k in range(n)], off


def spec_inbound(cxt: int, op: int, a: Args) -> bytes:
    """The inbound message byte by byte, counts masked to nibbles (§3.3, §7)."""
    offsets, slots, total = spec_layout(12, a)
    buf = bytearray(total)
    counts = (len(a.ib) % 16) | (len(a.ob) % 16) << 4 | (len(a.io) % 16) << 8 | (a.n_oo % 16) << 12
    struct.pack_into("<3I", buf, 0, cxt, op, counts)
    sizes = [len(d) for d in a.ib] + a.ob
    for k, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
        struct.pack_into("<II", buf, slots[k], off, size)
    for k, data in enumerate(a.ib):
        buf[offsets[k] : offsets[k] + len(data)] = data
    for j, ident in enumerate(a.io):
        struct.pack_into("<I", buf, slots[len(sizes) + j], ident)
    return bytes(buf)


@settings(max_examples=300)
@given(args(15), st.integers(0, U32), st.integers(0, 0xFFFF))
def test_wrapped_encoder_and_encode_invoke_agree_up_to_15(a: Args, cxt: int, op: int) -> None:
    """§3.4: where both apply (at most 15 of a kind) the driver's encoder and
    ``encode_invoke`` write the same bytes, and both are the spec's layout."""
    wrapped = _encode_wrapped(cxt, op, a.ib, a.ob, a.io, a.n_oo)
    plain = wire.encode_invoke(cxt, op, a.ib, a.ob, a.io, a.n_oo)
    assert bytes(wrapped) == bytes(plain) == spec_inbound(cxt, op, a)


@settings(max_examples=200)
@given(sixteen_of_a_kind(), st.integers(0, U32))
def test_sixteen_of_a_kind_wraps_the_nibble_and_lays_out_every_arg(a: Args, cxt: int) -> None:
    """§7: ``qcomtee_msg_init`` masks a count of 16 to 0 but every arg keeps its slot and
    payload; ``encode_invoke`` (15 encodable, §3.3) refuses the shape."""
    assert a.most == 16
    assert bytes(_encode_wrapped(cxt, 3, a.ib, a.ob, a.io, a.n_oo)) == spec_inbound(cxt, 3, a)
    with pytest.raises(UsageError, match="at most 15"):
        wire.encode_invoke(cxt, 3, a.ib, a.ob, a.io, a.n_oo)


@settings(max_examples=300)
@given(args(15), st.integers(0, U32), st.integers(0, 0xFFFF))
def test_decode_of_encode_gives_the_arguments_back(a: Args, cxt: int, op: int) -> None:
    """§3.3/§3.4: decoding an encoded inbound or callback message gives back its args,
    its counts word and its size (the async region's start, §3.5)."""
    msg = wire.decode_invoke(wire.encode_invoke(cxt, op, a.ib, a.ob, a.io, a.n_oo))
    offsets, _, total = spec_layout(12, a)
    assert (msg.cxt, msg.op, msg.ib, msg.io, msg.n_oo, msg.size) == (
        cxt,
        op,
        tuple(a.ib),
        tuple(a.io),
        a.n_oo,
        total,
    )
    assert msg.ob == tuple(
        wire.BufRef(o, s) for o, s in zip(offsets[len(a.ib) :], a.ob, strict=True)
    )
    assert msg.counts == Counts(len(a.ib), len(a.ob), len(a.io), a.n_oo).pack()
    out = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
    written = wire.encode_callback_msg(out, cxt, op, a.ib, a.ob, a.io, a.n_oo)
    assert wire.decode_callback(out) == written
    assert written.size == spec_layout(16, a)[2]


@settings(max_examples=200)
@given(st.one_of(args(15), sixteen_of_a_kind()), st.data())
def test_outputs_are_read_from_the_layout_slots(a: Args, data: st.DataObject) -> None:
    """§3.4: QTEE writes each OB's (shrunk) size and payload and each OO id in its slot;
    the driver reads them back by its own arg indexes, 16 of a kind included (§7)."""
    inbound = _encode_wrapped(1, 0, a.ib, a.ob, a.io, a.n_oo)
    offsets, slots, _ = spec_layout(12, a)
    nib, nob, nio = len(a.ib), len(a.ob), len(a.io)
    obs = [data.draw(st.binary(max_size=size)) for size in a.ob]
    oos = data.draw(st.lists(st.integers(0, U32), min_size=a.n_oo, max_size=a.n_oo))
    for k, payload in enumerate(obs):
        off = offsets[nib + k]
        inbound[off : off + len(payload)] = payload
        struct.pack_into("<II", inbound, slots[nib + k], off, len(payload))
    for k, ident in enumerate(oos):
        struct.pack_into("<I", inbound, slots[nib + nob + nio + k], ident)
    got = _wrapped_outputs(inbound, nib, nob, nio, a.n_oo)
    assert (list(got[0]), list(got[1])) == (obs, oos)
    if a.most <= 15:
        assert wire.decode_invoke_response(inbound) == (tuple(obs), tuple(oos))


def test_counts_pack_and_unpack_are_the_nibble_word() -> None:
    """§3.3: ``IB | OB<<4 | IO<<8 | OO<<12``; §7: 16 wraps to 0 and leaves its
    neighbours alone; bits above 15 are a DecodeError."""
    assert pack_counts(1, 2, 3, 4) == 0x4321 == Counts(1, 2, 3, 4).pack()
    assert pack_counts(16, 15, 16, 1) == 0x10F0
    for word in (0, 0x4321, 0xFFFF, 0xF00F):
        assert pack_counts(*unpack_counts(word)) == word
        assert Counts.unpack(word) == Counts(*unpack_counts(word))
    with pytest.raises(DecodeError, match="above bit 15"):
        unpack_counts(0x1_0000)
    bad = bytearray(wire.encode_invoke(1, 0))
    struct.pack_into("<I", bad, 8, 0x1_0001)
    with pytest.raises(DecodeError, match=r"^inbound: counts 0x00010001 has bits set above"):
        wire.decode_invoke(bad)
    with pytest.raises(DecodeError, match=r"^invoke response: counts 0x00010001 has bits"):
        wire.decode_invoke_response(bad)


class Nothing(SecureObject):
    @op(0)
    def nothing(self) -> None:
        """No arguments at all."""


class Root(SecureObject):
    @op(0, oo=1)
    def open(self) -> SecureObject:
        return Nothing()


def test_trace_of_sixteen_inputs_shows_what_qtee_reads() -> None:
    """§7 with the trace on: a call with 16 IBs is traced with the counts word QTEE reads
    (IB0) and goes through, as it does with the trace off."""
    lines: list[str] = []
    mem = CheckedMemory()
    dev = Device(SecureWorld(Root()), memory=mem)
    ctx = dev.open()
    try:
        head, out = raw_invoke(ctx, mem, NULL, 0, [uapi.Param(OBJ_OUT)])
        assert head.ret == 0 and out[0].b == TEE
        dev.trace = lines.append
        buf = mem.map(bytearray(8))
        head, _ = raw_invoke(ctx, mem, out[0].a, 0, [uapi.Param(UB_IN, buf, 8)] * 16)
        assert head.ret == 0
        assert [line.split()[:3] for line in lines] == [["NS", "->", "QTEE"], ["QTEE", "->", "NS"]]
        assert all("IB0 OB0 IO0 OO0" in line for line in lines)
    finally:
        ctx.close()

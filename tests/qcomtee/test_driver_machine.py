"""Random raw-ioctl programs against the driver, checked against an oracle of owners and
reference counts (issue 13 acceptance; HABITS tests 1, 2 and 8; Cap'n Proto's RPC fuzzer).

Up to three contexts of one device, each holding a handle to a shared secure service
(the vault), run programs of: open and close fds; SHM_ALLOC and the shm fd's close;
invoke with objects out (a new secure token, or one the vault holds); invoke with
objects in (a token, a callback object, a memory object, NULL) that the vault keeps;
the vault dropping what it keeps; the vault calling a kept callback object back, served
by this test as the owner's worker with SUPPL_RECV/SUPPL_SEND (answered with nothing,
with a new callback object, with an error; or the owner's or the caller's fd closed
while the call is in flight); RELEASE of a token; and close racing a SHM_ALLOC or a
blocked SUPPL_RECV.

Invariants, one sentence each:

1. Each fd's object ids are the ones the oracle predicts, handed out lowest-free (QK §2.2).
2. QTEE holds exactly one id for each object a context holds (QK §2.3).
3. The device's NS ids are exactly the callback and memory objects the vault keeps.
4. The device's shm ids are those an open fd owns or a kept memory object holds, handed
   out lowest-free from 1.
5. Each fd's request queue holds exactly the release notifications and callback requests
   the oracle expects, in FIFO order with lowest-free request ids (QK §4.2).
6. After every program (teardown): ``leaks() == {}`` and QTEE holds nothing.

``make test`` runs 500 programs; ``make soak`` (``QTEE_SOAK=1``) runs 10,000.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from objects import DriverError, QteeError, op
from qtee import Context, Device, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import NsObject, QteeRoot, SecureObject, SecureWorld
from tests._helpers import (
    MEM,
    META_OUT,
    NULL,
    OBJ_IN,
    OBJ_OUT,
    RELEASE,
    TEE,
    UB_IN,
    UB_OUT,
    USER,
    InvokeThread,
    raw_invoke,
    recv,
    send,
    wait_until,
)

SOAK = os.environ.get("QTEE_SOAK") == "1"
PROGRAMS = int(os.environ.get("QTEE_PROGRAMS", "10000" if SOAK else "500"))
VAULT_UID = 0x7A17
DEFUNCT_U32 = 0xFFFF_FFA6  # -90
UNAVAIL_U32 = 0xFFFF_FFA0  # -96
NO_SLOT = 0xFFFF_FFFF
U32 = struct.Struct("<I")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200 if SOAK else 300)]


class Token(SecureObject):
    """A secure object the vault makes; nothing but its identity."""


class Vault(SecureObject):
    """A secure service every context opens: keeps objects in numbered slots."""

    def __init__(self) -> None:
        self.slots: list[object] = []

    def _slot(self, raw: bytes) -> int:
        (i,) = U32.unpack(raw)
        if i >= len(self.slots):
            raise QteeError(10, f"no slot {i}")
        return i

    def _keep(self, obj: object) -> bytes:
        self.slots.append(obj)
        return U32.pack(len(self.slots) - 1)

    @op(0, oo=1)
    def make(self) -> SecureObject:
        return Token()

    @op(1, io=1, ob=(4,))
    def keep(self, obj: object) -> bytes:
        return self._keep(obj.retain() if isinstance(obj, NsObject) else obj)

    @op(2, ib=(4,))
    def drop(self, raw: bytes) -> None:
        i = self._slot(raw)
        obj, self.slots[i] = self.slots[i], None
        if isinstance(obj, NsObject):
            obj.release()

    @op(3, ib=(4,), oo=1)
    def give(self, raw: bytes) -> object:
        return self.slots[self._slot(raw)]

    @op(4, ib=(4,), ob=(4,))
    def call(self, raw: bytes) -> bytes:
        target = self.slots[self._slot(raw)]
        assert isinstance(target, NsObject)
        res = target.invoke(0, n_oo=1)
        if res.result:
            raise QteeError(res.result)
        got = res.oo[0]
        return self._keep(got) if isinstance(got, NsObject) else U32.pack(NO_SLOT)


@dataclass
class Slot:
    """What the oracle knows of a vault slot."""

    kind: str  # "token", "user", "mem", "null" or "dropped"
    owner: Fd | None = None  # for "user" and "mem": the fd that passed it in
    ident: int = 0  # user id, or shm id


@dataclass(eq=False)
class Fd:
    """The oracle's view of one open fd."""

    ctx: Context
    name: int
    vault: int = -1  # this fd's id of its vault handle
    tokens: set[int] = field(default_factory=set)
    shms: set[int] = field(default_factory=set)
    #: Requests the fd's queue should hold, oldest first: (request id, object id, op).
    queue: deque[tuple[int, int, int]] = field(default_factory=deque)
    next_user: int = 100
    open: bool = True

    def ids(self) -> set[int]:
        return {self.vault, *self.tokens}

    def new_user_id(self) -> int:
        self.next_user += 1
        return self.next_user


def _lowest_free(used: set[int], start: int = 0) -> int:
    i = start
    while i in used:
        i += 1
    return i


class DriverMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vault = Vault()
        self.mem = CheckedMemory()
        self.gate: threading.Event | None = None  # blocks the next SHM_ALLOC's backing
        self.inside = threading.Event()
        self.dev = Device(
            SecureWorld(QteeRoot({VAULT_UID: lambda env: self.vault})),
            memory=self.mem,
            shm_backing=self._backing,
        )
        self.fds: list[Fd] = []
        self.slots: list[Slot] = []
        self.opened = 0

    def _backing(self, size: int) -> tuple[bytearray, None]:
        gate = self.gate
        if gate is not None:
            self.gate = None
            self.inside.set()
            assert gate.wait(10)
        return bytearray(size), None

    # ------------------------------------------------------------------ helpers
    def live(self) -> list[Fd]:
        return [f for f in self.fds if f.open]

    def invoke(self, fd: Fd, obj: int, op_: int, params: list[uapi.Param]) -> InvokeResult:
        return raw_invoke(fd.ctx, self.mem, obj, op_, params)

    def ub_in(self, data: bytes) -> uapi.Param:
        return uapi.Param(UB_IN, self.mem.map(bytearray(data)), len(data))

    def out4(self) -> tuple[uapi.Param, bytearray]:
        buf = bytearray(4)
        return uapi.Param(UB_OUT, self.mem.map(buf), 4), buf

    def take_id(self, fd: Fd) -> int:
        return _lowest_free(fd.ids())

    def release_slot_object(self, slot: Slot) -> None:
        """The vault dropped ``slot``'s reference: what the driver does in response."""
        if slot.kind == "user" and slot.owner is not None and slot.owner.open:
            owner = slot.owner
            req_id = _lowest_free({r for r, _, _ in owner.queue})
            owner.queue.append((req_id, slot.ident, RELEASE))

    def shm_ids(self) -> set[int]:
        held = {s.ident for s in self.slots if s.kind == "mem"}
        return held.union(*(f.shms for f in self.live()))

    def close_fd(self, fd: Fd) -> None:
        """The oracle's close: notifications dropped, objects and shms go."""
        fd.open = False
        fd.queue.clear()
        fd.tokens.clear()
        fd.shms.clear()
        fd.vault = -1

    def drain_notifications(self, fd: Fd) -> None:
        """Receive the release notifications ahead of a callback request."""
        while fd.queue and fd.queue[0][2] == RELEASE:
            req_id, user_id, _ = fd.queue.popleft()
            head, params, _ = recv(fd.ctx, self.mem, n=2)
            assert (head.func, head.num_params) == (RELEASE, 1)
            assert (params[0].a, params[0].b) == (user_id, req_id)

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: len(self.live()) < 3)
    @rule()
    def open_fd(self) -> None:
        fd = Fd(self.dev.open(), self.opened)
        self.opened += 1
        _, p = self.invoke(fd, NULL, 2, [uapi.Param(OBJ_IN, NULL), uapi.Param(OBJ_OUT)])
        env = p[1].a
        assert (env, p[1].b) == (0, TEE)
        _, p = self.invoke(fd, env, 0, [self.ub_in(U32.pack(VAULT_UID)), uapi.Param(OBJ_OUT)])
        assert (p[1].a, p[1].b) == (1, TEE)
        self.invoke(fd, env, RELEASE, [])
        fd.vault = 1
        self.fds.append(fd)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), size=st.sampled_from([0, 1, 64, 4096, 5000]))
    def shm_alloc(self, data: st.DataObject, size: int) -> None:
        fd = data.draw(st.sampled_from(self.live()))
        expect = _lowest_free(self.shm_ids(), 1)
        arg = bytearray(uapi.ShmAllocData(size).pack())
        fd.ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
        assert uapi.ShmAllocData.unpack(arg) == uapi.ShmAllocData(size, 0, expect)
        fd.shms.add(expect)

    @precondition(lambda self: any(f.shms for f in self.live()))
    @rule(data=st.data())
    def shm_free(self, data: st.DataObject) -> None:
        fd = data.draw(st.sampled_from([f for f in self.live() if f.shms]))
        shm = data.draw(st.sampled_from(sorted(fd.shms)))
        fd.ctx.shm_free(shm)
        fd.shms.discard(shm)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def make_token(self, data: st.DataObject) -> None:
        fd = data.draw(st.sampled_from(self.live()))
        expect = self.take_id(fd)
        head, p = self.invoke(fd, fd.vault, 0, [uapi.Param(OBJ_OUT)])
        assert head.ret == 0 and (p[0].a, p[0].b) == (expect, TEE)
        fd.tokens.add(expect)

    @precondition(lambda self: any(f.tokens for f in self.live()))
    @rule(data=st.data())
    def release_token(self, data: st.DataObject) -> None:
        fd = data.draw(st.sampled_from([f for f in self.live() if f.tokens]))
        token = data.draw(st.sampled_from(sorted(fd.tokens)))
        self.invoke(fd, token, RELEASE, [])
        fd.tokens.discard(token)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), kind=st.sampled_from(["token", "user", "user", "mem", "null"]))
    def keep(self, data: st.DataObject, kind: str) -> None:
        """Invoke with an object in: the vault keeps it."""
        fd = data.draw(st.sampled_from(self.live()))
        if kind == "token" and fd.tokens:
            param, slot = uapi.Param(OBJ_IN, min(fd.tokens), TEE), Slot("token")
        elif kind == "user":
            uid = fd.new_user_id()
            param, slot = uapi.Param(OBJ_IN, uid, USER), Slot("user", fd, uid)
        elif kind == "mem" and fd.shms:
            shm = data.draw(st.sampled_from(sorted(fd.shms)))
            param, slot = uapi.Param(OBJ_IN, shm, MEM), Slot("mem", fd, shm)
        else:
            param, slot = uapi.Param(OBJ_IN, NULL), Slot("null")
        out, buf = self.out4()
        head, _ = self.invoke(fd, fd.vault, 1, [param, out])
        assert head.ret == 0 and U32.unpack(buf) == (len(self.slots),)
        self.slots.append(slot)

    @precondition(lambda self: self.live() and any(s.kind != "dropped" for s in self.slots))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        """The vault drops a slot: a callback object's owner gets a release notification."""
        fd = data.draw(st.sampled_from(self.live()))
        i = data.draw(st.sampled_from([k for k, s in enumerate(self.slots) if s.kind != "dropped"]))
        head, _ = self.invoke(fd, fd.vault, 2, [self.ub_in(U32.pack(i))])
        assert head.ret == 0
        self.release_slot_object(self.slots[i])
        self.slots[i] = Slot("dropped")

    @precondition(lambda self: self.live() and any(s.kind != "dropped" for s in self.slots))
    @rule(data=st.data())
    def give(self, data: st.DataObject) -> None:
        """Invoke with an object out that the vault already holds."""
        fd = data.draw(st.sampled_from(self.live()))
        i = data.draw(st.sampled_from([k for k, s in enumerate(self.slots) if s.kind != "dropped"]))
        slot = self.slots[i]
        expect = self.take_id(fd)
        head, p = self.invoke(fd, fd.vault, 3, [self.ub_in(U32.pack(i)), uapi.Param(OBJ_OUT)])
        if slot.kind == "token":
            assert head.ret == 0 and (p[1].a, p[1].b) == (expect, TEE)
            fd.tokens.add(expect)
        elif slot.kind == "null":
            assert head.ret == 0 and (p[1].a, p[1].b) == (NULL, 0)
        elif slot.owner is fd:  # its own callback or memory object comes back as itself
            flag = USER if slot.kind == "user" else MEM
            assert head.ret == 0 and (p[1].a, p[1].b) == (slot.ident, flag)
        else:  # another fd's object cannot be converted: UNAVAIL, no object (QK §2.3)
            assert head.ret == UNAVAIL_U32 and (p[1].a, p[1].b) == (0, 0)

    @precondition(lambda self: self.live())
    @rule(
        data=st.data(),
        answer=st.sampled_from(["nothing", "object", "error", "close owner", "close caller"]),
    )
    def call_back(self, data: st.DataObject, answer: str) -> None:
        """The vault calls a kept callback object (one is kept first if there is none);
        this test is the owner's worker."""
        if not any(s.kind == "user" for s in self.slots):
            self.keep(data, "user")
        caller = data.draw(st.sampled_from(self.live()))
        users = [k for k, s in enumerate(self.slots) if s.kind == "user"]
        i = data.draw(st.sampled_from(users))
        slot = self.slots[i]
        owner = slot.owner
        assert owner is not None
        out, buf = self.out4()
        call = InvokeThread(caller.ctx, self.mem, caller.vault, 4, [self.ub_in(U32.pack(i)), out])
        if not owner.open:  # QK §4.5: requests to a closed fd's objects fail DEFUNCT
            head, _ = call.outcome()
            assert head.ret == DEFUNCT_U32
            return
        req_id = _lowest_free({r for r, _, _ in owner.queue})
        owner.queue.append((req_id, slot.ident, 0))
        assert wait_until(lambda: len(owner.ctx.requests) == len(owner.queue))
        if answer == "close owner":  # pending request -> -ENODEV -> DEFUNCT for QTEE
            owner.ctx.close()
            head, _ = call.outcome()
            assert head.ret == DEFUNCT_U32
            if caller is owner:
                assert owner.ctx.life.released.wait(5)
            self.close_fd(owner)
            return
        self.drain_notifications(owner)
        head_r, params, _ = recv(owner.ctx, self.mem, n=3)
        assert owner.queue.popleft() == (req_id, slot.ident, 0)
        assert (head_r.func, head_r.num_params) == (0, 2)
        assert (params[0].a, params[0].b) == (slot.ident, req_id)
        assert params[1].attr == OBJ_OUT
        if answer == "close caller" and caller is not owner:
            caller.ctx.close()  # the invoke is in flight: the teardown waits for it
            assert not caller.ctx.life.released.is_set()
        reply_obj = uapi.Param(OBJ_OUT, NULL)
        new_uid = 0
        if answer == "object":
            new_uid = owner.new_user_id()
            reply_obj = uapi.Param(OBJ_OUT, new_uid, USER)
        status = 7 if answer == "error" else 0
        send(owner.ctx, self.mem, status, [uapi.Param(META_OUT, req_id), reply_obj])
        head, _ = call.outcome()
        if answer == "error":
            assert head.ret == 7
        else:
            assert head.ret == 0
            kept = U32.unpack(buf)[0]
            if answer == "object":
                assert kept == len(self.slots)
                self.slots.append(Slot("user", owner, new_uid))
            else:
                assert kept == NO_SLOT
        if answer == "close caller" and caller is not owner:
            assert caller.ctx.life.released.wait(5)
            self.close_fd(caller)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), how=st.sampled_from(["idle", "during SHM_ALLOC", "during RECV"]))
    def close(self, data: st.DataObject, how: str) -> None:
        """Close an fd: idle (torn down at once), or racing a SHM_ALLOC or a blocked RECV
        (torn down when that call leaves)."""
        fd = data.draw(st.sampled_from(self.live()))
        if how == "during SHM_ALLOC":
            self.close_during_shm_alloc(fd)
        elif how == "during RECV" and not fd.queue:
            self.close_during_recv(fd)
        else:
            fd.ctx.close()
            assert fd.ctx.life.released.is_set()  # nothing in flight: torn down at once
        self.close_fd(fd)

    def close_during_shm_alloc(self, fd: Fd) -> None:
        """The shm the racing SHM_ALLOC makes goes with the fd's teardown."""
        expect = _lowest_free(self.shm_ids(), 1)
        go_on = threading.Event()
        self.gate = go_on
        self.inside.clear()
        arg = bytearray(uapi.ShmAllocData(64).pack())
        t = threading.Thread(target=fd.ctx.ioctl, args=(uapi.TEE_IOC_SHM_ALLOC, arg))
        t.start()
        assert self.inside.wait(5)
        fd.ctx.close()
        assert not fd.ctx.life.released.is_set()
        go_on.set()
        t.join(5)
        assert uapi.ShmAllocData.unpack(arg).id == expect
        assert fd.ctx.life.released.wait(5)

    def close_during_recv(self, fd: Fd) -> None:
        """A worker blocked in SUPPL_RECV returns EINTR when its fd is closed."""
        got: list[int] = []

        def worker() -> None:
            try:
                recv(fd.ctx, self.mem)
            except DriverError as exc:
                got.append(exc.errno)

        t = threading.Thread(target=worker)
        t.start()
        assert wait_until(lambda: fd.ctx.life.in_flight == 1)
        fd.ctx.close()
        t.join(5)
        assert got == [errno.EINTR] and fd.ctx.life.released.wait(5)

    @precondition(lambda self: any(f.queue for f in self.live()))
    @rule(data=st.data())
    def receive_notifications(self, data: st.DataObject) -> None:
        fd = data.draw(st.sampled_from([f for f in self.live() if f.queue]))
        self.drain_notifications(fd)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def object_ids_match(self) -> None:
        for fd in self.live():
            assert set(fd.ctx.objects) == fd.ids()
        assert len(self.dev.world.live_ids()) == sum(len(f.ids()) for f in self.live())
        assert self.dev.world.pending_releases() == []

    @invariant()
    def ns_ids_match(self) -> None:
        assert len(self.dev.ns) == sum(s.kind in ("user", "mem") for s in self.slots)

    @invariant()
    def shm_ids_match(self) -> None:
        assert set(self.dev.shm) == self.shm_ids()
        for fd in self.live():
            assert set(fd.ctx.shms) == fd.shms

    @invariant()
    def queues_match(self) -> None:
        for fd in self.live():
            q = fd.ctx.requests
            assert [(r.req_id, r.object_id, r.op) for r in q.fifo] == list(fd.queue)

    def teardown(self) -> None:
        for fd in self.live():
            fd.ctx.close()
            self.close_fd(fd)
        ctx = self.dev.open()  # the vault lets go of what it keeps, through one more fd
        _, p = raw_invoke(ctx, self.mem, NULL, 2, [uapi.Param(OBJ_IN, NULL), uapi.Param(OBJ_OUT)])
        env = p[1].a
        _, p = raw_invoke(
            ctx, self.mem, env, 0, [self.ub_in(U32.pack(VAULT_UID)), uapi.Param(OBJ_OUT)]
        )
        for i, slot in enumerate(self.slots):
            if slot.kind != "dropped":
                raw_invoke(ctx, self.mem, p[1].a, 2, [self.ub_in(U32.pack(i))])
        ctx.close()
        assert self.dev.leaks() == {}, self.dev.leaks()
        assert self.dev.world.live_ids() == [] and self.dev.phys.lent() == 0


InvokeResult = tuple[uapi.ObjectInvokeArg, tuple[uapi.Param, ...]]

DriverMachine.TestCase.settings = settings(
    max_examples=PROGRAMS,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)
test_random_ioctl_programs_match_the_oracle = DriverMachine.TestCase

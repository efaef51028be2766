"""The lifecycle tables (issue 17, "each lifecycle in one table"): every legal move is
listed, an illegal move raises and leaves the state as it was, the objects move through
their table, and ARCHITECTURE.md carries the diagrams the tables generate."""

from __future__ import annotations

import enum
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objects import UsageError
from qtee import DeviceServer
from qtee._diagrams import BEGIN, COMMAND, END, TABLES, render, section, update
from qtee._remote.conn_state import CONNECTION_STATES, ConnEvent, ConnState
from qtee._remote.frames import FrameDecoder, Hello, Welcome, encode
from qtee._remote.server_conn import Connection
from qtee._statetable import IllegalTransition, StateTable
from qtee.gp import TeecLogin, TeecOrigin, TeecResult
from qtee.secure import GpSession, GpTA, QteeRoot, SecureWorld, panic
from qtee.secure._gp import GpRuntime, _Instance
from qtee.secure._gp_state import (
    INSTANCE_STATES,
    SESSION_STATES,
    InstEvent,
    InstState,
    SessEvent,
    SessState,
)
from qtee.vm import Vmm
from qtee.vm._phase import VM_STATES, VmEvent, VmPhase

ROOT = Path(__file__).resolve().parent.parent

ALL: list[StateTable[Any, Any]] = [SESSION_STATES, INSTANCE_STATES, VM_STATES, CONNECTION_STATES]


# ----------------------------------------------------------------------------- the tables


def test_session_moves() -> None:
    """optee.md §4.2/§4.4: a session opens, closes (CLOSING while its close entry runs),
    and is discarded from any state but CLOSED; nothing else."""
    assert dict(SESSION_STATES.transitions) == {
        (SessState.OPENING, SessEvent.OPENED): SessState.OPEN,
        (SessState.OPENING, SessEvent.DISCARD): SessState.CLOSED,
        (SessState.OPEN, SessEvent.CLOSE): SessState.CLOSING,
        (SessState.OPEN, SessEvent.DISCARD): SessState.CLOSED,
        (SessState.CLOSING, SessEvent.DISCARD): SessState.CLOSED,
    }
    assert SESSION_STATES.initial is SessState.OPENING


def test_instance_moves() -> None:
    """optee.md §4: create before the first open entry, destroy when the last TA session
    goes, panic makes it dead for good."""
    assert dict(INSTANCE_STATES.transitions) == {
        (InstState.NEW, InstEvent.CREATE): InstState.CREATED,
        (InstState.NEW, InstEvent.PANIC): InstState.PANICKED,
        (InstState.CREATED, InstEvent.DESTROY): InstState.NEW,
        (InstState.CREATED, InstEvent.PANIC): InstState.PANICKED,
        (InstState.PANICKED, InstEvent.PANIC): InstState.PANICKED,
        (InstState.PANICKED, InstEvent.DESTROY): InstState.PANICKED,
    }
    assert INSTANCE_STATES.initial is InstState.NEW


def test_vm_moves() -> None:
    """optee.md §6.1: created, destroyed once, its calls failed (STOPPING), gone."""
    assert dict(VM_STATES.transitions) == {
        (VmPhase.CREATING, VmEvent.CREATED): VmPhase.RUNNING,
        (VmPhase.CREATING, VmEvent.STOP): VmPhase.STOPPING,
        (VmPhase.CREATING, VmEvent.GONE): VmPhase.DESTROYED,
        (VmPhase.RUNNING, VmEvent.DESTROY): VmPhase.DESTROYING,
        (VmPhase.DESTROYING, VmEvent.STOP): VmPhase.STOPPING,
        (VmPhase.DESTROYING, VmEvent.GONE): VmPhase.DESTROYED,
        (VmPhase.STOPPING, VmEvent.GONE): VmPhase.DESTROYED,
    }
    assert VM_STATES.initial is VmPhase.CREATING


def test_connection_moves() -> None:
    """The device-server protocol: hello/welcome first, bye in any state but CLOSED, the
    end of the stream, then the close."""
    assert dict(CONNECTION_STATES.transitions) == {
        (ConnState.ACCEPTED, ConnEvent.WELCOME): ConnState.SERVING,
        (ConnState.ACCEPTED, ConnEvent.BYE): ConnState.ACCEPTED,
        (ConnState.ACCEPTED, ConnEvent.END): ConnState.ENDING,
        (ConnState.SERVING, ConnEvent.BYE): ConnState.SERVING,
        (ConnState.SERVING, ConnEvent.END): ConnState.ENDING,
        (ConnState.ENDING, ConnEvent.BYE): ConnState.ENDING,
        (ConnState.ENDING, ConnEvent.CLOSE): ConnState.CLOSED,
    }
    assert CONNECTION_STATES.initial is ConnState.ACCEPTED


def _event_types(table: StateTable[Any, Any]) -> tuple[type[enum.Enum], type[enum.Enum]]:
    (state, event) = next(iter(table.transitions))
    return type(state), type(event)


@pytest.mark.parametrize("table", ALL, ids=lambda t: t.name)
def test_every_state_has_an_illegal_move(table: StateTable[Any, Any]) -> None:
    """An illegal move raises IllegalTransition (a UsageError) naming the table, the event
    and the state; every state refuses at least one event."""
    states, events = _event_types(table)
    for state in states:
        bad = [e for e in events if not table.allows(state, e)]
        assert bad, f"{table.name}: {state.name} takes every event"
        with pytest.raises(IllegalTransition, match=f"{bad[0].name} from {state.name}") as exc:
            table.move(state, bad[0])
        assert isinstance(exc.value, UsageError)
        assert table.name in str(exc.value)


class _Holder:
    """Keeps a state and moves it only through its table, as the runtime's objects do."""

    def __init__(self, table: StateTable[Any, Any]) -> None:
        self.table = table
        self.state = table.initial

    def move(self, event: enum.Enum) -> None:
        self.state = self.table.move(self.state, event)


@pytest.mark.parametrize("table", ALL, ids=lambda t: t.name)
@given(data=st.data())
def test_random_moves_follow_the_table(table: StateTable[Any, Any], data: st.DataObject) -> None:
    """Any sequence of events: a legal one lands where the table says, an illegal one
    raises and leaves the state as it was."""
    _, events = _event_types(table)
    holder = _Holder(table)
    for event in data.draw(st.lists(st.sampled_from(list(events)), max_size=12)):
        before = holder.state
        if table.allows(before, event):
            holder.move(event)
            assert holder.state is table.transitions[before, event]
        else:
            with pytest.raises(IllegalTransition):
                holder.move(event)
            assert holder.state is before


def test_a_table_of_mixed_enums_is_refused() -> None:
    """A table's states are one enum: a transition to another kind is a UsageError."""
    with pytest.raises(UsageError, match="is not of SessState"):
        StateTable(
            "bad", SessState.OPENING, {(SessState.OPENING, SessEvent.OPENED): VmPhase.RUNNING}
        )
    with pytest.raises(UsageError, match="non-empty name"):
        StateTable("", SessState.OPENING, {})


def test_a_table_read_from_its_text_is_the_table_written_out() -> None:
    """Issue 17 ("each lifecycle in one table"): ``StateTable.parse`` reads one line per
    state, keeps the written order (the diagrams' order) and takes the first state as the
    initial one."""
    table = StateTable.parse(
        "t",
        VmPhase,
        VmEvent,
        "\n  STOPPING: GONE -> DESTROYED\n  RUNNING: STOP -> STOPPING, DESTROY -> DESTROYING\n",
    )
    assert table.initial is VmPhase.STOPPING
    assert list(table.transitions.items()) == [
        ((VmPhase.STOPPING, VmEvent.GONE), VmPhase.DESTROYED),
        ((VmPhase.RUNNING, VmEvent.STOP), VmPhase.STOPPING),
        ((VmPhase.RUNNING, VmEvent.DESTROY), VmPhase.DESTROYING),
    ]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "the table lists no state"),
        ("RUNNING: DESTROY DESTROYING", "cannot read 'DESTROY DESTROYING'"),
        ("RUNNING: DESTROYED -> STOPPING", "cannot read 'DESTROYED'"),
        ("RUN: STOP -> STOPPING", "cannot read 'RUN'"),
        ("RUNNING: STOP -> STOPPING, STOP -> DESTROYED", "cannot read 'STOP -> DESTROYED'"),
        ("RUNNING: STOP -> STOPPED", "cannot read 'STOPPED'"),
    ],
)
def test_a_table_text_that_does_not_read_is_refused(spec: str, why: str) -> None:
    """An unknown name, a move without its arrow or written twice, or no line at all: a
    UsageError naming the table and what it could not read."""
    with pytest.raises(UsageError, match=f"vm: {why}"):
        StateTable.parse("vm", VmPhase, VmEvent, spec)


# ----------------------------------------------------------------------------- the objects


class _StateTA(GpTA):
    UUID = uuid.UUID("5a7e7ab1-0000-4000-8000-000000000017")

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[Any]) -> None:
        if cmd == 1:
            panic(0x17)


@pytest.fixture
def rt() -> Any:
    world = SecureWorld(QteeRoot())
    world.tas.register_gp(_StateTA)
    runtime = GpRuntime(world)
    yield runtime
    assert runtime.live() == {"sessions": 0, "instances": 0}
    assert world.live_ids() == []


def test_gp_session_and_instance_move_through_their_tables(rt: GpRuntime) -> None:
    """optee.md §4.2: an opened session is OPEN with a CREATED instance; a panic makes the
    instance PANICKED; a close makes the session CLOSED."""
    public = TeecLogin.TEEC_LOGIN_PUBLIC
    sid, res, _ = rt.open_session(_StateTA.UUID.bytes, public, bytes(16), 0, [])
    assert res == TeecResult.TEEC_SUCCESS
    sess = rt._find(sid)
    assert sess is not None and sess._state is SessState.OPEN
    inst = sess._instance
    assert inst is not None and inst.state is InstState.CREATED
    assert rt.invoke(sid, 1, 0, []) == (
        TeecResult.TEEC_ERROR_TARGET_DEAD,
        TeecOrigin.TEEC_ORIGIN_TEE,
    )
    assert inst.state is InstState.PANICKED and inst.panicked and not inst.created
    assert rt.close_session(sid) == TeecResult.TEEC_SUCCESS
    assert sess._state is SessState.CLOSED


def test_gp_illegal_moves_change_nothing(rt: GpRuntime) -> None:
    """An illegal move of a session or an instance raises and leaves its state."""
    sess = GpSession(rt, _StateTA.UUID.bytes, 0, bytes(16), None)
    with pytest.raises(IllegalTransition):
        sess._move(SessEvent.CLOSE)
    assert sess._state is SessState.OPENING
    inst = _Instance(rt, _StateTA, _StateTA.UUID.bytes)
    with pytest.raises(IllegalTransition):
        inst.move(InstEvent.DESTROY)
    assert inst.state is InstState.NEW and inst.ta is None


def test_vm_phases_and_a_refused_move() -> None:
    """optee.md §6.1: a created VM is RUNNING; an illegal move leaves it RUNNING and not
    stopping; destroy ends DESTROYED and its row says so."""
    from qtee.secure import SecureMonitor

    with Vmm(SecureMonitor()) as vmm:
        guest = vmm.create_vm("states", ram_size=1 << 20)
        vm = vmm.state(guest)
        assert vm.phase is VmPhase.RUNNING
        with vm.lock, pytest.raises(IllegalTransition):
            vm.move(VmEvent.GONE)
        assert vm.phase is VmPhase.RUNNING and not vm.stopping
        vmm.destroy_vm(guest)
        assert vm.phase is VmPhase.DESTROYED
        assert [r.state for r in vmm.rows()] == ["destroyed"]


def test_connection_illegal_move_changes_nothing() -> None:
    """A connection that never said hello cannot close; its state stays ACCEPTED."""
    a, b = socket.socketpair()
    try:
        conn = Connection(SimpleNamespace(max_frame=1 << 16), a, "c")  # type: ignore[arg-type]
        with conn._lock, pytest.raises(IllegalTransition):
            conn._move(ConnEvent.CLOSE)
        assert conn.state is ConnState.ACCEPTED
    finally:
        a.close()
        b.close()


def test_a_served_connection_moves_through_its_table(qtee_server: DeviceServer) -> None:
    """From the client's side: after the welcome the connection is SERVING; after the
    client goes it is CLOSED."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(qtee_server.path)
    s.settimeout(3)
    s.sendall(encode(Hello(client="states")))
    dec = FrameDecoder()
    while (msg := dec.next_message()) is None:
        dec.feed(s.recv(4096))
    assert isinstance(msg, Welcome)
    with qtee_server._lock:
        (conn,) = [c for c in qtee_server._conns if c.ctx is not None]
    assert conn.state is ConnState.SERVING
    s.close()
    assert conn.closed.wait(3)
    assert conn.state is ConnState.CLOSED


# ----------------------------------------------------------------------------- the diagrams


def test_architecture_has_the_generated_diagrams() -> None:
    """ARCHITECTURE.md's state diagrams are what the tables generate now."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert section(text, render()) == text, f"ARCHITECTURE.md is out of date: run {COMMAND}"
    for ref in TABLES:
        assert f"`{ref.partition(':')[0].replace('.', '/')}.py: {ref.partition(':')[2]}`" in text


def test_the_generator_rewrites_a_stale_section(tmp_path: Path) -> None:
    """``--check`` exits 1 on a stale section and names the command; without it the
    section is rewritten, text around it kept."""
    path = tmp_path / "ARCH.md"
    path.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n", encoding="utf-8")
    run = [sys.executable, "-m", "qtee._diagrams"]
    check = subprocess.run(
        [*run, "--check", str(path)], check=False, capture_output=True, text=True
    )
    assert check.returncode == 1 and COMMAND in check.stderr
    assert subprocess.run([*run, str(path)], check=False).returncode == 0
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"before\n{BEGIN}\n") and text.endswith(f"{END}\nafter\n")
    assert "stateDiagram-v2" in text and "old" not in text
    assert update(path, check=True)


def test_the_generator_needs_its_markers(tmp_path: Path) -> None:
    """A file without the markers is a UsageError naming them."""
    with pytest.raises(UsageError, match="state diagrams"):
        section("no markers here\n", render())
    with pytest.raises(UsageError):
        section(f"{BEGIN}\nno end\n", render())

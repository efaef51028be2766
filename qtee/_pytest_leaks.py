"""The pytest plugin's leak check: every device a test builds is recorded, and after the
test its tables must be empty and no handle may be left for a client's close.

See :mod:`qtee.pytest_plugin` for what it checks and how a test opts out.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from qtee._tracker import Leftover


__all__ = ["CLOSE_MARKER", "TRACKED_DEVICES", "format_leaks", "format_leftovers"]

#: Device classes the leak check records, as ``(module, class)``.  Each needs a
#: ``leaks() -> dict[str, int]`` method.  A device server's device is a ``Device``.
TRACKED_DEVICES: list[tuple[str, str]] = [
    ("qtee._qcomtee.core", "Device"),
    ("qtee._optee.core", "OpteeDevice"),
    ("qtee.secure._monitor", "SecureMonitor"),
    ("qtee.vm._framework", "Vmm"),
]

# A device recorded by the leak check: [device, class name, where it was built], by id.
_Record = list[Any]
_RECORDS = pytest.StashKey[dict[int, _Record]]()
_ALREADY_FAILED = pytest.StashKey[bool]()
_TRACKER = pytest.StashKey[Any]()  # the test's ObjectTracker, or None
#: The marker of a test that leaves objects for the client's close on purpose.
CLOSE_MARKER = "qtee_close_releases"


# ------------------------------------------------------------------------ leak check
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (report.when == "call" and call.excinfo is not None) or (
        report.when == "setup" and report.failed
    ):  # failed, skipped or xfailed: a leak would only repeat it
        item.stash[_ALREADY_FAILED] = True
    return report


_OURS: Final = ("qtee", "objects", "supplicant")


@functools.cache
def _library_dirs(
    names: tuple[str, ...] = (*_OURS, "pytest", "_pytest", "pluggy"),
) -> tuple[str, ...]:
    """Directories whose frames never name where a device was built."""
    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.realpath(spec.origin)) + os.sep)
    return tuple(dirs)


@functools.cache
def _is_library(filename: str) -> bool:
    path = os.path.realpath(filename)
    return path.startswith(_library_dirs()) or path == os.path.realpath(threading.__file__)


@functools.cache
def _is_ours(filename: str) -> bool:
    return os.path.realpath(filename).startswith(_library_dirs(_OURS))


def _where(frame: FrameType | None) -> str:
    """``file:line`` of the innermost frame outside qtee and pytest; when the whole stack is
    theirs (a thread qtee started), the outermost frame in qtee's own packages, where the
    thread entered them (else the innermost)."""
    first = frame
    entry = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not _is_library(name):
            break
        if _is_ours(name):
            entry = frame
        frame = frame.f_back
    frame = frame or entry or first
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def format_leaks(kind: str, where: str, leaks: dict[str, int]) -> str:
    """One device's non-empty tables as a ``table | live`` table."""
    width = max(len("table"), *(len(name) for name in leaks))
    live = max(len("live"), *(len(str(n)) for n in leaks.values()))
    lines = [
        f"{kind} created at {where} still holds:",
        f"    {'table':<{width}} | {'live':>{live}}",
        f"    {'-' * width}-+-{'-' * live}",
    ]
    lines += [f"    {name:<{width}} | {count:>{live}}" for name, count in leaks.items()]
    return "\n".join(lines)


def format_leftovers(client: str, closed: bool, left: Sequence[Leftover]) -> str:
    """One client's leftovers as a ``kind | id | refers to | created at`` table."""
    from qtee._cli.info import format_table

    state = "unreleased when it was closed" if closed else "never closed, holds"
    rows = [[x.kind, x.ident, x.what, x.where] for x in left]
    return "\n".join(
        [
            f"client created at {client}: {state}:",
            *format_table(("kind", "id", "refers to", "created at"), rows),
        ]
    )


def _recording(cls: type, made: dict[int, _Record], lock: threading.Lock) -> Callable[..., None]:
    original: Callable[..., None] = cls.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        where = _where(sys._getframe(1))
        with lock:  # recorded once, even through two tracked __init__s
            made.setdefault(id(self), [self, type(self).__name__, where])

    return recording_init


@pytest.fixture(autouse=True)
def qtee_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Record the devices built during the test and what its clients hold; at teardown
    each device must have no leaks, and no client may have left handles for its close."""
    from qtee import _tracker as tracking

    made: dict[int, _Record] = {}  # keeps the devices alive, so ids stay unique
    lock = threading.Lock()
    request.node.stash[_RECORDS] = made
    tracker = None
    if request.node.get_closest_marker(CLOSE_MARKER) is None:
        tracker = tracking.ObjectTracker(_where)
    request.node.stash[_TRACKER] = tracker
    with pytest.MonkeyPatch.context() as mp:
        for module, name in TRACKED_DEVICES:
            cls = getattr(importlib.import_module(module), name)
            mp.setattr(cls, "__init__", _recording(cls, made, lock))
        previous = tracking.track_objects(tracker)
        try:
            yield
        finally:
            tracking.track_objects(previous)
    request.node.stash[_TRACKER] = None  # the clients it keeps alive can go with the test
    if request.node.stash.get(_ALREADY_FAILED, False):
        return
    problems = [
        format_leaks(kind, where, leaks)
        for dev, kind, where in made.values()
        if (leaks := dev.leaks())
    ]
    left = tracker.report() if tracker is not None else []
    if left:
        problems.append(
            "objects left for a client's close to release (release them in the test, or "
            f"mark a test about close @pytest.mark.{CLOSE_MARKER}):\n"
            + "\n".join(format_leftovers(*client) for client in left)
        )
    if problems:
        pytest.fail("leak check: " + "\n".join(problems), pytrace=False)


def _label(request: pytest.FixtureRequest, device: object, where: str) -> None:
    """Name the place a fixture-built device comes from in the leak table."""
    rec = request.node.stash.get(_RECORDS, {}).get(id(device))
    if rec is not None and rec[0] is device:
        rec[2] = where

"""The pytest plugin's TA markers: ``qtee_ta``, ``qtee_gp_ta`` and ``qtee_ta_file`` register
a TA for one test and restore the registries afterwards (autouse fixtures).

See :mod:`qtee.pytest_plugin` for the markers' arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn, TypeVar

import pytest

if TYPE_CHECKING:
    from qtee.secure import TrustedApp


__all__: list[str] = []

_K = TypeVar("_K")
_V = TypeVar("_V")


# ------------------------------------------------------------------------ TAs
def _misused(request: pytest.FixtureRequest, usage: str, mark: pytest.Mark) -> NoReturn:
    pytest.fail(f"{request.node.nodeid}: use @pytest.mark.{usage}, not {mark!r}", pytrace=False)


@contextlib.contextmanager
def _registered(
    wanted: dict[_K, _V],
    lookup: Callable[[_K], _V | None],
    register: Callable[[_K, _V], None],
    unregister: Callable[[_K], None],
) -> Iterator[None]:
    """Register each of ``wanted`` for the block; then put back what each key held before
    (unregistering a key that held nothing)."""
    saved: dict[_K, _V | None] = {}
    try:
        for key, value in wanted.items():
            saved[key] = lookup(key)
            register(key, value)
        yield
    finally:
        for key, previous in saved.items():
            if previous is not None:
                register(key, previous)
            elif lookup(key) is not None:
                unregister(key)


@pytest.fixture(autouse=True)
def _qtee_ta_markers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the TAs the ``qtee_ta``, ``qtee_gp_ta`` and ``qtee_ta_file`` markers name
    for this test; restore the registries afterwards."""
    node = request.node
    named = list(node.iter_markers("qtee_ta"))
    gp = list(node.iter_markers("qtee_gp_ta"))
    files = list(node.iter_markers("qtee_ta_file"))
    if not (named or gp or files):
        yield
        return
    with contextlib.ExitStack() as stack:
        for marks, registered in ((named, _named_tas), (gp, _gp_tas), (files, _ta_files)):
            if marks:
                stack.enter_context(registered(request, marks))
        yield


@contextlib.contextmanager
def _named_tas(request: pytest.FixtureRequest, marks: list[pytest.Mark]) -> Iterator[None]:
    """``qtee_ta(name, cls)``: ``cls`` registered under ``name``."""
    from qtee.secure._registry import PROCESS_TAS

    wanted: dict[str, type[TrustedApp]] = {}
    for mark in reversed(marks):  # closest marker (the function's) wins
        if len(mark.args) != 2 or mark.kwargs:
            _misused(request, "qtee_ta(name, cls)", mark)
        name, cls = mark.args
        wanted[name] = cls

    def lookup(name: str) -> type[TrustedApp] | None:
        return PROCESS_TAS.lookup(name, inherit=False)

    with _registered(wanted, lookup, PROCESS_TAS.register, PROCESS_TAS.unregister):
        yield


@contextlib.contextmanager
def _gp_tas(request: pytest.FixtureRequest, marks: list[pytest.Mark]) -> Iterator[None]:
    """``qtee_gp_ta(cls, loadable=False)``: the GP TA ``cls`` registered by its UUID."""
    from uuid import UUID

    from qtee.secure import GpTA
    from qtee.secure._registry import PROCESS_TAS

    wanted: dict[tuple[bytes, bool], type[GpTA]] = {}
    for mark in reversed(marks):  # closest marker (the function's) wins
        cls = mark.args[0] if len(mark.args) == 1 else None
        loadable = mark.kwargs.get("loadable", False)
        if cls is None or set(mark.kwargs) - {"loadable"} or not isinstance(loadable, bool):
            _misused(request, "qtee_gp_ta(cls, loadable=False)", mark)
        uuid = getattr(cls, "UUID", None)
        if not (isinstance(cls, type) and issubclass(cls, GpTA)) or not isinstance(uuid, UUID):
            pytest.fail(
                f"{request.node.nodeid}: qtee_gp_ta takes a GpTA subclass with a UUID, not {cls!r}",
                pytrace=False,
            )
        wanted[(uuid.bytes, loadable)] = cls

    def lookup(key: tuple[bytes, bool]) -> type[GpTA] | None:
        uuid, loadable = key
        if loadable:
            return PROCESS_TAS.lookup_loadable(uuid, inherit=False)
        return PROCESS_TAS.lookup_gp(uuid, inherit=False)

    def register(key: tuple[bytes, bool], cls: type[GpTA]) -> None:
        PROCESS_TAS.register_gp(cls, loadable=key[1])

    def unregister(key: tuple[bytes, bool]) -> None:
        PROCESS_TAS.unregister_gp(key[0], loadable=key[1])

    with _registered(wanted, lookup, register, unregister):
        yield


@contextlib.contextmanager
def _ta_files(request: pytest.FixtureRequest, marks: list[pytest.Mark]) -> Iterator[None]:
    """``qtee_ta_file(cls, path=None, sha256=None)``: TA files registered, then unregistered."""
    from qtee.secure import TaFileRegistration, register_ta_file

    regs: list[TaFileRegistration] = []
    try:
        for mark in reversed(marks):  # the closest (the function's) is registered last
            if len(mark.args) not in (1, 2) or set(mark.kwargs) - {"path", "sha256"}:
                _misused(request, "qtee_ta_file(cls, path=None, sha256=None)", mark)
            cls, *rest = mark.args
            path = rest[0] if rest else mark.kwargs.get("path")
            if path is not None:
                path = request.path.parent / path  # an absolute path stays as it is
            regs.append(register_ta_file(cls, path, sha256=mark.kwargs.get("sha256")))
        yield
    finally:
        for reg in reversed(regs):
            reg.unregister()

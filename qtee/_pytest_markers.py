"""The pytest plugin's TA markers: ``qtee_ta``, ``qtee_gp_ta`` and ``qtee_ta_file`` register
a TA for one test and restore the registries afterwards (autouse fixtures).

See :mod:`qtee.pytest_plugin` for the markers' arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from qtee.secure import TrustedApp


__all__: list[str] = []


# ------------------------------------------------------------------------ TAs
@pytest.fixture(autouse=True)
def _qtee_ta_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the TAs named by ``qtee_ta`` markers; restore the registry afterwards."""
    marks = list(request.node.iter_markers("qtee_ta"))
    if not marks:
        yield
        return
    from qtee.secure._registry import PROCESS_TAS

    wanted: dict[str, type[TrustedApp]] = {}
    for mark in reversed(marks):  # closest marker (the function's) wins
        if len(mark.args) != 2 or mark.kwargs:
            pytest.fail(
                f"{request.node.nodeid}: use @pytest.mark.qtee_ta(name, cls), not {mark!r}",
                pytrace=False,
            )
        name, cls = mark.args
        wanted[name] = cls
    saved: dict[str, type[TrustedApp] | None] = {}
    try:
        for name, cls in wanted.items():
            saved[name] = PROCESS_TAS.lookup(name, inherit=False)
            PROCESS_TAS.register(name, cls)
        yield
    finally:
        for name, previous in saved.items():
            if previous is not None:
                PROCESS_TAS.register(name, previous)
            elif PROCESS_TAS.lookup(name, inherit=False) is not None:
                PROCESS_TAS.unregister(name)


@pytest.fixture(autouse=True)
def _qtee_gp_ta_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the GP TAs named by ``qtee_gp_ta`` markers; restore the registry after."""
    marks = list(request.node.iter_markers("qtee_gp_ta"))
    if not marks:
        yield
        return
    from uuid import UUID

    from qtee.secure import GpTA
    from qtee.secure._registry import PROCESS_TAS

    wanted: dict[tuple[bytes, bool], type[GpTA]] = {}
    for mark in reversed(marks):  # closest marker (the function's) wins
        cls = mark.args[0] if len(mark.args) == 1 else None
        loadable = mark.kwargs.get("loadable", False)
        if cls is None or set(mark.kwargs) - {"loadable"} or not isinstance(loadable, bool):
            pytest.fail(
                f"{request.node.nodeid}: use @pytest.mark.qtee_gp_ta(cls, loadable=False), "
                f"not {mark!r}",
                pytrace=False,
            )
        uuid = getattr(cls, "UUID", None)
        if not (isinstance(cls, type) and issubclass(cls, GpTA)) or not isinstance(uuid, UUID):
            pytest.fail(
                f"{request.node.nodeid}: qtee_gp_ta takes a GpTA subclass with a UUID, not {cls!r}",
                pytrace=False,
            )
        wanted[(uuid.bytes, loadable)] = cls
    saved: dict[tuple[bytes, bool], type[GpTA] | None] = {}

    def lookup(key: tuple[bytes, bool]) -> type[GpTA] | None:
        uuid, loadable = key
        if loadable:
            return PROCESS_TAS.lookup_loadable(uuid, inherit=False)
        return PROCESS_TAS.lookup_gp(uuid, inherit=False)

    try:
        for key, cls in wanted.items():
            saved[key] = lookup(key)
            PROCESS_TAS.register_gp(cls, loadable=key[1])
        yield
    finally:
        for key, previous in saved.items():
            if previous is not None:
                PROCESS_TAS.register_gp(previous, loadable=key[1])
            elif lookup(key) is not None:
                PROCESS_TAS.unregister_gp(key[0], loadable=key[1])


@pytest.fixture(autouse=True)
def _qtee_ta_file_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the TA files named by ``qtee_ta_file`` markers; unregister afterwards."""
    marks = list(request.node.iter_markers("qtee_ta_file"))
    if not marks:
        yield
        return
    from qtee.secure import TaFileRegistration, register_ta_file

    regs: list[TaFileRegistration] = []
    try:
        for mark in reversed(marks):  # the closest (the function's) is registered last
            if len(mark.args) not in (1, 2) or set(mark.kwargs) - {"path", "sha256"}:
                pytest.fail(
                    f"{request.node.nodeid}: use @pytest.mark.qtee_ta_file(cls, path=None, "
                    f"sha256=None), not {mark!r}",
                    pytrace=False,
                )
            cls, *rest = mark.args
            path = rest[0] if rest else mark.kwargs.get("path")
            if path is not None:
                path = request.path.parent / path  # an absolute path stays as it is
            regs.append(register_ta_file(cls, path, sha256=mark.kwargs.get("sha256")))
        yield
    finally:
        for reg in reversed(regs):
            reg.unregister()

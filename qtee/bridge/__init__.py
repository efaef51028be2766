"""Unmodified C programs against the model: the preload bridge (``qtee run -- PROG``).

``libqtee_preload.so`` (built by ``make bridge`` from ``preload.c`` and ``embed.c``)
intercepts a program's opens of ``/dev/teeN`` / ``/dev/teeprivN`` and its ioctls on the
fds it hands out, and runs the model in the program's own process through an embedded
interpreter (:mod:`qtee.bridge._runtime`).  :func:`environment` gives the environment
that does it; ``qtee run`` (:mod:`qtee.bridge._cli`) sets it up, runs the program and
reports what the model still holds when it exits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

from objects import UsageError
from qtee.bridge._runtime import BridgeConfig

__all__ = ["LIBRARY", "BridgeConfig", "BridgeNotBuilt", "environment", "library_path"]

#: Where ``make bridge`` puts the preload library.
LIBRARY: Final = Path(__file__).resolve().parent / "libqtee_preload.so"


class BridgeNotBuilt(UsageError):
    """The preload library is not there (``make bridge`` builds it; it needs a C compiler
    and the Python headers)."""


def library_path() -> Path:
    """The built preload library; :class:`BridgeNotBuilt` says how to build it."""
    if not LIBRARY.is_file():
        raise BridgeNotBuilt(
            f"the preload bridge is not built ({LIBRARY} is missing): run `make bridge` "
            "(it needs a C compiler and the Python headers, python3-config --embed)"
        )
    return LIBRARY


def environment(
    config: BridgeConfig, base: dict[str, str] | None = None, *, search_first: str | None = None
) -> dict[str, str]:
    """The environment that runs a program against the model of ``config``: the preload
    library, the embedded interpreter's module path (this interpreter's, with qtee on
    it; ``search_first`` ahead of it, for TA modules) and the configuration."""
    if not isinstance(config, BridgeConfig):
        raise TypeError(f"config must be a BridgeConfig, not {type(config).__name__}")
    env = dict(os.environ if base is None else base)
    lib = str(library_path())
    preload = env.get("LD_PRELOAD", "")
    # After what is there already: a sanitizer's runtime must come first, and any place in
    # the list is ahead of libc.
    env["LD_PRELOAD"] = f"{preload} {lib}".strip() if lib not in preload.split() else preload
    root = str(Path(__file__).resolve().parent.parent.parent)  # where `import qtee` finds it
    path = [search_first] if search_first else []
    path += [root, *(p for p in sys.path if p and os.path.isdir(p))]
    env["QTEE_BRIDGE_PATH"] = os.pathsep.join(dict.fromkeys(path))
    env["QTEE_BRIDGE_HOME"] = sys.base_prefix
    env["QTEE_BRIDGE_CONFIG"] = config.to_json()
    return env

"""Where the suite's files are, for the tests that run programs or read files by path.

The test files sit in folders that mirror the packages (``tests/qcomtee/``, ``tests/remote/``,
...); the helpers they run as programs (``_server_peer.py``, ``_optee_peer.py``, the C
probes under ``c/``) and the TA modules served with ``--ta-module`` stay in ``tests/``.
"""

from __future__ import annotations

from pathlib import Path

#: The repository's root: the working directory of the subprocesses that import ``tests.*``.
REPO = Path(__file__).resolve().parents[1]
#: ``tests/`` itself: the shared helpers, the TA modules and ``c/``.
TESTS = REPO / "tests"

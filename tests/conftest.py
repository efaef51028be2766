"""Suite-wide set-up: the qtee pytest plugin, with its leak check after every test.

The plugin (``qtee.pytest_plugin``) comes from its ``pytest11`` entry point, which the
editable install provides; it is not named in ``pytest_plugins`` here, because the same
module registered under two names is an error.  Its autouse leak check is the teardown
half of HABITS.md "Tests" recipe 1 ("teardown closes everything and asserts the tables
are empty"), applied to every test: each ``qtee.Device`` and ``qtee.OpteeDevice`` built
while a test runs must have ``leaks() == {}`` once the test and its fixtures are done.
"""

from __future__ import annotations

import signal

import pytest

# A shell that starts a job in the background (`make test &`, `nohup ... &`) starts it
# with SIGINT ignored, and an ignored signal stays ignored across exec: every program the
# Ctrl-C tests start would then shrug SIGINT off.  A handler is not inherited (exec resets
# it to the default), so installing Python's own here gives the programs the default
# disposition a terminal gives them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    # Plugin autoload off (PYTEST_DISABLE_PLUGIN_AUTOLOAD): load the plugin ourselves,
    # unless it was loaded with `-p` or turned off with `-p no:qtee`.
    pm = config.pluginmanager
    if not (pm.has_plugin("qtee") or pm.has_plugin("qtee.pytest_plugin") or pm.is_blocked("qtee")):
        pm.import_plugin("qtee.pytest_plugin")

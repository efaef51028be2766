"""Suite-wide set-up: the qtee pytest plugin, with its leak check after every test.

The plugin (``qtee.pytest_plugin``) comes from its ``pytest11`` entry point, which the
editable install provides; it is not named in ``pytest_plugins`` here, because the same
module registered under two names is an error.  Its autouse leak check is the teardown
half of HABITS.md "Tests" recipe 1 ("teardown closes everything and asserts the tables
are empty"), applied to every test: each ``qtee.Device`` and ``qtee.OpteeDevice`` built
while a test runs must have ``leaks() == {}`` once the test and its fixtures are done.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Plugin autoload off (PYTEST_DISABLE_PLUGIN_AUTOLOAD): load the plugin ourselves,
    # unless it was loaded with `-p` or turned off with `-p no:qtee`.
    pm = config.pluginmanager
    if not (pm.has_plugin("qtee") or pm.has_plugin("qtee.pytest_plugin") or pm.is_blocked("qtee")):
        pm.import_plugin("qtee.pytest_plugin")

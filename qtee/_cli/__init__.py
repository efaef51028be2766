"""The ``qtee`` command line: ``verbs`` (the parser and each verb), ``ta`` (``qtee ta
sign``), ``ta_modules`` (the ``--ta-module`` option and its values), ``info`` and
``trace`` (what ``qtee info`` and ``qtee trace`` show, also asked by the driver and the
server), ``demo``.  ``qtee/__main__.py`` is the entry point; ``qtee run``, ``qtee vm`` and
``qtee supplicant`` live with their packages (``qtee.bridge``, ``qtee.vm``, ``supplicant``).
"""

"""The process boundary: a device served over a Unix socket and the client end of it.

``frames`` is the protocol (sans-IO); ``server``, ``server_conn``, ``server_optee`` and
``region_memory`` serve a device; ``remote``, ``checks`` and ``remote_optee`` are the
client's side.  The public names are re-exported by :mod:`qtee`.
"""

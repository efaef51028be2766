"""How each half of a :class:`~qtee._remote.remote.RemoteContext` sends a request: one
frame under the send lock, with the next ``seq``.

An ioctl, a query, a ``watch`` and a ``shm_free`` all go this way.  A frame over the
limit is E2BIG and sends nothing; a send that fails part way loses the connection (the
stream is no use any more), and the reader's last word says why.
"""

from __future__ import annotations

import errno
import itertools
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from objects import DriverError, UsageError

if TYPE_CHECKING:
    from qtee._remote.remote import RemoteDevice

__all__ = ["RemoteSender"]


class RemoteSender:
    """The request sender of :class:`~qtee._remote.remote.RemoteContext` (a mixin: the
    context owns the attributes declared here)."""

    sock: socket.socket
    device: RemoteDevice
    _send: threading.Lock
    _seq: itertools.count[int]
    _lock: threading.Lock
    _lost: str | None

    def _abandon(self, reason: str) -> None:
        raise NotImplementedError

    def _await_reader(self) -> None:
        raise NotImplementedError

    def _request(
        self,
        frame_of: Callable[..., bytes],
        waiting: dict[int, Any] | None = None,
        entry: object = None,
        *args: Any,
    ) -> int:
        """Send the frame ``frame_of(seq, *args)`` of the next request; its seq.  With
        ``waiting``, ``entry`` is filed there under the seq first (so no answer can beat it)
        and taken out again if the frame cannot be sent."""
        with self._send:
            seq = next(self._seq)
            with self._lock:
                if self._lost is not None:
                    raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
                if waiting is not None:
                    waiting[seq] = entry
            try:
                self.sock.sendall(frame_of(seq, *args))
            except (OSError, UsageError) as exc:
                if waiting is not None:
                    with self._lock:
                        waiting.pop(seq, None)
                if isinstance(exc, UsageError):  # over the frame limit: nothing was sent
                    raise DriverError(errno.E2BIG, str(exc)) from None
                # Part of the frame may have gone: the stream is no use any more.
                if isinstance(exc, BlockingIOError):  # SO_SNDTIMEO: the server reads nothing
                    reason = f"the server read nothing for {self.device.call_timeout:g} s"
                    self._abandon(reason)
                    raise DriverError(errno.ETIMEDOUT, reason) from None
                self._await_reader()  # the server's last word (a bye) says more than EPIPE
                self._abandon(f"send failed: {exc}")
                raise DriverError(errno.EBADF, f"connection lost: {self._lost}") from None
        return seq

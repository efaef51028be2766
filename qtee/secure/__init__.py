"""The secure world model: QTEE's object table, root, client env and services.

It consumes byte-exact inbound messages, writes responses in place, piggybacks async
RELEASE messages on the outbound buffer, and calls back into non-secure objects through
an outbound callback message that the driver serves in the same thread.
"""

from qtee.secure._world import NsObject, SecureObject, SecureWorld, ServeCallback

__all__ = ["NsObject", "SecureObject", "SecureWorld", "ServeCallback"]

"""qtee -- Qualcomm's TEE as the Linux qcomtee driver sees it, in Python.

``import qtee`` is the public API: the codecs (:mod:`qtee.wire`, :mod:`qtee.uapi`),
the address spaces, and the error types shared with :mod:`objects`.
"""

from objects import DecodeError, DriverError, QteeBaseError, QteeError, Result, UsageError
from qtee import uapi, wire
from qtee.addrspace import AddressSpace, CheckedMemory, ProcessMemory, address_of

__version__ = "0.1.0"

__all__ = [
    "AddressSpace",
    "CheckedMemory",
    "DecodeError",
    "DriverError",
    "ProcessMemory",
    "QteeBaseError",
    "QteeError",
    "Result",
    "UsageError",
    "__version__",
    "address_of",
    "uapi",
    "wire",
]

"""qtee -- Qualcomm's TEE as the Linux qcomtee driver sees it, in Python.

``import qtee`` is the public API: the device and its contexts, the client API, the
secure world with its services and Python TAs, the codecs (:mod:`qtee.wire`,
:mod:`qtee.uapi`), the address spaces, and the error types shared with :mod:`objects`.
"""

from objects import DecodeError, DriverError, QteeBaseError, QteeError, Result, UsageError, op
from qtee import uapi, wire
from qtee._driver import Context, Device
from qtee._optee import OpteeContext, OpteeDevice
from qtee._remote import ConnectError, RemoteContext, RemoteDevice, connect
from qtee._server import DeviceServer
from qtee.addrspace import AddressSpace, CheckedMemory, ProcessMemory, address_of
from qtee.client import OUT_OBJECT, CallbackObject, Client, MemoryObject, ObjRef, Out
from qtee.credentials import CredentialKey, Credentials
from qtee.secure import (
    IIO,
    IAppController,
    IAppLoader,
    IDiagnostics,
    IGPAppClient,
    IGPSession,
    IOpener,
    IRegisterListenerCBO,
    IRegisterTABufCBO,
    NsObject,
    QteeRoot,
    SecureObject,
    SecureWorld,
    TrustedApp,
    register_ta,
    register_ta_file,
    ta_image,
)

__version__ = "0.1.0"

__all__ = [
    "OUT_OBJECT",
    "AddressSpace",
    "CallbackObject",
    "CheckedMemory",
    "Client",
    "ConnectError",
    "Context",
    "CredentialKey",
    "Credentials",
    "DecodeError",
    "Device",
    "DeviceServer",
    "OpteeContext",
    "OpteeDevice",
    "DriverError",
    "IAppController",
    "IAppLoader",
    "IDiagnostics",
    "IGPAppClient",
    "IGPSession",
    "IIO",
    "IOpener",
    "IRegisterListenerCBO",
    "IRegisterTABufCBO",
    "MemoryObject",
    "NsObject",
    "ObjRef",
    "Out",
    "ProcessMemory",
    "QteeBaseError",
    "QteeError",
    "QteeRoot",
    "RemoteContext",
    "RemoteDevice",
    "Result",
    "SecureObject",
    "SecureWorld",
    "TrustedApp",
    "UsageError",
    "__version__",
    "address_of",
    "connect",
    "op",
    "register_ta",
    "register_ta_file",
    "ta_image",
    "uapi",
    "wire",
]

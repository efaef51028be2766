"""qtee -- Qualcomm's TEE as the Linux qcomtee driver sees it, in Python.

``import qtee`` is the public API: the device and its contexts, the client API, the
secure world with its services and Python TAs (QTEE TAs and GP TAs, with GP trusted
storage), the codecs (:mod:`qtee.wire`, :mod:`qtee.uapi`), the address spaces, and the
error types shared with :mod:`objects`.  The GP client API is :mod:`qtee.gp`; the rest
of the secure world is :mod:`qtee.secure`.
"""

from objects import (
    DecodeError,
    DriverError,
    QteeBaseError,
    QteeError,
    UsageError,
    op,
    publish_errors,
)
from qtee import uapi, wire
from qtee._optee import storage as _storage
from qtee._optee.core import OpteeContext, OpteeDevice
from qtee._optee.storage import *  # noqa: F403  (its __all__, re-exported below)
from qtee._optee.supp import OpteeSuppContext
from qtee._optee.supp_plugin import invoke_supp_plugin
from qtee._qcomtee.call import Context
from qtee._qcomtee.core import Device
from qtee._qcomtee_msg import MAX_ARGS_PER_KIND, USERSPACE_ONLY_RESULTS, Counts, Result
from qtee._remote.connect_errors import ConnectError
from qtee._remote.remote import RemoteContext, RemoteDevice, connect
from qtee._remote.server import DeviceServer
from qtee.addrspace import AddressSpace, CheckedMemory, ProcessMemory, SharedSpace, address_of
from qtee.client import (
    OUT_OBJECT,
    ArgBlock,
    CallbackObject,
    Client,
    ExportTable,
    MemoryObject,
    ObjRef,
    Out,
    Transfer,
)
from qtee.credentials import CredentialKey, Credentials
from qtee.secure import (
    NsObject,
    QteeRoot,
    SecureObject,
    SecureWorld,
    TrustedApp,
    _gp,
    _interface_errors,
    register_ta,
    register_ta_file,
    ta_image,
    unregister_ta,
)
from qtee.secure._gp import *  # noqa: F403  (the GP TA author's API: its __all__)
from qtee.secure._interface_errors import *  # noqa: F403  (each interface's errors)

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
    "ArgBlock",
    "ExportTable",
    "USERSPACE_ONLY_RESULTS",
    "MAX_ARGS_PER_KIND",
    "Counts",
    "SecureObject",
    "SecureWorld",
    "SharedSpace",
    "Transfer",
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
    "OpteeSuppContext",
    "unregister_ta",
    "invoke_supp_plugin",
]
__all__ += _gp.__all__
__all__ += _interface_errors.__all__
__all__ += _storage.__all__  # GP trusted storage: its constants, classes and entry point

publish_errors("qtee", globals(), __all__)

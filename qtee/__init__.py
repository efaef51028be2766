"""qtee -- Qualcomm's TEE as the Linux qcomtee driver sees it, in Python.

``import qtee`` is the public API: the device and its contexts, the client API, the
secure world with its services and Python TAs (QTEE TAs and GP TAs, with GP trusted
storage), the codecs (:mod:`qtee.wire`, :mod:`qtee.uapi`), the address spaces, and the
error types shared with :mod:`objects`.  The GP client API is :mod:`qtee.gp`; the rest
of the secure world is :mod:`qtee.secure`.
"""

from objects import DecodeError, DriverError, QteeBaseError, QteeError, Result, UsageError, op
from qtee import uapi, wire
from qtee._driver import Context, Device
from qtee._optee import OpteeContext, OpteeDevice
from qtee._optee_supp import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_ACCESS_WRITE_META,
    TEE_DATA_FLAG_OVERWRITE,
    TEE_DATA_FLAG_SHARE_READ,
    TEE_DATA_FLAG_SHARE_WRITE,
    TEE_DATA_SEEK_CUR,
    TEE_DATA_SEEK_END,
    TEE_DATA_SEEK_SET,
    TEE_STORAGE_PRIVATE,
    TEE_STORAGE_PRIVATE_REE,
    OpteeSuppContext,
    PersistentObject,
    TrustedStorage,
    trusted_storage,
)
from qtee._remote import RemoteContext, RemoteDevice, connect
from qtee._server import DeviceServer
from qtee.addrspace import AddressSpace, CheckedMemory, ProcessMemory, address_of
from qtee.client import OUT_OBJECT, CallbackObject, Client, MemoryObject, ObjRef, Out, Transfer
from qtee.credentials import CredentialKey, Credentials
from qtee.secure import (
    TEE_TIMEOUT_INFINITE,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    NsObject,
    QteeRoot,
    SecureObject,
    SecureWorld,
    TaPanic,
    TaSession,
    TeeParamType,
    TrustedApp,
    gp_ta_image,
    panic,
    register_gp_ta,
    register_loadable_ta,
    register_ta,
    register_ta_file,
    ta_image,
    tee_param_types,
    unregister_gp_ta,
    unregister_loadable_ta,
    unregister_ta,
)

__version__ = "0.1.0"

__all__ = [
    "OUT_OBJECT",
    "AddressSpace",
    "CallbackObject",
    "CheckedMemory",
    "Client",
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
    "SecureObject",
    "SecureWorld",
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
    "TEE_TIMEOUT_INFINITE",
    "GpParam",
    "GpSession",
    "GpTA",
    "GpTaError",
    "TaPanic",
    "TaSession",
    "TeeParamType",
    "gp_ta_image",
    "panic",
    "register_gp_ta",
    "register_loadable_ta",
    "tee_param_types",
    "unregister_gp_ta",
    "unregister_loadable_ta",
    "unregister_ta",
    "TEE_DATA_FLAG_ACCESS_READ",
    "TEE_DATA_FLAG_ACCESS_WRITE",
    "TEE_DATA_FLAG_ACCESS_WRITE_META",
    "TEE_DATA_FLAG_OVERWRITE",
    "TEE_DATA_FLAG_SHARE_READ",
    "TEE_DATA_FLAG_SHARE_WRITE",
    "TEE_DATA_SEEK_CUR",
    "TEE_DATA_SEEK_END",
    "TEE_DATA_SEEK_SET",
    "TEE_STORAGE_PRIVATE",
    "TEE_STORAGE_PRIVATE_REE",
    "PersistentObject",
    "TrustedStorage",
    "trusted_storage",
]

"""The public surface changes only on purpose (a curated API, as trio does it)."""

from __future__ import annotations

import objects
import qtee

QTEE_API = {
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
}

OBJECTS_API = {
    "ENOTSUPP",
    "INT_MAX",
    "MAX_ARGS_PER_KIND",
    "USERSPACE_ONLY_RESULTS",
    "Arg",
    "ArgType",
    "Counts",
    "CyclicAllocator",
    "DecodeError",
    "DriverError",
    "Grouped",
    "IdrAllocator",
    "InBuffer",
    "InObject",
    "ObjectTable",
    "OpSpec",
    "PyObject",
    "DispatchResult",
    "op",
    "OutBuffer",
    "OutObject",
    "QteeBaseError",
    "QteeError",
    "RefcountError",
    "Refcounted",
    "Result",
    "UsageError",
    "errno_name",
    "group_args",
    "result_from_u32",
    "result_name",
    "result_to_u32",
}


def test_qtee_public_surface() -> None:
    assert set(qtee.__all__) == QTEE_API
    for name in qtee.__all__:
        assert hasattr(qtee, name), name


def test_objects_public_surface() -> None:
    assert set(objects.__all__) == OBJECTS_API
    for name in objects.__all__:
        assert hasattr(objects, name), name


def test_error_channels_are_distinct() -> None:
    # DESIGN: one root; errno channel is an OSError; result channel is not.
    assert issubclass(qtee.DriverError, OSError)
    assert not issubclass(qtee.QteeError, OSError)
    assert issubclass(qtee.DriverError, qtee.QteeBaseError)
    assert issubclass(qtee.QteeError, qtee.QteeBaseError)
    assert qtee.DriverError is objects.DriverError


SUPPLICANT_API = {
    "FS_LISTENER_ID",
    "TIME_LISTENER_ID",
    "FileStore",
    "FsError",
    "ListenerObject",
    "OpteeSupplicant",
    "Supplicant",
    "TaBufferObject",
    "TaDirectory",
    "TimeService",
    "WorkerPool",
    "format_uuid",
}


def test_supplicant_public_surface() -> None:
    import supplicant

    assert set(supplicant.__all__) == SUPPLICANT_API
    for name in supplicant.__all__:
        assert hasattr(supplicant, name), name
    assert (supplicant.TIME_LISTENER_ID, supplicant.FS_LISTENER_ID) == (0xB, 0xA)

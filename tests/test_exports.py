"""The public surface changes only on purpose (a curated API, as trio does it).

Issue 15 ("Defaults and one public API"): every name a TA author, a GP client or a
supplicant developer touches is listed here, importable from its package, and
documented.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

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
    # GP TAs (a TA author writes against these) and the OP-TEE supplicant's context.
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
    # GP trusted storage, for GP TAs.
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
    "TEE_STORAGE_PRIVATE_RPMB",
    "PersistentObject",
    "TrustedStorage",
    "trusted_storage",
    "invoke_supp_plugin",
}

SECURE_API = {
    "GpfsClient",
    "GpfsError",
    "RpmbClient",
    "RpmbError",
    "TEE_ALG_ECDSA_SHA256",
    "TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256",
    "TEE_ALG_RSASSA_PKCS1_V1_5_SHA256",
    "default_model_key",
    "rpmb_huk",
    "set_rpmb_huk",
    "APP_LOADER_UID",
    "AppController",
    "AppLoader",
    "TrustedApp",
    "register_ta",
    "ta_image",
    "unregister_ta",
    "TaFileRegistration",
    "register_ta_file",
    "CDIAGNOSTICS_UID",
    "FEATURE_VERSIONS_UID",
    "IOPENER_ERROR_NOT_FOUND",
    "ClientEnv",
    "Diagnostics",
    "FeatureVersions",
    "Mapping",
    "NsObject",
    "QteeRoot",
    "SecureMonitor",
    "SecureObject",
    "SecureWorld",
    "ServeCallback",
    # per-world TA registries, IGPAppClient, the listener services' UIDs
    "TaRegistry",
    "CGPAPPCLIENT_UID",
    "REGISTER_LISTENER_UID",
    "REGISTER_TA_BUF_UID",
    "install_gp_app_client",
    # GP TAs
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
    # each interface's errors
    "IAppController",
    "IAppLoader",
    "IDiagnostics",
    "IGPAppClient",
    "IGPSession",
    "IIO",
    "IOpener",
    "IRegisterListenerCBO",
    "IRegisterTABufCBO",
}

GP_API = {
    "NIL_UUID",
    "SIZE_MAX",
    "TA_FLAG_PROPERTIES",
    "TEEC_CONFIG_PAYLOAD_REF_COUNT",
    "TEE_CLIENT_UUID_NS",
    "TEE_LOGIN_REE_KERNEL_MAX",
    "TEE_LOGIN_REE_KERNEL_MIN",
    "Cred",
    "MemrefUpdate",
    "NeedTempShm",
    "RegisteredMemref",
    "SharedMemory",
    "TaFlag",
    "TeecError",
    "TeecLogin",
    "TeecMemFlag",
    "TeecOrigin",
    "TeecParam",
    "TeecParamType",
    "TeecParamTypeError",
    "TeecResult",
    "TempMemref",
    "Value",
    "ValueUpdate",
    "calc_client_uuid",
    "check_partial_bounds",
    "check_user_login",
    "errno_to_result",
    "gid_connection_data",
    "is_ree_kernel_login",
    "name_of",
    "param_type_get",
    "param_types",
    "post_process_operation",
    "post_process_param",
    "pre_process_operation",
    "pre_process_param",
    "unpack_param_types",
    "uuid_v5",
    "GpTransport",
    "OpteeTransport",
    "TEEC_MAX_DEV_SEQ",
    "TeecContext",
    "TeecOperation",
    "TeecParameter",
    "TeecRegisteredMemoryReference",
    "TeecSession",
    "TeecSharedMemory",
    "TeecTempMemoryReference",
    "TeecValue",
}

OBJECTS_API = {
    "ENOTSUPP",
    "INT_MAX",
    "CyclicAllocator",
    "DecodeError",
    "DriverError",
    "IdrAllocator",
    "ObjectResult",
    "ObjectTable",
    "OpSpec",
    "PyObject",
    "DispatchResult",
    "op",
    "QteeBaseError",
    "QteeError",
    "RefcountError",
    "Refcounted",
    "UsageError",
    "canonical_result",
    "errno_name",
    "publish_errors",
    "register_results",
    "result_from_u32",
    "result_name",
    "result_to_u32",
}


def test_qtee_public_surface() -> None:
    assert set(qtee.__all__) == QTEE_API
    for name in qtee.__all__:
        assert hasattr(qtee, name), name


def test_secure_public_surface() -> None:
    import qtee.secure

    assert set(qtee.secure.__all__) == SECURE_API


def test_gp_public_surface() -> None:
    import qtee.gp

    assert set(qtee.gp.__all__) == GP_API


def test_what_qtee_and_qtee_secure_both_offer_is_one_object() -> None:
    """A GP TA author may import from ``qtee`` or ``qtee.secure``: the same objects."""
    import qtee.secure

    for name in set(qtee.__all__) & set(qtee.secure.__all__):
        assert getattr(qtee, name) is getattr(qtee.secure, name), name


PACKAGES = ["qtee", "qtee.secure", "qtee.gp", "objects", "objects.idl", "supplicant"]


def _documented(value: object) -> bool:
    """A class, function or module with a docstring of its own (not inherited)."""
    doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
    return isinstance(doc, str) and bool(doc.strip())


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_imports_and_is_documented(package: str) -> None:
    """``from package import name`` works for each name in ``__all__``, without
    duplicates, and every class, function and module among them has a docstring of its
    own (constants are documented where they are defined)."""
    module: ModuleType = importlib.import_module(package)
    names = list(module.__all__)
    assert len(names) == len(set(names)), "a name is listed twice"
    undocumented = []
    for name in names:
        namespace: dict[str, object] = {}
        exec(f"from {package} import {name}", namespace)
        value = namespace[name]
        code = inspect.isclass(value) or inspect.isroutine(value) or inspect.ismodule(value)
        if code and not _documented(value):
            undocumented.append(name)
    assert undocumented == []


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
    "GPFS_BUFFER_SIZE",
    "GPFS_LISTENER_ID",
    "RPMB_BUFFER_SIZE",
    "RPMB_LISTENER_ID",
    "TIME_LISTENER_ID",
    "FileStore",
    "FsError",
    "GpfsService",
    "RpmbService",
    "ListenerObject",
    "OpteeSupplicant",
    "RPMB_FRAME_SIZE",
    "EmulatedRpmb",
    "RpmbFileError",
    "RpmbFrame",
    "RpmbFrameError",
    "RpmbMsgType",
    "RpmbRequestError",
    "RpmbResult",
    "SuppPlugin",
    "Supplicant",
    "TaBufferObject",
    "TaDirectory",
    "TimeService",
    "WorkerPool",
    "format_uuid",
    "frame_mac",
    "plugin_from_spec",
}


def test_supplicant_public_surface() -> None:
    import supplicant

    assert set(supplicant.__all__) == SUPPLICANT_API
    for name in supplicant.__all__:
        assert hasattr(supplicant, name), name
    assert (supplicant.TIME_LISTENER_ID, supplicant.FS_LISTENER_ID) == (0xB, 0xA)


def test_exported_exceptions_name_a_public_home() -> None:
    """Issue 15: tracebacks say ``objects.QteeError``, ``qtee.gp.TeecError``, not a
    private module; that home exports the class under its name, so pickling by
    reference finds it."""
    import importlib
    import pickle

    seen = 0
    for pkg in (
        "objects",
        "objects.idl",
        "qtee",
        "qtee.secure",
        "qtee.gp",
        "qtee.vm",
        "supplicant",
    ):
        module = importlib.import_module(pkg)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (isinstance(obj, type) and issubclass(obj, BaseException)):
                continue
            seen += 1
            home = importlib.import_module(obj.__module__)
            assert not any(p.startswith("_") for p in obj.__module__.split(".")), obj
            assert getattr(home, obj.__qualname__) is obj
            assert name in home.__all__
            assert pickle.loads(pickle.dumps(obj)) is obj
    assert seen >= 12

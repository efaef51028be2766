"""The GlobalPlatform TEE Client API (libteec) and what it rests on.

:class:`TeecContext` (``TEEC_InitializeContext``) takes an OP-TEE device, a QTEE device
(through IGPAppClient), a served device of either kind or a :class:`qtee.Client`;
sessions, operations and shared memory follow libteec (:mod:`qtee.gp._client`,
:mod:`qtee.gp._operation`, :mod:`qtee.gp._shared_memory`).  Every
failure is a :class:`TeecError` with ``code`` and ``origin``.  Sans-IO beneath it:
:mod:`qtee.gp._defs` has the GP/OP-TEE constants, :mod:`qtee.gp._params` libteec's
pre/post-processing of an operation's params, :mod:`qtee.gp._identity` the kernel's
client-UUID rules.
"""

from __future__ import annotations

from objects import publish_errors as _publish_errors
from qtee.gp._client import TEEC_MAX_DEV_SEQ, TeecContext, TeecSession
from qtee.gp._defs import (
    TA_FLAG_PROPERTIES,
    TEE_LOGIN_REE_KERNEL_MAX,
    TEE_LOGIN_REE_KERNEL_MIN,
    TEEC_CONFIG_PAYLOAD_REF_COUNT,
    TaFlag,
    TeecError,
    TeecLogin,
    TeecMemFlag,
    TeecOrigin,
    TeecParamType,
    TeecParamTypeError,
    TeecResult,
    errno_to_result,
    is_ree_kernel_login,
    name_of,
    param_type_get,
    param_types,
    unpack_param_types,
)
from qtee.gp._identity import (
    NIL_UUID,
    TEE_CLIENT_UUID_NS,
    Cred,
    calc_client_uuid,
    check_user_login,
    gid_connection_data,
    uuid_v5,
)
from qtee.gp._operation import (
    TeecOperation,
    TeecParameter,
    TeecRegisteredMemoryReference,
    TeecTempMemoryReference,
    TeecValue,
)
from qtee.gp._params import (
    SIZE_MAX,
    MemrefUpdate,
    NeedTempShm,
    RegisteredMemref,
    SharedMemory,
    TeecParam,
    TempMemref,
    Value,
    ValueUpdate,
    check_partial_bounds,
    post_process_operation,
    post_process_param,
    pre_process_operation,
    pre_process_param,
)
from qtee.gp._shared_memory import TeecSharedMemory
from qtee.gp._transport import GpTransport, OpteeTransport

__all__ = [
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
]

_publish_errors("qtee.gp", globals(), __all__)

"""objects -- the generic object-capability core of qtee (no QTEE wire in it).

Result codes, the exception hierarchy, kernel-like id allocators, invocation
arguments and the counts word, refcounted entries and object tables.
"""

from objects._args import (
    MAX_ARGS_PER_KIND,
    Arg,
    ArgType,
    Counts,
    Grouped,
    InBuffer,
    InObject,
    OutBuffer,
    OutObject,
    group_args,
)
from objects._errors import (
    ENOTSUPP,
    DecodeError,
    DriverError,
    QteeBaseError,
    QteeError,
    UsageError,
    errno_name,
)
from objects._errors import publish_errors as _publish_errors
from objects._ids import INT_MAX, CyclicAllocator, IdrAllocator
from objects._optable import DispatchResult, OpSpec, PyObject, op
from objects._refs import ObjectTable, Refcounted, RefcountError
from objects._results import (
    USERSPACE_ONLY_RESULTS,
    Result,
    result_from_u32,
    result_name,
    result_to_u32,
)

__all__ = [
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
]

_publish_errors("objects", globals(), __all__)

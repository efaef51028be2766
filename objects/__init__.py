"""objects -- the generic object-capability core of qtee (no transport in it).

The generic result codes (a transport registers its own), the exception hierarchy,
kernel-like id allocators, refcounted entries and object tables, and objects written in
Python with a declarative op table.
"""

from objects._errors import (
    ENOTSUPP,
    DecodeError,
    DriverError,
    QteeBaseError,
    QteeError,
    UsageError,
    errno_name,
    publish_errors,
)
from objects._ids import INT_MAX, CyclicAllocator, IdrAllocator
from objects._optable import DispatchResult, OpSpec, PyObject, op
from objects._refs import ObjectTable, Refcounted, RefcountError
from objects._results import (
    ObjectResult,
    canonical_result,
    register_results,
    result_from_u32,
    result_name,
    result_to_u32,
)

__all__ = [
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
]

publish_errors("objects", globals(), __all__)

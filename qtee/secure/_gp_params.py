"""What a GP TA entry takes and how it ends: the four params (``TEE_Param`` and their
types, checked and copied as OP-TEE's ``copy_in_params``/``copy_out_param`` do), the
TA's own error (:class:`GpTaError`) and ``TEE_Panic`` (:class:`TaPanic`, :func:`panic`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from objects import UsageError
from qtee.gp import _codes as teec
from qtee.gp._defs import _U32
from qtee.secure._gp_session import _current_entry

__all__ = [
    "IN_VALUE_TYPES",
    "MEMREF_TYPES",
    "OUT_MEMREF_TYPES",
    "OUT_VALUE_TYPES",
    "TEE_NUM_PARAMS",
    "VALUE_TYPES",
    "GpParam",
    "GpTaError",
    "TaPanic",
    "TeeParamType",
    "gp_params",
    "panic",
    "tee_param_types",
]

TEE_NUM_PARAMS: Final = 4


class TeeParamType(enum.IntEnum):
    """``TEE_PARAM_TYPE_*``: what a TA sees, one nibble per param in ``types``."""

    TEE_PARAM_TYPE_NONE = 0
    TEE_PARAM_TYPE_VALUE_INPUT = 1
    TEE_PARAM_TYPE_VALUE_OUTPUT = 2
    TEE_PARAM_TYPE_VALUE_INOUT = 3
    TEE_PARAM_TYPE_MEMREF_INPUT = 5
    TEE_PARAM_TYPE_MEMREF_OUTPUT = 6
    TEE_PARAM_TYPE_MEMREF_INOUT = 7


#: The types by kind and direction (IGPAppClient's ``paramTypes`` nibbles are these too).
VALUE_TYPES: Final = frozenset({1, 2, 3})
IN_VALUE_TYPES: Final = frozenset({1, 3})
OUT_VALUE_TYPES: Final = frozenset({2, 3})
MEMREF_TYPES: Final = frozenset({5, 6, 7})
OUT_MEMREF_TYPES: Final = frozenset({6, 7})


def tee_param_types(p0: int = 0, p1: int = 0, p2: int = 0, p3: int = 0) -> int:
    """``TEE_PARAM_TYPES(p0, p1, p2, p3)``; a nibble that is no TEE type raises ValueError."""
    word = 0
    for i, t in enumerate((p0, p1, p2, p3)):
        word |= TeeParamType(t) << (4 * i)
    return word


@dataclass(slots=True, eq=False)
class GpParam:
    """One of a TA's four params (``TEE_Param`` plus its type), mutable by the TA.

    Values: ``a``, ``b`` (u32).  Memrefs: ``buffer`` is the shared bytes (writable for
    OUTPUT/INOUT, ``None`` for a NULL memref) and ``size`` its size, which the TA may
    set (the required size, with ``TEE_ERROR_SHORT_BUFFER``).
    """

    type: int = 0
    a: int = 0
    b: int = 0
    buffer: memoryview | None = None
    size: int = 0


def _is_u32(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U32


def gp_params(types: int, params: Sequence[GpParam]) -> list[GpParam]:
    """Check a call's params and build the four the TA sees (``copy_in_params``).

    ``types`` must hold TEE types only, agree with each ``params[i].type`` and name NONE
    for every missing param; at most four params; values are u32; a memref's ``size``
    fits its buffer and an output buffer is writable.  Anything else raises
    ``GpTaError(TEE_ERROR_BAD_PARAMETERS)``.  The TA gets copies: values and sizes reach
    the caller only through :func:`_copy_out`, buffers are shared (INPUT read-only).
    """
    if not _is_u32(types) or types >> (4 * TEE_NUM_PARAMS) or len(params) > TEE_NUM_PARAMS:
        raise GpTaError(teec.BAD_PARAMETERS, f"param types {types!r} with {len(params)} params")
    out: list[GpParam] = []
    for i in range(TEE_NUM_PARAMS):
        t = (types >> (4 * i)) & 0xF
        p = params[i] if i < len(params) else None
        if p is None:
            if t:
                raise GpTaError(teec.BAD_PARAMETERS, f"param {i}: type {t} but no param")
            out.append(GpParam())
            continue
        if not isinstance(p, GpParam) or p.type != t:
            raise GpTaError(
                teec.BAD_PARAMETERS, f"param {i}: param types say {t}, the param is {p!r}"
            )
        if t == 0:
            out.append(GpParam())
        elif t in VALUE_TYPES:
            if not (_is_u32(p.a) and _is_u32(p.b)):
                raise GpTaError(teec.BAD_PARAMETERS, f"param {i}: a value is two u32s")
            out.append(GpParam(t, p.a, p.b))
        elif t in MEMREF_TYPES:
            out.append(GpParam(t, buffer=_ta_view(t, p), size=p.size))
        else:
            raise GpTaError(teec.BAD_PARAMETERS, f"param {i}: {t} is no TEE param type")
    return out


def _ta_view(t: int, p: GpParam) -> memoryview | None:
    if not isinstance(p.size, int) or isinstance(p.size, bool) or p.size < 0:
        raise GpTaError(teec.BAD_PARAMETERS, f"a memref size of {p.size!r}")
    if p.buffer is None:
        return None  # a NULL memref: any size (the short-buffer size query)
    try:
        view = memoryview(p.buffer)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError):
        raise GpTaError(teec.BAD_PARAMETERS, "a memref buffer is no buffer of bytes") from None
    if p.size > len(view):
        raise GpTaError(teec.BAD_PARAMETERS, f"a memref of {p.size} bytes over {len(view)} bytes")
    if t in OUT_MEMREF_TYPES and view.readonly:
        raise GpTaError(teec.BAD_PARAMETERS, "an output memref over read-only bytes")
    view = view[: p.size]
    return view if t in OUT_MEMREF_TYPES else view.toreadonly()


def _copy_out(params: Sequence[GpParam], ta: Sequence[object]) -> None:
    """``copy_out_param``: output values and output memref sizes, whatever the result."""
    for p, q in zip(params, ta, strict=False):
        if not isinstance(q, GpParam):
            continue
        if p.type in OUT_VALUE_TYPES:
            if isinstance(q.a, int):
                p.a = q.a & _U32
            if isinstance(q.b, int):
                p.b = q.b & _U32
        elif p.type in OUT_MEMREF_TYPES and isinstance(q.size, int) and q.size >= 0:
            p.size = q.size


class GpTaError(Exception):
    """Raised by a TA entry point to return ``code`` (a ``TEE_Result``), origin TA.

    ``detail`` (model-only) says why; the client sees it in the
    :class:`~qtee.gp.TeecError`'s ``detail``."""

    code: int
    detail: str

    def __init__(self, code: int, detail: str = "") -> None:
        if not _is_u32(code):
            raise ValueError(f"a TEE_Result is a u32, not {code!r}")
        self.code = int(code)
        self.detail = str(detail)
        super().__init__(f"0x{code:08X}: {detail}" if detail else f"0x{code:08X}")


class TaPanic(BaseException):
    """``TEE_Panic(code)`` on its way out of a TA entry (see :func:`panic`).

    A ``BaseException``, so that a TA's own ``except Exception`` cannot swallow it:
    ``TEE_Panic`` never returns.
    """

    code: int

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"TEE_Panic(0x{code:08X})")


def panic(code: int = 0) -> NoReturn:
    """``TEE_Panic(code)``: end the calling TA for good, from inside one of its entry
    points.

    The entry's caller gets ``TEE_ERROR_TARGET_DEAD`` (origin TEE), and so does every
    later call on the instance; a single-instance TA leaves the UUID lookup (unless
    keep-crashed), so the next open makes a new instance.  No close or destroy entry
    runs in it again.  ``code`` (a u32) is only logged, as OP-TEE only prints it.
    Outside a TA entry: :class:`~objects.UsageError`.
    """
    if not _is_u32(code):
        raise UsageError(f"a panic code is a u32, not {code!r}")
    if _current_entry() is None:
        raise UsageError("panic() works only inside a GP TA's entry point")
    raise TaPanic(int(code))

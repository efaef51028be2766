"""How libteec reports what it refuses itself, and a failed ioctl (sans-IO).

A ``TEEC_Result`` libteec answers before any ioctl has origin API (:func:`_api`,
:func:`_bad`); a failed ioctl is the errno mapped by ``ioctl_errno_to_res``, origin
COMMS (:func:`_comms`).
"""

from __future__ import annotations

from objects import DriverError
from qtee.gp._defs import TeecError, TeecOrigin, TeecResult, errno_to_result

__all__: list[str] = []


def _api(code: int, detail: str) -> TeecError:
    return TeecError(code, TeecOrigin.TEEC_ORIGIN_API, detail)


def _bad(detail: str) -> TeecError:
    return _api(TeecResult.TEEC_ERROR_BAD_PARAMETERS, detail)


def _comms(exc: DriverError, what: str) -> TeecError:
    """A failed ioctl: libteec's ``ioctl_errno_to_res``, origin COMMS."""
    return TeecError(errno_to_result(exc.code), TeecOrigin.TEEC_ORIGIN_COMMS, f"{what}: {exc}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

"""The SMC boundary between the driver model and the secure side (QK §3.1, OP §6.1).

Sans-IO: function ids, return codes and the shape of a conduit; no threads, no state.

The driver reaches QTEE with SMC-shaped calls: ``INVOKE(in_pa, in_size, out_pa,
out_size)`` and ``CB_RSP(out_pa, out_size)``; each returns ``a0`` = response type and
``a1`` = result.  Type 3 (``QCOMTEE_RESULT_INBOUND_REQ_NEEDED``) means a callback request
waits in the outbound buffer; the kernel serves it and answers with CB_RSP, in the same
thread, until a final return (QK §4.1 step 6).  A :class:`SmcConduit` delivers each
type-3 return by calling ``on_return`` on the caller's thread; what ``on_return``
returns is the next SMC, ``(CB_RSP, out_pa, out_size)``.  That is the kernel's loop
expressed as a nested call, so a callback costs no thread handoff.

Registers are plain ints and tuples (the invoke hot path makes no record per call).  A
conduit that cannot complete a call raises :class:`objects.DriverError` with the errno,
as ``qcom_scm_call`` returns ``-errno``.

Client ids go in ``a7``; 0 is the hypervisor (host).  QTEE's sheet (QK) has no VM
lifecycle and no client id, so the model borrows OP-TEE's (OP §6.1) for its own
``QTEE_MODEL_VM_CREATED``/``QTEE_MODEL_VM_DESTROYED`` calls: those two ids are the
model's, not Qualcomm's.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

__all__ = [
    "HYP_CLIENT_ID",
    "OPTEE_SMC_SEC_CAP_VIRTUALIZATION",
    "QCOMTEE_RESULT_INBOUND_REQ_NEEDED",
    "OnReturn",
    "Regs",
    "SmcArgs",
    "SmcConduit",
    "SmcFid",
    "SmcHandler",
    "SmcReturn",
    "is_smcinvoke",
]


class SmcFid(enum.IntEnum):
    """SMC function ids (SMCCC: fast bit 31, SMC64 bit 30, owner bits 24-29, function)."""

    #: QK §3.1: service SMCINVOKE 0x06, owner TRUSTED_OS (50), yielding; SMC64 on arm64.
    QCOM_SCM_SMCINVOKE_INVOKE_LEGACY = 0x72000600  # cmd 0, unused by the driver
    QCOM_SCM_SMCINVOKE_CB_RSP = 0x72000601
    QCOM_SCM_SMCINVOKE_INVOKE = 0x72000602
    #: The same calls with the SMC32 convention (QK §3.1 gives both encodings).
    QCOM_SCM_SMCINVOKE_INVOKE_LEGACY_32 = 0x32000600
    QCOM_SCM_SMCINVOKE_CB_RSP_32 = 0x32000601
    QCOM_SCM_SMCINVOKE_INVOKE_32 = 0x32000602
    #: OP §6.1: OP-TEE std calls (SMC32, yielding).
    OPTEE_SMC_RETURN_FROM_RPC = 0x32000003
    OPTEE_SMC_CALL_WITH_ARG = 0x32000004
    #: OP §6.1: OP-TEE fast calls (SMC32, owner TRUSTED_OS).
    OPTEE_SMC_EXCHANGE_CAPABILITIES = 0xB2000009
    OPTEE_SMC_VM_CREATED = 0xB200000D
    OPTEE_SMC_VM_DESTROYED = 0xB200000E
    OPTEE_SMC_GET_THREAD_COUNT = 0xB200000F
    #: MODEL-ONLY (QK is silent on VMs): QTEE's VM lifecycle, fast calls 0x60D/0x60E in
    #: the SMCINVOKE service's range, with OP-TEE's a7 rule and return codes (OP §6.1).
    QTEE_MODEL_VM_CREATED = 0xB200060D
    QTEE_MODEL_VM_DESTROYED = 0xB200060E


class SmcReturn(enum.IntEnum):
    """``OPTEE_SMC_RETURN_*`` in ``a0`` of a fast call (OP §6.1); the model's VM calls too."""

    OK = 0
    ETHREAD_LIMIT = 1
    EBUSY = 2
    ERESUME = 3
    EBADADDR = 4
    EBADCMD = 5
    ENOMEM = 6
    ENOTAVAIL = 7
    UNKNOWN_FUNCTION = 0xFFFFFFFF


#: ``a0`` of an INVOKE/CB_RSP return: a callback request is in the outbound buffer.
QCOMTEE_RESULT_INBOUND_REQ_NEEDED: Final = 3
#: ``a7`` of the hypervisor (OP §6.1 ``HYP_CLNT_ID``); guests never have it.
HYP_CLIENT_ID: Final = 0
#: ``EXCHANGE_CAPABILITIES`` a1 bit: OP-TEE was built with virtualization (OP §6.1).
OPTEE_SMC_SEC_CAP_VIRTUALIZATION: Final = 1 << 3

#: ``a0..a3`` on return from an SMC.
Regs = tuple[int, int, int, int]
#: An SMC's argument registers, ``(fid, a1, a2, a3, a4, a5, a6, a7)``.
SmcArgs = tuple[int, int, int, int, int, int, int, int]
#: Called with each type-3 return, on the caller's thread; returns the next SMC,
#: ``(fid, a1, a2)`` -- for QTEE always ``(CB_RSP, out_pa, out_size)``.
OnReturn = Callable[[Regs], tuple[int, int, int]]
#: A secure-side service (:meth:`SecureMonitor.add_service`):
#: ``handler(fid, a1, a2, a3, a4, a5, a6, a7, on_return) -> Regs``.
SmcHandler = Callable[[int, int, int, int, int, int, int, int, "OnReturn | None"], Regs]

_SMCINVOKE: Final = frozenset(
    {
        SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_LEGACY,
        SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP,
        SmcFid.QCOM_SCM_SMCINVOKE_INVOKE,
        SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_LEGACY_32,
        SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP_32,
        SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_32,
    }
)


def is_smcinvoke(fid: int) -> bool:
    """Whether ``fid`` is one of the SMCINVOKE service's calls (either convention)."""
    if not isinstance(fid, int):
        raise TypeError(f"a function id is an int, not {type(fid).__name__}")
    return fid in _SMCINVOKE


class SmcConduit:
    """Where a driver's SMCs go: the secure monitor (host) or a VMM trap (guest).

    :meth:`smc` is the SMC instruction's calling convention, spelled here once; a conduit
    implements :meth:`_smc`, which takes the registers as one :data:`SmcArgs`."""

    __slots__ = ()

    def smc(
        self,
        fid: int,
        a1: int = 0,
        a2: int = 0,
        a3: int = 0,
        a4: int = 0,
        a5: int = 0,
        a6: int = 0,
        a7: int = 0,
        *,
        on_return: OnReturn | None = None,
    ) -> Regs:
        """Make one SMC; type-3 returns go to ``on_return``; the final regs are returned.

        Raises :class:`objects.DriverError` when the call cannot be made or completed."""
        return self._smc((fid, a1, a2, a3, a4, a5, a6, a7), on_return)

    def _smc(self, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """The conduit's SMC: ``args`` is ``(fid, a1, ..., a7)``, every register given."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _smc")

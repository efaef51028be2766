"""Wire codec cost: encode+decode of an invoke with 2 IB, 1 OB, 1 IO, 1 OO.

Baseline, measured in the same run: the same message built and read with bare
``struct.pack_into``/``unpack_from`` -- the same offset arithmetic and payload copies,
but no validation and no record objects.  The ratio is therefore what qtee's checks
and typed results cost on top of the work any encoder must do.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from pathlib import Path

# bench/supplicant.py shares its name with the supplicant package: bench/ goes last.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

from _timing import paired_ops_per_sec, pin_to_one_cpu, report

from qtee import wire

IB = (b"\x01\x00\x00\x00\x02\x00\x00\x00", b"0123456789abcdef0123")
OB = (4,)
IO = (0x80000001,)
N_OO = 1

_STRUCTS = [struct.Struct("<3I" + "II" * n) for n in range(61)]
_ARGS = [struct.Struct("<" + "II" * n) for n in range(61)]
_HDR = struct.Struct("<3I")


def bare_encode(
    cxt: int, op: int, ib: Sequence[bytes], ob: Sequence[int], io: Sequence[int], n_oo: int
) -> bytearray:
    n = len(ib) + len(ob) + len(io) + n_oo
    off = (12 + 8 * n + 7) & ~7
    fields = [len(ib) | len(ob) << 4 | len(io) << 8 | n_oo << 12]
    for data in ib:
        fields += (off, len(data))
        off += (len(data) + 7) & ~7
    for size in ob:
        fields += (off, size)
        off += (size + 7) & ~7
    for ident in io:
        fields += (ident, 0)
    fields += (0, 0) * n_oo
    buf = bytearray(off)
    _STRUCTS[n].pack_into(buf, 0, cxt, op, *fields)
    k = 1
    for data in ib:
        buf[fields[k] : fields[k] + len(data)] = data
        k += 2
    return buf


def bare_decode(buf: bytearray) -> tuple[object, ...]:
    cxt, op, counts = _HDR.unpack_from(buf, 0)
    nib, nob, nio, noo = counts & 15, counts >> 4 & 15, counts >> 8 & 15, counts >> 12
    vals = _ARGS[nib + nob + nio + noo].unpack_from(buf, 12)
    ib = []
    ob = []
    for k in range(0, 2 * (nib + nob), 2):
        if k < 2 * nib:
            ib.append(bytes(buf[vals[k] : vals[k] + vals[k + 1]]))
        else:
            ob.append(vals[k : k + 2])
    io = vals[2 * (nib + nob) : 2 * (nib + nob + nio) : 2]
    return cxt, op, ib, ob, io, noo


def bare() -> object:
    return bare_decode(bare_encode(7, 0, IB, OB, IO, N_OO))


def codec() -> object:
    return wire.decode_invoke(wire.encode_invoke(7, 0, IB, OB, IO, N_OO))


def main() -> None:
    print(pin_to_one_cpu())
    if bare_encode(7, 0, IB, OB, IO, N_OO) != wire.encode_invoke(7, 0, IB, OB, IO, N_OO):
        raise SystemExit("baseline and codec disagree on the message bytes")
    base, rate = paired_ops_per_sec(bare, codec)
    print("invoke message: 2 IB (8, 20 B), 1 OB (4 B), 1 IO, 1 OO")
    report("bare struct pack_into+unpack_from", base)
    report("wire.encode_invoke+decode_invoke", rate, base, target=2.0)


if __name__ == "__main__":
    main()

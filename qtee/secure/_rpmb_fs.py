"""OP-TEE's RPMB file system on the secure side (``TEE_STORAGE_PRIVATE_RPMB``).

The secure world keeps these objects in the eMMC's RPMB partition, which it reaches only
through tee-supplicant's RPC 1 (``OPTEE_RPC_CMD_RPMB``; the supplicant moves frames, see
:mod:`supplicant._rpmb`).  Every frame the secure side sends is MAC'd with a key only it
and the device know, and every answer is checked, so the normal world can neither read
forged data in nor replay an old write.

**Where the facts come from.**  ``OP-TEE/optee_os:core/tee/tee_rpmb_fs.c@00db65d`` (the
request/response sequences, the checks, the FS layout) and
``core/kernel/huk_subkey.c@11f5b73`` (the key derivation).  Only facts were taken.

The device layer (what this module sends, the legacy ``rpmb_req`` interface):

* **RPC**: one payload holding the request (``struct rpmb_req`` u16 cmd, dev_id,
  block_count, host order, then the frames) and, at the next 4 KiB boundary, the
  response; memref[0] IN = the request, memref[1] OUT = the response.  A non-zero RPC
  answer is the operation's result as is.
* **Init** (once, and again until the key is verified): GET_DEV_INFO (cmd 1, a 19-byte
  answer whose ``ret_code`` is preset to 1; ``ret_code`` not 0 or ``rpmb_size_mult`` 0 →
  GENERIC); the key is HMAC-SHA256 under the 16-byte HUK of the CID with bytes 9 (PRV) and
  15 (CRC) zeroed (``CFG_CORE_HUK_SUBKEY_COMPAT``, the default: no usage word); then a
  counter read.  When the device answers AUTH_KEY_NOT_PROGRAMMED the key is programmed
  (``CFG_RPMB_WRITE_KEY``, as QEMU builds set it) and the counter read again.  The model
  HUK is OP-TEE's stub (``otp_stubs.c``: 16 zero bytes) unless :func:`set_rpmb_huk`
  gives the world another.
* **Checks on every answer** (``tee_rpmb_resp_unpack_verify``), in this order: the last
  frame's result (low 6 bits): AUTH_KEY_NOT_PROGRAMMED → ITEM_NOT_FOUND, any other
  failure → GENERIC; message type, then block address → GENERIC; for a write, the
  counter must be the one sent + 1 → SECURITY; the nonce (reads) → SECURITY; the MAC
  over all frames → SECURITY.
* **Writes** go one block at a time (``rel_wr_blkcnt`` is 1 without
  ``RPMB_DRIVER_MULTIPLE_WRITE_FIXED``); a partial block is read, patched and written.  A
  write whose RPC or answer fails is sent again, up to 10 times in all; then RPMB is
  dead until reboot (here: until the device goes) and every operation is
  TEE_ERROR_COMMUNICATION.

The FS layer: byte 0 holds ``struct rpmb_fs_partition`` (u32 magic ``0x52504D42``,
fs_version 2, write_counter, fat_start_address 512, 112 reserved; little-endian); the
FAT starts at byte 512, one 256-byte ``struct rpmb_fat_entry`` per block (u32
start_address, data_size, flags ACTIVE 1 / LAST_ENTRY 2, unused; fek[16]; filename[224]),
ended by an entry flagged LAST_ENTRY.  File data is placed top-down in 256-byte units
below ``max_blk_idx * 256`` (``TEE_MM_POOL_HI_ALLOC``).  On first use the partition block
is read, written back (bumping the counter), read again, and initialised when its magic is
missing; another fs_version is ACCESS_DENIED.  An object of TA ``uuid`` is the file
``/<uuid>/<object id>`` in uppercase hex (the UUID as ``TEE_UUID`` lies in memory:
``uuid.bytes_le``).  A write that fits in place (inside the data and one block) is
written there; otherwise the file is copied to a new place and its FAT entry rewritten
last, so a crash leaves the old or the new file.

Differences from OP-TEE, on purpose: no data encryption (``fek`` stays zero) and no
object header in the file; creating an object opens-or-makes its file and empties it
(OP-TEE writes a temporary ``/<uuid>/.<id>`` file and renames it over the old one); FAT
entries are read 8 at a time with no cache (the defaults ``CFG_RPMB_FS_RD_ENTRIES`` 8,
``CFG_RPMB_FS_CACHE_ENTRIES`` 0); the relocating copy keeps every old byte
(``update_write_helper`` reads old data only for chunks that start before the write's
position, so a file over 4 KiB loses its later chunks there).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from qtee.gp import _codes as teec
from qtee.secure._gp import GpTaError

if TYPE_CHECKING:
    from qtee.secure._world import SecureWorld

__all__ = ["DEFAULT_HUK", "RpmbFs", "RpmbRpc", "rpmb_huk", "set_rpmb_huk"]

#: ``(request bytes, response size, response's initial bytes) -> response bytes``; raises
#: :class:`GpTaError` with the RPC's answer when it is not SUCCESS.
RpmbRpc = Callable[[bytes, int, bytes], bytes]

DEFAULT_HUK: Final = bytes(16)  # tee_otp_get_hw_unique_key's stub

_OK: Final = 0

# Frames (big-endian fields; see supplicant._rpmb).
_FRAME: Final = 512
_BLOCK: Final = 256
_MAC_START: Final = 228
_O_MAC, _O_DATA, _O_NONCE, _O_COUNTER = 196, 228, 484, 500
_O_ADDR, _O_COUNT, _O_RESULT, _O_TYPE = 504, 506, 508, 510
_REQ_KEY, _REQ_COUNTER, _REQ_WRITE, _REQ_READ = 1, 2, 3, 4
_RESP_KEY, _RESP_COUNTER, _RESP_WRITE, _RESP_READ = 0x100, 0x200, 0x300, 0x400
_RESULT_MASK: Final = 0x3F
_KEY_NOT_PROGRAMMED: Final = 7
_RPMB_REQ = struct.Struct("<3H")
_CMD_DATA_REQ, _CMD_GET_DEV_INFO = 0, 1
_DEV_INFO_SIZE: Final = 19
_CID_PRV, _CID_CRC = 9, 15
_MAX_RETRIES: Final = 10

# FS layout (little-endian, as the secure side lays its structs out).
_MAGIC: Final = 0x52504D42
_FS_VERSION: Final = 2
_PARTITION = struct.Struct("<4I112x")
_FAT_START: Final = 512
_ENTRY = struct.Struct("<4I16s224s")
_ACTIVE, _LAST = 1, 2
_RD_ENTRIES: Final = 8
_TMP_BLOCK: Final = 4096
_INT32_MAX: Final = (1 << 31) - 1

_HUKS: weakref.WeakKeyDictionary[SecureWorld, bytes] = weakref.WeakKeyDictionary()


def set_rpmb_huk(world: SecureWorld, huk: bytes) -> None:
    """Give ``world`` the 16-byte hardware unique key its RPMB key is derived from (set it
    before the first RPMB use: the key is derived once)."""
    if not isinstance(huk, bytes) or len(huk) != 16:
        raise ValueError("a HUK is 16 bytes")
    _HUKS[world] = huk


def rpmb_huk(world: SecureWorld) -> bytes:
    """The HUK of ``world`` (OP-TEE's stub, 16 zero bytes, unless set)."""
    return _HUKS.get(world, DEFAULT_HUK)


def derive_key(huk: bytes, cid: bytes) -> bytes:
    """``tee_rpmb_key_gen``: HMAC-SHA256(HUK, CID with PRV and CRC zeroed)."""
    msg = bytearray(cid)
    msg[_CID_PRV] = 0
    msg[_CID_CRC] = 0
    return hmac.new(huk, bytes(msg), hashlib.sha256).digest()


def _round(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _Entry:
    """One ``struct rpmb_fat_entry`` and where it lies."""

    __slots__ = ("addr", "data_size", "fek", "filename", "flags", "start")

    def __init__(self, addr: int, raw: bytes) -> None:
        start, size, flags, _unused, fek, name = _ENTRY.unpack(raw)
        self.addr: int = addr
        self.start: int = start
        self.data_size: int = size
        self.flags: int = flags
        self.fek: bytes = fek
        self.filename: bytes = name.split(b"\0", 1)[0]

    def pack(self) -> bytes:
        return _ENTRY.pack(self.start, self.data_size, self.flags, 0, self.fek, self.filename)


class RpmbFs:
    """OP-TEE's RPMB FS over one device (see the module docstring).

    The file interface is the one :class:`qtee._optee.storage.TrustedStorage` uses for the
    REE FS (``fs_open``/``fs_close``/``fs_read``/``fs_write``/``fs_truncate``/
    ``fs_remove``/``fs_rename``/``fs_listdir``), plus :meth:`fs_size`; errors are raised
    as :class:`GpTaError` with the code optee_os gives.
    """

    def __init__(self, rpc: RpmbRpc, huk: bytes = DEFAULT_HUK, *, dev_id: int = 0) -> None:
        if not isinstance(huk, bytes) or len(huk) != 16:
            raise ValueError("a HUK is 16 bytes")
        self._rpc = rpc
        self._huk = huk
        self._dev_id = dev_id
        self._lock = threading.RLock()  # rpmb_mutex
        # tee_rpmb_ctx
        self._key = bytes(32)
        self._cid = bytes(16)
        self.wr_cnt = 0
        self.max_blk_idx = 0
        self._dev_info_synced = False
        self._key_derived = False
        self._key_verified = False
        self._wr_cnt_synced = False
        self.dead = False  # rpmb_dead
        self._fs_ready = False  # fs_par
        self._max_address = 0
        self._fds: dict[int, bytes] = {}
        self._next_fd = 1
        #: Open persistent objects of this storage (TrustedStorage's sharing table).
        self._pobjs: dict[tuple[bytes, bytes], Any] = {}
        self.cond = threading.Condition()

    # ------------------------------------------------------------------ device layer
    def _invoke(self, cmd: int, frames: bytes, count: int, rsp_size: int, rsp: bytes) -> bytes:
        req = _RPMB_REQ.pack(cmd, self._dev_id, count) + frames
        return self._rpc(req, rsp_size, rsp)

    def _mac(self, frames: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for i in range(0, len(frames), _FRAME):
            mac.update(frames[i + _MAC_START : i + _FRAME])
        return mac.digest()

    @staticmethod
    def _frame(
        msg_type: int,
        *,
        address: int = 0,
        count: int = 0,
        counter: int = 0,
        nonce: bytes = bytes(16),
        data: bytes = bytes(_BLOCK),
        key_mac: bytes = bytes(32),
    ) -> bytearray:
        f = bytearray(_FRAME)
        f[_O_MAC : _O_MAC + 32] = key_mac
        f[_O_DATA : _O_DATA + _BLOCK] = data
        f[_O_NONCE : _O_NONCE + 16] = nonce
        struct.pack_into(">IHHHH", f, _O_COUNTER, counter, address, count, 0, msg_type)
        return f

    def _verify(
        self,
        rsp: bytes,
        msg_type: int,
        *,
        address: int | None = None,
        counter: list[int] | None = None,
        nonce: bytes | None = None,
        mac: bool = True,
    ) -> None:
        """``tee_rpmb_resp_unpack_verify`` on the last frame (raises GpTaError)."""
        last = rsp[-_FRAME:]
        result = last[_O_RESULT + 1] & _RESULT_MASK
        if result == _KEY_NOT_PROGRAMMED:
            raise GpTaError(teec.ITEM_NOT_FOUND, "RPMB: authentication key not programmed")
        if result != 0:
            raise GpTaError(teec.GENERIC, f"RPMB: operation result {result}")
        got_type, got_addr = struct.unpack_from(">H", last, _O_TYPE)[0], last[_O_ADDR : _O_ADDR + 2]
        if got_type != msg_type:
            raise GpTaError(
                teec.GENERIC, f"RPMB: message type {got_type:#06x}, not {msg_type:#06x}"
            )
        if address is not None and int.from_bytes(got_addr, "big") != address:
            raise GpTaError(teec.GENERIC, "RPMB: unexpected block address")
        if counter is not None:
            sent = counter[0]
            counter[0] = struct.unpack_from(">I", last, _O_COUNTER)[0]
            if msg_type == _RESP_WRITE:
                if counter[0] != (sent + 1) & 0xFFFF_FFFF:
                    raise GpTaError(teec.SECURITY, "RPMB: write counter mismatch")
                self.wr_cnt = (self.wr_cnt + 1) & 0xFFFF_FFFF
        if nonce is not None and not hmac.compare_digest(nonce, last[_O_NONCE : _O_NONCE + 16]):
            raise GpTaError(teec.SECURITY, "RPMB: nonce mismatch")
        if mac and not hmac.compare_digest(self._mac(rsp), last[_O_MAC : _O_MAC + 32]):
            raise GpTaError(teec.SECURITY, "RPMB: MAC mismatch")

    def _read_counter(self) -> None:
        nonce = os.urandom(16)
        frame = self._frame(_REQ_COUNTER, nonce=nonce)
        rsp = self._invoke(_CMD_DATA_REQ, bytes(frame), 0, _FRAME, bytes(_FRAME))
        counter = [0]
        self._verify(rsp, _RESP_COUNTER, counter=counter, nonce=nonce)
        self.wr_cnt = counter[0]

    def _write_key(self) -> None:
        frame = self._frame(_REQ_KEY, key_mac=self._key)
        rsp = self._invoke(_CMD_DATA_REQ, bytes(frame), 0, _FRAME, bytes(_FRAME))
        self._verify(rsp, _RESP_KEY, mac=False)

    def _init(self) -> None:
        """``tee_rpmb_init`` taking the legacy path (``CFG_RPMB_WRITE_KEY``)."""
        if self.dead:
            raise GpTaError(teec.COMMUNICATION, "RPMB is dead until reboot")
        if self._key_verified:
            return
        if not self._dev_info_synced:
            preset = bytes(18) + b"\x01"  # ret_code = RPMB_CMD_GET_DEV_INFO_RET_ERROR
            info = self._invoke(_CMD_GET_DEV_INFO, b"", 0, _DEV_INFO_SIZE, preset)
            if info[18] != 0:
                raise GpTaError(teec.GENERIC, "RPMB: GET_DEV_INFO answered an error")
            if info[16] == 0:
                raise GpTaError(teec.GENERIC, "RPMB: rpmb_size_mult is 0")
            self.max_blk_idx = info[16] * (128 * 1024 // _BLOCK) - 1
            self._cid = bytes(info[:16])
            self._dev_info_synced = True
        if not self._key_derived:
            self._key = derive_key(self._huk, self._cid)
            self._key_derived = True
        if not self._wr_cnt_synced or not self._key_verified:
            try:
                self._read_counter()
            except GpTaError as exc:
                if exc.code != teec.ITEM_NOT_FOUND or self._key_verified:
                    raise
                self._write_key()
                self._read_counter()
                return
            self._key_verified = self._wr_cnt_synced = True

    def _read(self, addr: int, length: int) -> bytes:
        """``tee_rpmb_read``: ``length`` bytes at byte ``addr``."""
        if length <= 0:
            raise GpTaError(teec.BAD_PARAMETERS, "RPMB read of nothing")
        blk, off = divmod(addr, _BLOCK)
        count = -(-(length + off) // _BLOCK)
        self._init()
        if blk > self.max_blk_idx:
            raise GpTaError(teec.GENERIC, "RPMB: block index out of range")
        nonce = os.urandom(16)
        frame = self._frame(_REQ_READ, address=blk, nonce=nonce)
        rsp = self._invoke(
            _CMD_DATA_REQ, bytes(frame), count, count * _FRAME, bytes(count * _FRAME)
        )
        self._verify(rsp, _RESP_READ, address=blk, nonce=nonce)
        data = b"".join(rsp[i + _O_DATA : i + _O_NONCE] for i in range(0, len(rsp), _FRAME))
        return data[off : off + length]

    def _write_block(self, blk: int, data: bytes) -> None:
        """``write_req`` for one block, with its retries."""
        counter = [self.wr_cnt]
        retries = 0
        while True:
            if blk > self.max_blk_idx:
                if not retries:
                    raise GpTaError(teec.GENERIC, "RPMB: block index out of range")
            else:
                frame = self._frame(_REQ_WRITE, address=blk, count=1, counter=counter[0], data=data)
                frame[_O_MAC : _O_MAC + 32] = self._mac(bytes(frame))
                try:
                    rsp = self._invoke(_CMD_DATA_REQ, bytes(frame), 0, _FRAME, bytes(_FRAME))
                    self._verify(rsp, _RESP_WRITE, address=blk, counter=counter)
                    return
                except GpTaError:
                    self._wr_cnt_synced = False
            retries += 1
            if retries >= _MAX_RETRIES:
                self.dead = True
                raise GpTaError(teec.COMMUNICATION, "RPMB write failed 10 times: RPMB is dead")

    def _write(self, addr: int, data: bytes) -> None:
        """``tee_rpmb_write``: whole blocks, a partial one read and patched first."""
        blk, off = divmod(addr, _BLOCK)
        count = -(-(len(data) + off) // _BLOCK)
        if off or len(data) % _BLOCK:
            buf = bytearray(self._read(blk * _BLOCK, count * _BLOCK))
            buf[off : off + len(data)] = data
            data = bytes(buf)
        self._init()
        for i in range(count):
            self._write_block(blk + i, data[i * _BLOCK : (i + 1) * _BLOCK])

    # ------------------------------------------------------------------ FS layer
    def _setup(self) -> None:
        """``rpmb_fs_setup``."""
        if self._fs_ready:
            return
        self._init()
        block = self._read(0, _BLOCK)
        self._write(0, block)  # bump the counter: a stale blocked request is now useless
        head = self._read(0, _PARTITION.size)
        magic, version, _wc, _fat = _PARTITION.unpack(head)
        if magic == _MAGIC:
            if version != _FS_VERSION:
                raise GpTaError(teec.ACCESS_DENIED, f"RPMB FS version {version}")
        else:
            last = _Entry(_FAT_START, bytes(_ENTRY.size))
            last.flags = _LAST
            self._write(_FAT_START, last.pack())
            self._write(0, _PARTITION.pack(_MAGIC, _FS_VERSION, 0, _FAT_START))
        self._max_address = self.max_blk_idx * _BLOCK
        self._fs_ready = True

    def _entries(self) -> Iterator[_Entry]:
        """The FAT, up to and including the LAST_ENTRY entry."""
        addr = _FAT_START
        while True:
            raw = self._read(addr, _RD_ENTRIES * _ENTRY.size)
            for i in range(_RD_ENTRIES):
                entry = _Entry(addr, raw[i * _ENTRY.size : (i + 1) * _ENTRY.size])
                addr += _ENTRY.size
                yield entry
                if entry.flags & _LAST:
                    return

    def _find(self, name: bytes) -> _Entry | None:
        self._setup()
        for e in self._entries():
            if e.flags & _ACTIVE and e.filename == name:
                return e
        return None

    def _need(self, name: bytes) -> _Entry:
        entry = self._find(name)
        if entry is None:
            raise GpTaError(teec.ITEM_NOT_FOUND, f"no RPMB file {name.decode()}")
        return entry

    def _write_entry(self, entry: _Entry) -> None:
        if entry.addr < _PARTITION.size:
            raise GpTaError(teec.ACCESS_CONFLICT, "the partition data is not a FAT entry")
        self._write(entry.addr, entry.pack())

    def _used(self, *, creating: bool) -> tuple[list[tuple[int, int]], _Entry, _Entry]:
        """The pool (``read_fat`` with a pool): used ranges, the entry a new file takes
        (first inactive or the LAST one), and the LAST entry; the FAT's range grows by one
        entry when ``creating`` takes the LAST one."""
        used: list[tuple[int, int]] = []
        free: _Entry | None = None
        last: _Entry | None = None
        for e in self._entries():
            if e.flags & _ACTIVE and e.data_size:
                used.append((e.start, e.start + _round(e.data_size, _BLOCK)))
            if not e.flags & _ACTIVE and free is None:
                free = e
            last = e
        assert last is not None and free is not None
        grow = creating and free is last
        fat_end = last.addr + _ENTRY.size + (_ENTRY.size if grow else 0)
        used.append((0, fat_end))
        return used, free, last

    def _alloc(self, used: list[tuple[int, int]], size: int) -> int:
        """``tee_mm_alloc`` top-down: the highest gap that fits ``size`` (256-byte units)."""
        need = _round(size, _BLOCK)
        top = self._max_address
        for start, end in sorted(used, key=lambda r: r[0], reverse=True):
            if end <= top and top - end >= need:
                return top - need
            top = min(top, start)
        if top >= need:
            return top - need
        raise GpTaError(teec.STORAGE_NO_SPACE, "RPMB: no space left")

    def _relocate(self, entry: _Entry, new_size: int, patch: tuple[int, bytes] | None) -> None:
        """Copy the file (zero-extended to ``new_size``, ``patch`` applied) to a new place,
        then point its FAT entry there."""
        used, _free, _last = self._used(creating=False)
        new = self._alloc(used, new_size)
        old_size = entry.data_size
        for off in range(0, new_size, _TMP_BLOCK):
            size = min(_TMP_BLOCK, new_size - off)
            chunk = bytearray(size)
            if off < old_size:
                n = min(size, old_size - off)
                chunk[:n] = self._read(entry.start + off, n)
            if patch is not None:
                pos, data = patch
                lo, hi = max(pos, off), min(pos + len(data), off + size)
                if lo < hi:
                    chunk[lo - off : hi - off] = data[lo - pos : hi - pos]
            self._write(new + off, bytes(chunk))
        entry.start, entry.data_size = new, new_size
        self._write_entry(entry)

    # ------------------------------------------------------------------ file interface
    def _fd(self, fd: int) -> bytes:
        name = self._fds.get(fd)
        if name is None:
            raise GpTaError(teec.BAD_PARAMETERS, f"no RPMB file handle {fd}")
        return name

    def fs_open(self, path: str, *, create: bool) -> int:
        """Open ``path`` (ITEM_NOT_FOUND if missing); ``create`` makes it, or empties it."""
        name = path.encode()
        if len(name) >= 224:
            raise GpTaError(teec.BAD_PARAMETERS, "RPMB file name too long")
        with self._lock:
            entry = self._find(name)
            if entry is None:
                if not create:
                    raise GpTaError(teec.ITEM_NOT_FOUND, f"no RPMB file {path}")
                _used, free, last = self._used(creating=True)
                if free is last:
                    end = _Entry(last.addr + _ENTRY.size, bytes(_ENTRY.size))
                    end.flags = _LAST
                    self._write_entry(end)
                free.start = free.data_size = 0
                free.flags, free.fek, free.filename = _ACTIVE, bytes(16), name
                self._write_entry(free)
            elif create and entry.data_size:
                entry.data_size = 0
                self._write_entry(entry)
            fd = self._next_fd
            self._next_fd += 1
            self._fds[fd] = name
            return fd

    def fs_close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)

    def fs_size(self, fd: int) -> int:
        with self._lock:
            return self._need(self._fd(fd)).data_size

    def fs_read(self, fd: int, offset: int, size: int) -> bytes:
        """``rpmb_fs_read``: up to ``size`` bytes at ``offset``."""
        if size <= 0:
            return b""  # rpmb_fs_read: nothing asked, nothing read
        with self._lock:
            entry = self._need(self._fd(fd))
            if offset >= entry.data_size:
                return b""
            return self._read(entry.start + offset, min(size, entry.data_size - offset))

    def fs_write(self, fd: int, offset: int, data: bytes) -> None:
        """``rpmb_fs_write_primitive``."""
        if not data:
            return
        with self._lock:
            entry = self._need(self._fd(fd))
            end = offset + len(data)
            at = entry.start + offset
            if end <= entry.data_size and at % _BLOCK + len(data) <= _BLOCK:
                self._write(at, data)  # in place: one block, atomic
            else:
                self._relocate(entry, max(end, entry.data_size), (offset, data))

    def fs_truncate(self, fd: int, length: int) -> None:
        """``rpmb_fs_truncate``: shrink in place, or copy to a zero-extended new place."""
        if length > _INT32_MAX:
            raise GpTaError(teec.BAD_PARAMETERS, "RPMB truncate past INT32_MAX")
        with self._lock:
            entry = self._need(self._fd(fd))
            if length > entry.data_size:
                self._relocate(entry, length, None)
            else:
                entry.data_size = length
                self._write_entry(entry)

    def fs_remove(self, path: str) -> None:
        with self._lock:
            entry = self._need(path.encode())
            blank = _Entry(entry.addr, bytes(_ENTRY.size))
            self._write_entry(blank)

    def fs_rename(self, old: str, new: str, *, overwrite: bool) -> None:
        """``rpmb_fs_rename``: an existing ``new`` is ACCESS_CONFLICT unless ``overwrite``."""
        with self._lock:
            entry = self._need(old.encode())
            target = self._find(new.encode())
            if target is not None:
                if not overwrite:
                    raise GpTaError(teec.ACCESS_CONFLICT, f"RPMB file {new} exists")
                self._write_entry(_Entry(target.addr, bytes(_ENTRY.size)))
            entry.filename = new.encode()
            self._write_entry(entry)

    def fs_listdir(self, path: str) -> list[str]:
        """``rpmb_fs_opendir``: the names under ``path/`` that are hex (others skipped)."""
        prefix = path.rstrip("/").encode() + b"/"
        with self._lock:
            self._setup()
            names = []
            for e in self._entries():
                if e.flags & _ACTIVE and e.filename.startswith(prefix):
                    rest = e.filename[len(prefix) :]
                    try:
                        bytes.fromhex(rest.decode())
                    except ValueError:
                        continue
                    if rest:
                        names.append(rest.decode())
            return names

"""MXNet RecordIO, read and written natively (mxnet does not install beside current jax).

Layout (dmlc-core's recordio.h; docs/sources.md): every record is uint32 magic 0xced7230a,
uint32 lrec (top 3 bits: continuation flag, low 29 bits: length), the payload, zero
padding to 4 bytes. Like dmlc's writer, a payload that contains the magic word at a
4-byte-aligned position is split there into parts (cflag 1 = first, 2 = middle, 3 = last)
and the magic word itself is dropped; the reader puts it back. The `.idx` file is text,
`key\\toffset` per line.

A payload is an IRHeader `<IfQQ` (flag, label, id, id2); with flag > 0, `flag` float32
labels follow (the class is the first). Then the encoded image. InsightFace files have a
header record with key 0 (flag > 0, no image, labels [a, b]) somewhere in the file (first,
last or between images and identities, by the tool that wrote it): images are records
1 .. a-1 and records a .. b-1 hold each identity's image range.

Read paths: `RecordFile.read` / `unpack` is the canonical reader: it handles every layout
(split parts, multi-label headers) and names the file, key and offset of any fault.
`read_plain` (one-part, flag-0 records: nearly every image) and `read_label_prefix` (labels
without the image) are measured fast paths for the loader and the label scan; anything
they do not recognise returns to the canonical reader. The datasets built on these records
live in `jaxface.data.sources`.

No jax or torch here: torchref and compare read data through this module too.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxface.fileio import atomic_write

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
IR_FORMAT = "<IfQQ"
_IR = struct.Struct(IR_FORMAT)
IR_SIZE = _IR.size  # 24
_LEN_MASK = (1 << 29) - 1
_LREC_IR = struct.Struct("<II" + IR_FORMAT.lstrip("<"))  # record header + IRHeader at once
MAX_PAYLOAD = 1 << 29


class RecordIOError(ValueError):
    """A bad RecordIO file or record; names the file, the record key and the byte offset."""

    def __init__(self, message: str, file: str | None = None, key=None, offset=None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if key is not None:
            where.append(f"record key {key}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.reason = message
        self.file = file
        self.key = key
        self.offset = offset

    def __reduce__(self):  # travels from decode workers to the main process intact
        return (type(self), (self.reason, self.file, self.key, self.offset))


class RecordIOWarning(UserWarning):
    """Something was recovered from (missing index, skipped record); never silent."""


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float
    id: int
    id2: int


# --- Encoding -------------------------------------------------------------------------


def pack_payload(label, image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """An IRHeader plus image bytes, as mxnet.recordio.pack: a scalar label goes in the
    header with flag 0; a sequence of labels sets flag = count and follows as float32."""
    if np.ndim(label) == 0:
        return _IR.pack(0, float(label), id, id2) + image
    labels = np.asarray(label, dtype="<f4").ravel()
    return _IR.pack(labels.size, 0.0, id, id2) + labels.tobytes() + image


def unpack_payload(payload: bytes) -> tuple[IRHeader, np.ndarray, bytes]:
    """(header, float32 labels, image bytes). Labels: [header.label] when flag is 0."""
    if len(payload) < IR_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than an IRHeader (24)")
    header = IRHeader(*_IR.unpack_from(payload))
    if header.flag == 0:
        return header, np.array([header.label], np.float32), payload[IR_SIZE:]
    end = IR_SIZE + 4 * header.flag
    if end > len(payload):
        raise ValueError(
            f"IRHeader flag {header.flag} announces {header.flag} labels, but the payload "
            f"has only {len(payload) - IR_SIZE} bytes after the header"
        )
    labels = np.frombuffer(payload, "<f4", header.flag, IR_SIZE).astype(np.float32)
    return header, labels, payload[end:]


def encode_record(payload: bytes) -> bytes:
    """The bytes dmlc's RecordIOWriter::WriteRecord emits for one payload."""
    size = len(payload)
    if size >= MAX_PAYLOAD:
        raise ValueError(f"a RecordIO payload must be < 2^29 bytes, got {size}")
    parts = []
    start = 0
    # A magic word inside the payload would desynchronise a scanning reader, so dmlc cuts
    # the payload there and drops the word; only 4-byte-aligned positions are checked.
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= size:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            parts.append(_LREC.pack(MAGIC, (cflag << 29) | (pos - start)))
            parts.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start else 0
    parts.append(_LREC.pack(MAGIC, (cflag << 29) | (size - start)))
    parts.append(payload[start:])
    parts.append(b"\0" * (-size % 4))
    return b"".join(parts)


class RecordIOWriter:
    """Writes `PREFIX.rec` and `PREFIX.idx` as mxnet's MXIndexedRecordIO does: records in
    the order written, with any keys; the index lists them in that order.

    Both files are written under temporary names and renamed when the writer closes
    without an error (`with` block or `close()`); after an error nothing is left behind.
    Existing files are never replaced unless `overwrite=True`."""

    def __init__(
        self, rec_path: str | Path, idx_path: str | Path | None = None, overwrite: bool = False
    ):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        if not overwrite:
            for path in (self.rec_path, self.idx_path):
                if path.exists():
                    raise FileExistsError(
                        f"{path} already exists; refusing to overwrite it (choose another "
                        "output name or remove it first)"
                    )
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f".tmp{os.getpid()}"
        self._tmp_rec = self.rec_path.with_name(f".{self.rec_path.name}{tmp}")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}{tmp}")
        self._rec = open(self._tmp_rec, "wb")  # noqa: SIM115 - closed in close()
        self._idx = open(self._tmp_idx, "w")  # noqa: SIM115
        self.count = 0

    def write(self, key: int, payload: bytes) -> int:
        """Appends one record; returns its byte offset."""
        offset = self._rec.tell()
        self._rec.write(encode_record(payload))
        self._idx.write(f"{key}\t{offset}\n")
        self.count += 1
        return offset

    def overwrite(self, offset: int, payload: bytes) -> None:
        """Rewrites a record in place; the new encoding must have the same length."""
        data = encode_record(payload)
        end = self._rec.tell()
        self._rec.seek(offset)
        self._rec.write(data)
        self._rec.seek(end)

    def close(self, complete: bool = True) -> None:
        """Finish the files (rename them into place), or with complete=False drop them."""
        if self._rec.closed:
            return
        self._rec.close()
        self._idx.close()
        if complete:
            os.replace(self._tmp_rec, self.rec_path)
            os.replace(self._tmp_idx, self.idx_path)
        else:
            self._tmp_rec.unlink(missing_ok=True)
            self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(complete=exc_type is None)


# --- Reading --------------------------------------------------------------------------


def resolve_rec_path(path: str | Path) -> Path:
    """`x.rec`, `x` (prefix) or a folder holding `train.rec`."""
    p = Path(path)
    if p.is_dir():
        p = p / "train.rec"
    elif p.suffix != ".rec" and p.with_suffix(".rec").exists():
        p = p.with_suffix(".rec")
    if not p.is_file():
        raise RecordIOError(f"no such RecordIO file ({path!r} resolves to {str(p)!r})")
    return p


class RecordFile:
    """Raw records of one `.rec` by key and byte offset; memory-mapped, fork/pickle safe."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.path.with_suffix(".idx")
        self.size = self.path.stat().st_size
        if self.size == 0:
            raise RecordIOError("the file is empty", str(self.path), offset=0)
        self._mm: mmap.mmap | None = None
        self._pid = -1
        if self.idx_path.is_file():
            self.keys, self.offsets = self._read_index()
        else:
            # Said before the scan, which reads the whole file (minutes for a large one).
            warnings.warn(
                f"{self.path}: no index file {self.idx_path}; scanning "
                f"{self.size / 1e6:,.0f} MB of records to build one in memory",
                RecordIOWarning,
                stacklevel=3,
            )
            t0 = time.perf_counter()
            self.keys, self.offsets = scan_offsets(self)
            warnings.warn(
                f"{self.path}: no index file {self.idx_path}; built one in memory by scanning "
                f"{len(self.keys):,} records ({time.perf_counter() - t0:.1f} s), keys = record "
                f"positions. Save it with `python -m jaxface.data.inspect {self.path} "
                "--write-idx` to skip the scan next time.",
                RecordIOWarning,
                stacklevel=3,
            )
        # Key -> offset without a dict (100+ bytes a record, copied into every worker):
        # InsightFace keys are 0 .. n-1 in order, so the key is the position; otherwise
        # binary search in the sorted keys.
        n = len(self.keys)
        self._dense = bool(n and self.keys[0] == 0 and np.array_equal(self.keys, np.arange(n)))
        self._by_key = None if self._dense else np.argsort(self.keys, kind="stable")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"], state["_pid"] = None, -1
        return state

    @property
    def mm(self) -> mmap.mmap:
        # One map per process: a map inherited through fork is fine, but re-opening keeps
        # spawn-started decode workers and the main process independent.
        if self._mm is None or self._pid != os.getpid():
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        return self._mm

    def _read_index(self) -> tuple[np.ndarray, np.ndarray]:
        data = self.idx_path.read_bytes()
        # Fast path (millions of lines): every line is exactly two integers.
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
        if data.count(b"\t") == lines:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # numpy warns, not raises, on junk
                    flat = np.fromstring(data.decode("ascii"), np.int64, sep=" ")
                if flat.size == 2 * lines and (flat[1::2] >= 0).all():
                    return self._check_index(flat[0::2].copy(), flat[1::2].copy())
            except (ValueError, UnicodeDecodeError, DeprecationWarning):
                pass  # the line-by-line pass below finds and names the bad line
        keys, offsets = [], []
        pos = 0
        idx = str(self.idx_path)
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            text = line.strip()
            if text:
                fields = text.split(b"\t")
                try:
                    key, offset = int(fields[0]), int(fields[1])
                    if len(fields) != 2 or offset < 0:
                        raise ValueError
                except (ValueError, IndexError):
                    raise RecordIOError(
                        f"garbled index line {number} {text[:60]!r}: expected "
                        "'key<TAB>offset' with integers",
                        idx,
                        key=fields[0][:20].decode(errors="replace"),
                        offset=pos,
                    ) from None
                keys.append(key)
                offsets.append(offset)
            pos += len(line)
        return self._check_index(np.asarray(keys, np.int64), np.asarray(offsets, np.int64))

    def _check_index(self, keys_a: np.ndarray, offsets_a: np.ndarray):
        idx = str(self.idx_path)
        if not keys_a.size:
            raise RecordIOError("the index file is empty", idx, offset=0)
        bad = np.flatnonzero((offsets_a + 8 > self.size) | (offsets_a % 4 != 0))
        if bad.size:
            i = int(bad[0])
            why = (
                f"past the end of {self.path} ({self.size} bytes)"
                if offsets_a[i] + 8 > self.size
                else "not a multiple of 4 (every record starts 4-byte aligned)"
            )
            raise RecordIOError(
                f"index offset {offsets_a[i]} is {why}; {bad.size} such line(s) in "
                f"{idx}: it does not belong to this .rec (rebuild it with --write-idx)",
                str(self.path),
                key=int(keys_a[i]),
                offset=int(offsets_a[i]),
            )
        if not (np.diff(keys_a) > 0).all():  # sorted keys, the usual case, are unique
            ordered = np.sort(keys_a)
            same = np.flatnonzero(ordered[1:] == ordered[:-1])
            if same.size:
                dup = int(ordered[same[0]])
                raise RecordIOError(f"garbled index: key {dup} appears twice", idx, key=dup)
        return keys_a, offsets_a

    def _position(self, key: int) -> int:
        """Position of `key` in the index, or -1."""
        if self._dense:
            return key if 0 <= key < len(self.keys) else -1
        order = self._by_key
        i = int(np.searchsorted(self.keys, key, sorter=order))
        return int(order[i]) if i < len(order) and self.keys[order[i]] == key else -1

    def has_key(self, key: int) -> bool:
        return self._position(key) >= 0

    def offset(self, key: int) -> int:
        i = self._position(key)
        if i < 0:
            raise RecordIOError(
                f"the index {self.idx_path} has no record with this key", str(self.path), key
            )
        return int(self.offsets[i])

    def read_at(self, offset: int, key=None) -> tuple[bytes, int]:
        """(payload, offset just past the record) of the record starting at `offset`."""
        mm, size, path = self.mm, self.size, str(self.path)
        parts = []
        pos = offset
        while True:
            if pos + 8 > size:
                raise RecordIOError(
                    f"truncated record: its 8-byte header at {pos} runs past the end of the "
                    f"file ({size} bytes)",
                    path,
                    key,
                    offset,
                )
            magic, lrec = _LREC.unpack_from(mm, pos)
            if magic != MAGIC:
                raise RecordIOError(
                    f"wrong magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x}): not a "
                    "RecordIO file, a corrupt file, or an index that does not match it",
                    path,
                    key,
                    offset,
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            start = pos + 8
            if start + length > size:
                raise RecordIOError(
                    f"truncated record: {length} payload bytes announced at {pos}, only "
                    f"{size - start} left in the file",
                    path,
                    key,
                    offset,
                )
            expected = (0, 1) if not parts else (2, 3)
            if cflag not in expected:
                raise RecordIOError(
                    f"continuation flag {cflag} at byte {pos} out of sequence (expected "
                    f"{' or '.join(map(str, expected))}): the record's parts are broken",
                    path,
                    key,
                    offset,
                )
            parts.append(mm[start : start + length])
            pos = start + length + (-length % 4)
            if cflag in (0, 3):
                break
        return (parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)), pos

    def read(self, key: int) -> bytes:
        return self.read_at(self.offset(key), key)[0]

    def read_plain(self, key: int) -> tuple[float, bytes] | None:
        """(header label, image bytes) of a one-part record with flag 0 (nearly every image
        record) in one struct read; None for anything else, which `unpack` then reads, and
        names the fault of. Saves a third of the loader's per-image Python time."""
        i = self._position(key)
        if i < 0:
            return None
        offset = int(self.offsets[i])
        if offset + 8 + IR_SIZE > self.size:
            return None
        mm = self.mm
        magic, lrec, flag, label, _, _ = _LREC_IR.unpack_from(mm, offset)
        end = offset + 8 + (lrec & _LEN_MASK)
        if magic != MAGIC or lrec >> 29 or flag or end > self.size or end < offset + 8 + IR_SIZE:
            return None
        return label, mm[offset + 8 + IR_SIZE : end]

    def read_label_prefix(self, key: int) -> tuple[np.ndarray, int]:
        """Labels of a record without touching its image: (float32 labels, image length)."""
        offset = self.offset(key)
        mm, path = self.mm, str(self.path)
        if offset + 8 + IR_SIZE > self.size:
            return self._labels_slow(key, offset)
        magic, lrec = _LREC.unpack_from(mm, offset)
        if magic != MAGIC or lrec >> 29 != 0:
            return self._labels_slow(key, offset)
        length = lrec & _LEN_MASK
        if length < IR_SIZE or offset + 8 + length > self.size:
            return self._labels_slow(key, offset)
        flag, label, _, _ = _IR.unpack_from(mm, offset + 8)
        if flag == 0:
            return np.array([label], np.float32), length - IR_SIZE
        if IR_SIZE + 4 * flag > length:
            raise RecordIOError(
                f"IRHeader flag {flag} announces more labels than the record holds", path, key
            )
        labels = np.frombuffer(mm, "<f4", flag, offset + 8 + IR_SIZE).astype(np.float32)
        return labels, length - IR_SIZE - 4 * flag

    def _labels_slow(self, key, offset):
        _, labels, image = self.unpack(key, offset)
        return labels, len(image)

    def unpack(self, key: int, offset: int | None = None):
        """(IRHeader, float32 labels, image bytes) of the record `key`."""
        if offset is None:
            offset = self.offset(key)
        payload, _ = self.read_at(offset, key)
        try:
            return unpack_payload(payload)
        except ValueError as exc:
            raise RecordIOError(str(exc), str(self.path), key, offset) from None

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def scan_offsets(records: RecordFile) -> tuple[np.ndarray, np.ndarray]:
    """Keys (record positions 0, 1, ...) and offsets of every record, found by walking the
    file; continuation parts belong to the record that starts them."""
    offsets = []
    pos = 0
    while pos < records.size:
        offsets.append(pos)
        _, pos = records.read_at(pos, key=len(offsets) - 1)
    return np.arange(len(offsets), dtype=np.int64), np.asarray(offsets, np.int64)


def write_index(rec_path: str | Path, idx_path: str | Path | None = None) -> Path:
    """Scan a `.rec` and write its `.idx` (keys = record positions). An existing index is
    never replaced: that is the user's file, and it may hold other keys."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path else rec_path.with_suffix(".idx")
    if idx_path.exists():
        raise RecordIOError(
            f"{idx_path} already exists; refusing to overwrite it (move it away to rebuild it)",
            str(rec_path),
        )
    tmp = idx_path.with_name(idx_path.name + ".missing")  # forces a scan, never read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordIOWarning)
        records = RecordFile(rec_path, tmp)
    lines = "".join(f"{k}\t{o}\n" for k, o in zip(records.keys, records.offsets, strict=True))
    records.close()
    return atomic_write(idx_path, lambda f: f.write(lines.encode()))

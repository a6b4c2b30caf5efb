"""The row groups of a Parquet file, read from its footer without pyarrow.

The clean stage plans its work (which worker reads which row groups) in the parent process, which otherwise
never reads a row. Loading pyarrow there for the footers alone would add its libraries and memory pool (about
30 MB of resident memory) to a process that lives through the whole stage; the footer is small and its
format fixed, so it is read here.

A Parquet file ends with its footer, a ``FileMetaData`` struct in the Thrift compact protocol, then the
footer's length (4 bytes, little-endian) and the magic ``PAR1``. Of it only ``row_groups`` (field 4, a list
of ``RowGroup``: ``total_byte_size``, field 2, and ``num_rows``, field 3, both i64) is decoded; every other
field is skipped by its wire type. The rest of the format (schema, pages, encodings) is pyarrow's business
(``llm.data.corpus.read_shard``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

MAGIC = b"PAR1"
_TAIL = 8  # footer length (uint32, little-endian) + magic

# Thrift compact protocol wire types
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class FooterError(ValueError):
    """Not a Parquet file, or its footer is cut short or malformed; the message says which."""


class _Reader:
    """A cursor over Thrift compact-protocol bytes, decoding what a footer holds."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise FooterError("the footer ends in the middle of a value")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    def integer(self) -> int:  # i16, i32 and i64: zigzag varints
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, wire type) of each field of the struct at the cursor, up to its stop byte."""
        last = 0
        while (header := self.byte()) != 0:
            delta, kind = header >> 4, header & 0x0F
            last = last + delta if delta else self.integer()
            yield last, kind

    def list_header(self) -> tuple[int, int]:
        header = self.byte()
        size = header >> 4
        return (self.varint() if size == 15 else size), header & 0x0F

    def skip(self, kind: int, in_container: bool = False) -> None:
        """Move past one value of wire type ``kind`` (a bool field carries its value in its type)."""
        if kind in (_TRUE, _FALSE):
            self.pos += 1 if in_container else 0
        elif kind == _BYTE:
            self.pos += 1
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.pos += 8
        elif kind == _BINARY:
            length = self.varint()  # read before pos is, since reading it moves pos
            self.pos += length
        elif kind in (_LIST, _SET):
            size, element = self.list_header()
            for _ in range(size):
                self.skip(element, in_container=True)
        elif kind == _MAP:
            size = self.varint()
            types = self.byte() if size else 0
            for _ in range(size):
                self.skip(types >> 4, in_container=True)
                self.skip(types & 0x0F, in_container=True)
        elif kind == _STRUCT:
            for _, field_kind in self.fields():
                self.skip(field_kind)
        else:
            raise FooterError(f"unknown Thrift wire type {kind}")


def _row_group(reader: _Reader) -> tuple[int, int]:
    size = rows = None
    for field, kind in reader.fields():
        if field == 2 and kind == _I64:
            size = reader.integer()
        elif field == 3 and kind == _I64:
            rows = reader.integer()
        else:
            reader.skip(kind)
    if size is None or rows is None:
        raise FooterError("a row group without its num_rows or total_byte_size")
    return rows, size


def read_footer(path: Path) -> bytes:
    """The Thrift bytes of the footer of the Parquet file at ``path``; FooterError when it has none."""
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        if end < len(MAGIC) + _TAIL:
            raise FooterError(f"{end} bytes is too short for Parquet")
        f.seek(end - _TAIL)
        tail = f.read(_TAIL)
        if tail[4:] != MAGIC:
            raise FooterError("no Parquet magic at its end" + (" (an encrypted footer)" if tail[4:] == b"PARE" else ""))
        length = int.from_bytes(tail[:4], "little")
        if length > end - len(MAGIC) - _TAIL:
            raise FooterError(f"its footer length ({length} bytes) is past its start")
        f.seek(end - _TAIL - length)
        return f.read(length)


def row_group_sizes(path: Path) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) of each row group of the Parquet file at ``path``, in order, as pyarrow's
    ``metadata.row_group(i).num_rows`` and ``.total_byte_size`` give them. Raises FooterError (its message
    says why, not which file) when ``path`` is not a Parquet file or its footer cannot be decoded."""
    reader = _Reader(read_footer(path))
    groups: list[tuple[int, int]] = []
    for field, kind in reader.fields():
        if field == 4 and kind == _LIST:
            size, element = reader.list_header()
            if element != _STRUCT:
                raise FooterError(f"row_groups holds wire type {element}, not structs")
            groups.extend(_row_group(reader) for _ in range(size))
        else:
            reader.skip(kind)
    return groups

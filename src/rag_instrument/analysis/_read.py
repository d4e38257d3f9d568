"""Reading logs: files, globs, ``-`` for stdin, gzip, in bounded chunks of lines.

Nothing is read whole: a file is read in blocks of :data:`BLOCK` bytes and handed out as
lists of complete lines, so memory stays at a few blocks whatever the file's size.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = ["BLOCK", "InputReport", "Source", "expand", "read_blocks", "read_chunks"]

#: Bytes read at a time.
BLOCK = 1 << 20
#: A line longer than this is not a log line we can use: it is skipped, and counted.
MAX_LINE = 16 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"


@dataclass
class Source:
    """One input: a path, or ``-`` for standard input; optionally a byte range of a file.

    A range (``start``, ``end``) is only for plain files, and must begin at a line start.
    """

    name: str
    start: int = 0
    end: int | None = None

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """Open for reading bytes, decompressing gzip (by content, whatever the name).

        Standard input is read but never closed.
        """
        raw: BinaryIO = sys.stdin.buffer if self.name == "-" else open(self.name, "rb")  # noqa: SIM115
        try:
            if self.start:
                raw.seek(self.start)
                yield raw
                return
            peekable = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[type-var]
            if peekable.peek(2)[:2] == _GZIP_MAGIC:
                yield _Gunzip(peekable)  # type: ignore[misc]
            else:
                yield peekable
        finally:
            if self.name != "-":
                raw.close()

    def is_gzip(self) -> bool:
        """Whether the input is gzip (``False`` for stdin and unreadable files)."""
        if self.name == "-":
            return False
        try:
            with open(self.name, "rb") as handle:
                return handle.read(2) == _GZIP_MAGIC
        except OSError:
            return False


@dataclass
class InputReport:
    """What reading went like: counted, never fatal."""

    files: int = 0
    lines: int = 0
    bad_lines: int = 0
    #: First offending line number per input, with what was wrong.
    first_bad: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: Inputs that could not be opened or read, with the reason.
    unreadable: dict[str, str] = field(default_factory=dict)

    def bad(self, source: str, line_no: int, why: str) -> None:
        """Count one unusable line."""
        self.bad_lines += 1
        if source not in self.first_bad:
            self.first_bad[source] = (line_no, why)

    def merge(self, other: InputReport) -> None:
        """Add another report's counts to this one."""
        self.files += other.files
        self.lines += other.lines
        self.bad_lines += other.bad_lines
        for key, value in other.first_bad.items():
            self.first_bad.setdefault(key, value)
        self.unreadable.update(other.unreadable)


def expand(patterns: list[str]) -> tuple[list[Source], list[str]]:
    """Expand globs; return the inputs and the patterns that matched nothing."""
    sources: list[Source] = []
    missing: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if pattern == "-":
            sources.append(Source("-"))
            continue
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
        else:
            matches = [pattern]
        if not matches:
            missing.append(pattern)
        for match in matches:
            if match not in seen:
                seen.add(match)
                sources.append(Source(match))
    return sources, missing


class _Gunzip:
    """gzip members one after another (NUL padding between them skipped), decompressed.

    Unlike ``gzip.GzipFile``, whose ``read()`` raises on a cut file and loses what it had
    decompressed in that call, this hands out every byte it could decompress first, then
    raises (``EOFError`` for a file cut short, ``zlib.error`` for corrupt data) on the
    next read: a log copied while it was being written keeps all its whole lines.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._member = zlib.decompressobj(31)
        self._input = b""  # compressed bytes not yet given to the decompressor
        self._started = False  # whether the current member has had any input
        self._error: Exception | None = None

    def read(self, size: int) -> bytes:
        """Up to ``size`` decompressed bytes; ``b""`` at the end of the last member."""
        if self._error is not None:
            raise self._error
        out = bytearray()
        while len(out) < size:
            if not self._input:
                self._input = self._raw.read(BLOCK)
                if not self._input:
                    if self._started:  # cut inside a member
                        self._error = EOFError(
                            "compressed file ended before the end-of-stream marker was reached"
                        )
                    break
            if not self._started:  # between members: a writer's NUL padding
                self._input = self._input.lstrip(b"\x00")
                if not self._input:
                    continue
            try:
                out += self._member.decompress(self._input, size - len(out))
            except zlib.error as exc:
                self._error = exc
                break
            self._started = True
            if self._member.eof:  # this member is complete: the next one, if any
                self._input = self._member.unused_data
                self._member = zlib.decompressobj(31)
                self._started = False
            else:
                self._input = self._member.unconsumed_tail
        if not out and self._error is not None:
            raise self._error
        return bytes(out)


def _raw_blocks(
    source: Source, report: InputReport, where: Callable[[], str]
) -> Iterator[bytes]:
    """Yield one input's bytes in blocks of up to :data:`BLOCK` (its range only, if any).

    An input that cannot be opened or fails midway (a truncated gzip member, an I/O
    error) is recorded in ``report.unreadable``, a failure midway as "read failed after"
    ``where()`` (how far the reader got); what was read before the failure counts.
    """
    remaining = None if source.end is None else source.end - source.start
    first = source.start == 0  # a UTF-8 byte order mark there is not part of a line
    try:
        with source.open() as stream:
            report.files += 1
            while True:
                try:
                    if remaining is None:
                        block = stream.read(BLOCK)
                    else:
                        block = stream.read(min(BLOCK, remaining))
                        remaining -= len(block)
                except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                    if first and source.start == 0:
                        # Nothing of it could be read (not gzip after all): not read.
                        report.files -= 1
                        report.unreadable[source.name] = str(exc) or type(exc).__name__
                    else:
                        report.unreadable[source.name] = f"read failed after {where()}: {exc}"
                    return
                if not block:
                    return
                if first:
                    first = False
                    if block.startswith(_BOM):
                        block = block[len(_BOM) :]
                        if not block:
                            continue
                yield block
    except OSError as exc:
        report.unreadable[source.name] = exc.strerror or type(exc).__name__


def read_blocks(source: Source, report: InputReport) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(number of the first line, lines)`` for one input, without line endings.

    Failures are recorded in ``report.unreadable`` (see :func:`_raw_blocks`).
    """
    line_no = 1
    tail = b""
    skipping = False  # inside a line already reported as too long: up to its end
    # The lambda reads line_no when a read fails: how far this reader got by then.
    for raw in _raw_blocks(source, report, lambda: f"line {line_no - 1}"):  # noqa: B023
        block = raw
        if skipping:
            rest = _after_line_end(block)
            if rest is None:
                continue
            block, skipping = rest, False
            line_no += 1
        lines = (tail + block).split(b"\n") if tail else block.split(b"\n")
        tail = lines.pop()  # the unfinished last line waits for the next block
        if not lines:
            if len(tail) > MAX_LINE:
                report.bad(source.name, line_no, "line too long")
                report.lines += 1
                tail, skipping = b"", True
            continue
        report.lines += len(lines)
        yield line_no, lines
        line_no += len(lines)
    if tail and not _cut(source, report):
        report.lines += 1
        yield line_no, [tail]


def read_chunks(source: Source, report: InputReport) -> Iterator[bytes | None]:
    """Yield one input as chunks of whole lines: a newline, then lines each ending in one.

    The same input as :func:`read_blocks` without splitting it into lines, for readers
    that find what they need in a chunk as a whole; lines are counted by the reader.
    ``None`` stands for a line longer than :data:`MAX_LINE`, skipped. Failures are
    recorded in ``report.unreadable``.
    """
    tail = b""
    done = 0
    skipping = False  # inside a line already reported as too long: up to its end
    for raw in _raw_blocks(source, report, lambda: f"byte {done}"):  # noqa: B023 (as above)
        done += len(raw)
        block = raw
        if skipping:
            rest = _after_line_end(block)
            if rest is None:
                continue
            block, skipping = rest, False
        end = block.rfind(b"\n")
        if end < 0:
            tail += block
            if len(tail) > MAX_LINE:
                yield None
                tail, skipping = b"", True
            continue
        yield b"".join((b"\n", tail, memoryview(block)[: end + 1]))  # one copy
        tail = block[end + 1 :]
    if tail and not _cut(source, report):
        yield b"".join((b"\n", tail, b"\n"))


def _after_line_end(block: bytes) -> bytes | None:
    """What follows the first line end in ``block`` (``None``: the line goes on)."""
    end = block.find(b"\n")
    return None if end < 0 else block[end + 1 :]


def _cut(source: Source, report: InputReport) -> bool:
    """Whether ``source`` failed midway: its unfinished last line is where it was cut."""
    return report.unreadable.get(source.name, "").startswith("read failed")

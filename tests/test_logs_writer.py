"""The log writer: short writes (disk full) and line separators (issue 11, items 11 and 18)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rag_instrument as ri
from rag_instrument._runtime import get_runtime
from rag_instrument.logs import render_console, render_json


class FullDisk:
    """os.write for one descriptor: takes ``budget`` bytes, then fails with ENOSPC."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fd = -1
        self.budget: int | None = None  # None: no limit

    def __call__(self, fd: int, data: Any) -> int:
        if fd != self.fd or self.budget is None:
            return int(self.real(fd, data))
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        chunk = bytes(data)[: self.budget]
        self.budget -= len(chunk)
        return int(self.real(fd, chunk))


def test_short_write_never_glues_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "app.log"
    ri.configure(log_file=str(path))
    out = get_runtime().log
    assert out is not None
    disk = FullDisk(os.write)
    disk.fd = out._fd  # type: ignore[assignment]
    monkeypatch.setattr(os, "write", disk)
    log = ri.get_logger()
    log.info("first")
    disk.budget = 20  # the next line is cut after 20 bytes, then the disk is full
    log.info("second", payload="x" * 200)
    log.info("third (disk still full: dropped)")
    disk.budget = None  # space again
    log.info("fourth")
    ri.shutdown()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    events = [json.loads(line)["event"] for line in lines[:-1]]  # every line is whole JSON
    assert events == ["first", "second", "fourth"]


def test_a_cut_line_is_finished_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "app.log"
    ri.configure(log_file=str(path))
    out = get_runtime().log
    assert out is not None
    disk = FullDisk(os.write)
    disk.fd = out._fd  # type: ignore[assignment]
    monkeypatch.setattr(os, "write", disk)
    log = ri.get_logger()
    disk.budget = 15
    log.info("cut", payload="y" * 100)
    disk.budget = None  # space again, but nothing else is logged before exit
    ri.shutdown()
    (line,) = path.read_bytes().splitlines()
    assert json.loads(line)["payload"] == "y" * 100


LINE_BREAKS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\n"]


@pytest.mark.parametrize("renderer", [render_json, render_console])
@pytest.mark.parametrize("brk", LINE_BREAKS)
def test_every_line_break_is_escaped(renderer: Any, brk: str) -> None:
    data = renderer({"event": f"a{brk}b", "field": f"c{brk}d", "context": {"k": f"e{brk}f"}})
    text = data.decode("utf-8")
    assert text.endswith("\n")
    assert len(text.splitlines()) == 1  # Python's reader, the most liberal one


@settings(max_examples=200, deadline=None)
@given(st.text(), st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=4))
def test_any_log_field_gives_one_parseable_line(event: str, fields: dict[str, str]) -> None:
    data = render_json({"event": event, **{f"f_{k}": v for k, v in fields.items()}})
    text = data.decode("utf-8")
    assert len(text.splitlines()) == 1
    assert json.loads(text)["event"] == event


def test_stage_lines_escape_line_breaks_in_bound_values(tmp_path: Path) -> None:
    path = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(path))
    with ri.request_context(note="a\u2028b\u0085c"), ri.stage("retrieval"):
        pass
    ri.shutdown()
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1
    assert json.loads(text)["context"]["note"] == "a\u2028b\u0085c"


def test_lines_written_while_configure_runs_again_stay_in_the_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Threads keep running stages while configure() is called again with the same file:
    # a line whose thread still held the previous configuration's output belongs in the
    # file, not on standard error, and none is lost.
    import threading

    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log))
    stop = threading.Event()
    runs = [0] * 4

    def work(n: int) -> None:
        while not stop.is_set():
            with ri.stage("retrieval"):
                pass
            runs[n] += 1

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(30):
            ri.configure(log_file=str(log))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    ri.shutdown()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    completed = [line for line in lines if line["event"] == "retrieval completed"]
    assert len(completed) == sum(runs)
    assert "retrieval completed" not in capfd.readouterr().err


def test_a_closed_output_hands_late_lines_to_its_successor(tmp_path: Path) -> None:
    from rag_instrument.logs import LogOutput

    old = LogOutput(ri.Settings(log_file=str(tmp_path / "a.jsonl")))
    new = LogOutput(ri.Settings(log_file=str(tmp_path / "b.jsonl")))
    old.write(b'{"n": 1}\n')
    old.close(new)
    old.write(b'{"n": 2}\n')  # a thread that still held the old output
    new.close()
    old.write(b'{"n": 3}\n')  # after shutdown: dropped
    assert (tmp_path / "a.jsonl").read_text() == '{"n": 1}\n'
    assert (tmp_path / "b.jsonl").read_text() == '{"n": 2}\n'


def test_a_rotated_or_deleted_log_file_is_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # logrotate's default renames the file and expects the writer to open a new one at
    # the same path; lines went on into the renamed file (and, once it was deleted, to
    # a descriptor of a deleted file: lost, its space never freed).
    from rag_instrument import logs

    monkeypatch.setattr(logs, "_REOPEN_CHECK_S", 0.0)  # check at every line (else each 1 s)
    log = tmp_path / "app.log"
    ri.configure(log_file=str(log))
    try:
        ri.get_logger().info("one")
        log.rename(tmp_path / "app.log.1")
        ri.get_logger().info("two")
        (tmp_path / "app.log.1").unlink()
        ri.get_logger().info("three")
    finally:
        ri.shutdown()
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()] == [
        "two",
        "three",
    ]


def test_lines_a_full_disk_loses_are_reported_on_stderr_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # /dev/full takes nothing: every line was dropped, and nothing said so.
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    ri.configure(log_file="/dev/full")
    try:
        for _ in range(5):
            ri.get_logger().warning("lost")
    finally:
        ri.shutdown()
    err = capsys.readouterr().err
    assert err.count("log lines are being lost") == 1
    assert "/dev/full" in err


def test_a_relative_log_file_is_followed_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rotation check stat()ed the relative path in the new directory, found nothing,
    # and started a second file there.
    from rag_instrument import logs

    monkeypatch.setattr(logs, "_REOPEN_CHECK_S", 0.0)
    (tmp_path / "app").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "app")
    ri.configure(log_file="app.jsonl")
    try:
        ri.get_logger().info("one")
        monkeypatch.chdir(tmp_path / "elsewhere")
        ri.get_logger().info("two")
    finally:
        ri.shutdown()
    assert not (tmp_path / "elsewhere" / "app.jsonl").exists()
    lines = (tmp_path / "app" / "app.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["one", "two"]


def test_a_signal_handler_that_logs_does_not_hang_the_process(tmp_path: Path) -> None:
    # A handler runs on the thread it interrupts, which may be writing a line under the
    # output's lock: with a plain lock it waited for itself forever (RELIABILITY A8).
    code = textwrap.dedent(
        f"""
        import logging, os, signal, threading, time
        import rag_instrument as ri
        ri.configure(log_file={str(tmp_path / "a.jsonl")!r})
        handled = []
        def on_term(signum, frame):
            handled.append(signum)
            logging.getLogger("app").warning("SIGTERM, draining")
        signal.signal(signal.SIGTERM, on_term)
        def killer():
            for _ in range(200):
                time.sleep(0.002)
                os.kill(os.getpid(), signal.SIGTERM)
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        @ri.stage("retrieval")
        def step():
            return 1
        while thread.is_alive():
            step()
        print("done", len(handled))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done")

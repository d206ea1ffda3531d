"""Every wait bounded, every OS error one line (issue 21): a server that accepts and never
answers costs its input ``--timeout`` seconds, not the run; a full disk, a file where a folder
belongs (or a folder where a file does) at the lock, the settings, the zoo cache, the index and
the report is one line naming the path and the reason, never a traceback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import SEED, report_of, run, start
from imagefactory import save_rgb


@pytest.fixture
def silent_server():
    """``http://127.0.0.1:PORT``: accepts every connection and never answers a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    for conn in held:
        conn.close()
    listener.close()


def test_a_server_that_never_answers_fails_its_inputs_after_timeout_and_the_run_goes_on(
    silent_server, tmp_path
):
    """A URL named, a tar URL (listed when the run starts) and a URL in a list (read with the
    images): each fails in one line after --timeout; the local image is written; exit 1."""
    pytest.importorskip("aiohttp")
    save_rgb(tmp_path / "in" / "good.png", 32, 40, seed=1)
    (tmp_path / "urls.txt").write_text(f"{silent_server}/listed.png\n")
    urls = [f"{silent_server}/named.png", f"{silent_server}/shard.tar"]
    began = time.monotonic()
    proc = start(
        tmp_path / "in",
        *urls,
        "--list",
        tmp_path / "urls.txt",
        "-o",
        tmp_path / "out",
        "--timeout",
        "1",
        *SEED,
    )
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - began < 60  # was 300 s per URL, then exit 2
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    for name in ("named.png", "shard.tar"):
        assert f"failed: {silent_server}/{name}: timed out after 1 s listing it (--timeout)\n" in stderr
    assert (
        f"failed: {silent_server}/listed.png: timed out after 1 s reading or decoding it (--timeout)\n"
        in stderr
    )
    assert (tmp_path / "out" / "good" / "p2.npy").is_file()
    report = report_of(tmp_path / "out")
    assert report["counts"] == {"ok": 1, "skipped": 0, "failed": 3}


def test_a_list_file_behind_a_server_that_never_answers_is_one_line_after_timeout(silent_server, tmp_path):
    pytest.importorskip("aiohttp")
    began = time.monotonic()
    result = run("--list", f"{silent_server}/urls.txt", "-o", tmp_path / "out", "--timeout", "1", *SEED)
    assert time.monotonic() - began < 30
    assert result.exit_code == 2
    assert (
        result.output
        == f"Error: cannot read --list {silent_server}/urls.txt: timed out after 1 s (--timeout)\n"
    )

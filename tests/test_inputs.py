"""Inputs beyond files and folders: list files, WebDataset tar shards of images, fsspec URLs
(memory://, a local HTTP server, S3 through a local moto server). Each kind's features must equal
those of the same images read from local files."""

from __future__ import annotations

import http.server
import io
import os
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from fpn_cli import open_features
from fpn_cli.inputs.sources import read_list

from conftest import SEED, report_of, run
from imagefactory import save_rgb, truncated_jpeg

NAMES = ["a.png", "b.png", "sub/c.png"]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> tuple[Path, dict]:
    """Three images in a folder, and their features read from local files: the reference."""
    root = tmp_path_factory.mktemp("local")
    for i, name in enumerate(NAMES):
        save_rgb(root / "in" / name, 32, 24 + 8 * i, seed=i)
    assert run(root / "in", "-o", root / "out", *SEED).exit_code == 0
    features = open_features(root / "out")
    return root / "in", {key: {k: np.array(v) for k, v in features[key].items()} for key in features}


def assert_features(out: str | Path, expected: dict) -> None:
    got = open_features(out)
    assert sorted(got) == sorted(expected)
    for key, levels in expected.items():
        for level, array in levels.items():
            assert np.array_equal(got[key][level], array), (key, level)


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_list_files_text_csv_tsv_and_parquet(local, tmp_path):
    folder, expected = local
    a, b, c = (str(folder / name) for name in NAMES)
    (tmp_path / "one.txt").write_text(f"{a}\n")
    (tmp_path / "two.csv").write_text(f"label,file\n1,{b}\n")
    (tmp_path / "three.tsv").write_text(f"file\tlabel\n{c}\t2\n")
    lists = ["--list", tmp_path / "one.txt", "--list", tmp_path / "two.csv", "--list", tmp_path / "three.tsv"]
    result = run(*lists, "--list-column", "file", "-o", tmp_path / "out", "--format", "shards", *SEED)
    assert result.exit_code == 0, result.output
    # listed files are relative to their deepest common folder (keys.py): sub/ is kept
    assert [e["path"] for e in report_of(tmp_path / "out")["images"]] == ["a.png", "b.png", "sub/c.png"]
    assert_features(tmp_path / "out", expected)


def test_lists_written_on_windows_byte_order_mark_and_crlf(local, tmp_path):
    """Excel's CSV starts with a UTF-8 byte-order mark and ends lines with CRLF; Notepad's text
    lists too: the paths come out as written."""
    folder, expected = local
    a, b = (str(folder / name) for name in NAMES[:2])
    (tmp_path / "excel.csv").write_bytes(f"\ufeffpath,label\r\n{a},1\r\n".encode())
    (tmp_path / "notepad.txt").write_bytes(f"\ufeff{b}\r\n".encode())
    lists = ["--list", tmp_path / "excel.csv", "--list", tmp_path / "notepad.txt"]
    result = run(*lists, "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 0, result.output
    assert [e["path"] for e in report_of(tmp_path / "out")["images"]] == ["a.png", "b.png"]


def test_one_bad_tar_among_many_is_a_failed_input_not_the_end_of_the_run(local, tmp_path):
    """A listed tar that is no tar, and a brace pattern's shard that is missing: failed inputs
    (exit 1) beside the good shards' images, as a missing listed file is."""
    folder, expected = local
    make_tar(tmp_path / "shard-0.tar", {"a.png": (folder / "a.png").read_bytes()})
    make_tar(tmp_path / "shard-2.tar", {"b.png": (folder / "b.png").read_bytes()})
    (tmp_path / "junk.tar").write_bytes(b"x" * 3000)
    (tmp_path / "tars.txt").write_text(f"{tmp_path / 'shard-0.tar'}\n{tmp_path / 'junk.tar'}\n")
    listed = run("--list", tmp_path / "tars.txt", "-o", tmp_path / "out", *SEED)
    assert listed.exit_code == 1 and "Traceback" not in listed.output
    assert "junk.tar: not a readable tar file" in listed.output
    assert [e["status"] for e in report_of(tmp_path / "out")["images"]] == ["ok", "failed"]
    pattern = run(str(tmp_path / "shard-{0..2}.tar"), "-o", tmp_path / "out2", *SEED)
    assert pattern.exit_code == 1 and f"{tmp_path / 'shard-1.tar'}: does not exist" in pattern.output
    assert sorted(e["path"] for e in report_of(tmp_path / "out2")["images"] if e["status"] == "ok") == [
        "a.png",
        "b.png",
    ]


def test_a_link_member_named_like_an_image_is_a_failed_input(local, tmp_path):
    folder, _ = local
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        data = (folder / "a.png").read_bytes()
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tar.addfile(link)
    result = run(tmp_path / "s.tar", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 1 and "b.png: a link in its tar, not read" in result.output
    statuses = {e["path"]: e["status"] for e in report_of(tmp_path / "out")["images"]}
    assert statuses == {"a.png": "ok", "b.png": "failed"}


def test_a_parquet_list_and_a_missing_column(local, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder, _ = local
    table = pa.table({"path": [str(folder / n) for n in NAMES], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "l.parquet")
    assert read_list(str(tmp_path / "l.parquet")) == [str(folder / n) for n in NAMES]
    result = run("--list", tmp_path / "l.parquet", "--list-column", "url", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 2 and "no column 'url' (columns: path, n)" in result.output


def test_webdataset_tar_shards_as_inputs(local, tmp_path):
    folder, expected = local
    px = {name: (folder / name).read_bytes() for name in NAMES}
    # a label member beside an image, as WebDataset datasets have; a member named to escape
    make_tar(tmp_path / "data-000000.tar", {"a.png": px["a.png"], "a.cls": b"3", "b.png": px["b.png"]})
    make_tar(tmp_path / "data-000001.tar", {"sub/c.png": px["sub/c.png"], "../evil.png": px["b.png"]})
    result = run(str(tmp_path / "data-{000000..000001}.tar"), "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 1
    assert "data-000001.tar#../evil.png: unsafe name: it would be written outside" in result.output
    entries = {e["path"]: e["status"] for e in report_of(tmp_path / "out")["images"]}
    assert entries == {"a.png": "ok", "b.png": "ok", "sub/c.png": "ok", "../evil.png": "failed"}
    assert_features(tmp_path / "out", expected)  # each member's key + extension, as WebDataset names it
    assert not (tmp_path / "evil").exists()


def test_a_corrupt_member_is_a_failed_input_and_the_others_are_written(local, tmp_path):
    folder, _ = local
    truncated_jpeg(tmp_path / "bad.jpg", 32, 32)
    members = {"bad.jpg": (tmp_path / "bad.jpg").read_bytes(), "a.png": (folder / "a.png").read_bytes()}
    result = run(make_tar(tmp_path / "in.tar", members), "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 1 and "in.tar#bad.jpg: truncated or corrupt image" in result.output
    assert report_of(tmp_path / "out")["counts"] == {"ok": 1, "skipped": 0, "failed": 1}


@pytest.fixture
def memory_fs():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


def test_memory_urls_in_and_shards_out(local, memory_fs, tmp_path):
    folder, expected = local
    for name in NAMES:
        memory_fs.pipe_file(f"/in/{name}", (folder / name).read_bytes())
    args = ["memory://in", "-o", "memory://feats", "--format", "shards", *SEED]
    assert run(*args).exit_code == 0
    assert sorted(p.rsplit("/", 1)[1] for p in memory_fs.find("/feats/shards")) == [
        "000000.jsonl",
        "000000.tar",
        "index.jsonl",
    ]
    assert_features("memory://feats", expected)
    again = run(*args[:-1], "--arch", "seed", "--device", "cpu")
    assert again.exit_code == 0 and "0 written, 3 already complete" in again.output
    summary = run("--summary", "memory://in/*.png", "memory://in/sub/c.png", "--arch", "seed")
    assert summary.exit_code == 0 and "dataset: 3 images (3 sizes)" in summary.output


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """http.server's files, with the single byte ranges that tar members are read by."""

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if match is None or not os.path.isfile(path):
            return super().send_head()
        data = Path(path).read_bytes()
        start, end = int(match.group(1)), int(match.group(2) or len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])

    def log_message(self, *args):
        pass


def test_https_style_urls_from_a_local_http_server(local, tmp_path):
    pytest.importorskip("aiohttp")
    folder, expected = local
    make_tar(tmp_path / "s.tar", {"sub/c.png": (folder / "sub/c.png").read_bytes()})
    (tmp_path / "a.png").write_bytes((folder / "a.png").read_bytes())
    (tmp_path / "b c.png").write_bytes((folder / "b.png").read_bytes())  # its URL says b%20c.png
    handler = lambda *a, **kw: RangeHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        (tmp_path / "urls.txt").write_text(f"{base}/b%20c.png\n")
        inputs = [f"{base}/a.png?token=x", f"{base}/s.tar", "--list", tmp_path / "urls.txt"]  # a query
        result = run(*inputs, "-o", tmp_path / "out", *SEED)
        assert result.exit_code == 0, result.output
        assert_features(tmp_path / "out", {("b c" if k == "b" else k): v for k, v in expected.items()})
        missing = run(f"{base}/nothing.png", "-o", tmp_path / "out2", *SEED)
        assert missing.exit_code == 2 and f"input {base}/nothing.png does not exist" in missing.output
        # a server that cannot be reached is said so, not called a missing file
        (tmp_path / "down.txt").write_text(f"{base}/nothing.png\nhttp://127.0.0.1:1/x.png\n")
        down = run("--list", tmp_path / "down.txt", "-o", tmp_path / "out3", *SEED)
        assert down.exit_code == 1 and f"failed: {base}/nothing.png: does not exist" in down.output
        assert "failed: http://127.0.0.1:1/x.png: cannot read: " in down.output
    finally:
        server.shutdown()


def test_s3_in_and_out_through_a_local_moto_server(local, tmp_path, monkeypatch):
    """The CLI against an S3 endpoint on this machine (moto's server mode), found as boto finds
    any endpoint: through AWS_ENDPOINT_URL."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    folder, expected = local
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        for name in NAMES[:2]:
            fs.pipe_file(f"bucket/in/{name}", (folder / name).read_bytes())
        make_tar(tmp_path / "s.tar", {"sub/c.png": (folder / "sub/c.png").read_bytes()})
        fs.put_file(str(tmp_path / "s.tar"), "bucket/tars/s.tar")
        args = ["s3://bucket/in/", "s3://bucket/tars/s.tar", "-o", "s3://bucket/feats", "--format", "shards"]
        result = run(*args, *SEED)
        assert result.exit_code == 0, result.output
        assert fs.exists("bucket/feats/shards/000000.tar") and fs.exists("bucket/feats/report.json")
        assert_features("s3://bucket/feats", expected)
        again = run(*args, "--arch", "seed", "--device", "cpu")
        assert again.exit_code == 0 and "0 written, 3 already complete" in again.output
        lost = run("s3://bucket/in/", "-o", "s3://no-such-bucket/feats", "--format", "shards", *SEED)
        assert lost.exit_code == 2 and "Traceback" not in lost.output
        assert "cannot use --out s3://no-such-bucket/feats: " in lost.output
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_a_url_whose_backend_is_missing_names_the_extra(tmp_path):
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    result = run("gs://bucket/x.png", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 2
    message = "gs://bucket/x.png: gs:// needs a package that is not installed: pip install 'fpn-extract[gcs]'"
    assert message in result.output

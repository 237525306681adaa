"""Downloads against a local HTTP server on 127.0.0.1; no real site is ever contacted."""
import dataclasses
import functools
import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from data import SCENES, load_scene
from data.loading import download, ensure_file
from utils.errors import UserError


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/cut":  # announce 10,000 bytes, send 100, hang up
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, folder it serves)."""
    root = tmp_path / "srv"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def payload(server):
    body = np.random.default_rng(0).bytes(150_000)
    (server[1] / "file.bin").write_bytes(body)
    return body, hashlib.sha256(body).hexdigest()


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_good_download(server, payload, tmp_path):
    body, sha = payload
    dest = download(f"{server[0]}/file.bin", tmp_path / "out" / "file.bin", len(body), sha)
    assert dest.read_bytes() == body
    assert _leftovers(tmp_path / "out") == ["file.bin"]


def test_wrong_sha_deletes_file(server, payload, tmp_path):
    body, sha = payload
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError) as err:
        download(f"{server[0]}/file.bin", tmp_path / "out" / "file.bin", len(body), "0" * 64)
    assert "file.bin" in str(err.value) and sha in str(err.value) and "0" * 64 in str(err.value)
    assert _leftovers(tmp_path / "out") == []


def test_wrong_size_is_refused(server, payload, tmp_path):
    body, sha = payload
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=f"file.bin.*{len(body)} bytes, expected {len(body) + 1}"):
        download(f"{server[0]}/file.bin", tmp_path / "out" / "file.bin", len(body) + 1, sha)
    assert _leftovers(tmp_path / "out") == []


def test_cut_off_download_leaves_nothing(server, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"cut\.mat.*cut off after 100 of 10000 bytes"):
        download(f"{server[0]}/cut", tmp_path / "out" / "cut.mat", 10000, None)
    assert _leftovers(tmp_path / "out") == []


def test_http_error_and_refused_connection(server, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"nothere\.mat.*404"):
        download(f"{server[0]}/nothere.mat", tmp_path / "out" / "nothere.mat", None, None)
    with pytest.raises(UserError, match=r"closed\.mat"):
        download("http://127.0.0.1:9/closed.mat", tmp_path / "out" / "closed.mat", None, None, timeout=5)
    assert _leftovers(tmp_path / "out") == []


def test_missing_file_without_download_says_where_and_url(tmp_path):
    info = SCENES["SalinasA"]
    with pytest.raises(UserError) as err:
        ensure_file(info, "cube", tmp_path, download=False)
    msg = str(err.value)
    assert "SalinasA_corrected.mat" in msg and str(tmp_path.resolve()) in msg and info.cube.url in msg
    assert "curl" in msg


def test_known_scene_downloaded_from_local_server(server, tmp_path, monkeypatch):
    real = os.environ.get("HSI_DATA_DIR", "")
    if not real or not Path(real).is_dir():
        pytest.skip("HSI_DATA_DIR is not set to the folder of real scene files")
    base, root = server
    info = SCENES["SalinasA"]
    for spec in (info.cube, info.gt):
        shutil.copy(Path(real) / spec.name, root / spec.name)  # tmp only
    monkeypatch.setitem(SCENES, "SalinasA", dataclasses.replace(
        info, cube=dataclasses.replace(info.cube, url=f"{base}/{info.cube.name}"),
        gt=dataclasses.replace(info.gt, url=f"{base}/{info.gt.name}")))
    scene = load_scene("SalinasA", data_dir=str(tmp_path / "dl"))
    assert scene.cube.shape == (83, 86, 204) and (scene.gt > 0).sum() == 5348
    assert _leftovers(tmp_path / "dl") == ["SalinasA_corrected.mat", "SalinasA_gt.mat"]

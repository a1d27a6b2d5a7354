"""Soak: generated load, faults on a schedule, and restores compared with
the live database, for N minutes.

    python -m bench.soak --minutes 10

Several writer processes (this module with ``--writer``) commit rows into
one database through ``sqlrepl.connect``, replicating to a real S3 server
(SeaweedFS) through a fault proxy; one of them replicates, the others stand
by. Between checks, one fault at a time, in a shuffled rotation:

- ``s3_restart``: the S3 server is killed (SIGKILL) and, a few seconds later,
  started again on the same data;
- ``proxy_errors``: the proxy answers the next requests with 500, 503
  SlowDown, a stall, or a connection cut mid-request or mid-response;
- ``foreign_checkpoint``: another process runs ``PRAGMA
  wal_checkpoint(TRUNCATE)`` or ``(RESTART)`` with a 5 s busy timeout;
- ``sigkill_replicator``: the writer process that replicates is killed with
  SIGKILL and started again (another writer takes over meanwhile);
- ``staging_full``: the staging folder is a small tmpfs, filled to the last
  byte for a few seconds and then emptied (skipped, with the reason printed,
  where tmpfs cannot be mounted).

Every minute, and at the end, a check: the writers pause between
transactions, one of them runs ``sqlrepl.sync()``, then the replica is
restored into a temporary file and compared **byte for byte** with an image
of the live database taken in one read transaction (``serialize()``, which
reads every page through SQLite, WAL included). With the writers paused and
``sync()`` returned, the replica's newest state and the live database are at
the same txid, so the two files must be identical. Rows acknowledged (a
``commit()`` that returned) are counted from the writers' output; every one
of them must be in the restored database.

Exit status 0 when no acknowledged row is missing, no restore differs, and
every check could sync; 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAULTS = ("s3_restart", "proxy_errors", "foreign_checkpoint", "sigkill_replicator", "staging_full")
STAGING_TMPFS_BYTES = 256 << 20
SYNC_TIMEOUT = 180.0
EVENT_DEADLINE = 120.0  # generous, for a loaded 2-core machine


# -- the writer process -------------------------------------------------------


def writer_main(db: str, url: str, writer: int, pace: float, seed: int) -> int:
    """Commit rows until told to stop; report each acknowledged commit.

    Protocol on stdout, one line each: ``ready``, ``a FIRST LAST MS`` (rows
    FIRST..LAST of this writer committed; the commit took MS milliseconds),
    ``role R``, ``e MESSAGE`` (a commit that failed: not acknowledged),
    ``paused``, ``synced`` / ``syncfail MESSAGE``, ``stopped``. Commands on
    stdin: ``pause``, ``resume``, ``sync``, ``stop``.
    """
    import sqlrepl

    rng = random.Random(seed)
    commands: queue.Queue[str] = queue.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("stop")

    threading.Thread(target=read_commands, daemon=True).start()

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    conn = sqlrepl.connect(db, url, timeout=60)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS rows(writer INTEGER, seq INTEGER, payload BLOB, PRIMARY KEY(writer, seq))"
    )
    conn.execute("CREATE TABLE IF NOT EXISTS counters(writer INTEGER PRIMARY KEY, seq INTEGER)")
    conn.execute("CREATE TABLE IF NOT EXISTS churn(id INTEGER PRIMARY KEY, writer INTEGER, data BLOB)")
    conn.commit()
    # A restarted writer continues after the last row it committed (which
    # may be one it was killed before acknowledging).
    (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM rows WHERE writer = ?", (writer,)).fetchone()
    say("ready")
    role = ""
    checked = 0.0
    paused = False
    while True:
        try:
            command = commands.get_nowait()
        except queue.Empty:
            command = ""
        if command == "pause":
            paused = True
            say("paused")
        elif command == "resume":
            paused = False
        elif command == "sync":
            try:
                sqlrepl.sync(db, timeout=SYNC_TIMEOUT)
                say("synced")
            except sqlrepl.SqlreplError as exc:
                say(f"syncfail {type(exc).__name__}: {exc}".replace("\n", " "))
        elif command == "stop":
            conn.close()
            say("stopped")
            return 0
        if paused:
            with contextlib.suppress(queue.Empty):
                commands.put(commands.get(timeout=0.5))
            continue
        if time.monotonic() - checked > 0.5:
            checked = time.monotonic()
            now = sqlrepl.status(db).role
            if now != role:
                role = now
                say(f"role {role}")
        n = 100 if rng.random() < 0.003 else rng.randint(1, 4)  # now and then a large transaction
        first = last + 1
        # Hex text: random, and compressible about as much as real rows.
        rows = [(writer, first + i, rng.randbytes(rng.choice((10, 30, 100, 400))).hex()) for i in range(n)]
        started = time.monotonic()
        try:
            conn.executemany("INSERT INTO rows VALUES (?, ?, ?)", rows)
            conn.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (writer, first + n - 1))
            # Churn: pages freed and reused, so restores see overwrites too.
            conn.execute("INSERT INTO churn(writer, data) VALUES (?, ?)", (writer, rng.randbytes(300).hex()))
            conn.execute(
                "DELETE FROM churn WHERE writer = ? AND id NOT IN"
                " (SELECT id FROM churn WHERE writer = ? ORDER BY id DESC LIMIT 50)",
                (writer, writer),
            )
            conn.commit()
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            say(f"e {type(exc).__name__}: {exc}")
            continue
        ms = (time.monotonic() - started) * 1000
        last = first + n - 1
        say(f"a {first} {last} {ms:.1f}")
        time.sleep(pace)  # load pacing: a steady rate, not a synchronisation


# -- the orchestrator ---------------------------------------------------------


@dataclass
class Writer:
    """One writer process and what it has reported."""

    id: int
    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    role: str = ""


@dataclass
class Tally:
    acked: dict[int, set[int]] = field(default_factory=dict)
    commits: int = 0
    slowest_ms: float = 0.0
    commit_errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)
    checkpoints: Counter[str] = field(default_factory=Counter)
    checkpoint_longest: float = 0.0
    lost_in_checks: int = 0
    slowest_sync: float = 0.0
    checks: int = 0
    byte_equal: int = 0
    mismatches: int = 0
    sync_failures: int = 0
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Soak:
    def __init__(self, work: Path, writers: int, pace: float, seed: int, verbose: bool) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from faultproxy import FaultProxy
        from s3server import SeaweedS3

        self.work = work
        self.db = str(work / "soak.db")
        self.staging = self.db + "-sqlrepl"
        self.rng = random.Random(seed)
        self.seed = seed
        self.pace = pace
        self.verbose = verbose
        self.tally = Tally()
        self.writers: dict[int, Writer] = {}
        self.n_writers = writers
        self.server = SeaweedS3(work / "seaweedfs")
        self.server.start()
        self.bucket = f"soak-{secrets.token_hex(4)}"
        self.server.create_bucket(self.bucket)
        self.proxy = FaultProxy("127.0.0.1", self.server.s3_port)
        self.proxy.start()
        self.url = f"s3://{self.bucket}/soak?endpoint={self.proxy.endpoint}"
        self.direct_url = f"s3://{self.bucket}/soak?endpoint={self.server.endpoint}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if "AWS_CA_BUNDLE" in os.environ:
            self.env["AWS_CA_BUNDLE"] = os.environ["AWS_CA_BUNDLE"]
        self.env.update(self.server.env())
        self.env.update(
            {
                "AWS_CONFIG_FILE": str(work / "aws-config-absent"),
                "AWS_SHARED_CREDENTIALS_FILE": str(work / "aws-credentials-absent"),
                "AWS_EC2_METADATA_DISABLED": "true",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep
                ),
            }
        )
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AWS_")})
        self.tmpfs = self._mount_staging()

    # -- set-up -----------------------------------------------------------------

    def _mount_staging(self) -> bool:
        os.makedirs(self.staging, exist_ok=True)
        if not sys.platform.startswith("linux"):
            self.tally.skipped["staging_full"] = "not Linux: no tmpfs"
            return False
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={STAGING_TMPFS_BYTES}", "tmpfs", self.staging],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            self.tally.skipped["staging_full"] = f"cannot mount a tmpfs on the staging folder: {why[-1:]}"
            return False
        return True

    def close(self) -> None:
        for w in list(self.writers.values()):
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
        with contextlib.suppress(Exception):
            self.proxy.stop()
        with contextlib.suppress(Exception):
            self.server.close()
        if self.tmpfs:
            subprocess.run(["umount", "-l", self.staging], check=False)

    # -- writers ----------------------------------------------------------------

    def start_writer(self, wid: int) -> None:
        proc = subprocess.Popen(
            [
                *(
                    sys.executable,
                    "-m",
                    "bench.soak",
                    "--writer",
                    str(wid),
                    "--db",
                    self.db,
                    "--url",
                    self.url,
                ),
                *("--pace", str(self.pace), "--seed", str(self.rng.randrange(1 << 30))),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.work / f"writer-{wid}.log", "a"),  # noqa: SIM115 - the child owns it
            text=True,
            bufsize=1,
            cwd=ROOT,
            env=self.env,
        )
        w = Writer(wid, proc)
        self.writers[wid] = w
        threading.Thread(target=self._read, args=(w,), daemon=True).start()
        self.expect(w, "ready")

    def _read(self, w: Writer) -> None:
        assert w.proc.stdout is not None
        t = self.tally
        for line in w.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("a "):
                _, first, last, ms = line.split()
                with t.lock:
                    t.acked.setdefault(w.id, set()).update(range(int(first), int(last) + 1))
                    t.commits += 1
                    t.slowest_ms = max(t.slowest_ms, float(ms))
                continue
            if line.startswith("role "):
                w.role = line[5:]
            elif line.startswith("e "):
                with t.lock:
                    t.commit_errors[line[2:].split(":")[0]] += 1
            if self.verbose and not line.startswith("a "):
                print(f"  writer {w.id}: {line}", flush=True)
            w.lines.put(line)
        w.lines.put("<exited>")

    def expect(self, w: Writer, prefix: str) -> str:
        """The next line of ``w`` that starts with ``prefix`` (control lines only)."""
        deadline = time.monotonic() + EVENT_DEADLINE + SYNC_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"writer {w.id}: no {prefix!r} line within the deadline")
            try:
                line = w.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "<exited>":
                raise RuntimeError(f"writer {w.id} exited (see {self.work}/writer-{w.id}.log)")
            if line.startswith(prefix) or (prefix == "synced" and line.startswith("syncfail")):
                return line

    def tell(self, w: Writer, command: str) -> None:
        assert w.proc.stdin is not None
        w.proc.stdin.write(command + "\n")
        w.proc.stdin.flush()

    # -- faults -----------------------------------------------------------------

    def fault(self, kind: str) -> None:
        getattr(self, f"_fault_{kind}")()
        self.tally.faults[kind] += 1
        usage = shutil.disk_usage(self.staging)
        print(
            f"[{self.elapsed():6.0f}s] fault {kind}; staging folder {usage.used >> 20} MiB used,"
            f" {os.path.getsize(self.db) >> 20} MiB database",
            flush=True,
        )

    def _fault_s3_restart(self) -> None:
        self.server.stop(grace=0)
        time.sleep(self.rng.uniform(2, 6))  # the outage's length
        self.server.start()

    def _fault_proxy_errors(self) -> None:
        kind = self.rng.choice(("http500", "slowdown", "stall", "cut_request", "cut_response"))
        self.proxy.inject(
            kind, times=self.rng.randint(1, 6), seconds=3.0, after_bytes=self.rng.randint(1, 2000)
        )
        self.tally.faults[f"proxy_errors:{kind}"] += 1
        time.sleep(self.rng.uniform(2, 5))  # while the faults are queued
        self.proxy.clear()

    def _fault_foreign_checkpoint(self) -> None:
        mode = self.rng.choice(("TRUNCATE", "RESTART"))
        code = (
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], timeout=5)\n"
            "t = time.monotonic()\n"
            f"r = c.execute('PRAGMA wal_checkpoint({mode})').fetchone()\n"
            "print(r[0], r[1], r[2], round(time.monotonic() - t, 2))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, self.db], capture_output=True, text=True, timeout=300, check=False
        )
        parts = done.stdout.split()
        if done.returncode != 0 or len(parts) != 4:
            self.tally.checkpoints[f"{mode} error"] += 1
            self.tally.notes.append(f"foreign {mode} checkpoint failed: {done.stderr.strip()[-200:]}")
            return
        busy, seconds = parts[0] == "1", float(parts[3])
        self.tally.checkpoints[f"{mode} {'busy' if busy else 'done'}"] += 1
        self.tally.checkpoint_longest = max(self.tally.checkpoint_longest, seconds)

    def _fault_sigkill_replicator(self) -> None:
        replicating = [w for w in self.writers.values() if w.role == "replicating"]
        if not replicating:
            # The role is reported every half second; the previous holder
            # may have just died. Kill one anyway: it may hold the lock.
            self.tally.notes.append("sigkill: no writer reported 'replicating'; killed writer 0")
            replicating = [self.writers[0]]
        victim = replicating[0]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        self.start_writer(victim.id)

    def _fault_staging_full(self) -> None:
        filler = os.path.join(self.staging, "filler")
        try:
            with open(filler, "wb", buffering=0) as f:
                for size in (1 << 20, 4096, 1):
                    with contextlib.suppress(OSError):
                        while True:
                            f.write(b"\0" * size)
                            f.flush()
        except OSError:
            self.tally.notes.append(
                f"staging_full at {self.elapsed():.0f}s: the staging tmpfs was already full"
            )
        time.sleep(self.rng.uniform(3, 8))  # how long the disk stays full
        with contextlib.suppress(FileNotFoundError):
            os.unlink(filler)

    # -- checks -----------------------------------------------------------------

    def check(self, final: bool = False) -> None:
        """Pause every writer, sync, restore, compare byte for byte, resume."""
        t = self.tally
        self.proxy.clear()
        ws = list(self.writers.values())
        for w in ws:
            self.tell(w, "pause")
        for w in ws:
            self.expect(w, "paused")
        t.checks += 1
        asked = time.monotonic()
        self.tell(ws[0], "sync")
        synced = self.expect(ws[0], "synced")
        t.slowest_sync = max(t.slowest_sync, time.monotonic() - asked)
        label = "final check" if final else "check"
        if synced != "synced":
            t.sync_failures += 1
            t.notes.append(f"{label} at {self.elapsed():.0f}s: {synced}")
            print(f"[{self.elapsed():6.0f}s] {label}: {synced}", flush=True)
            if not final:
                for w in ws:
                    self.tell(w, "resume")
            return
        with t.lock:
            acked = {k: set(v) for k, v in t.acked.items()}
        same, restored_rows, lost, how = self._compare(acked)
        t.byte_equal += same
        t.mismatches += not same
        t.lost_in_checks += lost
        if lost:
            t.notes.append(f"{label} at {self.elapsed():.0f}s: {lost} acknowledged rows missing")
        self.last_restored, self.last_lost = restored_rows, lost
        print(
            f"[{self.elapsed():6.0f}s] {label}: {how}; {restored_rows} rows restored,"
            f" {sum(map(len, acked.values()))} acknowledged before the pause, {lost} missing",
            flush=True,
        )
        if not final:
            for w in ws:
                self.tell(w, "resume")

    def _compare(self, acked: dict[int, set[int]]) -> tuple[bool, int, int, str]:
        import sqlrepl

        folder = tempfile.mkdtemp(prefix="restore-", dir=self.work)
        try:
            live = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=60)
            try:
                live.execute("BEGIN")
                live.execute("SELECT count(*) FROM sqlite_schema").fetchone()
                image = live.serialize()
                live.rollback()
            finally:
                live.close()
            target = os.path.join(folder, "restored.db")
            result = sqlrepl.restore(target, self.direct_url, if_replica_exists=False)
            assert result is not None
            with open(target, "rb") as f:
                restored = f.read()
            same = restored == image
            how = f"txid {result.txid}, {len(image)} bytes, " + ("byte-identical" if same else "DIFFERENT")
            if not same:
                first = next(
                    (i for i in range(min(len(image), len(restored))) if image[i] != restored[i]),
                    min(len(image), len(restored)),
                )
                how += f" from byte {first} ({len(restored)} restored)"
                shutil.copy(target, self.work / f"mismatch-{self.tally.checks}.db")
            conn = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
            try:
                have: dict[int, set[int]] = {}
                for w, seq in conn.execute("SELECT writer, seq FROM rows"):
                    have.setdefault(w, set()).add(seq)
            finally:
                conn.close()
            lost = sum(len(seqs - have.get(w, set())) for w, seqs in acked.items())
            return same, sum(map(len, have.values())), lost, how
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- the run ----------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self, minutes: float) -> int:
        self.started = time.monotonic()
        self.last_restored, self.last_lost = 0, 0
        for wid in range(self.n_writers):
            self.start_writer(wid)
        kinds = [k for k in FAULTS if k not in self.tally.skipped]
        for kind, why in self.tally.skipped.items():
            print(f"skipping fault {kind}: {why}", flush=True)
        rotation: list[str] = []
        end = self.started + minutes * 60
        next_check = self.started + 60
        while time.monotonic() < end:
            if time.monotonic() >= next_check:
                self.check()
                next_check += 60
                continue
            if not rotation:
                rotation = self.rng.sample(kinds, len(kinds))
            self.fault(rotation.pop())
            time.sleep(self.rng.uniform(2, 6))  # calm between faults: load only
        self.check(final=True)
        for w in self.writers.values():
            self.tell(w, "stop")
        for w in self.writers.values():
            with contextlib.suppress(RuntimeError):
                self.expect(w, "stopped")
            w.proc.wait(timeout=EVENT_DEADLINE)
        return self.report(minutes)

    def report(self, minutes: float) -> int:
        t = self.tally
        acked = sum(map(len, t.acked.values()))
        rows = [
            ("duration", f"{minutes:g} min ({self.elapsed():.0f} s), {self.n_writers} writer processes"),
            ("commits acknowledged", f"{t.commits}"),
        ]
        for kind in FAULTS:
            if kind in t.skipped:
                rows.append((f"fault {kind}", f"skipped: {t.skipped[kind]}"))
            else:
                detail = ""
                if kind == "proxy_errors":
                    sub = sorted(
                        (k.split(":")[1], n) for k, n in t.faults.items() if k.startswith("proxy_errors:")
                    )
                    detail = " (" + ", ".join(f"{k} {n}" for k, n in sub) + ")" if sub else ""
                if kind == "foreign_checkpoint":
                    sub = sorted(t.checkpoints.items())
                    detail = " (" + ", ".join(f"{k} {n}" for k, n in sub)
                    detail += f"; longest {t.checkpoint_longest:.1f} s)"
                rows.append((f"fault {kind}", f"{t.faults[kind]}{detail}"))
        rows += [
            ("restores compared", f"{t.checks} ({t.byte_equal} byte-identical)"),
            ("mismatches", f"{t.mismatches}"),
            ("checks whose sync failed", f"{t.sync_failures}"),
            ("slowest sync at a check", f"{t.slowest_sync:.1f} s"),
            ("rows acknowledged", f"{acked}"),
            ("rows restored (final)", f"{self.last_restored}"),
            ("rows lost", f"{self.last_lost}"),
            ("slowest app commit", f"{t.slowest_ms / 1000:.2f} s"),
            ("commits that failed", ", ".join(f"{k} {n}" for k, n in t.commit_errors.items()) or "0"),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        print(f"| {'what'.ljust(width)} | result |")
        print(f"|{'-' * (width + 2)}|--------|")
        for k, v in rows:
            print(f"| {k.ljust(width)} | {v} |")
        for note in t.notes:
            print(f"note: {note}")
        failed = t.lost_in_checks or t.mismatches or t.sync_failures or t.checks < 1
        print(f"\nsoak {'FAILED' if failed else 'passed'}: rows lost {self.last_lost}", flush=True)
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--writers", type=int, default=3, help="writer processes (default 3)")
    parser.add_argument("--pace", type=float, default=0.05, help="seconds each writer rests between commits")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the writers' control lines")
    parser.add_argument("--writer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if args.writer is not None:
        return writer_main(args.db, args.url, args.writer, args.pace, seed)
    print(f"soak: {args.minutes:g} minutes, {args.writers} writers, seed {seed}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="sqlrepl-soak-"))
    soak = None
    try:
        soak = Soak(work, args.writers, args.pace, seed, args.verbose)
        return soak.run(args.minutes)
    finally:
        if soak is not None:
            soak.close()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

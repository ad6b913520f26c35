"""The workdir a run owns: checked before any work, and held by one run at a time.

Two runs writing one workdir interleave metric rows and overwrite each
other's checkpoints, so a run takes a lease first: WORKDIR/lease.json names
the holder (host, pid, start time) and a heartbeat time that a background
thread renews. A new run refuses in one line while the lease is live, and
takes it over when the holder is gone: at once when the holder ran on this
host and its pid no longer exists, otherwise once the heartbeat is older than
`STALE_AFTER_S` (a killed run never blocks its workdir for long). On
multi-host runs process 0 holds the lease for all of them.
"""

import contextlib
import datetime
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid

from maejax import paths
from maejax.errors import UserError

LEASE_FILE = "lease.json"
HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 300.0
STORE_PROBE_TIMEOUT_S = 30.0


class WorkdirInUse(UserError):
    """Another live run holds the workdir."""


def check_usable(workdir: str) -> None:
    """Refuse, in one line, a workdir that is a file, cannot be written, or has no store backend.

    Creates the folder when it does not exist yet. A URL (gs://bucket/run)
    needs its fsspec backend installed (gcsfs for gs://) and credentials that
    can write there; both are tried here, before anything compiles.
    """
    paths.check_backend(workdir, "workdir")
    if paths.is_url(workdir):
        _check_store_writable(workdir)
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir!r} is a file, not a folder: pass another --workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-"):
            pass
    except OSError as e:
        raise UserError(
            f"workdir {workdir!r} cannot be written ({e.strerror or type(e).__name__}): "
            "pass a writable --workdir"
        ) from None


def _check_store_writable(workdir: str) -> None:
    """Write and delete one small object under the URL; a failure is one line naming the cause.

    Bounded by STORE_PROBE_TIMEOUT_S: the store client retries an unreachable
    host with backoff for about a minute, which would look like a hang.
    """
    probe = paths.join(workdir, f".write-check-{uuid.uuid4().hex[:8]}")
    outcome = {}

    def write_and_delete():
        try:
            paths.write_atomic(probe, "")
            paths.remove(probe)
            outcome["ok"] = True
        except Exception as e:  # auth, network, a missing bucket: the store's own words say which
            outcome["error"] = e

    thread = threading.Thread(target=write_and_delete, daemon=True, name="maejax-store-probe")
    thread.start()
    thread.join(STORE_PROBE_TIMEOUT_S)
    if outcome.get("ok"):
        return
    error = outcome.get("error")
    if error is None:
        cause = f"no answer within {STORE_PROBE_TIMEOUT_S:.0f} s"
    else:
        text = str(error).splitlines()[0][:200] if str(error) else ""
        cause = f"{type(error).__name__}: {text}"
    raise UserError(
        f"workdir {workdir!r} cannot be written ({cause}): check that the bucket exists, "
        "that this machine reaches it, and your credentials (gcloud auth application-default login)"
    )


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict) -> str:
    return (
        f"host {holder.get('host')} pid {holder.get('pid')}, started {_iso(holder.get('started', 0))}, "
        f"last heartbeat {max(_now() - holder.get('heartbeat', 0), 0):.0f} s ago"
    )


def holder_is_gone(holder: dict, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the lease `holder` may be taken over, or None while it looks alive."""
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return "its process no longer exists"
    age = _now() - float(holder.get("heartbeat", 0))
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f} s old"
    return None


class Lease:
    """Exclusive use of a workdir by this run; a context manager.

    Args:
      workdir: the run's folder (must exist).
      heartbeat_every_s: how often the holder renews the heartbeat.
      stale_after_s: a heartbeat older than this lets another run take over.
    """

    def __init__(
        self, workdir: str, heartbeat_every_s: float = HEARTBEAT_EVERY_S, stale_after_s=STALE_AFTER_S
    ):
        self.workdir = workdir
        self.path = paths.join(workdir, LEASE_FILE)
        self._every = heartbeat_every_s
        self._stale_after = stale_after_s
        self._id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None
        self.lost = None  # set to the new holder's description if another run took the lease

    def _record(self, started: float) -> dict:
        return {
            "id": self._id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": started,
            "heartbeat": _now(),
        }

    def _read(self) -> dict | None:
        try:
            return json.loads(paths.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # torn by a kill mid-write: treat as an unreadable, stale lease
            return {}

    def _create(self) -> bool:
        """Write the lease only if none exists (O_EXCL locally, a create-only precondition on a store)."""
        return paths.create_exclusive(self.path, json.dumps(self._record(_now())))

    def acquire(self) -> "Lease":
        """Take the workdir, or raise WorkdirInUse naming the live holder."""
        for _ in range(3):  # a racing run may create or retire the file between our steps
            holder = self._read()
            if holder is not None:
                reason = (
                    holder_is_gone(holder, self._stale_after) if holder else "its lease file is unreadable"
                )
                if reason is None:
                    raise WorkdirInUse(
                        f"workdir {self.workdir!r} is in use by another run ({describe(holder)}); "
                        f"wait for it to finish or stop it. If it is dead, delete {self.path}"
                    )
                self._retire(holder, reason)
            if self._create():
                break
        else:
            raise WorkdirInUse(f"could not take the workdir lease {self.path}: other runs keep taking it")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="maejax-lease")
        self._thread.start()
        return self

    def _retire(self, holder: dict, reason: str) -> None:
        """Remove a dead holder's lease so that `_create` can take it.

        Locally by a rename first: of several runs taking over at once, one
        wins. A store has no atomic rename; there the lease is deleted and
        the create-only write decides; a run that still loses a race sees
        the other's lease at its next heartbeat and stops before its next
        checkpoint (`check`).
        """
        if paths.is_url(self.path):
            paths.remove(self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, f"{self.path}.{self._id}.stale")
                os.remove(f"{self.path}.{self._id}.stale")
        logging.warning("took over the workdir lease from %s: %s", describe(holder), reason)

    def _beat(self) -> None:
        started = _now()
        while not self._stop.wait(self._every):
            holder = self._read()
            if not holder or holder.get("id") != self._id:
                self.lost = describe(holder) if holder else "nobody (the lease file is gone)"
                logging.error("the workdir lease %s is now held by %s", self.path, self.lost)
                return
            paths.write_atomic(self.path, json.dumps(self._record(holder.get("started", started))))

    def check(self) -> None:
        """Raise if another run has taken the workdir (checked before each checkpoint)."""
        if self.lost:
            raise WorkdirInUse(
                f"another run took over workdir {self.workdir!r} ({self.lost}); "
                "this run stops without writing more"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder and holder.get("id") == self._id:
            paths.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


class NoLease:
    """What processes other than 0 hold: nothing to take, nothing to check."""

    lost = None

    def acquire(self):
        return self

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

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

from maejax.errors import UserError

LEASE_FILE = "lease.json"
HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirInUse(UserError):
    """Another live run holds the workdir."""


def check_usable(workdir: str) -> None:
    """Refuse, in one line, a workdir that is a URL, a file, or cannot be written.

    Creates the folder when it does not exist yet. URLs (gs://...) are refused
    until every write under a workdir goes through a path layer that knows
    them: os.path would silently make `gs://b/x` a local folder `gs:/b/x` on
    each host, and a preempted VM would come back with nothing.
    """
    if "://" in workdir:
        raise UserError(
            f"workdir {workdir!r} is a URL; maejax writes workdirs through the local filesystem only "
            "for now: use a local or shared (NFS, a gcsfuse mount) folder"
        )
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
        self.path = os.path.join(workdir, LEASE_FILE)
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
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # torn by a kill mid-write: treat as an unreadable, stale lease
            return {}

    def _create(self) -> bool:
        """Write the lease only if no file exists (atomic on one filesystem)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(_now()), f)
        return True

    def acquire(self) -> "Lease":
        """Take the workdir, or raise WorkdirInUse naming the live holder."""
        for _ in range(3):  # a racing run may create or retire the file between our steps
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue
            reason = holder_is_gone(holder, self._stale_after) if holder else "its lease file is unreadable"
            if reason is None:
                raise WorkdirInUse(
                    f"workdir {os.path.dirname(self.path)!r} is in use by another run ({describe(holder)}); "
                    f"wait for it to finish or stop it. If it is dead, delete {self.path}"
                )
            # Retire the old lease by renaming it: of several runs taking over at once, one wins.
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, f"{self.path}.{self._id}.stale")
                os.remove(f"{self.path}.{self._id}.stale")
                logging.warning("took over the workdir lease from %s: %s", describe(holder), reason)
        else:
            raise WorkdirInUse(f"could not take the workdir lease {self.path}: other runs keep taking it")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="maejax-lease")
        self._thread.start()
        return self

    def _beat(self) -> None:
        started = _now()
        while not self._stop.wait(self._every):
            holder = self._read()
            if not holder or holder.get("id") != self._id:
                self.lost = describe(holder) if holder else "nobody (the lease file is gone)"
                logging.error("the workdir lease %s is now held by %s", self.path, self.lost)
                return
            tmp = f"{self.path}.{self._id}.tmp"
            with open(tmp, "w") as f:
                json.dump(self._record(holder.get("started", started)), f)
            os.replace(tmp, self.path)

    def check(self) -> None:
        """Raise if another run has taken the workdir (checked before each checkpoint)."""
        if self.lost:
            raise WorkdirInUse(
                f"another run took over workdir {os.path.dirname(self.path)!r} ({self.lost}); "
                "this run stops without writing more"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder and holder.get("id") == self._id:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

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

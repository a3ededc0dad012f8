"""Claims on run folders: one process works in a run folder at a time, and nothing is restarted over silently.

A claim is the file ``RUN/.pbip-claim.json``: ``{"pid", "host", "proc_start", "started", "command", "what", "token"}``.
It is created atomically (a fully written temporary file is hard-linked to the name, which fails if the name
exists), so a claim is either complete or absent, and two processes can never both create it. While the owner works,
a daemon thread refreshes the file's modification time every :data:`HEARTBEAT_S` seconds (the heartbeat).

A claim is **stale**, and is taken over with a message on stderr, when

* its owner ran on this host and that process is gone (``kill -9``, a crash, a reboot): the process id no longer
  exists, or now belongs to a process started at another time (the start time is recorded, so a reused process id is
  recognised on Linux);
* its owner ran on another host and the heartbeat is older than :data:`STALE_AFTER_S` seconds.

Any other claim is live: :class:`~pbip_core.errors.RunClaimedError` names its owner. An owner on this host whose
process still exists is never taken over, even with an old heartbeat (a stopped process may continue). The take-over
runs under an ``flock`` of the run folder, so two processes cannot both take over the same stale claim.

:func:`claim_run` is the context manager the stage-1/stage-2 loops and the grid runner use; :func:`refuse_partial_run`
and :func:`empty_run_folder` are the checks before a run folder is reused (``--resume`` / ``--overwrite``).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, PBIPError, RunClaimedError

CLAIM_NAME = ".pbip-claim.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
#: Files whose presence marks a folder as a pbip run folder (``--overwrite`` empties only such folders).
RUN_MARKERS = ("config.yaml", "last.pt", "best.pt", "history.json", "metrics.json", CLAIM_NAME)


# ---------------------------------------------------------------------------------------------------- owners
def _proc_start(pid: int) -> float | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])        # field 22 of proc(5), counted after the comm field


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                   # exists, owned by another user
        return True
    return True


def this_owner(what: str) -> dict[str, Any]:
    """The claim record of the calling process."""
    now = time.time()
    return {"format": "pbip-claim-v1", "pid": os.getpid(), "host": socket.gethostname(),
            "proc_start": _proc_start(os.getpid()), "started": now,
            "started_iso": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
            "command": " ".join(["pbip", *sys.argv[1:]])[:300], "what": what, "token": uuid.uuid4().hex}


def stale_reason(owner: dict[str, Any], heartbeat_age: float, stale_after: float = STALE_AFTER_S) -> str | None:
    """Why a claim is stale (``None``: it is live). ``heartbeat_age`` is the seconds since its last heartbeat."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int) or not isinstance(host, str):
        return "the claim file is not a pbip claim"
    if host == socket.gethostname():
        if not _pid_alive(pid):
            return f"process {pid} on this host is gone"
        recorded, now = owner.get("proc_start"), _proc_start(pid)
        if recorded is not None and now is not None and recorded != now:
            return f"process id {pid} now belongs to another process"
        return None
    if heartbeat_age > stale_after:
        return f"no heartbeat from host {host} for {heartbeat_age:.0f} s (> {stale_after:.0f} s)"
    return None


def describe(owner: dict[str, Any], heartbeat_age: float | None = None) -> str:
    """``pid 123 on host h (pbip train ..., since 2026-01-01T12:00:00, last heartbeat 4 s ago)``."""
    beat = "" if heartbeat_age is None else f", last heartbeat {heartbeat_age:.0f} s ago"
    return (f"pid {owner.get('pid')} on host {owner.get('host')} ({owner.get('command', '?')}, "
            f"since {owner.get('started_iso', '?')}{beat})")


def read_claim(folder: str | Path) -> tuple[dict[str, Any], float] | None:
    """``(owner, heartbeat age in s)`` of a folder's claim, or None when it has none."""
    path = Path(folder) / CLAIM_NAME
    try:
        text, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        owner = {}
    return (owner if isinstance(owner, dict) else {}), max(0.0, age)


def held_by_another(folder: str | Path, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether a live claim of another process holds ``folder`` now."""
    found = read_claim(folder)
    if found is None:
        return False
    owner, age = found
    return owner.get("pid") != os.getpid() and stale_reason(owner, age, stale_after) is None


# ---------------------------------------------------------------------------------------------------- claims
@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (best effort: file systems without flock go unlocked)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                                          # closing releases the lock


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Atomically create the claim file; False when it exists."""
    fd, tmp = tempfile.mkstemp(prefix=".pbip-claim.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(owner, fh, indent=1)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:                                       # no hard links here: exclusive create instead
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(out, "w") as fh:
                json.dump(owner, fh, indent=1)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class RunClaim:
    """This process's claim on a run folder; refreshed by a heartbeat thread until :meth:`release`."""

    def __init__(self, folder: Path, owner: dict[str, Any], created_folder: bool, heartbeat_s: float) -> None:
        self.folder, self.owner, self.created_folder = folder, owner, created_folder
        self.path = folder / CLAIM_NAME
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"pbip-claim-heartbeat:{folder.name}")
        self._thread.start()

    def _ours(self) -> bool:
        found = read_claim(self.folder)
        return found is not None and found[0].get("token") == self.owner["token"]

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self._ours():
                self.lost = f"{self.path}: this process's claim was removed or taken over"
                print(f"pbip: warning: {self.lost}; another process may now write into {self.folder}",
                      file=sys.stderr, flush=True)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim (only if it is still ours); remove the folder if this claim
        created it and nothing else was written into it."""
        self._stop.set()
        self._thread.join(timeout=5)
        with _folder_lock(self.folder):
            if self._ours():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()                           # only succeeds when empty

    def __enter__(self) -> RunClaim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(folder: str | Path, what: str = "run", stale_after: float = STALE_AFTER_S,
            heartbeat_s: float = HEARTBEAT_S) -> RunClaim:
    """Claim ``folder`` (created if needed) for this process.

    Raises :class:`RunClaimedError` naming the owner when another live process holds it; takes over a stale claim
    with a message on stderr; DataError naming the folder when it cannot be created or written.
    """
    folder = Path(folder)
    created = not folder.exists()
    owner = this_owner(what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CLAIM_NAME
        for _ in range(3):
            if _create(path, owner):
                return RunClaim(folder, owner, created, heartbeat_s)
            with _folder_lock(folder):
                found = read_claim(folder)
                if found is None:
                    continue                                  # released meanwhile: try again
                other, age = found
                reason = stale_reason(other, age, stale_after)
                if reason is None:
                    raise RunClaimedError(
                        f"{folder}: in use by {describe(other, age)}; wait for it to finish, or stop it first "
                        f"(a claim of a process that died is taken over automatically)")
                print(f"pbip: taking over the stale claim on {folder} ({reason}; it was {describe(other, age)})",
                      file=sys.stderr, flush=True)
                path.unlink()
                if _create(path, owner):
                    return RunClaim(folder, owner, created, heartbeat_s)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(f"{folder}: cannot write the run folder ({type(e).__name__}: {e.strerror or e})") from None
    raise RunClaimedError(f"{folder}: claimed by another process while this one was starting; try again")


@contextlib.contextmanager
def claim_run(folder: str | Path, what: str = "run", enabled: bool = True) -> Iterator[RunClaim | None]:
    """``with claim_run(out, "stage-1 run"):`` hold the claim of ``out`` for the block (``enabled=False``: no-op,
    e.g. on DDP ranks other than 0)."""
    if not enabled:
        yield None
        return
    claim = acquire(folder, what)
    try:
        yield claim
    finally:
        claim.release()


# ---------------------------------------------------------------------------------------------------- reuse
def refuse_partial_run(out: Path, resume: bool) -> None:
    """PBIPError when ``out`` holds a run and neither ``--resume`` nor ``--overwrite`` says what to do with it."""
    if resume:
        return
    if (out / "metrics.json").is_file():
        raise PBIPError(f"{out}: already holds a finished run; pass --resume to continue it, --overwrite to start "
                        "over (deletes it), or use a new --out folder")
    if (out / "last.pt").is_file():
        raise PBIPError(f"{out}: holds a partial run (last.pt, no metrics.json); pass --resume to continue it from "
                        "last.pt, --overwrite to start over (deletes it), or use a new --out folder")


def empty_run_folder(out: Path) -> int:
    """``--overwrite``: delete everything in a run folder except this process's claim; returns the entries deleted.

    A non-empty folder without any of :data:`RUN_MARKERS` is not a pbip run folder and is refused (DataError), so a
    mistyped ``--out`` cannot empty an unrelated folder.
    """
    if not out.is_dir():
        return 0
    entries = [p for p in out.iterdir() if p.name != CLAIM_NAME]
    if entries and not any((out / m).exists() for m in RUN_MARKERS if m != CLAIM_NAME):
        raise DataError(f"{out}: --overwrite refused: not a pbip run folder (none of "
                        f"{', '.join(m for m in RUN_MARKERS if m != CLAIM_NAME)}); choose another --out folder")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return len(entries)

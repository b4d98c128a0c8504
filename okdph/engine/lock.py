"""Per-run lock files, so that concurrent workers on one results folder run each run once
(docs/verification.md#concurrency-divergence-and-bad-input).

A worker holds `<out_dir>/<run_id>.lock` while it trains that run. The lock is a small JSON file
({host, node, pid, started, token}) created with O_CREAT|O_EXCL, which is atomic on local file systems
and on NFSv3+. While held, a daemon thread touches the file every `heartbeat` seconds, so its mtime says
the holder is alive.

A lock whose holder is gone is *stale* and is reclaimed by the next worker that wants the run:
- same machine (same host name, boot and pid namespace) and the holder's pid is dead (or a zombie);
- or its heartbeat (mtime) is older than `stale_after` seconds: a holder on another host, or a reused
  pid, or a holder frozen for that long (a lease: such a holder has lost its lock; `held()` tells it);
- or the file is empty/unreadable (the writer died between create and write) and older than `grace`.

Reclaiming must let exactly one of several racing workers win, and must never remove a fresh lock that
replaced the stale one between judging and removing it. Renaming the stale lock aside is not enough (a
slow reclaimer would rename the winner's fresh lock), so a reclaimer first hard-links the lock to a name
derived from the stale inode: link() fails if that name exists, so one reclaimer per stale file gets
it. Through that link (a stable handle on the inode, which also keeps the inode number from being
reused) it re-checks that the file is the one it judged and still stale, removes the lock name only if
it still points at that inode, then retries the exclusive create, which again only one worker wins.

NFS caveats: staleness by mtime compares the server's timestamps with this host's clock, so the hosts'
clocks must agree to well within `stale_after` (and `grace`); attribute caching can delay seeing a
heartbeat by up to `actimeo` (60 s by default), far below the default `stale_after` of 600 s. A reclaimer
killed in the middle of a reclaim leaves its link (`<lock>.stale-<inode>`), which others break once it
is older than `grace`. The remaining hazard needs a reclaimer killed mid-reclaim *and* two others racing
to break its link within microseconds; it is not handled.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_S = 30.0      # how often a holder touches its lock
STALE_AFTER_S = 600.0   # a lock without a heartbeat for this long is stale (any host)
GRACE_S = 5.0           # an empty/corrupt lock, or a reclaimer's leftover link, older than this is stale
ATTEMPTS = 5            # create/reclaim rounds before giving up under contention


class RunLocked(RuntimeError):
    """The run is held by another live worker (not a user error: the caller skips the run).

    `path` is the lock file, `holder` its parsed content (None when it is unreadable)."""

    def __init__(self, path: Path, holder: dict | None, reason: str = ""):
        self.path, self.holder = Path(path), holder
        if holder is None:
            who = "a worker whose lock file is being written (empty or unreadable)"
        else:
            who = f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('started')}"
        super().__init__(f"run is locked by {who}: {path}{f' ({reason})' if reason else ''}")


def node_id() -> str:
    """This machine and pid namespace: only a lock from the same node can be judged by its pid.
    The host name alone is not enough (containers on several machines can share one)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "/".join(parts)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this node and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    # A killed worker stays a zombie until its parent reaps it; it holds nothing any more.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def read_lock(path: Path) -> dict | None:
    """The holder recorded in a lock file; None when it is missing, empty or corrupt."""
    try:
        return _parse(Path(path).read_bytes())
    except OSError:
        return None


def _parse(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("token"), str):
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # os.kill(0 or -1) means a group
        return None
    return holder


class RunLock:
    """An exclusive, self-healing lock on one run, held as a context manager:

        with RunLock(out_dir / f"{run_id}.lock"):
            ...train and write the record...

    Entering raises `RunLocked` when another live worker holds the run. `held()` says whether the lock
    is still ours (check it before publishing a result after a long pause)."""

    def __init__(self, path: Path | str, *, heartbeat: float = HEARTBEAT_S, stale_after: float = STALE_AFTER_S,
                 grace: float = GRACE_S, attempts: int = ATTEMPTS):
        if not 0 < heartbeat < stale_after:
            raise ValueError(f"need 0 < heartbeat < stale_after, got {heartbeat}, {stale_after}")
        self.path = Path(path)
        self.heartbeat, self.stale_after, self.grace, self.attempts = heartbeat, stale_after, grace, attempts
        self.node = node_id()
        self.token: str | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    # ----------------------------------------------------------------------------------------------
    # acquire / release

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"lock already held: {self.path}")
        holder = None
        for _ in range(self.attempts):
            if self._create():
                self._start_heartbeat()
                return self
            seen = self._inspect(self.path)
            if seen is None:  # released between our create and our look: just try again
                continue
            ino, raw, mtime = seen
            holder = _parse(raw)
            if not self._stale(holder, mtime):
                raise RunLocked(self.path, holder)
            self._reclaim(ino, raw)
        raise RunLocked(self.path, holder, f"still contended after {self.attempts} attempts")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours; a lock that was reclaimed
        from us (we were judged dead) belongs to its new holder and is left alone."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # before closing the fd the thread touches
            self._thread = None
        try:
            if self._owns_path():
                _unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd, self.token = None, None

    def held(self) -> bool:
        """Whether we hold the lock and the file at `path` is still ours."""
        return self._fd is not None and not self._lost and self._owns_path()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ----------------------------------------------------------------------------------------------
    # internals

    def _create(self) -> bool:
        """The exclusive create: True when the lock is now ours, False when the file exists."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        token = uuid.uuid4().hex
        info = {"host": socket.gethostname(), "node": self.node, "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": token}
        try:
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)  # the content must be there before anyone judges it (NFS: on the server)
        except BaseException:
            os.close(fd)
            _unlink(self.path)
            raise
        self._fd, self.token, self._lost = fd, token, False
        return True

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(self._fd, self._stop),
                                        name=f"lock-heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def _beat(self, fd: int, stop: threading.Event) -> None:
        # Touch our own inode through the fd, never the path: after a reclaim the path is somebody
        # else's lock, and refreshing it would keep a foreign lock alive.
        while not stop.wait(self.heartbeat):
            try:
                if os.utime in os.supports_fd:
                    os.utime(fd)
                elif self._owns_path():
                    os.utime(self.path)
            except OSError:  # e.g. ESTALE on NFS: the file was removed by a reclaimer
                self._lost = True
                return

    def _owns_path(self) -> bool:
        # Read the content (not a cached stat): on NFS, open() revalidates (close-to-open consistency).
        holder = read_lock(self.path)
        return holder is not None and self.token is not None and holder.get("token") == self.token

    def _stale(self, holder: dict | None, mtime: float) -> bool:
        age = time.time() - mtime
        if holder is None:
            return age > self.grace
        if age > self.stale_after:  # no heartbeat for that long: dead, elsewhere or frozen
            return True
        return holder.get("node") == self.node and not pid_alive(holder["pid"])

    @staticmethod
    def _inspect(path: Path) -> tuple[int, bytes, float] | None:
        """(inode, content, mtime) of one file, read through one open fd so that they belong together;
        None when it does not exist."""
        try:
            with open(path, "rb") as handle:
                st = os.fstat(handle.fileno())
                return st.st_ino, handle.read(), st.st_mtime
        except FileNotFoundError:
            return None

    def _reclaim(self, ino: int, raw: bytes) -> None:
        """Remove the stale lock judged as (ino, raw), unless it has been replaced meanwhile; exactly one
        of several racing reclaimers removes it. The caller then retries the exclusive create."""
        aside = self.path.with_name(f"{self.path.name}.stale-{ino}")
        try:
            os.link(self.path, aside)  # fails if another reclaimer holds this stale file
        except FileNotFoundError:
            return  # already removed (released or reclaimed): retry the create
        except FileExistsError:
            # Another reclaimer is at work (milliseconds), or was killed here: break its link once old.
            try:
                if time.time() - os.stat(aside).st_ctime > self.grace:  # link() sets the ctime
                    _unlink(aside)
                else:
                    time.sleep(0.05)
            except FileNotFoundError:
                pass
            return
        try:
            # `aside` now names whatever was at `path` when we linked, and pins its inode number.
            seen = self._inspect(aside)
            if seen is None or seen[0] != ino or seen[1] != raw or not self._stale(_parse(seen[1]), seen[2]):
                return  # replaced by a fresh lock since we judged it: not ours to remove
            try:
                if os.stat(self.path).st_ino == ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            _unlink(aside)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

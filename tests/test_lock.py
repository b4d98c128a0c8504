"""Per-run lock files (okdph.engine.lock, docs/verification.md#concurrency-divergence-and-bad-input):
exclusion across real processes, reclaim of stale locks (killed holder, silent foreign host, corrupt
file), one winner among racing reclaimers."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from okdph.engine.lock import RunLock, RunLocked, node_id, read_lock

# fork: the children start in milliseconds and need nothing but this module's functions.
CTX = mp.get_context("fork")


def _write_lock(path, *, host="elsewhere", node="elsewhere", pid=12345, token="t0", age=0.0):
    path.write_text(json.dumps({"host": host, "node": node, "pid": pid, "started": "2020-01-01T00:00:00Z",
                                "token": token}))
    _age(path, age)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists (reuse within the test is vanishingly unlikely)
    return proc.pid


def _try_in_child(path, queue):
    try:
        with RunLock(path):
            queue.put("acquired")
    except RunLocked as exc:
        queue.put(f"locked: {exc}")


def test_acquire_release(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path) as lock:
        holder = read_lock(path)
        assert set(holder) >= {"host", "pid", "started", "token"}
        assert holder["pid"] == os.getpid() and holder["token"] == lock.token and lock.held()
    assert not path.exists() and not lock.held()
    with RunLock(path):  # free again
        assert path.exists()
    assert list(tmp_path.iterdir()) == []  # no leftovers


def test_second_acquirer_is_refused(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path):
        queue = CTX.Queue()
        child = CTX.Process(target=_try_in_child, args=(path, queue))
        child.start()
        answer = queue.get(timeout=20)
        child.join(timeout=20)
        assert answer.startswith("locked:") and f"pid {os.getpid()}" in answer
        with pytest.raises(RunLocked, match="host .* pid .* since"):  # same process, second lock
            RunLock(path).acquire()
        assert read_lock(path)["pid"] == os.getpid()


HOLDER = textwrap.dedent("""
    import sys, time
    from okdph.engine.lock import RunLock
    lock = RunLock(sys.argv[1], heartbeat=0.1, stale_after=60).acquire()
    print("held", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_killed_holder_is_reclaimed(tmp_path, reap):
    path = tmp_path / "run.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked):
            RunLock(path).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        if reap:
            proc.wait()
        else:  # killed but not yet waited for: a zombie, which holds nothing
            while pid_state(proc.pid) != "Z":
                time.sleep(0.01)
        with RunLock(path) as lock:
            assert read_lock(path)["token"] == lock.token and read_lock(path)["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()
    assert not path.exists() and not list(tmp_path.glob("*.stale-*"))


def pid_state(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def _race(path, go, done, queue):
    go.wait()
    try:
        lock = RunLock(path, stale_after=60).acquire()
    except RunLocked:
        queue.put("locked")
        return
    queue.put("won")
    done.wait(20)  # hold until every racer has tried, so a late one cannot legitimately win after us
    lock.release()


@pytest.mark.parametrize("stale", ["dead-pid", "silent-foreign-host", "corrupt"])
def test_racing_reclaimers_one_winner(tmp_path, stale):
    racers, rounds = 4, 4
    for r in range(rounds):
        path = tmp_path / f"run{r}.lock"
        if stale == "dead-pid":
            _write_lock(path, host="here", node=node_id(), pid=_dead_pid(), token=f"old{r}")
        elif stale == "silent-foreign-host":
            _write_lock(path, token=f"old{r}", age=120)
        else:
            path.write_bytes(b"")
            _age(path, 10)
        go, done, queue = CTX.Event(), CTX.Event(), CTX.Queue()
        procs = [CTX.Process(target=_race, args=(path, go, done, queue)) for _ in range(racers)]
        for p in procs:
            p.start()
        go.set()
        answers = sorted(queue.get(timeout=20) for _ in procs)
        done.set()
        for p in procs:
            p.join(timeout=20)
        assert answers == ["locked"] * (racers - 1) + ["won"], answers
        assert not path.exists() and not list(tmp_path.glob("*.stale-*"))


def test_foreign_host_stale_by_heartbeat_age(tmp_path):
    path = tmp_path / "run.lock"
    _write_lock(path, age=30)  # another host, heartbeat 30 s ago: alive
    with pytest.raises(RunLocked, match="host elsewhere pid 12345"):
        RunLock(path, stale_after=60).acquire()
    assert read_lock(path)["token"] == "t0"
    _age(path, 61)  # silent for longer than stale_after: reclaimed
    with RunLock(path, stale_after=60) as lock:
        assert read_lock(path)["token"] == lock.token


def test_live_pid_with_old_heartbeat_is_stale(tmp_path):
    # Same node, pid alive (e.g. reused by an unrelated process) but no heartbeat for stale_after.
    path = tmp_path / "run.lock"
    _write_lock(path, host="here", node=node_id(), pid=os.getppid(), age=30)
    with pytest.raises(RunLocked):
        RunLock(path, stale_after=60).acquire()
    _age(path, 61)
    with RunLock(path, stale_after=60) as lock:
        assert lock.held()


@pytest.mark.parametrize("content", [b"", b'{"host": "x", "pi'], ids=["empty", "truncated"])
def test_corrupt_lock_reclaimed_after_grace(tmp_path, content):
    path = tmp_path / "run.lock"
    path.write_bytes(content)
    with pytest.raises(RunLocked, match="being written"):  # a writer may be between create and write
        RunLock(path, grace=5).acquire()
    _age(path, 6)
    with RunLock(path, grace=5) as lock:
        assert lock.held()


def test_release_never_deletes_a_lock_it_lost(tmp_path):
    path = tmp_path / "run.lock"
    first = RunLock(path, heartbeat=0.05).acquire()
    os.unlink(path)  # as a reclaimer does once `first` is judged dead
    second = RunLock(path).acquire()
    time.sleep(0.2)  # first's heartbeat runs meanwhile: it must touch its own inode, not second's file
    assert not first.held() and second.held()
    first.release()
    assert read_lock(path)["token"] == second.token
    second.release()
    assert not path.exists()


def test_reclaim_leaves_a_lock_that_replaced_the_stale_one(tmp_path):
    # The race a plain rename-aside gets wrong: a slow reclaimer judged the old lock stale, and
    # meanwhile another worker reclaimed it and created a fresh one (possibly with the same inode
    # number). The slow reclaimer must leave the fresh lock in place.
    path = tmp_path / "run.lock"
    _write_lock(path, token="old", age=120)
    slow = RunLock(path, stale_after=60)
    ino, raw, _ = slow._inspect(path)
    winner = RunLock(path, stale_after=60).acquire()  # reclaims the old lock, creates its own
    slow._reclaim(ino, raw)
    assert winner.held() and read_lock(path)["token"] == winner.token
    with pytest.raises(RunLocked):
        slow.acquire()
    winner.release()
    assert not list(tmp_path.iterdir())


def test_dead_reclaimers_link_is_broken_after_grace(tmp_path):
    path = tmp_path / "run.lock"
    _write_lock(path, age=120)
    aside = tmp_path / f"run.lock.stale-{path.stat().st_ino}"
    os.link(path, aside)  # a reclaimer killed between its link and its unlink
    with pytest.raises(RunLocked, match="contended"):  # it might still be at work: wait
        RunLock(path, stale_after=60, grace=0.5, attempts=2).acquire()
    time.sleep(0.6)
    with RunLock(path, stale_after=60, grace=0.5) as lock:
        assert lock.held()
    assert not aside.exists()


def test_heartbeat_refreshes_mtime(tmp_path):
    path = tmp_path / "run.lock"
    lock = RunLock(path, heartbeat=0.05, stale_after=60).acquire()
    _age(path, 1000)
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    thread = lock._thread
    lock.release()
    assert not thread.is_alive() and not path.exists()


def test_bad_timings_refused(tmp_path):
    with pytest.raises(ValueError, match="heartbeat"):
        RunLock(tmp_path / "run.lock", heartbeat=600, stale_after=600)

"""A cgroup v2 per MTA: CPU of the whole process tree (exited children
included) from ``cpu.stat``, memory by sampling ``/proc/PID/smaps_rollup``
of every pid in the group.

The MTA's start command is run with ``preexec_fn`` writing its own pid to
``cgroup.procs``, so master and everything it ever forks live in the group.
"""

import os
import threading
import time


def cgroup2_root():
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup`` on a
    unified host, ``/sys/fs/cgroup/unified`` on a hybrid one), or None."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return parts[1]
    return None


class Cgroup:
    def __init__(self, name):
        root = cgroup2_root()
        if root is None:
            raise RuntimeError("no cgroup v2 hierarchy mounted (needed to measure CPU)")
        self.path = os.path.join(root, name)
        os.makedirs(self.path, exist_ok=True)

    def enter_fn(self):
        """A preexec_fn that moves the child into this group."""
        procs = os.path.join(self.path, "cgroup.procs")
        os.makedirs(self.path, exist_ok=True)  # again, after a remove()

        def enter():
            with open(procs, "w") as f:
                f.write("0")
        return enter

    def pids(self):
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def cpu_usec(self):
        with open(os.path.join(self.path, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                if k == "usage_usec":
                    return int(v)
        raise RuntimeError("cpu.stat has no usage_usec")

    def kill_all(self, sig):
        """Sends ``sig`` to each pid in the group, one by one, by PID."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def remove(self, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)


def tree_memory(pids):
    """(sum of Rss, sum of Pss) in bytes over ``pids``."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                data = f.read()
        except OSError:
            continue
        for line in data.split(b"\n"):
            if line.startswith(b"Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith(b"Pss:"):
                pss += int(line.split()[1]) * 1024
    return rss, pss


class MemorySampler:
    """Samples the group's RSS and PSS sums every ``interval`` seconds in a
    thread (less often if sampling takes more than a fifth of that); keeps
    the peaks and the largest number of processes seen."""

    def __init__(self, cgroup, interval=0.1):
        self.cg = cgroup
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.sampling_seconds = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def sample_once(self):
        pids = self.cg.pids()
        rss, pss = tree_memory(pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1
        return rss, pss

    def _loop(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sample_once()
            spent = time.monotonic() - t0
            self.sampling_seconds += spent
            # Every ``interval``, but never more than a fifth of one CPU:
            # with hundreds of processes a sample itself takes a while.
            self._stop.wait(max(self.interval, 4 * spent))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.sample_once()

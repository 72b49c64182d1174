#!/usr/bin/python3
"""The disk's own limit for a queue: how many files of SIZE bytes per
second can be written, fsync'd and renamed into a directory (and that
directory fsync'd), by one thread and by several.

    bench/disk_limit.py [--dir DIR] [--size BYTES ...] [--threads N ...] [--seconds S] [--json]

An MTA that answers 250 only after fsync cannot accept mail faster than
this on the same disk. The files are removed afterwards.
"""

import argparse
import json
import os
import shutil
import tempfile
import threading
import time


def measure(directory, size, threads, seconds):
    """Files per second, with ``threads`` threads each looping: write
    tmp/NAME, fsync it, rename it to new/NAME, fsync new/."""
    work = tempfile.mkdtemp(prefix="disk-limit-", dir=directory)
    try:
        tmp = os.path.join(work, "tmp")
        new = os.path.join(work, "new")
        os.mkdir(tmp)
        os.mkdir(new)
        payload = os.urandom(size)
        counts = [0] * threads
        stop = threading.Event()

        def worker(k):
            dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
            try:
                n = 0
                while not stop.is_set():
                    name = f"{k}.{n}"
                    src = os.path.join(tmp, name)
                    fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.write(fd, payload)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.rename(src, os.path.join(new, name))
                    os.fsync(dfd)
                    n += 1
                    counts[k] = n
            finally:
                os.close(dfd)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in ts:
            t.join()
        elapsed = time.monotonic() - t0
        return sum(counts) / elapsed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--size", type=int, nargs="+", default=[4096, 102400])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    results = []
    for size in a.size:
        for th in a.threads:
            rate = measure(a.dir, size, th, a.seconds)
            results.append({"size": size, "threads": th, "files_per_s": round(rate, 1)})
            if not a.json:
                print(f"disk limit: {size} B files, {th} thread(s): {rate:.0f} files/s "
                      f"(write + fsync + rename + fsync dir) in {a.dir}")
    if a.json:
        print(json.dumps({"dir": a.dir, "results": results}))


if __name__ == "__main__":
    main()

"""`python -m svdexport.batch.watchdog DRIVER_PID PID...`: stops a local Ray runtime whose driver was killed.

The batch driver starts this process with a pipe on its standard input and the process ids of the Ray
runtime it started (GCS, raylet, ...). A driver that ends normally closes the pipe and stops Ray itself; a
driver killed outright (SIGKILL, out of memory) closes it too, by dying, and then this process terminates
those processes and their children (the Ray workers), which would otherwise linger for a minute or more.
"""

from __future__ import annotations

import os
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    import threading

    import psutil  # a dependency of Ray

    driver, pids = int(argv[0]), [int(p) for p in argv[1:]]
    known: dict[int, psutil.Process] = {}  # pid -> process, with its start time, so a reused pid is never hit
    for pid in pids:
        try:
            known[pid] = psutil.Process(pid)
        except psutil.Error:
            pass
    ended = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), ended.set()), daemon=True).start()
    # Ray's processes start more (workers, agents) and, once the driver is gone, exit in an order that leaves
    # some orphaned: their tree is recorded while the job runs.
    while not ended.wait(0.5):
        for p in list(known.values()):
            try:
                known.update({c.pid: c for c in p.children(recursive=True) if c.pid not in known})
            except psutil.Error:
                pass
    time.sleep(0.2)
    if _alive(driver) and os.getppid() == driver:
        return 0  # a normal end: the driver stops Ray itself
    procs = [p for p in known.values() if p.pid != os.getpid()]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=5)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

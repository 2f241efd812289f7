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
    import psutil  # a dependency of Ray

    driver, pids = int(argv[0]), [int(p) for p in argv[1:]]
    procs = []
    for pid in pids:  # remembered with their start times, so a reused pid is never hit
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    sys.stdin.buffer.read()  # returns when the driver closes the pipe or dies
    time.sleep(0.2)
    if _alive(driver) and os.getppid() == driver:
        return 0  # a normal end: the driver stops Ray itself
    tree = []
    for p in procs:
        try:
            tree += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    for p in tree:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(tree, timeout=5)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

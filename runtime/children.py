"""Child processes that die with the service, and start clear of the working directory.

A round or an export left running after `run` died (kill -9, OOM killer, a crash) would carry on
under init and write versions or model.onnx files nobody asked for any more. So each child calls
`die_with_parent` first: on Linux the kernel sends it SIGKILL when its parent goes
(PR_SET_PDEATHSIG), and everywhere a daemon thread exits it once its parent id changes.

`python -c` puts the working directory first on sys.path, so a file `mas3_edge.py` or `export.py`
where `run` was started would replace our modules in the child: `python_child` drops that entry
before importing anything (`-P` would too, but only from Python 3.11).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, poll_s: float = 0.2) -> None:
    """Call first thing in a child: end this process when `parent_pid` is no longer its parent."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl (e.g. a static build): the thread below suffices
            pass
    if os.getppid() != parent_pid:  # the parent died before the kernel knew to tell us
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, poll_s), name="parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)  # re-parented: whatever we were doing is no longer wanted


_BOOT = ("import sys\n"
         "if sys.path[:1] == ['']: del sys.path[0]  # -c put the working directory first: nothing there may shadow us\n"
         "from mas3_edge.runtime.children import die_with_parent\n"
         "die_with_parent(int(sys.argv[1]))\n"
         "import os\n"
         "if int(sys.argv[2]) and hasattr(os, 'nice'): os.nice(int(sys.argv[2]))\n"
         "import importlib\n"
         "fn = getattr(importlib.import_module(sys.argv[3]), sys.argv[4])\n"
         "fn(*sys.argv[5:])\n")


def python_child(module: str, function: str, *args: str, nice: int = 0) -> subprocess.Popen:
    """Start `module.function(*args)` in a fresh interpreter tied to this process (stdout/stderr piped)."""
    return subprocess.Popen([sys.executable, "-c", _BOOT, str(os.getpid()), str(nice), module, function, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

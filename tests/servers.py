"""`billion serve` as a real process for the tests: started on 127.0.0.1 and a free port (0), ready
once uvicorn says where it listens, its output collected, stopped at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    url: str
    log: list[str] = field(default_factory=list)  # every line it printed so far
    reader: threading.Thread | None = None

    def output(self, timeout: float = 30) -> str:
        """Everything it printed, once it has exited."""
        self.proc.wait(timeout)
        self.reader.join(timeout)
        return "".join(self.log)


@contextmanager
def serve_process(folder, *args: str, backend: str = "torch"):
    """`billion serve -m folder -b backend` (CPU, float32, one torch thread) with `args`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "billion", "serve", "-m", str(folder), "-b", backend, "--device",
                             "cpu", "--dtype", "float32", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        log, url, deadline = [], None, time.time() + 90
        while url is None:
            line = proc.stdout.readline()
            assert line and time.time() < deadline, "".join(log)
            log.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        served = ServeProcess(proc, url, log)
        # the rest of its output is collected as it comes, so the pipe never fills
        served.reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
        served.reader.start()
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)

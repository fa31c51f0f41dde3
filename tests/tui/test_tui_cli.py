"""`atod-edge tui RUN_DIR` as a user runs it: a real terminal (a pseudo-terminal), the app on a
run directory the trainer wrote, the dashboard drawn, `q` quits with exit status 0."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[A-Za-z~]|\x1b[()][A-Za-z0-9]|\x1b[=>78]|\x1b\][^\x07]*\x07")


def read_until(fd: int, wanted: list[bytes], timeout: float) -> bytes:
    """What the app drew (escape codes removed) once every `wanted` text is on screen; the app
    writes its frames to the terminal, so this waits on its output, not on a guessed time."""
    raw, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                raw += os.read(fd, 65536)
            except OSError:   # the app exited and closed the terminal
                break
            text = ANSI.sub(b"", raw)
            if all(w in text for w in wanted):
                return text
    raise AssertionError(f"the dashboard never showed {wanted}; it drew: {ANSI.sub(b'', raw)[-2000:]!r}")


def test_tui_opens_a_run_dir_written_by_train_and_quits(trained_run, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 36, 120, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", OMP_NUM_THREADS="1", COLUMNS="120", LINES="36")
    proc = subprocess.Popen([sys.executable, "-m", "atod_edge.cli", "tui", str(trained_run)], stdin=slave,
                            stdout=slave, stderr=slave, cwd=tmp_path, env=env, close_fds=True)
    os.close(slave)
    try:
        screen = read_until(master, [b"kappa (OPD weight)", b"rho (GRPO weight)", b"step 7", b"run"], timeout=120)
        assert b"Traceback" not in screen
        os.write(master, b"q")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)

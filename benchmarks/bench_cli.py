"""What the long benchmark scripts share: a timestamped log line, and `atod-edge` commands run in a
subprocess (the installed or checked-out atod_edge of this interpreter), each logged before it runs.

    from functools import partial
    import bench_cli
    log, cli = partial(bench_cli.log, "pilots"), partial(bench_cli.cli, "pilots")
"""

from __future__ import annotations

import subprocess
import sys
import time


def log(tag: str, msg: str) -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(tag: str, *args: str) -> None:
    """Run `atod-edge ARGS...`; a failing command raises CalledProcessError."""
    cmd = [sys.executable, "-m", "atod_edge.cli", *args]
    log(tag, " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)

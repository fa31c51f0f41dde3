"""What the long benchmark scripts share: a timestamped log line, and `atod-edge` commands run in a
subprocess (the installed or checked-out atod_edge of this interpreter), each logged before it runs.

    from functools import partial
    import bench_cli
    log, cli = partial(bench_cli.log, "pilots"), partial(bench_cli.cli, "pilots")
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def log(tag: str, msg: str) -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(tag: str, *args: str, code: str | None = None) -> None:
    """Run `atod-edge ARGS...`; a failing command raises CalledProcessError. code: a checkout of
    atod-edge to run instead of the installed one (put first on PYTHONPATH)."""
    cmd = [sys.executable, "-m", "atod_edge.cli", *args]
    log(tag, " ".join(cmd[2:]) + (f"  (code: {code})" if code else ""))
    env = None
    if code:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, check=True, env=env)

"""One exported GGUF agent at the edge end: the stock llama.cpp server and the embedded Agent.

    python benchmarks/serve_gguf.py EXPORT_DIR/agent.q4_k_m.gguf --prompts 20 --episodes 20 \\
        --threads 2 --out benchmarks/results/DIR [--name serve]

1. Served: `python -m llama_cpp.server` (the stock server of llama-cpp-python, atod-edge[serve])
   on 127.0.0.1 loads the file; the first turns of `--prompts` household eval tasks go to its
   OpenAI chat endpoint (greedy, 48 tokens). Each reply must parse to an action, and it is compared
   with the action the same file gives in process on the prompt tokens atod-edge builds (equal
   when the server applied the GGUF's chat template exactly as training did). Also the server's
   median wall time per request, as a client sees it.
2. Embedded: `atod_edge.Agent.load(FILE)` plays `--episodes` household eval episodes (greedy,
   up to --max-turns turns): success, turns, replies without a parseable action, and the latency of its first action
   and of every action (median), what an application embedding the agent waits for.

Writes OUT/NAME.json and OUT/NAME.md (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from atod_edge.io import atomic_write_json, atomic_write_text

READY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def wait_ready(base: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {READY_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")


@contextlib.contextmanager
def stock_server(gguf: Path, threads: int, n_ctx: int, log_path: Path):
    """`python -m llama_cpp.server` serving `gguf` on a free 127.0.0.1 port, ready: yields (base URL,
    the process); stopped on exit. float32 KV cache, as LlamaCppPolicy runs the file."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--type_k", "0",
             "--type_v", "0"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    try:
        wait_ready(base, server, log_path)
        yield base, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def served_actions(gguf: Path, prompts: int, threads: int) -> dict:
    """First-turn household prompts through the stock server vs the same file in process."""
    from atod_edge.engine.backends.llamacpp import LlamaCppPolicy
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.envs import make_env
    from atod_edge.prompts import build_messages, encode_prompt, parse_action

    env = make_env("household")
    requests = []
    for task in env.tasks("eval", prompts):
        observation = env.reset(task)
        requests.append(build_messages(env.instructions, observation, [], None, env.admissible_actions()))
    local = LlamaCppPolicy.load(str(gguf), n_threads=threads)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=48)
    expected = [parse_action(g.text).action for g in local.generate(
        [encode_prompt(local.tokenizer, m) for m in requests], sampling)]
    local.close()

    with tempfile.TemporaryDirectory() as tmp, stock_server(gguf, threads, 2048, Path(tmp) / "server.log") as (base, _):
        replies, seconds = [], []
        for messages in requests:
            started = time.perf_counter()
            reply = post(f"{base}/v1/chat/completions", {"messages": messages, "temperature": 0.0, "max_tokens": 48})
            seconds.append(time.perf_counter() - started)
            replies.append(reply["choices"][0]["message"]["content"])
    actions = [parse_action(text).action for text in replies]
    return {"prompts": len(requests), "parsed": sum(a is not None for a in actions),
            "same_as_in_process": sum(a == e for a, e in zip(actions, expected)),
            "median_request_s": float(np.median(seconds)), "examples": replies[:3]}


def agent_episodes(gguf: Path, episodes: int, threads: int, max_turns: int) -> dict:
    """atod_edge.Agent from the file on household eval episodes, greedy, up to `max_turns` turns."""
    from atod_edge import Agent
    from atod_edge.envs import make_env

    env = make_env("household")
    agent = Agent.load(str(gguf), env_instructions=env.instructions, n_threads=threads)
    wins, turns, no_action, first, every = 0, [], 0, [], []
    for task in env.tasks("eval", episodes):
        observation = env.reset(task)
        agent.reset(observation)
        for turn in range(max_turns):
            result = agent.act(observation, env.admissible_actions())
            (first if turn == 0 else every).append(result.seconds)
            no_action += not result.valid   # the reply held no parseable action
            step = env.step(result.action or "")
            observation = step.observation
            if step.done:
                break
        wins += bool(step.info.get("won"))
        turns.append(turn + 1)
    agent.close()
    return {"episodes": episodes, "success": wins / max(1, episodes), "mean_turns": float(np.mean(turns)),
            "no_action_rate": no_action / max(1, sum(turns)), "first_action_s": float(np.median(first)),
            "action_s": float(np.median(first + every))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="an exported agent.<quant>.gguf")
    parser.add_argument("--prompts", type=int, default=20, help="first-turn prompts sent to the server")
    parser.add_argument("--episodes", type=int, default=20, help="episodes the embedded Agent plays")
    parser.add_argument("--max-turns", type=int, default=15, help="turn limit of the Agent's episodes")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (server and Agent)")
    parser.add_argument("--out", required=True, help="directory of NAME.json and NAME.md")
    parser.add_argument("--name", default="serve", help="file name stem of the report")
    args = parser.parse_args(argv)
    gguf = Path(args.gguf)
    if not gguf.is_file():
        raise SystemExit(f"{gguf}: no such GGUF file")
    result = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "threads": args.threads,
              "server": served_actions(gguf, args.prompts, args.threads),
              "agent": agent_episodes(gguf, args.episodes, args.threads, args.max_turns)}
    out = Path(args.out)
    atomic_write_json(out / f"{args.name}.json", result)
    s, a = result["server"], result["agent"]
    md = (f"# {gguf.name} at the edge end\n\n`python benchmarks/serve_gguf.py {gguf.name} --prompts {args.prompts} "
          f"--episodes {args.episodes} --max-turns {args.max_turns} --threads {args.threads}` ({result['bytes'] / 2**20:.1f} MiB)\n\n"
          f"- Stock `python -m llama_cpp.server` on 127.0.0.1: {s['parsed']}/{s['prompts']} first-turn replies "
          f"parse to an action, {s['same_as_in_process']}/{s['prompts']} equal the in-process action on "
          f"atod-edge's own prompt tokens; median request {1000 * s['median_request_s']:.0f} ms.\n"
          f"- `atod_edge.Agent.load(\"{gguf.name}\")`, greedy, {a['episodes']} household eval episodes: "
          f"success {100 * a['success']:.1f}%, {a['mean_turns']:.1f} turns, {100 * a['no_action_rate']:.1f}% of "
          f"replies without an action; first action {1000 * a['first_action_s']:.0f} ms, any action {1000 * a['action_s']:.0f} ms "
          f"(medians, {args.threads} threads).\n")
    atomic_write_text(out / f"{args.name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The exported agent behind a stock server: `python -m llama_cpp.server` on 127.0.0.1 serves the
Q4_K_M file with the chat template stored in it; OpenAI-style chat completions built by
atod_edge.prompts come back with parseable `<action>` replies. Also: the Modelfile and SERVE.md
that export writes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi", reason="the server needs atod-edge[serve]")
pytest.importorskip("sse_starlette", reason="the server needs atod-edge[serve]")

from atod_edge.envs import make_env  # noqa: E402
from atod_edge.prompts import build_messages, parse_action, render_prompt  # noqa: E402
from bench_loader import load_benchmark  # noqa: E402

# the server helpers of the benchmark that serves a real export (benchmarks/serve_gguf.py)
serve_gguf = load_benchmark("serve_gguf")


def test_stock_llama_cpp_server_answers_household_prompts_with_actions(peaked_export, tmp_path):
    """Five household prompts through the stock server: every reply holds an action, and it is the
    action the same file gives in-process on the prompt tokens atod-edge builds itself (the server
    applied the GGUF's chat template exactly as training did)."""
    from atod_edge.engine.backends.llamacpp import LlamaCppPolicy
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.prompts import encode_prompt

    out, _ = peaked_export
    gguf_file = out / "agent.q4_k_m.gguf"
    env = make_env("household")
    requests = []
    for task in env.tasks("eval", 5, start=40):
        observation = env.reset(task)
        requests.append(build_messages(env.instructions, observation, [], None, env.admissible_actions()))
    local = LlamaCppPolicy.load(str(gguf_file), n_threads=1, n_ctx=1024)
    expected = [parse_action(g.text).action for g in local.generate(
        [encode_prompt(local.tokenizer, m) for m in requests], SamplingParams(temperature=0.0))]
    local.close()

    with serve_gguf.stock_server(gguf_file, threads=1, n_ctx=1024, log_path=tmp_path / "server.log") as (base, server):
        replies = [serve_gguf.post(f"{base}/v1/chat/completions",
                                   {"messages": messages, "temperature": 0.0, "max_tokens": 48}
                                   )["choices"][0]["message"]["content"] for messages in requests]
    actions = [parse_action(text).action for text in replies]
    assert all(actions), replies                                    # 5 of 5 parse
    assert actions == expected, (replies, expected)
    assert server.returncode is not None


def test_export_writes_modelfile_and_serve_md(peaked_export):
    from transformers import AutoTokenizer

    from atod_edge.export.serve import chatml_render

    out, report = peaked_export
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./agent.q4_k_m.gguf" in modelfile                       # smallest passing file
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "PARAMETER temperature 0.4" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert report["serving"]["gguf"] == "agent.q4_k_m.gguf" and report["serving"]["ollama_template"]
    # the Modelfile's template renders exactly the tokens the agent sees in training
    tokenizer = AutoTokenizer.from_pretrained(out)
    env = make_env("household")
    observation = env.reset(env.tasks("eval", 1)[0])
    messages = build_messages(env.instructions, observation, [("look", "You see a desk.")], "obs",
                              env.admissible_actions())
    assert chatml_render(messages) == render_prompt(tokenizer, messages)
    serve = (out / "SERVE.md").read_text()
    for command in ("python -m llama_cpp.server --model agent.q4_k_m.gguf", "llama-server -m agent.q4_k_m.gguf",
                    "ollama create atod-agent -f Modelfile"):
        assert command in serve


def test_non_chatml_template_gets_no_ollama_template(atod_cache):
    from atod_edge.export.serve import ollama_template
    from atod_edge.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny-student")
    assert ollama_template(tokenizer) is not None
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    assert ollama_template(tokenizer) is None


def test_serve_gguf_benchmark_serves_and_embeds_one_file(peaked_export, tmp_path):
    """benchmarks/serve_gguf.py on an exported file: the stock server's replies parse and equal the
    in-process actions, the embedded Agent plays whole episodes, and the report is written."""
    out, _ = peaked_export
    assert serve_gguf.main([str(out / "agent.q4_k_m.gguf"), "--prompts", "2", "--episodes", "1", "--max-turns", "3",
                            "--threads", "1", "--out", str(tmp_path), "--name", "s"]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["server"]["prompts"] == 2 and result["server"]["parsed"] == 2
    assert result["server"]["same_as_in_process"] == 2
    agent = result["agent"]
    assert agent["episodes"] == 1 and 1 <= agent["mean_turns"] <= 3 and agent["first_action_s"] > 0
    assert "llama_cpp.server" in (tmp_path / "s.md").read_text()
    with pytest.raises(SystemExit, match="no such GGUF file"):
        serve_gguf.main([str(tmp_path / "missing.gguf"), "--out", str(tmp_path)])

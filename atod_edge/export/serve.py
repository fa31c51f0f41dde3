"""Files that let people serve an exported agent with the tools they already run: an Ollama
`Modelfile` and a short `SERVE.md` (llama.cpp's server, llama-cpp-python's server, Ollama).

The Modelfile's TEMPLATE is written only when it renders exactly what the model's own chat
template renders (checked here on probe conversations): the agent was trained on those tokens,
and a prompt that differs by one newline is a prompt it never saw.
"""

from __future__ import annotations

from pathlib import Path

from atod_edge.io import atomic_write_text

MODELFILE = "Modelfile"
SERVE_MD = "SERVE.md"
# which GGUF to serve: the smallest type that keeps the agent's behaviour, when it passed
SERVE_PREFERENCE = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "f16", "f32")

# Ollama (Go text/template) rendering of ChatML; chatml_render below is the same in Python
OLLAMA_CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                 '{{ end }}<|im_start|>assistant\n')


def chatml_render(messages: list[dict]) -> str:
    """What OLLAMA_CHATML renders for `messages` (Ollama always ends with the assistant turn)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


_PROBES = [
    [{"role": "system", "content": "Act.\nReply with <action>...</action>."},
     {"role": "user", "content": "You are in a room.\n\nAdmissible actions: look | go to desk 1"}],
    [{"role": "user", "content": "  leading and trailing spaces \n"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
     {"role": "assistant", "content": "<action>look</action>"}, {"role": "user", "content": "again"}],
]


def ollama_template(tokenizer) -> str | None:
    """OLLAMA_CHATML when the tokenizer's chat template renders exactly like it, else None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        for messages in _PROBES:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if rendered != chatml_render(messages):
                return None
    except Exception:      # a template that cannot render the probes is not ChatML
        return None
    return OLLAMA_CHATML


def choose_gguf(files: list[dict]) -> dict | None:
    """The GGUF entry to serve: by SERVE_PREFERENCE among files that passed (or were not
    verified); among all GGUF files when none passed."""
    gguf = [f for f in files if f.get("format") == "gguf"]
    usable = [f for f in gguf if f.get("status", "unverified") in ("pass", "unverified")] or gguf

    def rank(f: dict) -> int:
        return SERVE_PREFERENCE.index(f["type"]) if f["type"] in SERVE_PREFERENCE else len(SERVE_PREFERENCE)

    return min(usable, key=rank) if usable else None


def stop_strings(tokenizer) -> list[str]:
    """The end-of-turn tokens as text, for the servers' stop lists."""
    from atod_edge.engine.sampling import stop_token_ids

    return sorted(tokenizer.convert_ids_to_tokens(sorted(stop_token_ids(tokenizer))))


def write_serving_files(out_dir: str | Path, tokenizer, files: list[dict], context_length: int,
                        model_name: str = "atod-agent") -> dict | None:
    """Write Modelfile and SERVE.md beside the exported files; returns what was written, or None
    when there is no GGUF file to serve."""
    from atod_edge.evaluate.evaluate import EvalConfig

    entry = choose_gguf(files)
    if entry is None:
        return None
    out = Path(out_dir)
    defaults = EvalConfig()
    temperature, max_tokens = defaults.temperature, defaults.max_new_tokens
    n_ctx = max(512, min(int(context_length), 4096))
    stops = stop_strings(tokenizer)
    template = ollama_template(tokenizer)
    gguf_name = entry["file"]

    lines = ["# Ollama Modelfile for an atod-edge agent (written by `atod-edge export`)",
             f"#   ollama create {model_name} -f Modelfile && ollama run {model_name}",
             f"FROM ./{gguf_name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: the model's chat template is not ChatML, so Ollama uses the template "
                     "stored in the GGUF file")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"# temperature {temperature:g}: atod-edge eval's default (the ATOD paper evaluates at 0.4)",
              f"PARAMETER temperature {temperature:g}",
              f"PARAMETER num_predict {max_tokens}",
              f"PARAMETER num_ctx {n_ctx}", ""]
    atomic_write_text(out / MODELFILE, "\n".join(lines))

    verdict = {"pass": "passed verification", "fail": "FAILED verification (see report.md)",
               "unverified": "not verified"}.get(entry.get("status", "unverified"), "")
    stop_json = ", ".join(f'"{s}"' for s in stops)
    serve = f"""# Serving this agent

`{gguf_name}` ({entry['type']}, {verdict}) is the file these commands serve; the others in this
folder work the same way. The agent expects the prompts atod-edge builds (`atod_edge.prompts`:
the env's instructions, the task, the last turns, the admissible actions) and answers with
`<action>...</action>`; replies stop at {', '.join(f'`{s}`' for s in stops)}.

## llama-cpp-python's server (OpenAI-compatible)

```bash
pip install 'atod-edge[serve]'          # llama-cpp-python and its server dependencies
python -m llama_cpp.server --model {gguf_name} --host 127.0.0.1 --port 8000 --n_ctx {n_ctx}
```

## llama.cpp's `llama-server`

```bash
llama-server -m {gguf_name} --host 127.0.0.1 --port 8000 -c {n_ctx} --jinja
```

## Ollama

```bash
ollama create {model_name} -f Modelfile
ollama run {model_name}
```

## Ask for an action

```python
import json, urllib.request
from atod_edge.envs import make_env
from atod_edge.prompts import build_messages, parse_action

env = make_env("household")
observation = env.reset(env.tasks("eval", 1)[0])
messages = build_messages(env.instructions, observation, [], None, env.admissible_actions())
body = {{"messages": messages, "temperature": {temperature:g}, "max_tokens": {max_tokens}, "stop": [{stop_json}]}}
request = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", json.dumps(body).encode(),
                                 {{"Content-Type": "application/json"}})
reply = json.load(urllib.request.urlopen(request))["choices"][0]["message"]["content"]
print(parse_action(reply))      # ParsedAction(action='go to ...', reason='')
```

(Ollama serves the same API at `http://127.0.0.1:11434/v1/chat/completions` with `"model": "{model_name}"`.)
In Python without a server, `atod_edge.Agent.load("{gguf_name}", env_instructions=...)` does all of this.
"""
    atomic_write_text(out / SERVE_MD, serve)
    return {"gguf": gguf_name, "modelfile": MODELFILE, "serve_md": SERVE_MD,
            "ollama_template": bool(template), "stop": stops}

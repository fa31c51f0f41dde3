"""`export_model` (checkpoint -> ONNX / GGUF files + verification) and `verify_dir`.

Output directory layout:

    DIR/tokenizer.json ...      the HF tokenizer (llama.cpp files load their token ids from it)
    DIR/onnx/model.onnx         fp32, past key values; DIR/onnx/model.int8.onnx with --int8
    DIR/agent.f16.gguf          and agent.q8_0.gguf, agent.q4_k_m.gguf, ... one per quant type
    DIR/export.json             what was exported from where (verify_dir reads it)
    DIR/report.json, report.md  the verification report (report.png: success and KL per file)
    DIR/Modelfile, SERVE.md     how to serve the chosen GGUF (Ollama, llama.cpp's servers)

Every file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from atod_edge.errors import UserError
from atod_edge.io import atomic_path, atomic_write_json, check_output

from . import gguf as gguf_export
from . import onnx as onnx_export
from .report import write_report
from .serve import write_serving_files
from .verify import (DEFAULT_ENV, VerifyConfig, agent_episodes, agent_summary, decode_speed, file_bytes,
                     greedy_agreement, greedy_sampling, heldout_contexts, logit_parity, on_policy_contexts,
                     torch_logits)

DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")
MANIFEST = "export.json"


def load_student(source: str | Path):
    """(model, tokenizer) in fp32 on CPU; a LoRA adapter directory is merged into its base."""
    from atod_edge.models.loading import load_model, load_tokenizer
    from atod_edge.models.presets import resolve_model

    path = Path(source)
    adapter = path / "adapter_config.json"
    if path.is_dir() and adapter.is_file() and not (path / "config.json").is_file():
        try:
            from peft import PeftModel
        except ImportError:
            raise UserError(f"{path} is a LoRA adapter: merging it needs `peft` (pip install peft)") from None
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{adapter}: no base_model_name_or_path to merge the adapter into")
        model, tokenizer = load_model(base, device="cpu")
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload().eval()
        if (path / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(path)
        return model, tokenizer
    return load_model(resolve_model(source), device="cpu")


def export_model(ckpt_dir: str | Path, out_dir: str | Path, onnx: bool = True, int8: bool = False,
                 gguf_quants: Sequence[str] | None = DEFAULT_QUANTS, verify: bool = True,
                 config: VerifyConfig | None = None, name: str = "agent",
                 n_threads: int | None = None, progress: Callable[[str], None] | None = None,
                 calibrate: int = 0, force: bool = False) -> dict:
    """Export a student checkpoint (or preset name) to ONNX and/or GGUF, then verify the files.

    calibrate=N quantizes the GGUF K-quants with an importance matrix from N of the student's own
    train-split episodes on its env (export.calibrate).
    Returns the report dict (also written as report.json and report.md in `out_dir`);
    report["passed"] is False when any file fails verification.
    `out_dir` must be new, empty or an earlier export (io.check_output, before any work; force: a
    foreign directory too); the export is written beside it and renamed onto it once complete.
    """
    out = check_output(out_dir, "export", force=force)
    with atomic_path(out, kind=None if force else "export") as tmp:
        tmp.mkdir(parents=True)
        return _export_into(ckpt_dir, tmp, onnx=onnx, int8=int8, gguf_quants=gguf_quants, verify=verify,
                            config=config, name=name, n_threads=n_threads, progress=progress, calibrate=calibrate)


def _export_into(ckpt_dir: str | Path, out_dir: str | Path, onnx: bool, int8: bool,
                 gguf_quants: Sequence[str] | None, verify: bool, config: VerifyConfig | None, name: str,
                 n_threads: int | None, progress: Callable[[str], None] | None, calibrate: int) -> dict:
    say = progress or (lambda message: None)
    quants = [q.strip().lower() for q in (gguf_quants or []) if q.strip()]
    unknown = [q for q in quants if q not in gguf_export.ALL_TYPES]
    if unknown:
        raise UserError(f"unknown GGUF quant {', '.join(unknown)} (choices: {', '.join(gguf_export.ALL_TYPES)})")
    onnx = onnx or int8
    if not onnx and not quants:
        raise UserError("nothing to export: ask for --onnx and/or --gguf")
    if calibrate and not any(q in gguf_export.K_QUANTS for q in quants):
        raise UserError(f"--calibrate weighs the GGUF K-quants ({', '.join(gguf_export.K_QUANTS)}); "
                        f"none of {', '.join(quants) or 'no GGUF types'} is one")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files: list[dict] = []

    source = str(Path(ckpt_dir).resolve()) if Path(ckpt_dir).exists() else str(ckpt_dir)
    env, env_source = resolve_env(config or VerifyConfig(), source)
    say(f"loading {ckpt_dir}")
    model, tokenizer = load_student(ckpt_dir)
    calibration = None
    if calibrate and any(q in gguf_export.K_QUANTS for q in quants):
        from .calibrate import calibrate as run_calibration

        calibration = run_calibration(model, tokenizer, env, calibrate, progress=say)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as work:
        # one merged fp32 checkpoint feeds both exporters (LoRA merged, GGUF-sourced presets dequantized)
        merged = Path(work) / "hf"
        model.save_pretrained(merged, safe_serialization=True)
        tokenizer.save_pretrained(merged)
        del model
        _publish_tokenizer(merged, out)

        if onnx:
            say("exporting ONNX" + (" (+ int8)" if int8 else ""))
            onnx_export.export_onnx(merged, out / "onnx", int8=int8)
            files.append({"file": f"onnx/{onnx_export.FP32_FILE}", "format": "onnx", "type": "fp32"})
            if int8:
                files.append({"file": f"onnx/{onnx_export.INT8_FILE}", "format": "onnx", "type": "int8"})
        if quants:
            f32_source = Path(work) / f"{name}.f32.gguf"
            say("writing GGUF f32 (quantization source)")
            gguf_export.write_gguf(merged, f32_source, "f32", name=name)
            for quant in quants:
                target = out / f"{name}.{quant}.gguf"
                entry = {"file": target.name, "format": "gguf", "type": quant}
                say(f"writing {target.name}")
                if quant == "f32":
                    with atomic_path(target) as tmp:
                        shutil.copyfile(f32_source, tmp)
                elif quant == "f16":
                    gguf_export.write_gguf(merged, target, "f16", name=name)
                else:
                    calibrated = calibration is not None and quant in gguf_export.K_QUANTS
                    gguf_export.quantize_gguf(f32_source, target, quant, n_threads=n_threads,
                                              imatrix=calibration.imatrix if calibrated else None)
                    if calibrated:
                        entry["calibrated"] = calibration.summary()
                files.append(entry)

    manifest = {"source": source, "name": name, "files": files, "env": env, "env_source": env_source,
                "export_seconds": round(time.perf_counter() - started, 2)}
    atomic_write_json(out / MANIFEST, manifest)
    if verify:
        say("verifying")
        return verify_dir(out, config=config, progress=progress)
    report = {"source": source, "passed": True, "verified": False,
              "files": [_static_checks(out, dict(f)) for f in files]}
    for f in report["files"]:
        f["status"] = "unverified"
    _write_serving(out, tokenizer, report)
    write_report(out, report)
    return report


def _write_serving(out: Path, tokenizer, report: dict) -> None:
    """Modelfile and SERVE.md for the GGUF file to serve (recorded in report["serving"])."""
    try:
        context = int(json.loads((out / "config.json").read_text()).get("max_position_embeddings") or 4096)
    except (OSError, ValueError):
        context = 4096
    serving = write_serving_files(out, tokenizer, report["files"], context)
    if serving:
        report["serving"] = serving


def _publish_tokenizer(merged: Path, out: Path) -> None:
    """Copy the tokenizer files beside the exported models, each atomically."""
    for src in merged.iterdir():
        if src.is_file() and (src.name.startswith(("tokenizer", "special_tokens", "chat_template",
                                                   "vocab", "merges", "added_tokens"))
                              or src.name in ("config.json", "generation_config.json")):
            with atomic_path(out / src.name) as tmp:
                shutil.copyfile(src, tmp)


def _read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{out} holds no {MANIFEST}: not an export directory (run `atod-edge export` first)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{out / MANIFEST} is not valid JSON: {e}") from None


def _static_checks(out: Path, entry: dict) -> dict:
    """Size and, for GGUF, the stored tensor types and any quant fallback."""
    path = out / entry["file"]
    entry["bytes"] = file_bytes(path)
    entry.setdefault("warnings", [])
    entry.setdefault("failures", [])
    if entry["format"] == "gguf":
        entry["tensor_types"] = gguf_export.type_histogram(path)
        entry["quant_fallbacks"] = gguf_export.quant_fallbacks(path, entry["type"])
        if entry["quant_fallbacks"]:
            got = sorted({f["got"] for f in entry["quant_fallbacks"]})
            entry["warnings"].append(
                f"quant fallback: {len(entry['quant_fallbacks'])} weight tensors are not {entry['type']} "
                f"but {', '.join(got)} (row length not a multiple of the block size)")
    return entry


def run_config_env(source: str | Path) -> tuple[str, Path] | None:
    """(env, config.yaml path) of the run that wrote a checkpoint, when there is one:
    RUN/checkpoints/step_N (atod-edge train, and sft's OUT.work/checkpoints) or an sft output
    OUT with OUT.work/config.yaml beside it."""
    import yaml

    path = Path(source)
    candidates = [path / "config.yaml", Path(f"{path}.work") / "config.yaml"]
    if path.parent.name == "checkpoints":
        candidates.append(path.parent.parent / "config.yaml")
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("env"), str) and data["env"]:
            return data["env"], candidate
    return None


def zoo_card_env(source: str | Path) -> tuple[str, str] | None:
    """(env, zoo name) when `source` is a zoo model (its name or its directory) whose card names
    the env it was trained on."""
    from atod_edge.models import zoo

    path = Path(source)
    if zoo.is_zoo_name(str(source)):
        name = str(source)
    elif path.parent.resolve() == zoo.ZOO_ROOT.resolve() and zoo.is_zoo_name(path.name):
        name = path.name
    else:
        return None
    env = zoo.read_card(name).get("env")
    return (env, name) if isinstance(env, str) and env else None


def resolve_env(cfg: VerifyConfig, source: str | Path, manifest: dict | None = None) -> tuple[str, str]:
    """(env, where it came from): the configured env, else the checkpoint's run config.yaml, else
    the zoo card's env for a zoo model, else the env recorded in export.json, else household."""
    if cfg.env:
        return cfg.env, "given (--env or verify.env)"
    found = run_config_env(source)
    if found:
        return found[0], f"the checkpoint's run config ({found[1]})"
    card = zoo_card_env(source)
    if card:
        return card[0], f"the zoo card of {card[1]} (card.json)"
    if manifest and manifest.get("env"):
        return manifest["env"], f"export.json: {manifest.get('env_source', 'recorded at export')}"
    return DEFAULT_ENV, "default (no run config.yaml found beside the checkpoint)"


def verify_dir(out_dir: str | Path, student: str | Path | None = None, config: VerifyConfig | None = None,
               progress: Callable[[str], None] | None = None) -> dict:
    """Verify every file listed in DIR/export.json against the PyTorch student; write the report."""
    from atod_edge.engine.policy import TorchPolicy

    say = progress or (lambda message: None)
    out = Path(out_dir)
    manifest = _read_manifest(out)
    source = str(student or manifest["source"])
    cfg = dataclasses.replace(config or VerifyConfig())
    cfg.env, env_source = resolve_env(cfg, source, manifest)
    missing = [f["file"] for f in manifest["files"] if not (out / f["file"]).is_file()]
    if missing:
        raise UserError(f"{out}: exported files missing: {', '.join(missing)}")
    say(f"verifying on env {cfg.env} ({env_source})")

    model, tokenizer = load_student(source)
    contexts, context_source = heldout_contexts(tokenizer, cfg)
    reference_logits = [torch_logits(model, c.ids) for c in contexts]
    prompts = [c.prompt_ids for c in contexts]
    torch_policy = TorchPolicy(model, tokenizer, name="torch")
    reference_greedy = torch_policy.generate(prompts, greedy_sampling(cfg.greedy_tokens))
    say("timing the PyTorch student")
    student_report = {"speed": decode_speed(torch_policy, prompts, cfg.speed_tokens)}
    reference = Reference(contexts, reference_logits, reference_greedy)
    if cfg.n_episodes:
        say(f"agent parity: PyTorch student on {cfg.n_episodes} {cfg.env} episodes")
        reference.episodes = agent_episodes(torch_policy, cfg)
        student_report["agent"] = agent_summary(reference.episodes)
        reference.on_policy = on_policy_contexts(reference.episodes, cfg.on_policy_contexts,
                                                 cfg.max_context_tokens)
        reference.on_policy_logits = [torch_logits(model, c.ids) for c in reference.on_policy]

    results = []
    for entry in manifest["files"]:
        say(f"verifying {entry['file']}")
        results.append(_verify_file(out, dict(entry), cfg, reference))
    report = {
        "source": source,
        "env": cfg.env,
        "env_source": env_source,
        "verified": True,
        "config": asdict(cfg),
        "contexts": {"count": len(contexts), "source": context_source,
                     "tokens": sum(len(c.ids) for c in contexts)},
        "on_policy_contexts": {"count": len(reference.on_policy),
                               "source": f"the student's own greedy {cfg.env} eval episodes",
                               "tokens": sum(len(c.ids) for c in reference.on_policy)},
        "student": student_report,
        "files": results,
        "passed": all(r["status"] == "pass" for r in results),
    }
    _write_serving(out, tokenizer, report)
    write_report(out, report)
    return report


@dataclass
class Reference:
    """What the PyTorch student did, for every exported file to be compared with."""

    contexts: list
    logits: list
    greedy: list
    episodes: list | None = None                 # agent-parity episodes (paired with each file's)
    on_policy: list = field(default_factory=list)          # contexts from those episodes
    on_policy_logits: list = field(default_factory=list)


def _verify_file(out: Path, entry: dict, cfg: VerifyConfig, ref: Reference) -> dict:
    entry = _static_checks(out, entry)
    path = out / entry["file"]
    kind = entry["type"]
    policy = scorer = None
    try:
        longest = max(len(c.ids) for c in ref.contexts + ref.on_policy)
        policy, scorer = _open(path, entry, cfg, longest)
        if entry["format"] == "gguf":
            entry["tokenizer_mismatches"] = _tokenizer_mismatches(scorer, ref.contexts)
        entry["parity"] = logit_parity(ref.logits, [scorer.logits(c.ids) for c in ref.contexts])
        if ref.on_policy:
            entry["parity_on_policy"] = logit_parity(ref.on_policy_logits,
                                                     [scorer.logits(c.ids) for c in ref.on_policy])
        if scorer is not policy:
            scorer.close()
        if _threshold_failures(entry, kind, cfg):
            # already failing: skip the slow checks (a broken file can also be very slow)
            entry["warnings"].append("greedy, speed and agent checks skipped: logit parity failed")
            return _finish(entry, kind, cfg)
        generated = policy.generate([c.prompt_ids for c in ref.contexts], greedy_sampling(cfg.greedy_tokens))
        entry["greedy"] = greedy_agreement(ref.greedy, generated)
        entry["speed"] = decode_speed(policy, [c.prompt_ids for c in ref.contexts], cfg.speed_tokens)
        if ref.episodes is not None:
            entry["agent"] = agent_summary(agent_episodes(policy, cfg), reference=ref.episodes)
    except Exception as e:  # a broken file is a verification result, not a crash
        entry["failures"].append(f"could not run: {type(e).__name__}: {e}")
    finally:
        if policy is not None:
            policy.close()
    return _finish(entry, kind, cfg)


def _finish(entry: dict, kind: str, cfg: VerifyConfig) -> dict:
    entry["failures"] += _threshold_failures(entry, kind, cfg)
    entry["status"] = "fail" if entry["failures"] else "pass"
    return entry


def _open(path: Path, entry: dict, cfg: VerifyConfig, longest_context: int):
    """(policy for generation, scorer with .logits) for one exported file."""
    threads = cfg.n_threads or None
    if entry["format"] == "onnx":
        from atod_edge.engine.backends.ort import OrtPolicy

        policy = OrtPolicy.load(str(path), device=cfg.device, n_threads=threads)
        entry["providers"] = policy.providers
        return policy, policy
    from atod_edge.engine.backends.llamacpp import LlamaCppPolicy

    # the scorer keeps logits for every position, so give it only the context it needs
    scorer = LlamaCppPolicy.load(str(path), n_threads=threads, logits_all=True,
                                 n_ctx=longest_context + 8)
    return LlamaCppPolicy.load(str(path), n_threads=threads), scorer


def _tokenizer_mismatches(scorer, contexts) -> int:
    """Contexts whose text llama.cpp's own tokenizer splits differently from the HF tokenizer."""
    tokenizer = scorer.tokenizer
    mismatches = 0
    for c in contexts:
        text = tokenizer.decode(c.ids, skip_special_tokens=False)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = scorer.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        mismatches += list(got) != list(expected)
    return mismatches


def _threshold_failures(entry: dict, kind: str, cfg: VerifyConfig) -> list[str]:
    failures = []
    for key, where in (("parity", "expert contexts"), ("parity_on_policy", "on-policy contexts")):
        parity = entry.get(key)
        if not parity:
            continue
        if kind in ("fp32", "f32"):
            tol = cfg.fp32_max_abs_logit
            if not parity["max_abs_logit_diff"] <= tol:
                failures.append(f"max |logit diff| {parity['max_abs_logit_diff']:.3g} > {tol:g} ({where})")
        else:
            cap = cfg.kl_cap(kind)
            if not parity["mean_kl"] <= cap:
                failures.append(f"mean KL(student||exported) {parity['mean_kl']:.3g} > {cap:g} ({where})")
    agent = entry.get("agent")
    if agent and not abs(agent["points_vs_student"]) <= cfg.points_cap(kind):
        failures.append(f"success rate {agent['points_vs_student']:+.1f} points from the student "
                        f"(allowed ±{cfg.points_cap(kind):g})")
    if entry.get("tokenizer_mismatches"):
        failures.append(f"llama.cpp tokenizes {entry['tokenizer_mismatches']} context(s) differently "
                        "from the HF tokenizer (wrong pre-tokenizer?)")
    if cfg.fail_on_fallback and entry.get("quant_fallbacks"):
        failures.append("quant fallback (fail_on_fallback is set)")
    return failures

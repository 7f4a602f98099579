"""Tokenizer and chat template of a Hugging Face checkpoint (tokenizer.json, tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json: pass token ids instead of strings")
        self.tok = _HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.eos_ids = self._eos_ids(model_dir)

    def _eos_ids(self, model_dir: Path) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            p = model_dir / name
            if p.is_file():
                v = json.loads(p.read_text()).get("eos_token_id")
                if v is not None:
                    ids.update(v if isinstance(v, list) else [v])
        if self.eos_token is not None and self.tok.token_to_id(self.eos_token) is not None:
            ids.add(self.tok.token_to_id(self.eos_token))
        return ids

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def _raise(msg):
    raise jinja2.TemplateError(msg)

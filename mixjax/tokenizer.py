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


class DecodeStream:
    """The text of a growing list of token ids, as `Tokenizer.decode` gives it for the whole list, at a cost per call
    that does not grow with the list: a server re-decoding each request's whole output at every flush pays O(n^2)
    over an n-token generation, on the engine's thread.

    `text` is the text of ids[:read]; each call decodes only the window ids[prefix:] and the window's first part
    ids[prefix:read], and adds what the window's text has beyond its first part's (decoding a window with a token
    before the new ones keeps what a decoder does at a word's start, e.g. SentencePiece's leading space). The offsets
    move on only when the window's text does not end in U+FFFD: its last token may hold part of a character. A
    decoder whose window text does not extend its first part's gets a full decode instead. (`tokenizers`' own
    DecodeStream holds a token back while its character is incomplete and never returns the U+FFFD that a full
    decode ends with when the generation stops mid-character.)"""

    def __init__(self, tok: "Tokenizer"):
        self.tok = tok
        self.prefix = self.read = 0
        self.text = ""

    def decode(self, ids: list[int]) -> str:
        """decode(ids) for ids that extend the ids of the previous call."""
        first = self.tok.decode(ids[self.prefix: self.read])
        window = self.tok.decode(ids[self.prefix:])
        if not window.startswith(first):
            return self.tok.decode(ids)
        full = self.text + window[len(first):]
        if not window.endswith("\ufffd"):
            self.text, self.prefix, self.read = full, self.read, len(ids)
        return full


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def _raise(msg):
    raise jinja2.TemplateError(msg)

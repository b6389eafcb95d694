"""Tokenizer and chat template of a checkpoint: `tokenizer.json` through the `tokenizers` library, and the Jinja
chat template from `tokenizer_config.json` when the checkpoint ships one (DeepSeek's does).

Owns text <-> ids and the incremental detokenization used for streaming. The engine knows nothing of text.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    pass


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # {"content": "<｜begin▁of▁sentence｜>", ...}
        return v.get("content")
    return v


class Tokenizer:
    """Example:
        >>> tok = Tokenizer.from_dir("path/to/checkpoint")
        >>> ids = tok.encode("Hello"); tok.decode(ids)
    """

    def __init__(self, tok: _HFTokenizer, config: dict[str, Any] | None = None):
        self._tok = tok
        cfg = config or {}
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(cfg.get("add_bos_token", self.bos_id is not None))
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise TokenizerError(f"{path}: no tokenizer.json; pass token ids instead of text, or add the "
                                 "checkpoint's tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{tj}: cannot be read by the tokenizers library ({e})") from None
        cfg = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                cfg = json.load(f)
        return cls(tok, cfg)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's Jinja chat template (sandboxed, as transformers does)."""
        if not self.chat_template:
            raise TokenizerError("this checkpoint ships no chat_template in tokenizer_config.json; pass plain text")

        def raise_exception(msg):
            raise TokenizerError(f"chat template: {msg}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8 tail."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete UTF-8 tail) once the sequence ends."""
        text = self.tok.decode(self.ids)
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta

"""The Engine: owns the weights handles, the KV caches and the per-layer jitted steps, and runs prefill + decode.

This is the all-in-memory path: every weight sits on the default device. The tiered runtime (planner, layer ring,
expert cache, prefetch) replaces where weights come from, not this loop's math. Text lives in the tokenizer; the
engine's core works on token ids.
"""

# B batch, T tokens, V vocab

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model import embed_step, head_step, init_layer_cache, layer_step
from dsjax.model.attention import MlaForm
from dsjax.runtime.sampling import SamplingParams, sample
from dsjax.runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


class PromptError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of sequence `seq`: its id, the text it completes (may be empty) and whether it ends."""

    seq: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None = None


@dataclasses.dataclass
class Generation:
    """A finished sequence: prompt ids, generated ids, generated text, and why it stopped ("stop" or "length")."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


def _prompt_bucket(n: int) -> int:
    """Padded prompt length: the smallest of 16, 24, 32, 48, 64, 96, ... (two per octave) that holds n. Every
    distinct length compiles the prefill anew (tens of seconds at V3 widths); multiples of 16 compiled once per 16
    tokens of prompt, these O(log n) times, for at most 1.5x the prefill compute."""
    b = 16
    while True:
        if n <= b:
            return b
        if n <= b + b // 2:
            return b + b // 2
        b *= 2


class Engine:
    """Runs a DeepSeek model held as a weight pytree. Build it with `dsjax.load`.

    Example:
        >>> engine = dsjax.load("path/to/checkpoint")
        >>> engine.generate("The capital of France is", max_new_tokens=16).text
    """

    def __init__(self, cfg: ModelConfig, weights: dict, tokenizer: Tokenizer | None = None, *,
                 prefill_form: MlaForm = "naive", name: str = "", dtype=None, enable_fusion: bool = False):
        self.config = cfg
        self.enable_fusion = enable_fusion      # FP4 weights through the fused kernels (GPU); else the references
        self.weights = weights
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype) if dtype is not None else weights["embed"].dtype
        self.prefill_form = prefill_form
        self.name = name
        self._stats: dict[str, Any] = {}

    # ---- model steps ---------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def _run_layers(self, x, caches, positions, form):
        cfg = self.config
        for i, w in enumerate(self.weights["layers"]):
            x, caches[i], _ = layer_step(w, x, caches[i], positions, cfg, cfg.layer_kind(i), form,
                                         fusion=self.enable_fusion)
        return x

    def _embed(self, tokens: np.ndarray) -> jax.Array:
        return embed_step(self.weights["embed"], jnp.asarray(tokens), self.dtype)

    def _head(self, x: jax.Array) -> jax.Array:
        return head_step(self.weights["final_norm"], self.weights["lm_head"], x, self.config, fusion=self.enable_fusion)

    def _set_phase(self, phase: str) -> None:
        """'prefill' or 'decode': lets a runtime attribute its transfers (no-op here)."""

    def _new_caches(self, batch: int, length: int) -> list[dict]:
        return [init_layer_cache(batch, length, self.config, self.dtype) for _ in range(self.config.num_hidden_layers)]

    def logits(self, token_ids) -> np.ndarray:
        """Full forward of token ids [B, T] (or [T]) from position 0: float32 numpy logits [B, T, V]."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        self._check_ids(ids.reshape(-1))
        B, T = ids.shape
        if T > self.max_context:
            raise PromptError(f"{T} tokens exceed the model's context limit of {self.max_context}")
        x = self._embed(ids)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self._run_layers(x, self._new_caches(B, T), positions, self.prefill_form)
        return np.asarray(self._head(x))

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise PromptError(f"token id {int(ids.max() if ids.max() >= self.config.vocab_size else ids.min())} is "
                              f"outside the vocabulary [0, {self.config.vocab_size})")

    # ---- prompts -------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            if chat:
                return self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
                                             add_bos=False)
            return self.tokenizer.encode(prompt)
        items = list(prompt)
        if items and isinstance(items[0], dict):
            if self.tokenizer is None:
                raise TokenizerError("chat messages need the checkpoint's tokenizer")
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(items), add_bos=False)
        return [int(t) for t in items]

    def _normalize(self, prompts, chat: bool) -> tuple[list[list[int]], bool]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            single = True
        elif isinstance(prompts, Sequence) and len(prompts) > 0:
            single = isinstance(prompts[0], (int, np.integer, dict))   # token ids or chat messages
        else:
            raise PromptError("prompts must be a string, token ids, chat messages, or a non-empty list of these")
        if single:
            prompts = [prompts]
        ids = [self._encode(p, chat) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise PromptError(f"prompt {i} is empty")
            if len(p) >= self.max_context:
                raise PromptError(f"prompt {i} has {len(p)} tokens; the context limit is {self.max_context} "
                                  "(prompt + at least one generated token must fit)")
            self._check_ids(np.asarray(p))
        return ids, single

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        eos = self.config.eos_token_id
        ids.update(eos if isinstance(eos, tuple) else ([eos] if eos is not None else []))
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    # ---- generation ----------------------------------------------------------------------------
    def stream(self, prompts, params: SamplingParams | None = None, *, chat: bool = False,
               **kwargs) -> Iterator[TokenEvent]:
        """Generate token by token; yields a TokenEvent per new token of each unfinished sequence.

        `prompts`: a string, a list of token ids, a list of chat messages, or a list of any of these.
        Keyword arguments are SamplingParams fields (max_new_tokens, temperature, top_p, top_k, stop, seed).
        """
        params = params or SamplingParams(**kwargs)
        ids, _ = self._normalize(prompts, chat)
        yield from self._generate(ids, params)

    def _generate(self, ids: list[list[int]], params: SamplingParams, *, seq_offset: int = 0,
                  n_real: int | None = None) -> Iterator[TokenEvent]:
        """Prefill and decode one batch. Rows from `n_real` on are padding (no events); row b samples with the
        key of sequence seq_offset + b."""
        B = len(ids)
        lengths = np.array([len(p) for p in ids], np.int32)
        budget = np.minimum(params.max_new_tokens, self.max_context - lengths)   # tokens each row may still add
        T = min(_prompt_bucket(int(lengths.max())), self.max_context)
        # The KV cache length is a power of two (at least 64): every distinct length compiles each attention variant
        # anew, so generations of growing length (a chat) compile O(log n) times, not once per 64 tokens. MLA's
        # cache is small (576 values per token and layer), so the up-to-2x padding costs little.
        S = min(max(64, 1 << (int((lengths + budget).max()) - 1).bit_length()), self.max_context)
        stop_ids = self._stop_ids(params)
        decoders = [StreamDecoder(self.tokenizer) if self.tokenizer else None for _ in range(B)]
        done = np.arange(B) >= (B if n_real is None else n_real)
        n_new = np.zeros(B, np.int32)
        stats = dict(batch=B, prompt_tokens=int(lengths[: n_real or B].sum()), generated_tokens=0)

        t0 = time.perf_counter()
        tokens = np.zeros((B, T), np.int32)
        for b, p in enumerate(ids):
            tokens[b, : len(p)] = p
        caches = self._new_caches(B, S)
        self._set_phase("prefill")
        x = self._embed(tokens)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self._run_layers(x, caches, positions, self.prefill_form)
        last = x[jnp.arange(B), jnp.asarray(lengths - 1)][:, None]               # [B, 1, D] last real token
        logits = self._head(last)[:, 0]
        pos = lengths.copy()
        step = 0
        while True:
            nxt = np.asarray(sample(logits, params, list(range(seq_offset, seq_offset + B)), step))
            if step == 0:
                stats["ttft_s"] = time.perf_counter() - t0
                t_dec = time.perf_counter()
                self._set_phase("decode")
            for b in range(B):
                if done[b]:
                    continue
                tok = int(nxt[b])
                n_new[b] += 1
                text = decoders[b].push(tok) if decoders[b] else ""
                reason = None
                if tok in stop_ids:
                    reason = "stop"
                elif params.stop and decoders[b] and any(s in decoders[b].text for s in params.stop):
                    reason = "stop"
                elif n_new[b] >= budget[b]:
                    reason = "length"
                done[b] = reason is not None
                if done[b] and decoders[b]:
                    text += decoders[b].flush()
                yield TokenEvent(seq_offset + b, tok, text, bool(done[b]), reason)
            step += 1
            if done.all():
                break
            x = self._embed(nxt[:, None])
            x = self._run_layers(x, caches, jnp.asarray(pos[:, None]), "absorbed")
            logits = self._head(x)[:, 0]
            pos = pos + 1
        stats["generated_tokens"] = int(n_new.sum())
        stats["decode_s"] = time.perf_counter() - t_dec
        stats["decode_tok_s"] = (stats["generated_tokens"] - B) / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
        self._stats = stats

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] | str = (), seed: int = 0, *, chat: bool = False,
                 stop_token_ids: Sequence[int] = ()) -> Generation | list[Generation]:
        """Generate continuations. A single prompt returns one Generation, a list of prompts a list.

        Example:
            >>> engine.generate(["Once upon a time", [1, 2, 3]], max_new_tokens=32, temperature=0.7, seed=1)
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=stop, stop_token_ids=tuple(stop_token_ids), seed=seed)
        ids, single = self._normalize(prompts, chat)
        toks: list[list[int]] = [[] for _ in ids]
        reasons: list[str] = ["length"] * len(ids)
        for ev in self._generate(ids, params):
            toks[ev.seq].append(ev.token_id)
            if ev.finished:
                reasons[ev.seq] = ev.finish_reason
        out = []
        for p, t, r in zip(ids, toks, reasons):
            text = self.tokenizer.decode(t) if self.tokenizer else ""
            for s in params.stop:
                if s in text:
                    text = text[: text.index(s)]
            out.append(Generation(p, t, text, r))
        return out[0] if single else out

    def stats(self) -> dict[str, Any]:
        """Counters and timings of the last generation (prompt/generated tokens, TTFT, decode tok/s)."""
        return dict(self._stats)

    def close(self) -> None:
        """Release what the engine holds beyond its arrays (nothing here; the tiered engine stops its readers)."""

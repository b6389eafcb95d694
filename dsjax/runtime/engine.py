"""The Engine: a request-level engine that advances every running request by one token per step, on one thread.

Thread model (the contract):
- One engine thread, started at the first request, owns every device array (weights handles, the KV pool, the
  expert caches), every cache and ledger, and every Request. Nothing else mutates them.
- Any thread may call `submit` (-> RequestHandle), `generate`, `stream`, `logits`, `stats`, `cancel` on a handle, and
  `close`: they hand work to the engine thread through a queue and wait on futures or the handle's event queue.
  Four threads calling `generate` at once get their results as if they had called one after another.
- Callbacks (`on_event`) run on the engine thread and must not block.
- With compute_config.compile_ahead on, a compile thread (compile_ahead.py) lowers and compiles programs the engine
  thread hands it (the decode shape admitted requests lead to); it runs none of the engine's computations and touches
  no engine state. The engine thread waits for a compile in progress there rather than compiling it again.

A step (`_step`): the Scheduler admits waiting requests while the KV pool has pages for them, decode rows and prompt
chunks become groups, one forward runs the groups through every layer (`_forward`; the tiered engine shares each
layer's experts between the groups), each request that completes a token samples it with its own key (seed, token
index), finished requests leave at once and their pages return to the pool. This class holds the whole model as a
weight pytree on its device (the all-in-memory path); TieredEngine (tiered.py) replaces `_forward`'s weight movement,
not this loop. Text lives in the tokenizer; the engine's core works on token ids.
"""

# B batch rows of a group, T tokens of a group, W pages of a row's table, V vocab

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import math
import secrets
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model import embed_step, head_step, init_layer_cache, layer_step
from dsjax.model.attention import MlaForm
from dsjax.runtime.compile_ahead import CompileAhead, abstract, enabled, with_shape
from dsjax.runtime.compile_ahead import compile_threads as compile_threads_of
from dsjax.runtime.compile_ahead import start_thread as _start_thread
from dsjax.runtime.config import routing_report
from dsjax.runtime.kv_pool import PAGE_TOKENS, KVPool
from dsjax.runtime.requests import Generation, PromptError, Request, RequestHandle, TokenEvent
from dsjax.runtime.sampler import MAX_LOGPROBS, choose, lower_variant
from dsjax.runtime.sampler import VARIANTS as SAMPLER_VARIANTS
from dsjax.runtime.sampling import SamplingParams
from dsjax.runtime.scheduler import DEFAULT_STEP_TOKENS, Scheduler, StepPlan
from dsjax.runtime.tiers import pow2_bucket
from dsjax.runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

Prompt = str | Sequence[int] | Sequence[dict[str, str]]
DEFAULT_CONTEXT = 4096          # max_context when neither the caller nor the model's config says less
# A row's page table is at least this many tokens wide (bucketed widths below it would be one more compiled shape of
# every attention program each, for a few KB of KV read per row and layer: at the default warm-up, 512-token prompts
# and 128-token outputs at max_batch_size 32, it drops widths 1 and 2 of 1-16 pages)
MIN_TABLE_TOKENS = 4 * PAGE_TOKENS
SEED_LIMIT = 2**64

__all__ = ["Engine", "Generation", "PromptError", "TokenEvent", "RequestHandle"]


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


@dataclasses.dataclass
class Group:
    """Rows of one shape in a step: decode rows (T = 1) or prompt chunks. Padding rows and tokens have valid False,
    page tables past the pool and positions past their table, so they write no cache."""

    tokens: np.ndarray            # [B, T] int32
    positions: np.ndarray         # [B, T] int32
    pages: np.ndarray | None      # [B, W] int32 page tables (None: a private contiguous cache, e.g. logits())
    valid: np.ndarray             # [B, T] bool
    last: np.ndarray | None       # [B] the token whose logits are wanted (None: every token's)
    form: MlaForm


@jax.jit
def _take_last(x, last):
    return x[jnp.arange(x.shape[0]), last][:, None]                  # [B, 1, D]


@functools.partial(jax.jit, static_argnames=("layers",), donate_argnums=(0,))
def count_experts(counts, idxs, valid, layers):
    """counts [L, E] + how often each expert of each layer in `layers` is routed by the valid tokens of that layer's
    idx [N, K] (one call per step, on the device: no sync, no dispatch per layer)."""
    w = jnp.repeat(valid.reshape(-1), idxs[0].shape[-1]).astype(counts.dtype)
    for layer, idx in zip(layers, idxs):
        counts = counts.at[layer, idx.reshape(-1)].add(w)
    return counts


@jax.jit
def _select_rows(logits, idx):
    """Rows `idx` [N] of a step's groups ([B_g, 1, V] each, their rows numbered in group order) as one [N, V]. N is
    a power of two (padding repeats row 0): the program depends on the groups' shapes and N, not on how many rows of
    each group sample (one compile per such count was a stall on the engine thread whenever the running set changed)."""
    return jnp.concatenate([lg[:, 0] for lg in logits])[idx]


# Programs JAX lowers (and compiles, or loads from the persistent cache) on a thread, for the threads registered here:
# the engine thread's compiles stall every running request, so the engine reports them (stats()["steps"]["compiles"]).
# Lowering to MLIR (once per new program: a new shape or static argument) and the XLA compile (or its persistent-cache
# lookup): each recorded once per top-level jitted call (tracing is not counted: a jit traced inside another records
# its time inside its caller's). demo.compile_seconds sums the same two.
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENTS = (LOWER_EVENT, "/jax/core/compile/backend_compile_duration")
_compile_logs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()      # thread -> its counters (a dict)
_compile_listener_lock = threading.Lock()
_compile_listener_on = False


def _compile_listener(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS and (log := _compile_logs.get(threading.current_thread())) is not None:
        log["programs"] += event == LOWER_EVENT
        log["seconds"] += seconds


def _log_compiles(thread: threading.Thread, log: dict) -> None:
    """Count the programs `thread` lowers and the seconds it spends lowering and compiling into `log`
    ({"programs": 0, "seconds": 0.0}), from JAX's monitoring events, for as long as the thread lives."""
    global _compile_listener_on
    with _compile_listener_lock:
        if not _compile_listener_on:
            jax.monitoring.register_event_duration_secs_listener(_compile_listener)
            _compile_listener_on = True
        _compile_logs[thread] = log


def _engine_thread(ref, cv: threading.Condition, inbox, waiting, running, compiles: dict) -> None:
    """The engine thread's loop. It holds its engine only through a weak reference while idle, so an engine a caller
    drops without close() is collected (its device arrays freed) and the thread ends within a second."""
    _log_compiles(threading.current_thread(), compiles)
    while True:
        engine = ref()
        if engine is None or not engine._turn():
            return
        del engine
        with cv:
            if not (inbox or waiting or running):
                cv.wait(timeout=1.0)


class _Call:
    """A function to run on the engine thread between steps, and the future of its result."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class Engine:
    """Runs a DeepSeek model held as a weight pytree. Build it with `dsjax.load`.

    Example:
        >>> engine = dsjax.load("path/to/checkpoint")
        >>> engine.generate("The capital of France is", max_new_tokens=16).text
        >>> h = engine.submit("Once", max_new_tokens=8, seed=1); h.result().text
    """

    def __init__(self, cfg: ModelConfig, weights: dict, tokenizer: Tokenizer | None = None, *,
                 prefill_form: MlaForm = "naive", name: str = "", dtype=None, enable_fusion: bool = False,
                 max_batch_size: int = 32, min_batch_size: int = 1, dynamic_batch: bool = True,
                 max_context: int | None = None, step_tokens: int = DEFAULT_STEP_TOKENS, kv_pages: int | None = None,
                 device=None, mm=None, compile_ahead: bool | str = "off", min_table_tokens: int = MIN_TABLE_TOKENS):
        self.config = cfg
        self.enable_fusion = enable_fusion      # FP4 weights through the fused kernels (GPU); else the references
        self.weights = weights
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype) if dtype is not None else weights["embed"].dtype
        self.prefill_form = prefill_form
        self.name = name
        self.device = device if device is not None else jax.devices()[0]
        self._stats: dict[str, Any] = {}
        self._act_counts: jax.Array | None = None      # [layers, experts] routed token-expert pairs, on the device
        # ---- requests (engine thread) ----
        limit = min(cfg.max_position_embeddings, max_context or DEFAULT_CONTEXT)
        if max_context is not None and max_context > cfg.max_position_embeddings:
            raise ValueError(f"max_context={max_context} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        self.max_context = limit
        self.batch = dict(min=min_batch_size, max=max_batch_size, dynamic=dynamic_batch)
        per_request = math.ceil(limit / PAGE_TOKENS)
        self.kv = KVPool(cfg, kv_pages if kv_pages is not None else max_batch_size * per_request, self.dtype,
                         jax.sharding.SingleDeviceSharding(self.device), mm=mm)
        if self.kv.pages < per_request:
            raise PromptError(f"the KV pool holds {self.kv.capacity_tokens} tokens, less than one request of "
                              f"max_context={limit}; lower max_context or give the pool more memory")
        self.scheduler = Scheduler(max_batch_size, step_tokens)
        # page tables are at least this many pages wide (a power of two, at most a max_context request's)
        self.min_width = pow2_bucket(max(1, self.kv.pages_for(min(min_table_tokens, limit))))
        # the decode shape admitted requests lead to, compiled on a thread of its own (compile_ahead.py; None: off)
        self.compile_ahead = CompileAhead() if enabled(compile_ahead) else None
        self._warm_pool: CompileAhead | None = None     # warmup's compile threads, while it runs
        self._sites: dict[tuple, tuple] = {}            # call site -> (lower, abstract args, batch args, pages)
        self._sharding = jax.sharding.SingleDeviceSharding(self.device)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._inbox: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._ids = itertools.count()
        self.counters = {"steps": 0, "decode_rows": 0, "prefill_tokens": 0, "step_seconds": 0.0,
                         "finished": collections.Counter(), "submitted": 0, "last_batch": 0, "max_running": 0}
        self.decode_batches: set[int] = set()     # padded decode row counts met (min/max_batch_size, dynamic_batch)
        self.compiles = {"programs": 0, "seconds": 0.0}     # lowered / compiled on the engine thread (_log_compiles)
        self._status = {"running": 0, "waiting": 0}

    # ---- model steps (engine thread) ------------------------------------------------------------------------------
    def _embed(self, tokens: np.ndarray) -> jax.Array:
        return embed_step(self.weights["embed"], jnp.asarray(tokens), self.dtype)

    def _head(self, x: jax.Array) -> jax.Array:
        return head_step(self.weights["final_norm"], self.weights["lm_head"], x, self.config, fusion=self.enable_fusion)

    def _set_phase(self, phase: str) -> None:
        """'prefill' or 'decode': lets a runtime attribute its transfers (no-op here)."""

    def _new_caches(self, batch: int, length: int) -> list[dict]:
        return [init_layer_cache(batch, length, self.config, self.dtype) for _ in range(self.config.num_hidden_layers)]

    def _logits_of(self, x: jax.Array, g: Group) -> jax.Array:
        """float32 logits [B, 1, V] of each row's wanted token, or [B, T, V] of every token when g.last is None."""
        if g.last is None:
            return self._head(x)
        return self._head(_take_last(x, g.last))

    def _forward(self, groups: list[Group], caches: list[dict]) -> list[jax.Array]:
        """Run the groups through every layer; `caches[i]` is layer i's cache (the KV pool's, or private ones)."""
        out = []
        plain = type(self)._layer is Engine._layer
        for g in groups:
            x = self._embed(g.tokens)
            # call sites noted this step (compile ahead, the warm-up's compile pool)
            noted = set() if self._ahead() is not None and plain else None
            if plain:
                # committed to the engine's device, as the compile thread's abstract arguments are (one executable)
                positions, pages = jax.device_put((g.positions, g.pages), self._sharding)
            else:                                   # placed by the subclass's programs (expert parallel: a mesh)
                positions = jnp.asarray(g.positions)
                pages = None if g.pages is None else jnp.asarray(g.pages)
            routed = {}
            for i, w in enumerate(self.weights["layers"]):
                if noted is not None and (kind := self.config.layer_kind(i)) not in noted:
                    noted.add(kind)
                    cfg, fusion = self.config, self.enable_fusion
                    self._note_call(("layer", kind, g.form), lambda *a, pages, kind=kind, form=g.form:
                                           layer_step.lower(*a, cfg, kind, form, fusion=fusion, pages=pages),
                                           (w, x, caches[i], positions), (1, 3), pages)
                x, caches[i], r = self._layer(i, w, x, caches[i], positions, g.form, pages)
                if r is not None:
                    routed[i] = r.idx
            self._count_activations(routed, g.valid)
            out.append(self._logits_of(x, g))
        return out

    def _ahead(self) -> CompileAhead | None:
        """The compile threads that call sites are handed to now: the warm-up's pool while it runs, else compile ahead
        (None: neither)."""
        return self._warm_pool if self._warm_pool is not None else self.compile_ahead

    def _note_call(self, key: tuple, lower: Callable, args: tuple, rows: tuple[int, ...], pages) -> None:
        """Engine thread, before a call with page tables `pages` [B, W] on inputs of B rows of T tokens: (B, T, W) is
        compiled for this call site by the call itself (or was handed to the compile threads: then wait for it); the
        site's abstract arguments are kept once, so `_lower_site` can lower it for other rows, tokens and widths
        (`rows`: the arguments whose leading axes are [B, T])."""
        ahead = self._ahead()
        if ahead is None or pages is None:
            return
        B, T = args[rows[0]].shape[:2]
        shape = key + (B, T, pages.shape[1])
        ahead.wait_for(shape)
        ahead.submitted.add(shape)
        if key not in self._sites:
            self._sites[key] = (lower, abstract(args), rows, abstract(pages))

    def _lower_site(self, key: tuple, B: int, T: int, W: int) -> Callable[[], Any]:
        """A thunk lowering call site `key` for B rows of T tokens and page tables W wide."""
        lower, args, rows, pages = self._sites[key]
        a = tuple(with_shape(x, (B, T) + x.shape[2:]) if j in rows else x for j, x in enumerate(args))
        p = with_shape(pages, (B, W))
        return lambda: lower(*a, pages=p)

    def _compile_decode_ahead(self) -> None:
        """Requests were admitted: the decode steps after their prefill run with the running set's rows and widest
        page table, a shape the batch may not have met. Have the compile thread build every decode call site for it
        while the prefill runs (compile_ahead.py), instead of the first such decode step compiling while every
        stream waits."""
        if self.compile_ahead is None or self._warm_pool is not None or not self._sites or not self._running:
            return
        B = self._batch_rows(len(self._running))
        W = self._width(max(len(r.pages) for r in self._running))
        for key in self._sites:
            if key[2] == "absorbed":                       # the decode rows' form (key: (what, kind, form, ...))
                self.compile_ahead.submit(key + (B, 1, W), self._lower_site(key, B, 1, W))

    def _layer(self, i: int, w: dict, x, cache: dict, positions, form: MlaForm, pages):
        """Decoder layer i on its weights: (x, cache, routing or None). Expert parallelism replaces it."""
        return layer_step(w, x, cache, positions, self.config, self.config.layer_kind(i), form,
                          fusion=self.enable_fusion, pages=pages)

    def _count_activations(self, routed: dict[int, jax.Array], valid: np.ndarray) -> None:
        """Expert activations of a forward's MoE layers ({layer: idx [N, K]}), counted where the routing is, in one
        call (no host sync); read by stats()."""
        if not routed:
            return
        if self._act_counts is None:
            E = self.config.n_routed_experts
            first = next(iter(routed.values()))
            self._act_counts = jax.device_put(np.zeros((self.config.num_hidden_layers, E), np.int32), first.sharding)
        layers = tuple(routed)
        self._act_counts = count_experts(self._act_counts, tuple(routed[i] for i in layers), valid, layers=layers)

    def _activations(self) -> list[list[int]]:
        """Expert activations per layer (routed token-expert pairs; zeros for dense layers)."""
        E = self.config.n_routed_experts or 0
        if self._act_counts is None:
            return [[0] * E for _ in range(self.config.num_hidden_layers)] if E else []
        return np.asarray(self._act_counts).tolist()

    def _prepare_decode(self, batch: int) -> None:
        """Before the first decode step of a batch size (the tiered engine compiles its expert calls)."""

    def _recover(self) -> None:
        """After a step failed: put the runtime's caches back in a usable state (the tiered engine's pins)."""

    # ---- prompts -------------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: text (with the tokenizer; `chat` wraps it as a user message), token ids, or chat
        messages rendered with the checkpoint's chat template."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            if chat:
                return self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
                                             add_bos=False)
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            if self.tokenizer is None:
                raise TokenizerError("chat messages need the checkpoint's tokenizer")
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(items), add_bos=False)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
            bad = next(t for t in items if not isinstance(t, (int, np.integer)) or isinstance(t, bool))
            raise PromptError(f"a prompt is text, a list of token ids, or a list of chat messages; got a list holding "
                              f"{type(bad).__name__} {bad!r}")
        return [int(t) for t in items]

    def _normalize(self, prompts, chat: bool) -> tuple[list[list[int]], bool]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            single = True
        elif isinstance(prompts, Sequence) and len(prompts) > 0:
            first = prompts[0]
            single = isinstance(first, (int, np.integer, dict))          # token ids or chat messages
            if not single and not all(isinstance(p, (str, Sequence, np.ndarray)) for p in prompts):
                bad = next(p for p in prompts if not isinstance(p, (str, Sequence, np.ndarray)))
                raise PromptError(f"prompt {prompts.index(bad)}: a prompt is text, a list of token ids, or a list of "
                                  f"chat messages; got {type(bad).__name__} {bad!r} in a list of prompts")
        else:
            raise PromptError("prompts must be a string, token ids, chat messages, or a non-empty list of these")
        if single:
            prompts = [prompts]
        ids = []
        for i, p in enumerate(prompts):
            try:
                ids.append(self.encode(p, chat))
            except PromptError as e:
                raise PromptError(f"prompt {i}: {e}") from None
        for i, p in enumerate(ids):
            self._check_prompt(p, i)
        return ids, single

    def _check_prompt(self, p: list[int], i: int = 0) -> None:
        if not p:
            raise PromptError(f"prompt {i} is empty")
        if len(p) >= self.max_context:
            raise PromptError(f"prompt {i} has {len(p)} tokens; the context limit is {self.max_context} "
                              "(prompt + at least one generated token must fit)")
        self._check_ids(np.asarray(p))

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise PromptError(f"token id {int(ids.max() if ids.max() >= self.config.vocab_size else ids.min())} is "
                              f"outside the vocabulary [0, {self.config.vocab_size})")

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = set(params.stop_token_ids)
        eos = self.config.eos_token_id
        ids.update(eos if isinstance(eos, tuple) else ([eos] if eos is not None else []))
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return frozenset(ids)

    # ---- the caller's API (any thread) ---------------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False, logprobs: int = 0,
               on_event: Callable[[TokenEvent], None] | None = None, request_id: str | None = None, seq: int = 0,
               **sampling) -> RequestHandle:
        """Queue one request; returns its handle at once. Bad prompts and parameters raise here (ValueError).

        `params` or keyword SamplingParams fields; `seed=None` draws a fresh seed (handle.seed says which);
        `logprobs=n` (0..20) adds each token's log-probability and its n most likely alternatives to the events;
        `on_event` is called on the engine thread for every event (must not block).

        Example:
            >>> h = engine.submit([0, 17, 42], max_new_tokens=8, temperature=0.7, seed=3)
            >>> [ev.token_id for ev in h.events()]
        """
        params = params or SamplingParams(**sampling)
        ids = self.encode(prompt, chat)
        self._check_prompt(ids)
        req = self._request(ids, params, params.seed, logprobs=logprobs, on_event=on_event, request_id=request_id,
                            seq=seq)
        self._post(req)
        return req.handle

    def _submit_all(self, reqs: list[Request]) -> list[RequestHandle]:
        """Queue requests together: the engine thread admits them in the same step (a static batch stays one)."""
        self._post(*reqs)
        return [r.handle for r in reqs]

    def _request(self, ids: list[int], params: SamplingParams, seed: int | None, *, logprobs: int = 0,
                 on_event=None, request_id: str | None = None, seq: int = 0) -> Request:
        if params.top_k > self.config.vocab_size:
            raise ValueError(f"top_k={params.top_k} must be <= the vocabulary size {self.config.vocab_size}")
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={logprobs} must lie in [0, {MAX_LOGPROBS}]")
        if seed is None:
            seed = secrets.randbits(63)
        elif not 0 <= int(seed) < SEED_LIMIT:
            raise ValueError(f"seed={seed} must lie in [0, 2**64)")
        rid = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(rid, ids, int(seed), seq, on_event)
        budget = min(params.max_new_tokens, self.max_context - len(ids))
        req = Request(handle, ids, params, int(seed), budget, self._stop_ids(params), logprobs,
                      StreamDecoder(self.tokenizer) if self.tokenizer else None)
        if self.kv.pages_for(Scheduler.kv_tokens(req)) > self.kv.pages:
            raise PromptError(f"the request needs {Scheduler.kv_tokens(req)} tokens of KV cache; the pool holds "
                              f"{self.kv.capacity_tokens} (raise gpu_memory or lower max_new_tokens)")
        return req

    def _post(self, *items) -> None:
        with self._cv:
            if self._closing:
                raise RuntimeError("the engine is closed")
            if self._thread is None:
                self._thread = _start_thread(_engine_thread, (weakref.ref(self), self._cv, self._inbox, self._waiting,
                                                              self._running, self.compiles), f"dsjax-engine-{self.name}")
            self._inbox.extend(items)
            self._cv.notify()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread (between steps) and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()
        call = _Call(fn)
        self._post(call)
        return call.future.result()

    def _seeds_for(self, n: int, params: SamplingParams, seed) -> list[int | None]:
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise ValueError(f"seed has {len(seed)} values for {n} prompts; give one per prompt, an int or None")
            return list(seed)
        return [seed] * n

    def stream(self, prompts, params: SamplingParams | None = None, *, chat: bool = False,
               **kwargs) -> Iterator[TokenEvent]:
        """Generate token by token; yields a TokenEvent per new token of each unfinished sequence (ev.seq: the
        prompt's index), in the order the engine produces them.

        `prompts`: a string, a list of token ids, a list of chat messages, or a list of any of these.
        Keyword arguments are SamplingParams fields (max_new_tokens, temperature, top_p, top_k, stop, seed; seed may
        be a list, one per prompt).
        """
        seed = kwargs.pop("seed", params.seed if params else 0)
        params = params or SamplingParams(**kwargs)
        ids, _ = self._normalize(prompts, chat)
        seeds = self._seeds_for(len(ids), params, seed)
        import queue
        sink: queue.SimpleQueue = queue.SimpleQueue()
        t0 = time.perf_counter()
        handles = self._submit_all([self._request(p, params, s, on_event=sink.put, seq=i)
                                    for i, (p, s) in enumerate(zip(ids, seeds))])
        open_ = len(handles)
        try:
            while open_:
                ev = sink.get()
                if ev.finished:
                    open_ -= 1
                    if ev.finish_reason == "error":
                        handles[ev.seq].result()             # raises the step's error
                        continue
                yield ev
            self._stats = self._batch_stats(handles, [h.result() for h in handles], t0)
        finally:
            for h in handles:
                h.cancel()

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] | str = (), seed: int | Sequence[int] | None = 0, *,
                 chat: bool = False, stop_token_ids: Sequence[int] = (), logprobs: int = 0
                 ) -> Generation | list[Generation]:
        """Generate continuations. A single prompt returns one Generation, a list of prompts a list (any length: the
        engine runs them as KV pages and max_batch_size allow, starting each as soon as there is room).

        `seed`: an int (every prompt), a list (one per prompt), or None (a fresh random seed per prompt; the
        Generation's `seed` says which). The same prompt, parameters and seed give the same tokens alone, in a batch
        or joining a running one.

        Example:
            >>> engine.generate(["Once upon a time", [1, 2, 3]], max_new_tokens=32, temperature=0.7, seed=1)
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=stop, stop_token_ids=tuple(stop_token_ids),
                                seed=seed if isinstance(seed, int) or seed is None else 0)
        ids, single = self._normalize(prompts, chat)
        seeds = self._seeds_for(len(ids), params, seed)
        t0 = time.perf_counter()
        handles = self._submit_all([self._request(p, params, s, logprobs=logprobs, seq=i)
                                    for i, (p, s) in enumerate(zip(ids, seeds))])
        out = [h.result() for h in handles]
        self._stats = self._batch_stats(handles, out, t0)
        return out[0] if single else out

    @staticmethod
    def _batch_stats(handles: list[RequestHandle], out: list[Generation], t0: float) -> dict[str, Any]:
        firsts = [h.first_token for h in handles if h.first_token is not None]
        lasts = [h.last_token for h in handles if h.last_token is not None]
        B = len(handles)
        gen = sum(len(g.token_ids) for g in out)
        stats = dict(batch=B, prompt_tokens=sum(len(g.prompt_ids) for g in out), generated_tokens=gen,
                     ttft_s=(max(firsts) - t0) if firsts else 0.0)
        stats["decode_s"] = (max(lasts) - min(firsts)) if firsts else 0.0
        stats["decode_tok_s"] = (gen - len(firsts)) / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
        return stats

    def logits(self, token_ids) -> np.ndarray:
        """Full forward of token ids [B, T] (or [T]) from position 0: float32 numpy logits [B, T, V]."""
        ids = np.asarray(token_ids)
        if ids.size == 0:
            raise PromptError("logits(): empty input: give at least one token")
        ids = ids.astype(np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        self._check_ids(ids.reshape(-1))
        B, T = ids.shape
        if T > self.config.max_position_embeddings:
            raise PromptError(f"{T} tokens exceed the model's context limit of {self.config.max_position_embeddings}")

        def run():
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
            g = Group(ids, positions, None, np.ones((B, T), bool), None, self.prefill_form)
            self._set_phase("prefill")
            return np.asarray(self._forward([g], self._new_caches(B, T))[0])
        return self._call(run)

    def warmup(self, max_prompt: int | None = None, max_new_tokens: int = 256,
               progress: Callable[[int, int], None] | None = None, *, bursts: int = 1,
               compile_threads: int | None = None, sampling: bool = True) -> dict[str, Any]:
        """Compile now what requests of up to `max_prompt` prompt tokens (default: the context, at most 512) and
        `max_new_tokens` output tokens will meet, so that no compile lands in their steps: on the engine thread a
        compile stalls every running request (run 6, V3 slice on an H200: 36-73 s to a server's first tokens).

        Runs steps of padding rows only (they write no cache and route to no expert) of every step shape such
        requests lead to: decode rows (each batch bucket x each page-table width of their reservations), decode rows
        beside prompt chunks (chunk rows x widths, and each batch bucket beside each chunk-row count), a prompt alone
        (each prompt bucket x width: a new one, or the rest of one whose first chunks ran beside decoding rows), then
        the sampler's programs for each row count: plain (greedy or temperature), with top-k / top-p filters, each with
        and without log-probabilities (`sampling=False`: plain only; the others then compile on a request's first
        use). `bursts` > 1 also covers up to that many new prompts prefilled
        together with nobody decoding (requests arriving at once at an idle engine, a list given to generate(): each
        count bucket up to `bursts` x prompt bucket; one prompt alone is always covered). Not covered: the rests of
        several prompts prefilled together after the running streams ended; those compile on first use. Safe while
        requests run (its steps go between theirs).

        `compile_threads` threads (0: none; default: on the CPU backend one per CPU but the engine thread's, at most
        8, and 0 on a GPU until measured there: compile_ahead.compile_threads) compile the attention programs of the
        later steps (the call sites a step notes, lowered for every later step's rows, tokens
        and page width; on the CPU backend 62% of the warm-up's compile time) and the sampler's programs while this
        engine's thread runs the steps and compiles the rest.
        Returns {"steps", "programs" (compiled or loaded from the persistent cache, on any thread), "seconds" (spent on
        them, summed over threads), "wall_s", "threads", and "engine_thread" / "compile_threads": their programs and
        seconds (and the seconds the engine thread waited for the compile threads)}.

        Example:
            >>> r = engine.warmup(max_prompt=512, max_new_tokens=128)     # before serving
            >>> r["programs"], r["seconds"]
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if max_prompt is not None and max_prompt < 1:
            raise ValueError(f"max_prompt={max_prompt} must be >= 1 (None: the context, at most 512)")
        if bursts < 1:
            raise ValueError(f"bursts={bursts} must be >= 1 (1: a prompt alone)")
        limit = self.max_context
        max_prompt = min(limit, 512 if max_prompt is None else max_prompt)
        threads = compile_threads_of(compile_threads)
        return self._call(lambda: self._warmup(max_prompt, max_new_tokens, progress, bursts, threads, sampling))

    def _warm_shapes(self, max_prompt: int, max_new_tokens: int,
                     bursts: int = 1) -> list[tuple[tuple, bool, frozenset[int]]]:
        """The step shapes of `warmup`: ((rows, tokens, page width) per group, decode first; whether _advance samples
        the first group's logits as they are; the row counts it gathers with _select_rows)."""
        page, sched = self.kv.page_tokens, self.scheduler
        pages = lambda n: -(-n // page)                                                    # noqa: E731
        upto = lambda n: [1 << k for k in range(pow2_bucket(n).bit_length())]             # noqa: E731
        tables = lambda n: sorted({self._width(w) for w in upto(n)})                       # noqa: E731
        widths = tables(pages(min(max_prompt + max_new_tokens - 1, self.max_context)))   # a reservation's table
        chunk_widths = tables(pages(max_prompt))                                           # a chunk's, to its end
        running = {}                                           # decode rows B -> the running counts padded to B
        for n in range(1, sched.max_running + 1):
            running.setdefault(self._batch_rows(n), []).append(n)
        batches = sorted(running)
        chunk_rows = upto(min(max(1, sched.step_tokens // sched.chunk_tokens), sched.max_running))
        C = sched.chunk_tokens
        shapes = []
        for B in batches:                                      # decode alone
            gathered = frozenset(pow2_bucket(n) for n in running[B] if pow2_bucket(n) != B)
            as_is = any(pow2_bucket(n) == B for n in running[B])
            shapes += [(((B, 1, W),), as_is, gathered) for W in widths]

        def mixed(B, Bc, W):                                   # decode rows + the prompts a chunk completes
            # (each group's attention is its own program: the decode rows' are the decode-alone shapes', so they
            # take the narrowest table here; the chunk's widths and the groups' rows together are what is new)
            return (((B, 1, widths[0]), (Bc, C, W)), False, frozenset(pow2_bucket(n + d) for n in running[B]
                                                                      for d in range(1, Bc + 1)))
        for Bc in chunk_rows:                                  # decode beside prompt chunks
            shapes += [mixed(batches[0], Bc, W) for W in chunk_widths]
            shapes += [mixed(B, Bc, chunk_widths[0]) for B in batches[1:]]
        T, prev = 16, 0                      # a prompt alone, whole (or its rest, after chunks): each bucket and width
        while True:
            ws = [W for W in chunk_widths if W >= self._width(pages(min(prev + 1, max_prompt)))]
            shapes += [(((1, T, W),), True, frozenset()) for W in ws]
            # several new prompts at once, nobody decoding (_groups: count padded to a power of two, whole prompts from
            # position 0, so the width follows the longest one's length, which lies in (prev, T]); _advance samples
            # all their rows as they are (every prompt completes)
            firsts = sorted({self._width(pages(min(n, max_prompt))) for n in range(prev + 1, T + 1)})
            for B in upto(min(bursts, sched.max_running))[1:]:      # 2, 4, ... (one prompt is the shapes above)
                shapes += [(((B, T, W),), True, frozenset()) for W in firsts]
            if T >= max_prompt:
                break
            prev, T = T, _prompt_bucket(T + 1)
        return shapes

    def _warmup(self, max_prompt: int, max_new_tokens: int, progress, bursts: int = 1,
                threads: int = 0, sampling: bool = True) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), dict(self.compiles)
        shapes = self._warm_shapes(max_prompt, max_new_tokens, bursts)
        page = self.kv.page_tokens
        variants = SAMPLER_VARIANTS if sampling else SAMPLER_VARIANTS[:1]
        prepared, sampled = set(), set()
        # The call sites a step notes (attention: the most programs and most of the compile time) are handed to
        # `threads` compile threads for every later step's groups, in step order, while this thread runs the steps
        # (and compiles the other programs); a step waits for its own when it gets there.
        forms = [[(B, T, W, "absorbed" if (T == 1 and k == 0) else self.prefill_form)
                  for k, (B, T, W) in enumerate(groups)] for groups, _, _ in shapes]
        pool = self._warm_pool = CompileAhead("dsjax-warmup-compile", threads) if threads else None
        handed: set = set()
        on_pool: list = []                 # the sampler's programs handed to the compile threads

        def sample(logits):                # the sampler's programs for these logits (no step needs their tokens)
            for v in variants:
                if pool is None:
                    choose(logits, [v[0]], [0], [0], [v[1]])
                else:
                    key = ("choose", logits.shape, str(logits.dtype), v)
                    if pool.submit(key, lower_variant(abstract(logits), v)):
                        on_pool.append(key)
        try:
            if pool is not None:                                   # sites noted before (an engine that ran)
                handed = self._hand_sites(pool, forms, handed)
            for n, (groups, as_is, gathered) in enumerate(shapes):
                if groups[0][1] == 1 and len(groups) == 1 and groups[0][0] not in prepared:
                    self._prepare_decode(groups[0][0])             # as _step does before a decode-only step
                    prepared.add(groups[0][0])
                self._set_phase("warmup")
                gs = []
                for k, (B, T, W) in enumerate(groups):            # padding rows: pages past the pool, nothing valid
                    gs.append(Group(np.zeros((B, T), np.int32), np.full((B, T), W * page, np.int32),
                                    np.full((B, W), self.kv.pages, np.int32), np.zeros((B, T), bool),
                                    np.zeros(B, np.int32), forms[n][k][3]))
                for logits in self._warm_forward(gs):
                    lgs = tuple(logits)                            # the sampler's programs, as _advance calls them
                    key = tuple(x.shape for x in lgs)
                    if as_is and (key, 0) not in sampled:
                        sampled.add((key, 0))
                        sample(lgs[0])
                    for M in sorted(gathered):
                        if (key, M) not in sampled:
                            sampled.add((key, M))
                            sample(_select_rows(lgs, np.zeros(M, np.int32)))
                if pool is not None:
                    handed = self._hand_sites(pool, forms[n + 1:], handed)
                if progress is not None:
                    progress(n + 1, len(shapes))
            for key in on_pool:                                    # closing the pool would drop what is queued
                pool.wait_for(key)
        finally:
            self._warm_pool = None
            if pool is not None:
                pool.close()
        done = pool.stats() if pool is not None else {"compiled": 0, "seconds": 0.0, "waited_s": 0.0}
        return {"steps": len(shapes), "programs": self.compiles["programs"] - c0["programs"] + done["compiled"],
                "seconds": self.compiles["seconds"] - c0["seconds"] + done["seconds"],
                "wall_s": time.perf_counter() - t0, "threads": threads,
                "engine_thread": {"programs": self.compiles["programs"] - c0["programs"],
                                  "seconds": self.compiles["seconds"] - c0["seconds"]},
                "compile_threads": {"programs": done["compiled"], "seconds": done["seconds"],
                                    "waited_s": done["waited_s"]}}

    def _hand_sites(self, pool: CompileAhead, later: list[list[tuple]], handed: set) -> set:
        """Hand the call sites noted since `handed` to the warm-up's compile threads for every group (B, T, W, form)
        of the `later` steps, in their order; returns the sites handed so far."""
        new = [site for site in self._sites if site not in handed]
        for groups in later:
            for B, T, W, form in groups:
                for site in new:
                    if site[2] == form:                        # (what, kind, form, ...)
                        pool.submit(site + (B, T, W), self._lower_site(site, B, T, W))
        return handed | set(new)

    def _warm_forward(self, groups: list[Group]) -> list[list[jax.Array]]:
        """The forward(s) of a warm-up step: each path a step of these shapes may take (here: the one)."""
        return [self._forward(groups, self.kv.caches)]

    def requests_status(self) -> dict[str, Any]:
        """Running and waiting requests, finished ones by reason, and the KV pool's use (any thread, no wait)."""
        return {"running": self._status["running"], "waiting": self._status["waiting"],
                "finished": dict(self.counters["finished"]),
                "kv": {"pages": self.kv.pages, "pages_used": self.kv.pages - self.kv.free_pages,
                       "page_tokens": self.kv.page_tokens, "max_context": self.max_context}}

    def stats(self) -> dict[str, Any]:
        """Counters and timings of the last generate() (prompt/generated tokens, TTFT, decode tok/s), plus the
        request engine's (requests, steps, KV pool)."""
        return self._call(lambda: {**self._stats, "routing": routing_report(self.config),
                                   "requests": self.requests_status(), "steps": self._step_counters(),
                                   "expert_activations": self._activations()})

    def save_popularity(self, path) -> dict[str, Any]:
        """Write the expert activations counted since load (stats()["expert_activations"], [n_layers][E]) to `path`
        as JSON, with the model's name and its store's source fingerprint: the measured popularity that
        memory_config.hot_experts chooses its GPU-resident experts by, and that devices= balances its split by.

        Example:
            >>> engine.generate(representative_prompts, max_new_tokens=64)
            >>> engine.save_popularity("pop.json")
            >>> hot = dsjax.load(store, gpu_memory="16GB", hot_experts=64, popularity="pop.json")
        """
        from dsjax.runtime.popularity import write_popularity
        store = getattr(self, "store", None)
        fingerprint = store.manifest.source.get("fingerprint") if store is not None else None
        return write_popularity(path, self.stats()["expert_activations"], model=self.name, fingerprint=fingerprint)

    def _step_counters(self) -> dict[str, Any]:
        c = self.counters
        return {"steps": c["steps"], "decode_rows": c["decode_rows"], "prefill_tokens": c["prefill_tokens"],
                "step_seconds": c["step_seconds"], "last_batch": c["last_batch"], "max_running": c["max_running"],
                "decode_batches": sorted(self.decode_batches), "compiles": dict(self.compiles),
                **({"compile_ahead": self.compile_ahead.stats()} if self.compile_ahead is not None else {})}

    def stats_prometheus(self) -> str:
        from dsjax.runtime.metrics import prometheus_text
        return prometheus_text(self.stats())

    def stats_json_line(self) -> str:
        from dsjax.runtime.metrics import json_line
        return json_line(self.stats())

    def close(self) -> None:
        """Finish the engine thread (requests still queued are cancelled) and release what the engine holds beyond
        its arrays (the tiered engine stops its readers)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join()
        if self.compile_ahead is not None:
            self.compile_ahead.close()

    # ---- the engine thread ---------------------------------------------------------------------------------------
    def _turn(self) -> bool:
        """One turn of the engine thread: take what callers posted, then one step if any request is in. False once
        the engine is closed."""
        with self._cv:
            inbox = list(self._inbox)
            self._inbox.clear()
            closing = self._closing
        for item in inbox:
            if isinstance(item, _Call):
                try:
                    item.future.set_result(item.fn())
                except BaseException as e:          # the caller gets the error; the engine goes on
                    item.future.set_exception(e)
            else:
                self._waiting.append(item)
                self.counters["submitted"] += 1
        if closing:
            for r in list(self._waiting) + self._running:
                self._finish(r, "cancelled")
            self._waiting.clear()
            self._running.clear()
            self._publish()
            return False
        self._drop_cancelled()
        if self._waiting or self._running:
            self._step()
        self._publish()
        return True

    def _publish(self) -> None:
        self._status = {"running": len(self._running), "waiting": len(self._waiting)}

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.handle.cancelled]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._running if r.handle.cancelled]:
            self._retire(r, "cancelled")

    def _finish(self, r: Request, reason: str, text: str = "") -> None:
        self.counters["finished"][reason] += 1
        r.handle._emit(TokenEvent(r.handle.seq, -1, text, True, reason))

    def _retire(self, r: Request, reason: str | None = None) -> None:
        """Take a running request out and return its pages (with a final event when it did not end on a token)."""
        self._running.remove(r)
        if r.pages is not None:
            self.kv.free(r.pages)
            r.pages = None
        if reason is not None:
            self._finish(r, reason)

    def _batch_rows(self, n: int) -> int:
        b = self.batch
        size = min(max(pow2_bucket(n), b["min"]), b["max"]) if b["dynamic"] else b["max"]
        return max(size, n, b["min"])

    def _width(self, pages: int) -> int:
        """The page-table width of a group whose widest row needs `pages` pages: a power of two, >= min_width."""
        return max(pow2_bucket(pages), self.min_width)

    def _groups(self, plan: StepPlan) -> list[Group]:
        page = self.kv.page_tokens
        groups = []
        if plan.decode:
            reqs = plan.decode
            B = self._batch_rows(len(reqs))
            self.decode_batches.add(B)
            W = self._width(max(len(r.pages) for r in reqs))
            tokens = np.zeros((B, 1), np.int32)
            positions = np.full((B, 1), W * page, np.int32)
            pages = np.full((B, W), self.kv.pages, np.int32)
            valid = np.zeros((B, 1), bool)
            for b, r in enumerate(reqs):
                tokens[b, 0], positions[b, 0], valid[b, 0] = r.last_token, r.pos, True
                pages[b, :len(r.pages)] = r.pages
            groups.append(Group(tokens, positions, pages, valid, np.zeros(B, np.int32), "absorbed"))
        if plan.prefill:
            chunks = plan.prefill
            B = pow2_bucket(len(chunks))
            # beside decoding rows a chunk is always chunk_tokens long (one shape); alone, prompts go whole, bucketed
            T = self.scheduler.chunk_tokens if plan.decode else _prompt_bucket(max(c.length for c in chunks))
            # a chunk reads and writes positions before its end only: the pages through its end, not the request's
            # whole reservation (the width then follows the prompt, not max_tokens: fewer shapes to compile)
            need = [-(-(c.start + c.length) // page) for c in chunks]
            W = self._width(max(need))
            tokens = np.zeros((B, T), np.int32)
            positions = np.full((B, T), W * page, np.int32)
            pages = np.full((B, W), self.kv.pages, np.int32)
            valid = np.zeros((B, T), bool)
            last = np.zeros(B, np.int32)
            for b, c in enumerate(chunks):
                r = c.request
                tokens[b, :c.length] = r.prompt[c.start:c.start + c.length]
                positions[b, :c.length] = np.arange(c.start, c.start + c.length)
                valid[b, :c.length] = True
                pages[b, :need[b]] = r.pages[:need[b]]
                last[b] = c.length - 1
            groups.append(Group(tokens, positions, pages, valid, last, self.prefill_form))
        return groups

    def _after_step(self) -> None:
        """Once a step's tokens are known (its sampling read them back, so its device work has finished): subclasses
        time the whole step here (the tiered runtime's copy-ahead trial and link gate)."""

    def _step(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        plan = self.scheduler.next_step(self._running, self._waiting, self.kv)
        self._running.extend(plan.admitted)
        if plan.admitted:
            self._compile_decode_ahead()
        self.counters["max_running"] = max(self.counters["max_running"], len(self._running))
        if plan.empty:          # nothing fits (cannot happen: submit refuses requests larger than the pool)
            return
        try:
            if plan.decode and not plan.prefill:
                c1 = time.thread_time()
                self._prepare_decode(self._batch_rows(len(plan.decode)))
                if (m := getattr(self, "metrics", None)) is not None:
                    # the warmup counts in the phase it set (prefill: the generation's start), not in this step
                    warm = time.thread_time() - c1
                    m.host_cpu_seconds[m.phase]["step"] += warm
                    c0 += warm
            self._set_phase("prefill" if plan.prefill else "decode")
            groups = self._groups(plan)
            logits = self._forward(groups, self.kv.caches)
            self._advance(plan, logits)
            self._after_step()
            if (m := getattr(self, "metrics", None)) is not None:    # the engine thread's CPU time for the whole
                m.host_cpu_seconds[m.phase]["step"] += time.thread_time() - c0      # step: host work, waits excluded
        except Exception as e:           # fail the step's requests only; the engine keeps serving the others
            self._recover()
            involved = plan.requests
            broken = self.kv.broken()    # a failed call consumed the pool: every running request lost its cache
            if broken:
                involved = list(self._running)
            for r in involved:
                if r in self._running:
                    self._retire(r)
                self.counters["finished"]["error"] += 1
                r.handle._fail(e)
            if broken:
                self.kv.reset()
            return
        c = self.counters
        c["steps"] += 1
        c["decode_rows"] += len(plan.decode)
        c["prefill_tokens"] += sum(ch.length for ch in plan.prefill)
        c["step_seconds"] += time.perf_counter() - t0
        c["last_batch"] = len(plan.decode) + len(plan.prefill)

    def _advance(self, plan: StepPlan, logits: list[jax.Array]) -> None:
        """Move every request of the step forward; sample a token for those that complete one."""
        rows, picks, lgs, k = [], [], [], 0
        if plan.decode:
            rows += plan.decode
            picks.append(np.arange(len(plan.decode), dtype=np.int32))
            lgs.append(logits[k])
            for r in plan.decode:
                r.pos += 1
            k += 1
        if plan.prefill:
            done = [b for b, c in enumerate(plan.prefill) if c.completes_prompt]
            if done:
                rows += [plan.prefill[b].request for b in done]
                picks.append(np.asarray(done, np.int32))
                lgs.append(logits[k])
            for c in plan.prefill:
                c.request.pos = c.start + c.length
        if not rows:
            return
        N = pow2_bucket(len(rows))
        if len(lgs) == 1 and lgs[0].shape[0] == N and len(picks[0]) == len(rows) and picks[0][-1] == len(rows) - 1:
            lg = lgs[0]                       # the decode group as it is: its padding rows are the sampler's
        else:
            offsets = np.cumsum([0] + [x.shape[0] for x in lgs[:-1]])
            idx = np.zeros(N, np.int32)
            idx[:len(rows)] = np.concatenate([o + p for o, p in zip(offsets, picks)])
            lg = _select_rows(tuple(lgs), idx)
        ch = choose(lg, [r.params for r in rows], [r.seed for r in rows], [len(r.generated) for r in rows],
                    [r.logprobs for r in rows])
        for n, r in enumerate(rows):
            lp = top = None
            if r.logprobs:
                lp = float(ch.logprob[n])
                top = tuple((int(t), float(v))
                            for t, v in zip(ch.top_ids[n, :r.logprobs], ch.top_logprobs[n, :r.logprobs]))
            self._emit_token(r, int(ch.tokens[n]), lp, top)

    def _emit_token(self, r: Request, tok: int, logprob: float | None, top) -> None:
        r.generated.append(tok)
        reason = None
        if tok in r.stop_ids:
            reason = "stop"
        elif len(r.generated) >= r.budget:
            reason = "length"
        text = ""
        if r.decoder is not None:
            r.decoder.push(tok)
            if reason is not None:
                r.decoder.flush()
            full = r.decoder.text
            cut = None
            for s in r.params.stop:
                j = full.find(s, max(0, r.emitted - len(s) + 1))
                if j >= 0 and (cut is None or j < cut):
                    cut = j
            if cut is not None:
                reason, end = "stop", max(cut, r.emitted)
            elif reason is not None:
                end = len(full)
            else:                      # hold back a tail that may be the start of a stop string
                hold = max((n for s in r.params.stop for n in range(1, len(s)) if full.endswith(s[:n])), default=0)
                end = max(len(full) - hold, r.emitted)
            text = full[r.emitted:end]
            r.emitted = end
        if reason is not None:
            self.counters["finished"][reason] += 1
            self._running.remove(r)
            self.kv.free(r.pages)
            r.pages = None
        r.handle._emit(TokenEvent(r.handle.seq, tok, text, reason is not None, reason, logprob, top))

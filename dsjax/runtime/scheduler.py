"""Scheduler: which requests a step advances, and how (the seed's ComputeScheduler at the level of requests).

Pure bookkeeping over plain Request objects and the KV pool's page count, testable on the CPU: it admits waiting
requests in arrival order while the running set has room (max_batch_size) and the KV pool has every page the
request may need, then plans one step: every running request past its prompt decodes one token, and requests still
in their prompt prefill chunks of `chunk_tokens` (min(step_tokens, 256)) from a budget of `step_tokens` prompt tokens
per step, first come first served, so a joining prompt never stalls the running streams for its whole length, and a
burst of arrivals is prefilled several at a time (V3 slice on an H100, 32 Poisson arrivals: with one chunk of one
request per step the median time to first token was 20 s, every arrival waiting its turn). With no request decoding
there is nobody to stall: whole prompts go at once (as many tokens in one step as there are: in a step bound by the
experts' bytes, the more tokens the cheaper each; one shape per count and length, which Engine.warmup compiles for
one prompt alone, not for several). Fixed-length chunks keep the shapes a mixed step compiles to a handful (decode rows
x chunk rows, both powers of two) however requests arrive.
"""

from __future__ import annotations

import collections
import dataclasses

from dsjax.runtime.requests import Request

# Prompt tokens a step prefills beside the decoding rows (16 chunks of 256). V3 slice on an H100, `dsjax serve` with 32
# streams arriving at once (bench/RESULTS.md, runs 10 and 11): with 1,024 (4 chunks a step) the other 31 prompts took
# ~8 steps of ~0.5-0.9 s to start, TTFT p50 4.2 s and 0.86x the static batch's tok/s; with 4,096 two steps, TTFT p50
# 1.7 s and 0.92x. In a step bound by the experts' bytes the extra prompt rows ride on bytes that move anyway; the cost
# is compute in a compute-bound step (the running streams wait for it) and more step shapes for a warm-up (chunk rows
# 1..16: 73 shapes instead of 59 for prompts up to 512 and max_batch_size 32). Activations: a mixed step's attention
# scores are [rows, heads, 256, width], at most what one 4,096-token prompt prefilled alone holds, and the naive
# form's per-head keys [rows, width, heads, 256] grow with the rows (16 rows of V3 at a 4,096 width: 8.6 GB); attention
# keeps both under 1 GiB a call (query blocks; the absorbed form past it: attention.SCORE_BLOCK_BYTES), which the
# plan's pools do not count.
# vLLM's chunked prefill budgets 2,048-8,192 tokens a step.
DEFAULT_STEP_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Prompt positions [start, start + length) of `request`, prefilled this step."""

    request: Request
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == len(self.request.prompt)


@dataclasses.dataclass
class StepPlan:
    admitted: list[Request]             # moved from waiting to running this step (pages given)
    decode: list[Request]               # one token each
    prefill: list[Chunk]                # one prompt chunk each

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def requests(self) -> list[Request]:
        return self.decode + [c.request for c in self.prefill]


class Scheduler:
    """Example:
        >>> sched = Scheduler(max_running=32, step_tokens=256)
        >>> plan = sched.next_step(running, waiting, kv_pool)
    """

    def __init__(self, max_running: int, step_tokens: int):
        if max_running < 1 or step_tokens < 1:
            raise ValueError(f"max_running={max_running} and step_tokens={step_tokens} must be >= 1")
        self.max_running = max_running
        self.step_tokens = step_tokens
        self.chunk_tokens = min(step_tokens, 256)      # a mixed step's prompt rows are this long (one shape)

    @staticmethod
    def kv_tokens(req: Request) -> int:
        """Positions a request can ever write: its prompt and every generated token but the last."""
        return len(req.prompt) + req.budget - 1

    def next_step(self, running: list[Request], waiting: collections.deque, kv) -> StepPlan:
        """Admit from `waiting` (removing them; `running` is not modified) and plan the step."""
        admitted: list[Request] = []
        while waiting and len(running) + len(admitted) < self.max_running:
            pages = kv.alloc(self.kv_tokens(waiting[0]))
            if pages is None:                 # first come, first served: the head waits for pages, and so do the rest
                break
            req = waiting.popleft()
            req.pages = pages
            admitted.append(req)
        active = list(running) + admitted
        decode = [r for r in active if not r.prefilling]
        prefilling = [r for r in active if r.prefilling]
        if decode:
            rows = max(1, self.step_tokens // self.chunk_tokens)
            prefill = [Chunk(r, r.pos, min(len(r.prompt) - r.pos, self.chunk_tokens)) for r in prefilling[:rows]]
        else:
            prefill = [Chunk(r, r.pos, len(r.prompt) - r.pos) for r in prefilling]
        return StepPlan(admitted, decode, prefill)

"""Several processes (hosts) running one expert-parallel engine (issue 22): joining the run, and the step loop that
every process runs in lockstep.

Owns: `initialize` (jax.distributed from flags or the environment), `MultiHostEngine` (the expert-parallel engine of
parallel.py whose engine thread broadcasts each turn's changes from process 0) and `Roles`.
Does not own: the model, the placement (parallel.py: the same on every process, each process placing its own
devices' blocks), transport (JAX's coordination service carries the turn messages, the backend's collectives the
psums: gloo on CPU, NCCL on GPU).

The protocol: requests enter on process 0 only (generate, stream, submit, `dsjax serve`). At each turn in which
process 0 does something (admits requests, cancels some, steps, or closes) it first writes one message to the
coordination service's key-value store under `dsjax/<engine>/turn/<n>`: the requests that joined (token ids,
sampling parameters, resolved seed), the ids cancelled, and whether it is closing. Every other process runs
`engine.follow()`: it reads message n, applies it to its own copy of the scheduler's queues, and runs the same step.
Scheduling, sampling (seeded per request and position) and stop decisions are deterministic functions of that state
and of the logits (replicated by the psum), so every process launches the same programs in the same order, as SPMD
needs; the tokens are process 0's. A follower learns nothing else from process 0: its results are discarded.

Costs: one key-value write (process 0) and one blocking read (every other process) per step, over the coordination
service's gRPC connection, beside the step's collectives. `engine.logits()` is not built over several processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
from typing import Any

import jax

from dsjax.runtime.engine import _Call
from dsjax.runtime.parallel import ExpertParallelEngine
from dsjax.runtime.requests import Request
from dsjax.runtime.sampling import SamplingParams

__all__ = ["ENV", "MultiHostEngine", "initialize"]

# the environment `initialize` reads for what is not given; JAX itself reads JAX_COORDINATOR_ADDRESS
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
POLL_MS = 1000                   # a follower's blocking read wakes this often to run local calls or see close()
_engine_ids = itertools.count()  # engines built in this process, in order: the same numbers on every process


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               timeout_s: int = 300) -> bool:
    """Join a run of several processes (one per host, or several on one machine) with jax.distributed, before
    anything else uses JAX. Arguments not given are read from JAX_COORDINATOR_ADDRESS (host:port of process 0's
    coordinator), JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns False (nothing done) for one process.

    Every process then sees every process's devices in jax.devices(); `dsjax.load(path, devices=jax.device_count())`
    on each builds one engine over all of them (process 0 takes requests, the others call engine.follow()). On the
    CPU the processes' collectives use gloo.

    Example:
        >>> initialize("10.0.0.1:9876", 2, int(os.environ["RANK"]))      # on each of two hosts
        >>> engine = dsjax.load("v3-nvfp4-store", devices=jax.device_count())
    """
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV["num_processes"])
    process_id = process_id if process_id is not None else _env_int(ENV["process_id"])
    if num_processes is None or num_processes == 1:
        if coordinator is not None or process_id not in (None, 0):
            raise ValueError("several processes need --num-processes N (or JAX_NUM_PROCESSES) with N >= 2 beside the "
                             "coordinator address and the process id")
        return False
    missing = [f"--{k.replace('_', '-')} ({ENV[k]})" for k, v in (("coordinator", coordinator),
                                                                  ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(f"a run of {num_processes} processes needs {' and '.join(missing)}: the coordinator is "
                         "host:port of process 0 (any free port, the same on every process), the process id 0.."
                         f"{num_processes - 1} (0 takes the requests)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} must lie in [0, {num_processes}) for {num_processes} processes")
    if ":" not in coordinator:
        raise ValueError(f"coordinator {coordinator!r}: give host:port of process 0, e.g. 10.0.0.1:9876")
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise ValueError(f"jax.distributed is already initialized as process {jax.process_index()} of "
                             f"{jax.process_count()}, not {process_id} of {num_processes}")
        return True
    # gloo carries the CPU backend's cross-process collectives (jax's default in this version; set so it stays so)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)
    except RuntimeError as e:
        if "before" in str(e) or "already" in str(e):
            raise ValueError(f"jax.distributed.initialize must run before anything uses JAX ({e}); call "
                             "dsjax.runtime.multihost.initialize first") from None
        raise
    return True


def _wire(r: Request) -> dict[str, Any]:
    p = dataclasses.asdict(r.params)
    p["stop"], p["stop_token_ids"] = list(r.params.stop), list(r.params.stop_token_ids)
    return {"id": r.handle.request_id, "prompt": list(r.prompt), "params": p, "seed": r.seed,
            "logprobs": r.logprobs}


class MultiHostEngine(ExpertParallelEngine):
    """The expert-parallel engine over the devices of several processes (`load_parallel` builds it when
    jax.process_count() > 1). On process 0 it is used as any engine; every other process calls `follow()`, which
    runs the same steps until process 0 closes its engine.

    Example (two processes, each `dsjax.runtime.multihost.initialize(...)` first):
        >>> engine = dsjax.load(store, devices=jax.device_count())
        >>> if jax.process_index() == 0: print(engine.generate("Hello", max_new_tokens=8).text); engine.close()
        >>> else: engine.follow()
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.leader = jax.process_index() == 0
        self._key = f"dsjax/engine{next(_engine_ids)}/turn"
        self._turns = 0
        self._closed_sent = False
        from jax._src.distributed import global_state
        self._kv = global_state.client

    # ---- the caller's API: process 0 only ----------------------------------------------------------------------
    def _not_leader(self, what: str) -> None:
        if not self.leader:
            raise RuntimeError(f"{what} on process {jax.process_index()}: requests enter on process 0 of the run; "
                               "call engine.follow() on the other processes")

    def submit(self, *args, **kwargs):
        self._not_leader("submit()")
        return super().submit(*args, **kwargs)

    def _submit_all(self, reqs):
        self._not_leader("generate()/stream()")
        return super()._submit_all(reqs)

    def logits(self, token_ids):
        raise NotImplementedError("engine.logits() over several processes is not built (each forward would need its "
                                  "own broadcast); use generate(), or load on the devices of one process")

    def warmup(self, *args, **kwargs):
        raise NotImplementedError("engine.warmup() over several processes is not built (its steps would need their "
                                  "own broadcast); the programs compile on first use")

    def close(self) -> None:
        """Process 0: finish the engine and tell the followers to return from follow(). Elsewhere: stop following
        (process 0's next step then waits for this process in its collectives: close process 0 first)."""
        if self.leader and self._thread is None and not self._closed_sent:
            self._send({"new": [], "cancel": [], "close": True})     # no engine thread ever ran: tell them here
        super().close()

    # ---- messages ------------------------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        self._kv.key_value_set(f"{self._key}/{self._turns}", json.dumps(msg))
        self._turns += 1
        self._closed_sent |= bool(msg["close"])

    def _receive(self) -> dict | None:
        """The next turn's message (blocks; None once this follower is closed)."""
        key = f"{self._key}/{self._turns}"
        while True:
            self._run_local_calls()
            if self._closing:
                return None
            try:
                raw = self._kv.blocking_key_value_get(key, POLL_MS)
            except Exception as e:               # jax's XlaRuntimeError: DEADLINE_EXCEEDED on a quiet turn
                if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                    continue
                raise RuntimeError(f"process {jax.process_index()} lost process 0's turn {self._turns} ({e}); did "
                                   "process 0 exit without closing its engine?") from e
            self._turns += 1
            return json.loads(raw)

    def _run_local_calls(self) -> None:
        """Calls other threads of a follower posted (stats()); a follower's steps come from process 0."""
        with self._cv:
            calls = [c for c in self._inbox if isinstance(c, _Call)]
            self._inbox.clear()
        for c in calls:
            try:
                c.future.set_result(c.fn())
            except BaseException as e:      # the caller gets the error (as Engine._turn)
                c.future.set_exception(e)

    # ---- the turn (both roles) -----------------------------------------------------------------------------------
    def _turn(self) -> bool:
        """Process 0's engine thread: take what callers posted, tell the followers, then the turn as on one
        process."""
        with self._cv:
            inbox = list(self._inbox)
            self._inbox.clear()
            closing = self._closing
        new = []
        for item in inbox:
            if isinstance(item, _Call):
                try:
                    item.future.set_result(item.fn())
                except BaseException as e:      # the caller gets the error (as Engine._turn)
                    item.future.set_exception(e)
            else:
                new.append(item)
        self._admit(new)
        cancel = [r.handle.request_id for r in [*self._waiting, *self._running] if r.handle.cancelled]
        if new or cancel or closing or self._waiting or self._running:
            self._send({"new": [_wire(r) for r in new], "cancel": cancel, "close": closing})
        return self._apply(cancel, closing, self._turns - 1)

    def follow(self) -> None:
        """On a process other than 0: run process 0's steps until it closes its engine (or this one is closed from
        another thread). Blocks the calling thread, which becomes this engine's thread."""
        if self.leader:
            raise RuntimeError("follow() runs on processes other than 0; process 0 takes the requests")
        self._thread = threading.current_thread()
        while (msg := self._receive()) is not None:
            self._admit([self._request(w["prompt"], SamplingParams(**w["params"]), w["seed"],
                                       logprobs=w["logprobs"], request_id=w["id"]) for w in msg["new"]])
            if not self._apply(msg["cancel"], msg["close"], None):
                return

    def _admit(self, reqs: list[Request]) -> None:
        self._waiting.extend(reqs)
        self.counters["submitted"] += len(reqs)

    def _apply(self, cancel: list[str], closing: bool, sent: int | None) -> bool:
        """The rest of a turn, the same on every process: close, or drop the cancelled and step."""
        if closing:
            for r in list(self._waiting) + self._running:
                self._finish(r, "cancelled")
            self._waiting.clear()
            self._running.clear()
            self._publish()
            return False
        ids = set(cancel)
        for r in [r for r in self._waiting if r.handle.request_id in ids]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._running if r.handle.request_id in ids]:
            self._retire(r, "cancelled")
        if self._waiting or self._running:
            steps = self.counters["steps"]
            self._step()
            if sent is not None and self.counters["steps"] > steps:
                # the step's psums needed every process, each of which had read this turn's message: drop it
                self._kv.key_value_delete(f"{self._key}/{sent}")
        self._publish()
        return True

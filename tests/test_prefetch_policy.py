"""The PrefetchPolicy alone, on plain arrays: which experts it copies and reads ahead, in what order, within which
room, and how a step's observations move its threshold, look-ahead and copies ahead (no engine, no arrays moved)."""

import numpy as np
import pytest

from dsjax.runtime.prefetch import DISK, GPU, HOST, READING, PrefetchPolicy, StepSample


def _where(*tiers):
    return np.asarray(tiers, np.int8)


def test_plan_copies_the_likeliest_host_experts_of_the_next_layer_and_reads_disk_experts_within_the_room():
    pol = PrefetchPolicy(threshold=0.5, prefetch_layers=2, disk_prefetch_layers=2, adaptive=False)
    pred = np.array([[0.9, 0.6, 0.4, 1.0, 0.7, 0.55],          # next MoE layer (7)
                     [0.8, 0.0, 0.9, 0.6, 0.0, 0.95]])         # the one after (9)
    where = {7: _where(HOST, DISK, HOST, GPU, HOST, READING), 9: _where(DISK, HOST, DISK, DISK, DISK, GPU)}
    plan = pol.plan(pred, [7, 9], where, copy_room=2, read_room=3)
    assert plan.predicted == {7: frozenset({0, 1, 3, 4, 5})}               # >= 0.5 (2 is below), depth 0 only
    assert plan.copies == {7: (0, 4)}                                       # host experts, likeliest first, room 2
    # disk experts only (never the GPU one, nor one already being read), likeliest first, one room for both layers
    assert plan.reads == {7: (1,), 9: (2, 0)}
    nothing = pol.plan(pred, [7, 9], where, copy_room=0, read_room=0)
    assert nothing.copies == {} and nothing.reads == {} and nothing.predicted == plan.predicted


def test_reads_go_only_disk_prefetch_layers_ahead_and_ties_break_by_expert_id():
    pred = np.array([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    where = {1: _where(DISK, DISK, DISK, DISK), 2: _where(DISK, DISK, DISK, DISK)}
    one = PrefetchPolicy(0.4, 2, 1, adaptive=False).plan(pred, [1, 2], where, copy_room=4, read_room=10)
    two = PrefetchPolicy(0.4, 2, 2, adaptive=False).plan(pred, [1, 2], where, copy_room=4, read_room=10)
    assert one.reads == {1: (0, 1, 2, 3)}
    assert two.reads == {1: (0, 1, 2, 3), 2: (0, 1, 2, 3)}
    assert PrefetchPolicy(0.4, 2, 0, adaptive=False).plan(pred, [1, 2], where, copy_room=4, read_room=10).reads == {}


def test_threshold_one_predicts_only_full_shares_and_zero_predicts_every_routed_expert():
    pred = np.array([[0.0, 0.3, 1.0, 0.99]])
    where = {3: _where(HOST, HOST, HOST, HOST)}
    assert PrefetchPolicy(1.0, 1, 1).plan(pred, [3], where, copy_room=9, read_room=9).copies == {3: (2,)}
    assert PrefetchPolicy(0.0, 1, 1).plan(pred, [3], where, copy_room=9, read_room=9).copies == {3: (2, 3, 1)}


def test_a_full_link_stops_copies_ahead_until_it_drops_below_three_quarters():
    pol = PrefetchPolicy(0.4, 2, 1)
    pred, where = np.array([[1.0, 1.0]]), {5: _where(HOST, DISK)}
    pol.end_step(tp=0, fp=0, fn=0, disk_waited=False, link_busy=0.95)
    assert not pol.copies_ahead and pol.steps_without_copies_ahead == pol.steps_link_full == 1
    plan = pol.plan(pred, [5], where, copy_room=4, read_room=4)
    assert plan.copies == {} and plan.reads == {5: (1,)}                 # disk reads are not gated by the link
    pol.end_step(tp=0, fp=0, fn=0, disk_waited=False, link_busy=0.8)     # hysteresis: still off
    assert not pol.copies_ahead
    pol.end_step(tp=0, fp=0, fn=0, disk_waited=False, link_busy=0.5)
    assert pol.copies_ahead and pol.steps_without_copies_ahead == 2


def test_end_step_moves_threshold_and_lookahead_from_what_the_step_saw():
    pol = PrefetchPolicy(0.4, 2, 1)
    pol.end_step(tp=5, fp=1, fn=10, disk_waited=False, link_busy=0.0)   # recall 1/3: predict more
    assert pol.threshold == pytest.approx(0.36)
    pol.end_step(tp=5, fp=20, fn=1, disk_waited=False, link_busy=0.0)   # precision 0.2: predict less, look closer
    assert pol.threshold == pytest.approx(0.396) and pol.depth == 1 and pol.disk_depth == 1
    for _ in range(5):                                                   # disk waits: look further, up to 2 + 2
        pol.end_step(tp=9, fp=1, fn=1, disk_waited=True, link_busy=0.0)
    assert pol.depth == pol.max_depth == 4 and pol.disk_depth == 4
    frozen = PrefetchPolicy(0.4, 2, 1, adaptive=False)
    frozen.end_step(tp=0, fp=9, fn=9, disk_waited=True, link_busy=1.0)
    assert (frozen.threshold, frozen.depth, frozen.disk_depth, frozen.copies_ahead) == (0.4, 2, 1, True)
    assert PrefetchPolicy(0.4, 0, 0).max_depth == 0                     # prefetch_layers 0: never ahead


def test_chunks_split_a_layers_experts_by_the_slots():
    used = list(range(10))
    assert PrefetchPolicy.chunks(used, 16, True) == [used]
    assert PrefetchPolicy.chunks(used, 8, True) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert PrefetchPolicy.chunks(used, 8, False) == [list(range(8)), [8, 9]]


# ---- the CPU path (issue 24): which host-resident misses the CPU computes while the link copies the others ----------

def test_split_cpu_balances_the_two_paths_so_they_finish_together():
    from dsjax.runtime.prefetch import split_cpu
    mb = 25 << 20
    # equal rates: half each; CPU at 18.6 and link at 46.7 GB/s (issue 24): 2 of 8 (k ~ 8 * 18.6 / 65.3 = 2.3)
    assert split_cpu(list(range(8)), 1, 10e9, 10e9, mb) == ([0, 1, 2, 3], [4, 5, 6, 7])
    cpu, copy = split_cpu(list(range(8)), 1, 18.6e9, 46.7e9, mb)
    assert cpu == [0, 1] and copy == [2, 3, 4, 5, 6, 7]
    # k minimises max(k / cpu, (n - k) / link): a faster CPU takes more, a fast link fewer; all when the link is 0
    assert len(split_cpu(list(range(8)), 1, 90e9, 46.7e9, mb)[0]) == 5
    assert split_cpu([4, 7], 1, 1e9, 46.7e9, mb) == ([], [4, 7])        # the copies alone finish first
    assert split_cpu([4, 7], 1, 1e9, 0.0, mb) == ([4, 7], [])
    # experts the link moves anyway (read from disk) push more of the host-resident ones to the CPU
    assert len(split_cpu([1, 2, 3, 4], 1, 18.6e9, 46.7e9, mb, copied_anyway=6)[0]) == 3


def test_split_cpu_takes_the_experts_with_the_fewest_rows_first_and_none_past_max_rows_or_without_a_rate():
    from dsjax.runtime.prefetch import split_cpu
    mb = 1 << 20
    counts = {2: 5, 6: 1, 9: 3, 11: 1}
    cpu, copy = split_cpu([2, 6, 9, 11], 6, 1e9, 1e9, mb, assignments=counts)
    assert cpu == [6, 11] and copy == [2, 9]                          # 1-row experts, lowest id first; copies in order
    assert split_cpu([2, 6, 9, 11], 9, 1e9, 1e9, mb) == ([], [2, 6, 9, 11])     # more than 8 rows: the link alone
    assert split_cpu([2, 6, 9, 11], 9, 1e9, 1e9, mb, max_rows=16)[0] == [2, 6]
    assert split_cpu([2, 6], 1, 0.0, 1e9, mb) == ([], [2, 6])          # no CPU rate: off
    assert split_cpu([], 1, 1e9, 1e9, mb) == ([], [])


def test_cpu_rates_start_from_a_prior_scaled_by_rows_and_average_the_measured_rates():
    from dsjax.runtime.prefetch import CpuRates
    rates = CpuRates(prior_bps=10e9, alpha=0.5)
    assert rates.rate(1) == 10e9 and rates.rate(4) == 2.5e9
    rates.observe(1, nbytes=20 << 30, seconds=1.0)                     # one call at ~21.5 GB/s moves it half way
    assert rates.rate(1) == pytest.approx(0.5 * 10e9 + 0.5 * (20 << 30))
    rates.observe(1, nbytes=0, seconds=1.0)                            # an empty call says nothing
    rates.observe(2, nbytes=1, seconds=0.0)
    assert rates.rate(1) == pytest.approx(0.5 * 10e9 + 0.5 * (20 << 30)) and rates.rate(2) == 5e9


LINK, EXPERT = 40e9, 25_000_000                    # bytes/s and bytes: one expert copy takes 0.625 ms


def _run_trial(pol, step_s, steps: int, rows: int = 1, moved: int = 8 * EXPERT):
    """Feed `steps` decode steps whose time step_s(copies_ahead) gives; returns the copies-ahead flag of each step
    as it ran."""
    ran = []
    for _ in range(steps):
        ahead = pol.copies_ahead
        ran.append(ahead)
        pol.end_step(tp=0, fp=0, fn=0, disk_waited=False, link_busy=0.3,
                     step=StepSample(rows, step_s(ahead), moved, moe_layers=4))
    return ran


@pytest.mark.parametrize("ahead_wins", [True, False])
def test_the_copy_ahead_trial_keeps_the_faster_side_and_rechecks_the_other(ahead_wins):
    pol = PrefetchPolicy(0.4, 1, 1, link_bps=LINK, expert_bytes=EXPERT, probe_every=8)
    fast, slow = 0.030, 0.040
    ran = _run_trial(pol, lambda ahead: fast if ahead == ahead_wins else slow, 130)
    assert ran[:7] == [True, True, False, True, False, True, False]       # (a first step, untimed) 3 of each side
    # the loser is re-checked after 8 steps, then after twice as many each time it loses again
    assert [k for k, a in enumerate(ran[7:]) if a != ahead_wins] == [7, 7 + 16, 7 + 16 + 32, 7 + 16 + 32 + 64]
    assert pol.trial()["1"]["copies_ahead_win"] is ahead_wins
    assert pol.trial_steps[True] + pol.trial_steps[False] == 129
    log = pol.trial_samples()                      # the last 32 steps as run: mode, time, bytes, timed
    assert len(log) == 32 and [x["ahead"] for x in log] == ran[-32:] and all(x["timed"] for x in log)
    assert all(x["ms"] == 1e3 * (fast if x["ahead"] == ahead_wins else slow) for x in log)
    assert all(x["h2d_MB"] == 8 * EXPERT / 1e6 and x["rows"] == 1 for x in log)


def test_a_recheck_that_overturns_the_verdict_restarts_the_short_interval():
    """The loser's re-checks back off (8, 16, 32 steps) while it keeps losing; when conditions change and a re-check
    turns the verdict, the new loser is re-checked after 8 steps again."""
    pol = PrefetchPolicy(0.4, 1, 1, link_bps=LINK, expert_bytes=EXPERT, probe_every=8)
    ran = _run_trial(pol, lambda ahead: 0.030 if ahead else 0.040, 7 + 8 + 16)     # ahead wins; two re-checks
    assert [k for k, a in enumerate(ran[7:]) if not a] == [7, 7 + 16]
    ran = _run_trial(pol, lambda ahead: 0.050 if ahead else 0.040, 60)  # now it loses: the verdict turns
    assert pol.trial()["1"]["copies_ahead_win"] is False
    turned = next(k for k, a in enumerate(ran) if not a and k > 0 and not ran[k - 1])   # settled on "without"
    probes = [k for k, a in enumerate(ran) if a and k > turned]
    assert probes[:2] == [probes[0], probes[0] + 16] and probes[0] - turned <= 8


def test_a_tie_goes_to_loading_on_demand_and_buckets_are_judged_apart():
    pol = PrefetchPolicy(0.4, 1, 1, link_bps=LINK, expert_bytes=EXPERT)
    _run_trial(pol, lambda ahead: 0.030 if ahead else 0.0301, 13, rows=1)   # within the 2% margin: no win
    assert pol.trial()["1"]["copies_ahead_win"] is False
    _run_trial(pol, lambda ahead: 0.020 if ahead else 0.040, 13, rows=8)
    assert pol.trial()["8"]["copies_ahead_win"] is True and pol.trial()["1"]["copies_ahead_win"] is False


def test_copies_ahead_per_layer_are_limited_to_the_idle_link_time_of_on_demand_steps():
    pol = PrefetchPolicy(0.0, 1, 1, link_bps=LINK, expert_bytes=EXPERT)
    # without copies ahead: 20 ms a step of which 8 experts' copies (5 ms) keep the link busy; 15 ms idle over 4 MoE
    # layers = 3.75 ms a layer = 6 expert copies (the steps with copies ahead, faster, do not count)
    _run_trial(pol, lambda ahead: 0.015 if ahead else 0.020, 7)
    assert pol.copies_ahead
    assert pol.ahead_limit == 6
    pred = np.linspace(0.1, 0.9, 9)[None]                                 # expert 8 likeliest, then 7, ...
    plan = pol.plan(pred, [2], {2: np.full(9, HOST, np.int8)}, copy_room=50, read_room=0)
    assert plan.copies == {2: (8, 7, 6, 5, 4, 3)}


def test_no_trial_without_link_rate_or_prefill_steps():
    pol = PrefetchPolicy(0.4, 1, 1)                                       # no link rate: the link gate alone
    _run_trial(pol, lambda ahead: 0.04 if ahead else 0.01, 10)
    assert pol.copies_ahead and pol.trial() == {} and pol.ahead_limit is None


def test_a_buckets_first_step_is_not_timed():
    """Its programs compile in it: a 9 s first step must not decide the trial."""
    pol = PrefetchPolicy(0.4, 1, 1, link_bps=LINK, expert_bytes=EXPERT)
    calls = []

    def step_s(ahead):                  # the first step compiles; after it, copies ahead are 25% faster
        calls.append(ahead)
        return 9.0 if len(calls) == 1 else (0.0225 if ahead else 0.030)
    _run_trial(pol, step_s, 7)
    assert pol.trial()["1"]["ms_with"] == pytest.approx(22.5)            # the 9 s step is in neither median
    assert pol.trial()["1"]["copies_ahead_win"] is True


def _run_cpu_trial(pol, step_s, steps: int, rows: int = 1, link_busy: float = 0.3):
    """Feed `steps` decode steps, each run with the CPU path as pol.cpu_allowed(rows) says and copies ahead as
    pol.copies_ahead says, timed by step_s(cpu, ahead); returns the (cpu, ahead) of each step as it ran."""
    ran = []
    for _ in range(steps):
        cpu, ahead = pol.cpu_allowed(rows), pol.copies_ahead
        ran.append((cpu, ahead))
        pol.end_step(tp=0, fp=0, fn=0, disk_waited=False, link_busy=link_busy,
                     step=StepSample(rows, step_s(cpu, ahead), 8 * EXPERT, moe_layers=4, cpu=cpu))
    return ran


@pytest.mark.parametrize("cpu_wins", [True, False])
def test_the_cpu_trial_keeps_the_cpu_path_only_where_it_makes_steps_faster(cpu_wins):
    pol = PrefetchPolicy(0.4, 0, 0, overlap=False, link_bps=LINK, expert_bytes=EXPERT, probe_every=8)
    pol.cpu_trial = True                       # (no copy-ahead trial without look-ahead: the CPU trial starts at once)
    ran = [cpu for cpu, _ in _run_cpu_trial(pol, lambda cpu, _: 0.024 if cpu == cpu_wins else 0.032, 70)]
    assert ran[:7] == [True, True, False, True, False, True, False]       # (a first step, untimed) 3 of each side
    assert [k for k, c in enumerate(ran[7:]) if c != cpu_wins] == [7, 7 + 16, 7 + 16 + 32]   # re-checks, backing off
    rep = pol.cpu_trial_report()["1"]
    assert rep["cpu_wins"] is cpu_wins
    assert rep["ms_with" if cpu_wins else "ms_without"] == pytest.approx(24.0)
    assert pol.cpu_trial_steps[True] + pol.cpu_trial_steps[False] == 69
    assert pol.cpu_allowed(12) and pol.cpu_allowed(0)                     # past CPU_MAX_ROWS, prefill: no trial


def test_the_cpu_trial_judges_buckets_apart_and_a_tie_turns_the_cpu_path_off():
    pol = PrefetchPolicy(0.4, 0, 0, overlap=False, link_bps=LINK, expert_bytes=EXPERT)
    pol.cpu_trial = True
    _run_cpu_trial(pol, lambda cpu, _: 0.030 if cpu else 0.0301, 13, rows=1)     # within the 2% margin
    _run_cpu_trial(pol, lambda cpu, _: 0.100 if cpu else 0.150, 13, rows=7)      # bucket 8: the CPU pays
    rep = pol.cpu_trial_report()
    assert rep["1"]["cpu_wins"] is False and rep["8"]["cpu_wins"] is True
    assert not pol.cpu_allowed(1) and pol.cpu_allowed(5)                  # 5 rows: bucket 8's verdict


def test_the_cpu_trial_waits_for_the_copy_ahead_verdict_and_the_two_never_mix_their_samples():
    pol = PrefetchPolicy(0.4, 1, 1, link_bps=LINK, expert_bytes=EXPERT, probe_every=8)
    pol.cpu_trial = True
    # copies ahead cost 10 ms a step, the CPU path saves 5: each trial must find its own knob's effect
    ran = _run_cpu_trial(pol, lambda cpu, ahead: 0.030 + 0.010 * ahead - 0.005 * cpu, 80)
    assert all(cpu for cpu, _ in ran[:7])             # the copy-ahead trial runs first, the CPU path on throughout
    assert not all(cpu for cpu, _ in ran[7:16])       # then the CPU trial
    assert pol.trial()["1"]["copies_ahead_win"] is False and pol.cpu_trial_report()["1"]["cpu_wins"] is True
    # every sample of each trial has the other knob at its settled value: the medians are exact
    assert pol.trial()["1"]["ms_with"] == pytest.approx(35.0) and pol.trial()["1"]["ms_without"] == pytest.approx(25.0)
    rep = pol.cpu_trial_report()["1"]
    assert rep["ms_with"] == pytest.approx(25.0) and rep["ms_without"] == pytest.approx(30.0)
    # the CPU trial's re-checks of its loser (CPU off, 30 ms) never reach the copy-ahead trial's log
    assert any(not cpu for cpu, _ in ran[-32:])
    assert all(x["ms"] in (pytest.approx(35.0), pytest.approx(25.0)) for x in pol.trial_samples())
    # and the copy-ahead trial's re-checks (copies ahead on: 35 / 40 ms) never reach the CPU trial's samples
    assert any(ahead for _, ahead in ran[16:])
    kept = [t for side in pol._cpu_trials[1].times.values() for t in side]
    assert kept and all(t in (pytest.approx(0.025), pytest.approx(0.030)) for t in kept)


def test_the_cpu_trial_runs_while_a_full_link_holds_copies_ahead_back():
    """Batch 8 and 32 fill the link: the copy-ahead trial then never runs a step with copies ahead (no verdict), and
    the CPU trial must not wait for one."""
    pol = PrefetchPolicy(0.4, 1, 1, link_bps=LINK, expert_bytes=EXPERT)
    pol.cpu_trial = True
    ran = _run_cpu_trial(pol, lambda cpu, _: 0.100 if cpu else 0.150, 16, rows=8, link_busy=0.95)
    assert not any(ahead for _, ahead in ran[1:])                       # the gate closed after the first step
    assert pol.trial().get("8", {}).get("copies_ahead_win") is None
    assert pol.cpu_trial_report()["8"]["cpu_wins"] is True and pol.cpu_trial_steps[False] >= 3

"""The rollout judge: the canary's numbers against stable's, and a verdict with reasons.
Pure; no I/O, no clock.

- **histogram** (`proxy.judge.histogram`): log-bucketed durations, exact to merge.
- **stats** (`proxy.judge.stats`): per route and variant, per time slice.
- **sequential** (`proxy.judge.sequential`): confidence bounds and always-valid tests.
- **analysis** (`proxy.judge.analysis`): evidence and checks to a judgement.
"""

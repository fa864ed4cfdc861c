"""The rollout judge: the canary's numbers against stable's, and a verdict with reasons.
Pure; no I/O, no clock.

- **histogram** (`proxy.judge.histogram`): log-bucketed durations, exact to merge.
- **stats** (`proxy.judge.stats`): per route and variant, per time slice, with sums per
  user cluster.
- **sequential** (`proxy.judge.sequential`): always-valid tests (e-processes) of a rate
  against a limit, slice by slice, and their design effects.
- **analysis** (`proxy.judge.analysis`): evidence gathered slice by slice, and checks to
  a judgement.
"""

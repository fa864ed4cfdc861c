"""Rollouts: a route's state, and how judgements, operators and config edits change it.
Pure; time is an argument.

- **machine** (`proxy.rollout.machine`): the state machine of SPEC §6.
- **planner** (`proxy.rollout.planner`): what a controller tick decides.
- **simulate** (`proxy.rollout.simulate`): many rollouts of synthetic traffic, or of a
  request trace, through the real judge and state machine on a simulated clock;
  **traffic** (`proxy.rollout.traffic`) draws the synthetic scenarios, **baselines**
  (`proxy.rollout.baselines`) decides the same traffic as Flagger, Kayenta and an
  oracle would.
"""

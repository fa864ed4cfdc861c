"""Rollouts: a route's state, and how judgements, operators and config edits change it.
Pure; time is an argument.

- **machine** (`proxy.rollout.machine`): the state machine of SPEC §6.
- **simulate** (`proxy.rollout.simulate`): many rollouts of synthetic traffic through the
  real judge and state machine on a simulated clock.
"""

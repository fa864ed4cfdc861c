"""How a shadow pair's two answers compare: agreement and output length. Pure.

Rules:
1. Answers agree when their texts are the same, for a deterministic request (temperature
   0); otherwise when the words they share (lower-cased, split on white space) are at
   least `similarity` of the words either has (Jaccard). Two empty answers agree.
2. Only a bounded prefix of each text is compared (`PREFIX_CHARS`): the cost of a pair
   does not grow with its answers.
3. Output lengths match when neither side's output token count is more than
   `max_ratio` times the other's; a pair where either count is unknown or zero is not
   compared (None).
"""

from __future__ import annotations

from typing import Final

__all__ = ["PREFIX_CHARS", "agree", "lengths_match"]

PREFIX_CHARS: Final = 2000


def agree(stable: str, canary: str, deterministic: bool, similarity: float) -> bool:
    """Do the two answers agree (rules 1 and 2)?"""
    stable, canary = stable[:PREFIX_CHARS], canary[:PREFIX_CHARS]
    if deterministic:
        return stable == canary
    mine, theirs = set(stable.lower().split()), set(canary.lower().split())
    either = mine | theirs
    if not either:
        return True
    return len(mine & theirs) / len(either) >= similarity


def lengths_match(stable: int | None, canary: int | None, max_ratio: float) -> bool | None:
    """Are the output token counts within `max_ratio` of each other (rule 3)?"""
    if not stable or not canary:
        return None
    return max(stable, canary) <= max_ratio * min(stable, canary)

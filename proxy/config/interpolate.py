"""`${VAR}` in config values: one file, the values that differ between places from the environment.

Rules:
1. Only scalar values are interpolated, never keys: the shape of the config is the
   file's. `${NAME}` is the variable's value; `${NAME:-word}` is `word` when NAME is
   unset or empty; `$${` is a literal `${`. A `$` not followed by `{` is itself.
2. An unset variable without a default is a problem at the value's path, naming the
   variable; so is a malformed reference (`${}`, `${1X}`, `${X` without its `}`).
3. An unquoted value is typed after substitution as YAML would type it written there
   (`max_concurrency: ${N}` with N=512 is a number); a quoted one stays a string.
   Inside a flow collection (`{...}`, `[...]`) YAML itself needs the reference quoted.
4. It works on the composed YAML nodes, before any value is built: a variable's value
   is one scalar and never YAML structure, whatever characters it holds.
5. It is for values that are not secret: secrets stay in the environment, named by
   `*_env` keys, and never enter the config's values (see `proxy.config.parse`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.config.reader import key_path

__all__ = ["Resolver", "interpolate"]


class Resolver(Protocol):
    """What types a plain scalar from its text: a YAML loader."""

    def resolve(self, kind: type[Node], value: str, implicit: tuple[bool, bool]) -> str: ...


# `$${`, then `${...}` up to the first `}`, then a `${` left open.
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def interpolate(node: Node | None, resolver: Resolver, environ: Mapping[str, str]) -> list[str]:
    """Substitute every reference under `node` in place; the problems, `path: message`."""
    problems: list[str] = []
    _walk(node, "", set(), resolver, environ, problems)
    return problems


def _walk(
    node: Node | None,
    path: str,
    seen: set[int],
    resolver: Resolver,
    environ: Mapping[str, str],
    problems: list[str],
) -> None:
    if node is None or id(node) in seen:  # an alias shares its anchor's node
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{path}[{index}]", seen, resolver, environ, problems)
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            child = key_path(path, str(key.value)) if isinstance(key, ScalarNode) else path
            _walk(value, child, seen, resolver, environ, problems)
    elif isinstance(node, ScalarNode) and "$" in node.value:
        _substitute(node, path, resolver, environ, problems)


def _substitute(
    node: ScalarNode,
    path: str,
    resolver: Resolver,
    environ: Mapping[str, str],
    problems: list[str],
) -> None:
    text: str = node.value
    found: list[str] = []

    def replace(match: re.Match[str]) -> str:
        whole, body = match.group(0), match.group(1)
        if whole == "$${":
            return "${"
        if body is None:
            found.append("an unclosed ${ (write $${ for a literal one)")
            return whole
        parsed = _BODY.fullmatch(body)
        if parsed is None:
            found.append(
                f"{whole} is no variable reference (expected ${{NAME}} or ${{NAME:-default}})"
            )
            return whole
        name, default = parsed.group(1), parsed.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            found.append(
                f"the environment variable {name} is not set "
                f"(give a default with ${{{name}:-value}})"
            )
            return whole
        return value

    value = _REFERENCE.sub(replace, text)
    for problem in found:
        problems.append(f"{path or 'top level'}: {problem}")
    if found or value == text:
        return
    # An unquoted scalar whose tag YAML resolved from its text is resolved again from
    # the new text; a quoted one (or one with an explicit tag) keeps its tag.
    implicit = node.style is None and node.tag == resolver.resolve(ScalarNode, text, (True, False))
    node.value = value
    if implicit:
        node.tag = resolver.resolve(ScalarNode, value, (True, False))

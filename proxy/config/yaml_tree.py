"""Loading YAML text into a plain tree, with the mistakes YAML itself would let pass.

Rules:
1. Only `yaml.SafeLoader` constructs values: no tags that run code.
2. A duplicate key in a mapping is a problem with its path and lines; YAML would
   silently keep the last one, which hides typos.
3. Every way the text can fail to be YAML becomes one `ConfigError` line,
   `line L, column C: invalid YAML: <problem>` where PyYAML knows the place.
4. `${VAR}` references in values are substituted from the environment before any
   value is built (`proxy.config.interpolate`).
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.config.interpolate import interpolate
from proxy.config.reader import key_path
from proxy.errors import ConfigError

__all__ = ["load_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


def load_yaml(data: bytes, environ: Mapping[str, str]) -> tuple[object, list[str]]:
    """The YAML tree, with `${VAR}` references taken from `environ`, and its problems
    (duplicate keys, unset variables); a syntax error raises ConfigError."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"byte {exc.start}: the file is not UTF-8 text") from exc
    try:
        return _compose_and_construct(text, environ)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_problem(exc)) from exc
    except yaml.reader.ReaderError as exc:
        line, column = _line_and_column(text, exc.position)
        raise ConfigError(
            f"line {line}, column {column}: invalid YAML: unacceptable character "
            f"#x{ord(exc.character) if isinstance(exc.character, str) else exc.character:04x}"
        ) from exc
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        # PyYAML lets some bad scalars through as plain Python errors (`2020-13-45`).
        raise ConfigError(f"invalid YAML: {str(exc).splitlines()[0]}") from exc
    except RecursionError as exc:
        raise ConfigError("invalid YAML: nested too deeply") from exc


def _compose_and_construct(text: str, environ: Mapping[str, str]) -> tuple[object, list[str]]:
    loader = yaml.SafeLoader(text)  # checks for unprintable characters right away
    try:
        node = loader.get_single_node()
        problems: list[str] = []
        _find_duplicate_keys(node, "", set(), problems)
        problems += interpolate(node, loader, environ)
        return (None if node is None else loader.construct_document(node)), problems
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or "cannot parse"
    if exc.context and exc.context.startswith("expected"):
        problem = f"{exc.context}, {problem}"  # "expected a single document..., but found..."
    elif exc.context:
        problem = f"{problem} ({exc.context})"
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"


def _line_and_column(text: str, position: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1


def _find_duplicate_keys(node: Node | None, path: str, seen: set[int], out: list[str]) -> None:
    if node is None or id(node) in seen:  # aliases may share (or even contain) a node
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _find_duplicate_keys(item, f"{path}[{index}]", seen, out)
    elif isinstance(node, MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            child = key_path(path, str(key.value))
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_line:
                out.append(
                    f"{child}: duplicate key (line {line}; first on line "
                    f"{first_line[key.tag, key.value]}); YAML would keep only the last"
                )
            first_line.setdefault((key.tag, key.value), line)
            _find_duplicate_keys(value, child, seen, out)

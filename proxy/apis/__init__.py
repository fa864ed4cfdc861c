"""What the LLM APIs say on the wire: how an answer reports its model, usage and finish,
and how a stream ends. Pure; no I/O.

- **answer** (`proxy.apis.answer`): facts read from an answer's bytes as they pass.
"""

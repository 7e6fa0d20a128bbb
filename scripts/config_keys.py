"""Print the README's table of config keys for a stage, from the config dataclasses and the docstring
under each field (the README's key tables are this output):

    python scripts/config_keys.py coldstart|rl|eval
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys

from ovr_hpc import cli  # noqa: F401  (registers the eval stage)
from ovr_hpc.config import STAGES


def field_docs(cls) -> dict[str, str]:
    """{field: the string literal right under it}, over the class and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def rows(obj, prefix: str = ""):
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from rows(value, f"{prefix}{f.name}.")
        else:
            required = (f.name in ("output_dir", "path") and value == "" and prefix != "critic.") or \
                (f.name == "train_files" and not value)
            shown = "required" if required else f"`{value}`"
            yield f"| `{prefix}{f.name}` | {shown} | {docs.get(f.name, '')} |"


if __name__ == "__main__":
    print("| key | default | meaning |\n|---|---|---|")
    print("\n".join(rows(STAGES[sys.argv[1]]())))

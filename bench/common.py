"""What every benchmark script does with its result: print it as JSON, and write it to ``--out``."""

from __future__ import annotations

import json


def emit(result: dict, out: str | None, *, indent: int = 1) -> None:
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")

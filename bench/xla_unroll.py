"""What the LLVM unroll limit (``outer_train.runtime.xla_cpu.limit_full_unroll``) does for speed.

    python -m bench.xla_unroll [--repeats 5] [--out FILE]

The same elementwise work, ``relu(x * 0.999 + b)`` 100 times in one jitted ``fori_loop``, over
443,648 floats laid out [13864, 32] (the learned optimizer's hidden activations) and [6932, 64]
(a layout LLVM vectorizes either way), each setting (``LEARNED_OPT_LLVM_UNROLL=limited`` /
``default``) in a fresh process, since XLA reads its flags once. ``narrow_over_wide`` is the
[N, 32] time over the [N, 64] time in the same process (best of ``--repeats`` rounds), free of
the machine's load; ``speedup`` = default / limited of that ratio. The ratio depends on the
CPU (AVX-512 or not): the test suite checks only the deterministic part (the limited loop
compiles to vector code, ``tests/test_xla_cpu.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import emit, machine

_SCRIPT = """
import json, sys, time
from outer_train.runtime import xla_cpu
applied = xla_cpu.limit_full_unroll()
import jax, jax.numpy as jnp
from jax import lax

def seconds(shape, repeats):
    x, b = jnp.ones(shape), jnp.full(shape[-1:], 0.5)
    f = jax.jit(lambda x, b: lax.fori_loop(0, 100, lambda i, y: jax.nn.relu(y * 0.999 + b), x))
    f(x, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(x, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best

repeats = int(sys.argv[1])
narrow, wide = seconds((13864, 32), repeats), seconds((6932, 64), repeats)
print(json.dumps({"applied": applied, "narrow_us_per_op": narrow * 1e4,
                  "wide_us_per_op": wide * 1e4, "narrow_over_wide": narrow / wide}))
"""


def run_setting(choice: str, repeats: int) -> dict:
    env = {**os.environ, "LEARNED_OPT_LLVM_UNROLL": choice}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(repeats)], env=env, capture_output=True, text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = {choice: run_setting(choice, args.repeats) for choice in ("default", "limited")}
    emit({
        "command": "python -m bench.xla_unroll " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "results": results,
        "speedup": results["default"]["narrow_over_wide"]
        / results["limited"]["narrow_over_wide"],
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

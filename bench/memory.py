"""Part 5: memory of one worker after 100,000 distinct tokens, and the caches' bounds.

Each cache is filled in a fresh child process (``python -m bench.memory jwt
100000``), through the whole middleware, one request per distinct token, as a
worker would see them. Tokens are made one at a time and dropped after their
request, so what stays is what the caches keep. Reported: the entries kept
(against ``token_cache_size`` / ``cache_l1_size``), the growth of the process's
resident set (what an operator sees per worker), and the deep size of the cache
(every object reachable from it, by ``sys.getsizeof``) per entry. tracemalloc
would triple the run time of 100,000 signature checks, so it is not used.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

__all__ = ["run_memory"]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def deep_size(root: object) -> int:
    """Bytes of ``root`` and of every object reachable from it (types, functions and modules excepted)."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def _child(kind: str, count: int) -> dict[str, Any]:
    from certbound_wsgi.middleware import CertBoundMiddleware
    from tests.support.tokens import ISSUER

    from .fixtures import FakeIntrospection, Workspace, environ_factory, hello_app, opaque_tokens, start_response

    ws = Workspace()
    if kind == "jwt":
        settings = ws.settings()
        bound = settings.token_cache_size
        mw = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))

        accepted = mw.authenticator.accepted
        assert accepted is not None

        def size() -> int:
            # The memo of verified tokens and the memo of accepted decisions fill together, each bounded.
            return max(mw.jwt.memo_size(), len(accepted))  # type: ignore[union-attr]

        def cache() -> object:
            # The one issuer's validator (issue 14 put a router in front of it), and the accepted
            # decisions, which share the claims with it.
            return [*(route.validator._memo for route in mw.jwt.routes.values()),  # type: ignore[union-attr]
                    accepted._entries]

        def next_token() -> str:
            return ws.tokens(1)[0]
    else:
        settings = ws.settings(auth_methods=("introspection",), client_id="bench", client_secret="bench-secret",
                               introspection_endpoint=ISSUER + "/token/introspection")
        bound = settings.cache_l1_size
        mw = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
        mw.introspection._client = FakeIntrospection(ws.introspection_answer())  # type: ignore[union-attr]

        def size() -> int:
            return len(mw.introspection._l1)  # type: ignore[union-attr]

        def cache() -> object:
            return mw.introspection._l1._data  # type: ignore[union-attr]

        def next_token() -> str:
            return opaque_tokens(1)[0]

    # One request first, so that imports, key parsing and the certificate's memo are not counted.
    mw(environ_factory([next_token()], ws.cert_value)(0), start_response)
    gc.collect()
    rss_before = _rss_bytes()
    began = time.perf_counter()
    sizes = []
    token_bytes = 0
    for i in range(count):
        token = next_token()
        token_bytes += sys.getsizeof(token)
        body = mw(environ_factory([token], ws.cert_value)(0), start_response)
        if i == 0 and b"".join(body) != b"hello":
            raise RuntimeError(f"{kind}: the request was refused")
        if (i + 1) % (count // 10) == 0:
            sizes.append(size())
    seconds = time.perf_counter() - began
    gc.collect()
    kept = size()
    retained = deep_size(cache())
    return {
        "kind": kind,
        "tokens": count,
        "bound": bound,
        "entries": kept,
        "entries_every_tenth": sizes,
        "within_bound": kept <= bound and all(s <= bound for s in sizes),
        "cache_bytes": retained,
        "bytes_per_entry": retained / kept if kept else None,
        "token_bytes_per_entry": token_bytes / count,
        "rss_growth_bytes": _rss_bytes() - rss_before,
        "seconds": seconds,
    }


def run_memory(count: int) -> dict[str, Any]:
    """Fill the JWT memo and the L1 introspection cache, each in a child process, side by side."""
    root = Path(__file__).resolve().parent.parent
    children = {
        kind: subprocess.Popen([sys.executable, "-m", "bench.memory", kind, str(count)], cwd=root,
                               stdout=subprocess.PIPE, text=True)
        for kind in ("jwt", "l1")
    }
    results = {}
    for kind, child in children.items():
        out, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"bench.memory {kind} exited with {child.returncode}")
        results[kind] = json.loads(out.strip().splitlines()[-1])
    return results


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]))))

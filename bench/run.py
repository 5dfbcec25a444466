"""``python -m bench``: run every part, write ``bench/results/latest.{md,json,png}``, print the tables."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .fixtures import Workspace
from .inprocess import Sizes, run_inprocess
from .report import targets, write_chart, write_json, write_markdown

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"


def _machine(argv: list[str]) -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for name in ("authlib", "joserfc", "cryptography", "gunicorn", "redis"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr.strip()
        versions.append(nginx.rpartition(":")[2].strip())
    except OSError:
        pass
    root = RESULTS.parent.parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=root).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "certbound_wsgi"], capture_output=True, text=True,
                           check=False, cwd=root).stdout.strip()
    if dirty:
        commit += " (with uncommitted changes under certbound_wsgi/)"
    return {
        "command": " ".join(["python -m bench", *argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": ", ".join(versions),
        "commit": commit,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a smoke run, not a result)")
    parser.add_argument("--skip", action="append", default=[], choices=("inprocess", "e2e", "burst", "memory"),
                        help="leave a part out (repeatable)")
    parser.add_argument("--rounds", type=int, default=None, help="in-process rounds (default 9; quick 3)")
    parser.add_argument("--e2e-pairs", type=int, default=None,
                        help="end-to-end protected/unprotected pairs per configuration (default 12; quick 2)")
    parser.add_argument("--memory-tokens", type=int, default=None, help="distinct tokens (default 100000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.{md,json,png} go")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    began = time.monotonic()
    results: dict[str, Any] = {"meta": _machine(argv), "notes": [], "timings_s": {}}
    ws = Workspace()

    def part(name: str) -> bool:
        if name in args.skip:
            results["notes"].append(f"part {name} skipped (--skip {name})")
            return False
        print(f"bench: {name}...", file=sys.stderr, flush=True)
        return True

    if part("memory"):
        # First, and alone: two child processes that keep both cores busy.
        from .memory import run_memory

        t = time.monotonic()
        results["memory"] = run_memory(args.memory_tokens or (20000 if args.quick else 100000))
        results["timings_s"]["memory"] = time.monotonic() - t

    if part("inprocess"):
        t = time.monotonic()
        rounds = args.rounds or (3 if args.quick else 9)
        sizes = (Sizes(bare=5000, warm=3000, cold=100, l1=3000, l2=500, authlib=100, dpop=100,
                                 floor_es256=100, floor_redis=500, interleaved=100) if args.quick
                 else Sizes())
        results["inprocess"] = {"rounds": rounds, **run_inprocess(ws, rounds, sizes)}
        results["timings_s"]["inprocess"] = time.monotonic() - t

    if "e2e" not in args.skip or "burst" not in args.skip:
        from .e2e import run_burst, run_e2e, started_idp

        with started_idp(ws) as provider:
            if part("e2e"):
                t = time.monotonic()
                results["e2e"] = run_e2e(ws, provider, pairs=args.e2e_pairs or (2 if args.quick else 12),
                                         duration=0.5 if args.quick else 1.5, warmup=0.2, connections=8)
                results["timings_s"]["e2e"] = time.monotonic() - t
            if part("burst"):
                t = time.monotonic()
                results["burst"] = run_burst(ws, provider, bursts=3)
                results["timings_s"]["burst"] = time.monotonic() - t

    if args.quick:
        results["notes"].append("--quick: a smoke run with few, short rounds; not a result.")
    results["meta"]["elapsed_s"] = time.monotonic() - began
    args.out.mkdir(parents=True, exist_ok=True)
    skipped = write_chart(results, args.out / "latest.png")
    if skipped:
        results["notes"].append(skipped)
    results["meta"]["elapsed_s"] = time.monotonic() - began
    write_json(results, args.out / "latest.json")
    text = write_markdown(results, args.out / "latest.md")
    print(text)
    failed = [t["target"] for t in targets(results) if not t["holds"]]
    print(f"bench: {len(failed)} target(s) missed; wrote {args.out}/latest.md, latest.json"
          f"{'' if skipped else ', latest.png'} in {results['meta']['elapsed_s']:.0f} s", file=sys.stderr)
    return 0

"""Command line: ``python -m turboquant_codec info`` (backends table) or ``demo``."""

from __future__ import annotations

import sys

from .backends import statuses


def info() -> int:
    rows = statuses()
    width = max(len(r.name) for r in rows)
    print(f"{'backend':<{width}}  device  status")
    for r in rows:
        status = "available" + (f" ({r.reason})" if r.reason else "") if r.available else (
            f"unavailable: {r.reason}")
        print(f"{r.name:<{width}}  {r.device:<6}  {status}")
    print("\nbackend='auto' takes, for where the data lives, the first available backend that serves the "
          "request (capabilities.py): host arrays numba_cpu (paged attention) then numpy, GPU arrays "
          "cupy_raw then numba_cuda; TQ_BACKEND overrides it.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m turboquant_codec {info,demo} [options]")
        return 0 if args else 2
    if args[0] == "info":
        return info()
    if args[0] == "demo":
        from .demo import main as demo

        return demo(args[1:])
    print(f"unknown command {args[0]!r}; choose info or demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

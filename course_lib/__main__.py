"""Command line: `python -m course_lib doctor | bench | serve | loadgen ...`."""

from __future__ import annotations

import sys

USAGE = """usage: python -m course_lib COMMAND [options]

commands:
  doctor   check the environment, the device and the default model; generate a short reply
  bench    run a benchmark suite and write its ratios as JSON (see `bench --help`)
  serve    serve a model over an OpenAI-compatible API (see `serve --help`)
  loadgen  load-test an OpenAI-compatible endpoint (see `loadgen --help`)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "doctor":
        from course_lib.doctor import main as run
    elif command == "bench":
        from course_lib.bench import main as run
    elif command == "serve":
        from course_lib.server import main as run
    elif command == "loadgen":
        from course_lib.loadgen import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())

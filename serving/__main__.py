"""`python -m serving [--params P] [--profile NAME] [--host H] [--port N]`: same as `sur serve`."""

from __future__ import annotations

import argparse
import os
import sys

from serving.main import ServeError, serve
from suradapter.config import PARAMS_ENV, PROFILE_ENV, ParamsError, load_params


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--params", default=os.environ.get(PARAMS_ENV), help="params.yaml")
    parser.add_argument("--profile", default=os.environ.get(PROFILE_ENV), help="profile")
    parser.add_argument("--host", help="bind address (default: serving.host)")
    parser.add_argument("--port", type=int, help="port (default: serving.port)")
    args = parser.parse_args(argv)
    try:
        serve(load_params(args.params, args.profile), host=args.host, port=args.port)
    except (ParamsError, ServeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

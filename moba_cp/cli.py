"""The ``moba-cp`` command: one entry point, subcommands in their own modules.

    moba-cp --version
    moba-cp config RECIPE.yaml [--a.b=value ...]     print the resolved, validated recipe
    moba-cp selfcheck [--tokens N ...]               MoBA on random data vs the fp64 oracle
"""

from __future__ import annotations

import argparse
import sys

import moba_cp


def _cmd_config(args, overrides) -> int:
    from moba_cp.config import RecipeError, dump, load_recipe

    try:
        cfg = load_recipe(args.recipe, overrides)
    except RecipeError as e:
        print(f"moba-cp config: {e}", file=sys.stderr)
        return 2
    print(dump(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moba-cp", description="Context-parallel MoBA training on Megatron-Core."
    )
    parser.add_argument("--version", action="version", version=f"moba-cp {moba_cp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("config", help="print the resolved, validated recipe",
                       description="Load RECIPE (YAML), apply --a.b=value overrides, validate, print.")
    p.add_argument("recipe", help="path to a YAML recipe (e.g. recipes/quickstart.yaml)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("selfcheck", help="run MoBA on random data with each backend against the fp64 oracle")
    from moba_cp import selfcheck

    selfcheck.add_arguments(p)
    p.set_defaults(func=lambda a, rest: _no_extra(rest, "selfcheck") or selfcheck.run(a))
    return parser


def _no_extra(rest, cmd):
    if rest:
        raise SystemExit(f"moba-cp {cmd}: unexpected arguments {rest}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())

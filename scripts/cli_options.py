"""Prints every subcommand of `svdexport` with its options, from argparse itself (a markdown table):
`python scripts/cli_options.py`. Options argparse hides (removed flags that only answer with a hint) are left out."""

from __future__ import annotations

import argparse
import sys


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every subcommand, nested ones as 'bench lora'."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((f"{prefix}{name}", sub))
                found += subcommands(sub, f"{prefix}{name} ")
    return found


def options(parser: argparse.ArgumentParser) -> list[str]:
    """The options it lists in --help, positionals as their metavar, in the order --help shows them."""
    shown = []
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        shown.append(max(a.option_strings, key=len) if a.option_strings else (a.metavar or a.dest).upper())
    return shown


def main() -> int:
    from svdexport.cli import parser

    print("| subcommand | options |\n|---|---|")
    for name, sub in subcommands(parser()):
        print(f"| `{name}` | {' '.join(f'`{o}`' for o in options(sub)) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `tpserve` command."""

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__)
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(argv)

"""KEY=VALUE overrides that may come after a command's options (`run demo.yaml --launcher slurm max_steps=8`)."""
import argparse
import types


def accept_late_overrides(parser: argparse.ArgumentParser) -> None:
    """argparse leaves positionals that follow options unrecognised; collect every leftover KEY=VALUE into the
    parser's `overrides` argument instead."""
    parser.parse_known_args = types.MethodType(_parse_known_args, parser)


def _parse_known_args(self, args=None, namespace=None):
    namespace, extras = argparse.ArgumentParser.parse_known_args(self, args, namespace)
    late = [a for a in extras if "=" in a and not a.startswith("-")]
    namespace.overrides = list(getattr(namespace, "overrides", None) or []) + late
    return namespace, [a for a in extras if a not in late]

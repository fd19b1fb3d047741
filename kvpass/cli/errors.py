"""The command line's own error: arguments that contradict each other (argparse checks each alone)."""


class UsageError(ValueError):
    """Bad arguments: `kvpass` exits with status 2 and this one-line message."""

"""The one exception type users see: a one-line message naming the file, record and field."""


class RayFTError(Exception):
    """Bad input or an unmet precondition; the CLI prints it as one line and exits 2."""

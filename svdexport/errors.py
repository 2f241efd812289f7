"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SvdExportError(Exception):
    """A problem with the user's input, files or environment (not a bug in svdexport)."""

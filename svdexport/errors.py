"""The one exception type the CLI turns into a one-line message and a non-zero exit, and how messages quote
user text."""


class SvdExportError(Exception):
    """A problem with the user's input, files or environment (not a bug in svdexport)."""


def clip(text: object, limit: int = 80) -> str:
    """User text quoted in an error (a prompt, a class name, a line of a file) cut to its first `limit`
    characters: a 10 MB prompt must not make a 10 MB error line."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def first_line(error: BaseException) -> str:
    """The first line of an error raised by a library (its traceback-sized message cut to what names the problem);
    the exception's type when it says nothing."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def one_line(error: Exception, output: object = None, limit: int = 2000) -> str:
    """What the CLI prints of an error: one line of at most `limit` characters (the places that quote user text
    cut it already; this bounds what they missed). An OSError that no writer named (a write raises it without
    a file name) says its file, else the command's `output`."""
    if isinstance(error, OSError) and not isinstance(error, SvdExportError):
        where = f" on {error.filename}" if error.filename else f" writing {output}" if output else ""
        text = f"I/O error{where}: {error.strerror or error}"
    else:
        text = str(error)
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

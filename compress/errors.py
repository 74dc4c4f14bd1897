"""User-facing errors: one line that names the field or file, exit status 2 from the CLI."""


class LrcError(Exception):
    """Bad input from the user (recipe, model path, data). The CLI prints ``error: <message>`` and exits 2."""

    exit_code = 2

class UnivError(Exception):
    """An error the user can fix: the CLI prints its message as one line and exits non-zero."""

"""The one base class of bad input: what a person can fix (a file, a flag, a certificate, a
configuration). The CLI prints such an error as one line naming the problem and exits 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad input, named in the message; every command maps it to exit code 2."""

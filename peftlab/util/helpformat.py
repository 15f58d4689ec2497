"""The help formatter of every ``peftlab`` command: options show ``(default: X)``."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` for options whose default is a value (not None, False or empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.default not in (None, False, [], argparse.SUPPRESS)
            and "%(default)" not in text
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text

"""Plumbing shared by the command-line scripts: one-line errors and absl flag parsing.

The scripts own their flags; these helpers take the flag values as a plain argument.
"""

import sys

EXIT_BAD_INPUT = 2


def error(message):
    """Prints `message` as one `error:` line on stderr; returns the bad-input exit status."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return EXIT_BAD_INPUT


def flags_parser(flag_values):
    """A `flags_parser` for absl's app.run: a bad flag is one error line and exit 2."""
    from absl import flags

    def parse(argv):
        try:
            return flag_values(argv)
        except flags.Error as e:
            sys.exit(error(f"{e}: expected the flags that --help lists"))
    return parse

"""Plumbing shared by the command-line scripts: one-line errors, absl flag parsing and
help, flag precedence, logging and output noise.

The scripts own their flags; these helpers take the flag values as a plain argument.
Nothing here imports TensorFlow, so help and bad flags are answered at once.
"""

import contextlib
import logging
import os
import sys
import threading

EXIT_BAD_INPUT = 2

# absl's help flags (app.run defines them); "-h" too, as every other tool takes it.
HELP_FLAGS = {"--help": "short", "-help": "short", "-h": "short", "-?": "short",
              "--helpshort": "short", "-helpshort": "short",
              "--helpfull": "full", "-helpfull": "full"}


def error(message):
    """Prints `message` as one `error:` line on stderr; returns the bad-input exit status."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return EXIT_BAD_INPUT


def parse_argv(flag_values, argv, positional=False, example=""):
    """Parses `argv` into `flag_values` unless app.run already did (a script's main
    called directly). Returns (argv, None), or (None, exit status) after one error line
    for a bad flag, or for arguments besides flags when `positional` is False."""
    from absl import flags

    if not flag_values.is_parsed():
        try:
            argv = flag_values(list(argv))
        except flags.Error as e:
            return None, error(f"{e}: expected the flags that --help lists")
    if not positional and len(argv) > 1:
        return None, error(f"unexpected argument(s) {argv[1:]}: expected only flags"
                           + (f", such as {example}" if example else ""))
    return argv, None


def flags_parser(flag_values):
    """A `flags_parser` for absl's app.run: a bad flag is one error line and exit 2;
    --help, -h, --helpshort and --helpfull print the flags and exit 0."""
    from absl import flags

    def parse(argv):
        kind = help_requested(argv)
        if kind:
            print_help(flag_values, kind)
            sys.exit(0)
        try:
            return flag_values(argv)
        except flags.Error as e:
            sys.exit(error(f"{e}: expected the flags that --help lists"))
    return parse


def help_requested(argv):
    """'short' or 'full' when argv[1:] asks for help (before a '--'), else None."""
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in HELP_FLAGS:
            return HELP_FLAGS[arg]
    return None


def print_help(flag_values, kind, module=None, doc=None):
    """Prints the usage text and the flags on stdout, like absl's app.usage.

    kind 'short': the flags of `module` (a module name; default the main script's,
    where absl files the flags a script defines); 'full': every flag. `doc`
    defaults to the main script's docstring.
    """
    if doc is None:
        doc = getattr(sys.modules.get("__main__"), "__doc__", None) or \
            f"\nUSAGE: {os.path.basename(sys.argv[0] or 'script')} [flags]\n"
    if kind == "full":
        text = flag_values.get_help()
    else:
        text = flag_values.module_help(module if module is not None else sys.argv[0])
    out = doc.rstrip("\n") + "\n\nflags:\n" + text + "\n"
    if kind != "full":
        out += "\nTry --helpfull to get a list of all flags.\n"
    try:
        sys.stdout.write(out)
        sys.stdout.flush()
    except BrokenPipeError:  # `script --helpfull | head` is fine
        pass


def flagfiles_first(argv, implied=()):
    """argv with every --flagfile directive moved before the flags given explicitly.

    absl applies flags in order, the last one winning, and expands a flagfile where
    it stands: `--strategy=random --flagfile=F` would let F's --strategy win. Moved
    to the front (in their own order, so a later flagfile still beats an earlier
    one), flagfiles only supply defaults that explicit flags override wherever they
    stand. `implied` flags go between the two: they override flagfiles, and yield to
    explicit flags. Everything from a '--' on is kept at the end, as it was.
    """
    argv = list(argv)
    files, explicit = [], []
    rest = argv[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            explicit.extend(rest[i:])
            break
        if arg in ("--flagfile", "-flagfile"):
            files.extend(rest[i:i + 2])  # the file is the next argument
            i += 2
            continue
        if arg.startswith(("--flagfile=", "-flagfile=")):
            files.append(arg)
        else:
            explicit.append(arg)
        i += 1
    return argv[:1] + files + list(implied) + explicit


def progress_verbosity(verbose, stream):
    """Keras Progbar's `verbose` for the --verbose a user gave.

    Progbar's live bar (1) redraws itself many times a second with backspaces and
    carriage returns; in a file (stdout redirected, a CI log) every redraw stays, a
    few MB for a quick run. There 1 becomes 2: one line when an epoch ends.
    """
    if verbose != 1:
        return verbose
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        tty = False
    return 1 if tty else 2


_OURS = "_bonsai_tf_cli"


def setup_logging(name, log_file=None, stream=None):
    """Sends logger `name` to `stream` (default stderr) and, given `log_file`, to it too.

    Idempotent: handlers of an earlier call are replaced, never added to, so a
    second call (the runner's, once the run directory exists) does not print every
    line twice. The logger does not propagate to the root logger: absl's logging,
    which TensorFlow uses, calls logging.basicConfig() on its first message (saving
    a SavedModel does it), and that root handler would print each line again.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, _OURS, False)]:
        logger.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(stream if stream is not None else sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _OURS, True)
        logger.addHandler(handler)
    return logger


# Lines native code prints unconditionally during an export. The TFLite converter
# writes "fully_quantize: ..." through llvm::dbgs(), which neither TF_CPP_MIN_LOG_LEVEL
# nor absl's log level reaches; LiteRT announces its XNNPACK delegate the same way.
EXPORT_NOISE = ("fully_quantize: ", "INFO: Created TensorFlow Lite XNNPACK delegate")


@contextlib.contextmanager
def dropping_stderr_lines(prefixes):
    """Meanwhile, lines written to file descriptor 2 that start with one of `prefixes`
    are dropped; every other line passes through unchanged, so errors still show.

    Works on the descriptor, not on sys.stderr, because native libraries write there
    directly. Where stderr cannot be redirected, nothing is dropped.
    """
    prefixes = tuple(p.encode() for p in prefixes)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        saved = None
    if saved is None:
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if line.startswith(prefixes):
                    continue
                view = memoryview(line)
                try:
                    while view:
                        view = view[os.write(saved, view):]
                except OSError:  # stderr itself is gone: keep draining the pipe
                    pass

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to EOF
        # A child process that inherited the pipe could keep it open; do not hang on it.
        thread.join(timeout=10)
        if not thread.is_alive():
            os.close(saved)

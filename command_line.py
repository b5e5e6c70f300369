"""What the command-line tools share: their argument parser, and the line that reports a write that failed.

A mistake in the flags is one line on stderr and exit status 1, like every other user error of these tools (argparse
prints its usage block first and exits 2). A fault of the machine while writing an output (a full disk, a read-only
folder) is one line too, naming the file, the cause, what was kept and what to do.
"""

import argparse
import errno
import os

# what clears each cause; other causes (an I/O error, a folder deleted meanwhile) get the generic advice
REMEDIES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EFBIG: "lift the file size limit (ulimit -f, or the filesystem's own)",
    errno.EROFS: "make it writable",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
}


class UsageError(Exception):
    """A mistake in the command or the input: reported as one line, without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message}; run with --help for the flags\n")


def write_failed(path: str | os.PathLike, error: OSError, kept: str, then: str) -> str:
    """One line for a write of `path` that failed with `error`: `kept` says what is still whole, `then` how to go on
    once the cause is cleared. The error's own file name, when it has one, is more precise than `path`; a failed copy
    or rename names the file written second, after its source."""
    remedy = REMEDIES.get(error.errno, "check the path and its filesystem")
    where, cause = error.filename2 or error.filename or path, error.strerror or str(error)
    return f"cannot write {where}: {cause}; {kept}: {remedy} and {then}"

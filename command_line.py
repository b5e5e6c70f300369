"""What the command-line tools share: their argument parser, and the line that reports a write that failed.

A mistake in the flags is one line on stderr and exit status 1, like every other user error of these tools (argparse
prints its usage block first and exits 2). A fault of the machine while writing an output (a full disk, a read-only
folder) is one line too, naming the file, the cause, what was kept and what to do.
"""

import argparse
import contextlib
import errno
import os
import re
from pathlib import Path

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


# what torch.save's zip writer names in the RuntimeError it raises when a write fails (it keeps no error number):
# its class in TORCH_CHECK's messages, its source file in CAFFE_ENFORCE's
TORCH_WRITER_MARKS = ("PytorchStreamWriter", "inline_container.cc")


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


def write_fault(error: Exception) -> OSError | None:
    """The OSError behind a failed write, or None when `error` is something else. Not only OSError itself:
    safetensors (SafetensorError) and tokenizers raise errors ending in Rust's "(os error 28)", and torch.save a
    RuntimeError of its zip writer that carries no cause at all."""
    if isinstance(error, OSError):
        return error
    code = re.search(r"\(os error (\d+)\)", str(error))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if isinstance(error, RuntimeError) and any(mark in str(error) for mark in TORCH_WRITER_MARKS):
        return OSError(None, "torch.save stopped part-way without saying why")
    return None


def replace_file(path: Path, data: str | bytes) -> None:
    """Write `data` to a temporary file (one per process, so processes writing side by side never collide) and
    rename it over `path`: a write that fails leaves an earlier file whole and no temporary file behind."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            temporary.write_bytes(data)
        else:
            temporary.write_text(data)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):  # in a read-only folder there is nothing to remove, and removing fails
            temporary.unlink(missing_ok=True)

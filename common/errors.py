"""The one exception type for mistakes a user can fix.

The CLI prints ``str(error)`` as a single line (what is wrong, where, how to fix it) and exits
with ``error.exit_code``; no traceback. Anything else escaping is a bug in this project.
"""
import contextlib
import errno
import os


class UserError(Exception):
    """Bad input or an impossible request, reported as one line."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(message.split()))  # always one line
        if exit_code is not None:
            self.exit_code = exit_code


#: what the disk or the file system says when a file cannot be read or written, and the fix
_IO_FIXES = {
    errno.ENOSPC: "free space or choose another --output, then rerun the same command",
    errno.EDQUOT: "free space (disk quota) or choose another --output, then rerun the same command",
    errno.EFBIG: "choose an --output on a file system that takes files this large",
    errno.EIO: "the disk reported an I/O error: check it (e.g. dmesg) or choose another --output, "
               "then rerun the same command",
    errno.EROFS: "choose a writable --output",
    errno.EACCES: "check the permissions or choose another --output",
    errno.EPERM: "check the permissions or choose another --output",
}
IO_ERRNOS = frozenset(_IO_FIXES)


def io_error(e: OSError, path=None) -> UserError:
    """The one line for a file the disk would not read or write (``e.errno`` in IO_ERRNOS): the
    file (of a two-path call such as a copy or a rename, the destination ``e.filename2``; else
    ``e.filename``, else ``path``), what the system said, the fix. The CLI maps every such
    OSError here; exit status 2 like any input the user can fix."""
    where = next((w for w in (getattr(e, "filename2", None), e.filename, path) if w is not None),
                 None)
    what = (e.strerror or os.strerror(e.errno)) if e.errno else str(e)
    fix = _IO_FIXES.get(e.errno, "check the file system, then rerun the same command")
    return UserError(f"{where if where is not None else 'a file'}: {what}; {fix}")


@contextlib.contextmanager
def naming(path):
    """Give an OSError raised inside without a file name (a failed write(), fsync or close
    names none) ``path``, so that the one line says which file."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise

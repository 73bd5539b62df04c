"""What every lesson's commands share, from the first one on: bad input is one line and exit code 2, and a file
is written whole or not at all, so that an error or Ctrl-C never damages what is already there (notes.md §6, §7).

    DataError          a problem with the data that the user can fix: str(error) is the problem, then the fix
    one_line_errors    a command's bad input -> `error: <one line>` on stderr, exit code 2; tracebacks stay for bugs
    atomic_write       a temporary name beside the file, renamed into place when the block succeeds
"""

import hashlib
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DataError(Exception):
    """A problem with the data that the user can fix. str(error) is one line: the problem, then the fix."""


@contextmanager
def one_line_errors(*more):
    """Every lesson's commands: bad input (a DataError, a ValueError, a missing file, or one of `more`, later lessons'
    own errors) and Ctrl-C become `error: <one line>` on stderr and exit code 2. Tracebacks stay for bugs."""
    try:
        yield
    except (DataError, ValueError, FileNotFoundError, *more) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; files under their final names are whole", file=sys.stderr)
        sys.exit(2)


def exit_on_data_error(main):
    """Run a demo's main() under one_line_errors."""
    with one_line_errors():
        main()


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` (atomic: readers see the old file or the whole
    new one) if the block succeeds, delete it if not. Unique per call; not mkstemp (0600 whatever the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

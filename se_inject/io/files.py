"""Files on disk, read and written so that a user's data is never at risk.

- Reading: only regular files (never a device, a FIFO or a directory), up to a size cap, so a
  path in a recipe or on the command line cannot make se_inject read ``/dev/zero`` forever.
- Writing one file: to a temporary name beside it, then renamed over it (readers see the old or
  the new file, never half of one).
- Writing a directory (:func:`write_directory`): the whole new directory is built beside the
  target and renamed into place. An existing target is replaced only with ``force``, only if it
  holds nothing but files se_inject writes, and never when it is ``/``, the home directory, the
  working directory or one of its parents. On Linux the old and new directories are swapped in
  one ``renameat2(RENAME_EXCHANGE)``, so the target is never missing; an exclusive lock beside
  the target makes concurrent saves to one place fail cleanly instead of overwriting each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from se_inject.errors import ArtifactError, SEInjectError

MiB = 1 << 20


def as_path(value: object, what: str, error: type[SEInjectError] = ArtifactError) -> Path:
    """``value`` as a Path; a non-path or a path with a NUL byte is ``error`` naming ``what``."""
    if not isinstance(value, (str, os.PathLike)):
        raise error(f"{what}: expected a path, got {type(value).__name__}")
    text = os.fspath(value)
    if isinstance(text, bytes) or "\0" in text or not text:
        raise error(f"{what}: {text!r} is not a usable path (empty, bytes, or a NUL character)")
    return Path(text)


def read_regular_file(
    path: str | os.PathLike[str], *, limit: int, what: str, error: type[SEInjectError] = ArtifactError
) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; else ``error``."""
    path = as_path(path, what, error)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below refuses it anyway
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise error(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise error(f"{path}: the {what} is not a regular file (a device, pipe or directory cannot be read as one)")
    if info.st_size > limit:
        os.close(fd)
        raise error(f"{path}: the {what} is {info.st_size:,} bytes, over the {limit:,}-byte limit")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # the file grew while it was read
        raise error(f"{path}: the {what} is over the {limit:,}-byte limit")
    return data


def read_text_file(
    path: str | os.PathLike[str], *, limit: int, what: str, error: type[SEInjectError] = ArtifactError
) -> str:
    """:func:`read_regular_file`, decoded as UTF-8 (a binary file is ``error``)."""
    data = read_regular_file(path, limit=limit, what=what, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: the {what} is not UTF-8 text (byte {err.start}); is it a binary file?") from None


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it over ``path``; the file
    gets the user's umask, whatever mode the writer created it with (safetensors makes it private)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomic(path, write)


# --- whole directories ----------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux's renameat2; False where the system or the file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _protected(target: Path) -> str | None:
    """Why ``target`` may never be replaced (None: it may)."""
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == cwd:
        return "it is the working directory"
    if resolved in cwd.parents:
        return "it holds the working directory"
    return None


def check_target(target: Path, *, force: bool, owned: Collection[str], marker: str, what: str = "--save") -> bool:
    """Check that ``target`` may be written; True when it exists and will be replaced.

    A directory may be replaced only with ``force``, only if it is an se_inject directory (holds
    ``marker``) or empty, and only if every entry in it is one of the files se_inject writes
    (``owned``): se_inject never deletes what it did not write.
    """
    reason = _protected(target)
    if reason:
        raise ArtifactError(f"{what} {target}: refused, {reason}; give a new directory for the model")
    if os.path.islink(target):
        raise ArtifactError(f"{what} {target}: refused, it is a symbolic link; give the real directory")
    if not os.path.lexists(target):
        return False
    if not target.is_dir():
        raise ArtifactError(f"{what} {target}: exists and is not a directory; choose another path")
    if not force:
        raise ArtifactError(f"{target} already exists; choose another directory or pass force=True (CLI: --force)")
    try:
        entries = sorted(os.listdir(target))
    except OSError as err:
        raise ArtifactError(f"{what} {target}: cannot list it: {err.strerror or err}") from None
    if entries and marker not in entries:
        raise ArtifactError(
            f"{what} {target}: refused, it is not a directory se_inject wrote (it holds {', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); --force replaces only se_inject's own directories"
        )
    foreign = [e for e in entries if e not in owned or not (target / e).is_file() or (target / e).is_symlink()]
    if foreign:
        raise ArtifactError(
            f"{what} {target}: refused, it holds files se_inject did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); move them away or choose another directory"
        )
    return True


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """An exclusive lock for writing ``target``, held on a lock file beside it; a second writer fails at once.

    The lock file is removed afterwards only if this save created it (and it is still the same
    file): a file of that name the user made, or one a crashed save left, is locked but never deleted.
    """
    import fcntl

    lock_path = target.with_name(f".{target.name}.se_inject.lock")
    busy = f"{target}: another se_inject save to it is in progress; try again when it has finished"
    for _ in range(3):
        fd, created = _open_lock(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArtifactError(busy) from None
        try:  # the holder before us may have removed the file after we opened it: then lock the new one
            same = os.path.samestat(os.fstat(fd), os.lstat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise ArtifactError(busy)
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.lstat(lock_path)):
                    lock_path.unlink()
        os.close(fd)


def _open_lock(lock_path: Path) -> tuple[int, bool]:
    """A descriptor of the lock file, and whether this call created it."""
    flags = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o644), True
    except FileExistsError:
        pass
    except OSError as err:
        raise ArtifactError(f"{lock_path}: cannot create the lock file: {err.strerror or err}") from None
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NONBLOCK | flags)
    except FileNotFoundError:  # its owner removed it meanwhile: create it again
        return _open_lock(lock_path)
    except OSError as err:
        raise ArtifactError(f"{lock_path}: exists and cannot be used as a lock file: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{lock_path}: exists and is not a lock file; move it away and save again")
    return fd, False


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; the ones created, innermost first."""
    created: list[Path] = []
    for folder in [parent, *parent.parents]:
        if os.path.lexists(folder):
            break
        created.append(folder)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(f"{parent}: cannot create the directory: {err.strerror or err}") from None
    return created


def _umask() -> int:
    """The process's umask (read by setting it, and set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int, int]]:
    """What ``directory`` holds: each entry's inode, type, size and modification time."""
    found = {}
    for entry in os.scandir(directory):
        info = entry.stat(follow_symlinks=False)
        found[entry.name] = (info.st_ino, stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
    return found


def _describe_change(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    removed = sorted(set(before) - set(after))
    parts = [
        f"{what}: {', '.join(names[:3])}"
        for what, names in (("new", added), ("changed", changed), ("gone", removed))
        if names
    ]
    return "; ".join(parts)


def _swap(staging: Path, target: Path) -> Path:
    """Put ``staging`` at ``target`` and the old ``target`` aside; where the old directory now is."""
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return staging
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "dir"
    os.replace(target, aside)
    os.replace(staging, target)
    return aside


def _swap_back(old: Path, target: Path, staging: Path) -> None:
    """Undo :func:`_swap`: the old directory at ``target`` again, the new one at ``staging``."""
    if old == staging:
        _renameat2(old, target, _RENAME_EXCHANGE)
        return
    os.replace(target, staging)
    os.replace(old, target)
    old.parent.rmdir()


def _remove_old(old: Path, expected: dict[str, tuple[int, int, int, int]], staging: Path) -> None:
    """Delete the replaced directory: only the files the check saw, then the (empty) folder."""
    for name in expected:
        (old / name).unlink()
    try:
        old.rmdir()
    except OSError:  # something was written into it after the swap (through an open descriptor): kept
        import warnings

        warnings.warn(f"{old}: files written into the replaced directory during the save are kept there", stacklevel=4)
        return
    if old != staging:
        old.parent.rmdir()


def write_directory(
    target: str | os.PathLike[str],
    write: Callable[[Path], object],
    *,
    force: bool,
    owned: Collection[str],
    marker: str,
) -> Path:
    """Write a complete directory at ``target`` with ``write(staging)``; see the module docstring.

    An existing ``target`` is checked (:func:`check_target`) and its contents recorded; after the new
    directory is swapped in, the old one must hold exactly what was recorded, or the swap is undone
    and nothing is replaced: a file written into ``target`` while the model was written is never
    deleted. Only the recorded files are removed, one by one. The new directory gets the user's umask.
    """
    target = as_path(target, "--save")
    check_target(target, force=force, owned=owned, marker=marker)
    created = _make_parents(target.parent)
    staging: Path | None = None
    try:
        with _exclusive(target):
            # another save may have created the target while this one was checking
            replacing = check_target(target, force=force, owned=owned, marker=marker)
            expected = _snapshot(target) if replacing else {}
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.se_inject-", dir=target.parent))
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model is shared like any folder
            try:
                write(staging)
            except ArtifactError as err:  # named by the target, not by the staging folder it failed in
                raise ArtifactError(f"{target}: {err}; nothing was replaced") from None
            if not replacing:
                if not _renameat2(staging, target, _RENAME_NOREPLACE):
                    os.rename(staging, target)
                staging = None
            else:
                old = _swap(staging, target)
                found = _snapshot(old)
                if found != expected:
                    _swap_back(old, target, staging)
                    raise ArtifactError(
                        f"{target} changed while the model was being written ({_describe_change(expected, found)}); "
                        "nothing was replaced; save again when nothing else writes there"
                    )
                swapped, staging = staging, None
                _remove_old(old, expected, swapped)
    except FileExistsError:
        raise ArtifactError(f"{target} was created by another save while this one ran; nothing was replaced") from None
    except OSError as err:
        raise ArtifactError(f"{target}: cannot write the directory: {err.strerror or err}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # only what this save wrote
        if not target.exists():
            for folder in created:  # parents this save created for a directory that never came
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return target

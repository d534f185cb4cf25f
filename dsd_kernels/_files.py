"""Writing files so that a crash or a kill never leaves a half-written one: write beside the
target, then rename over it (atomic on POSIX and Windows within one file system)."""
from __future__ import annotations

import contextlib
import hashlib
import os


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """A temporary path beside `path` to write to; it replaces `path` when the block ends
    without error and is removed otherwise. suffix: e.g. ".png" where the writer picks the
    format from the name."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- checked checkpoints
class DamagedFile(ValueError):
    """A file that cannot be read back as written (digest mismatch, truncated, not a checkpoint)."""


def digest_path(path: str) -> str:
    """The sha256 of `path`, beside it, in `sha256sum -c` format."""
    return path + ".sha256"


def previous_path(path: str) -> str:
    """Where checked_torch_save(keep_previous=True) keeps the last good file."""
    root, ext = os.path.splitext(path)
    return f"{root}.previous{ext}"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checked_torch_save(obj, path: str, *, keep_previous: bool = False) -> None:
    """torch.save with a sha256 beside the file, of its bytes as read back from disk before it
    replaces anything (a rename moves those bytes unchanged). keep_previous: the file it replaces (and its digest) is kept as previous_path(path),
    so a damaged newest checkpoint leaves a good one to restart from. At every point of a kill
    `path` is either missing, or complete with its own digest, or fails its digest check."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        digest = sha256_of(tmp)
        if keep_previous and os.path.exists(path):
            os.replace(path, previous_path(path))
            if os.path.exists(digest_path(path)):
                os.replace(digest_path(path), digest_path(previous_path(path)))
        atomic_write_text(digest_path(path), f"{digest}  {os.path.basename(path)}\n")


def checked_torch_load(path: str):
    """torch.load(weights_only=True) of a file whose digest (where written) matches; any other
    file is a DamagedFile naming it."""
    import torch
    digest_file = digest_path(path)
    if os.path.exists(digest_file):
        with open(digest_file) as f:
            expected = (f.read().split() or [""])[0]
        found = sha256_of(path)
        if found != expected:
            raise DamagedFile(f"{path} is damaged: its sha256 is {found[:16]}... but {digest_file} says "
                              f"{expected[:16]}...")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: truncated, zeroed, not a zip
        raise DamagedFile(f"{path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def remove_checked(path: str) -> None:
    """Remove a checked file, its digest and its kept previous version."""
    for p in (path, digest_path(path), previous_path(path), digest_path(previous_path(path))):
        if os.path.exists(p):
            os.remove(p)

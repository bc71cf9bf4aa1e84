"""One writer per workdir: an exclusive lock that a writing run holds for its lifetime.

Two runs writing one workdir would interleave their checkpoints, `metrics.jsonl` and
`invocations.jsonl`. A writing mode (prepare, warmup, train, all, predict, and retrieval
while it still has warm-up to run) takes the lock before it writes anything; a second
writer stops with one line naming the holder. Reading modes (eval, retrieval after warm-up)
take no lock and read the newest complete checkpoint.

What it relies on: flock(2) on `<workdir>/.lock`. The kernel drops the lock when the
holding process ends, however it ends (kill -9, a crashed node), so the lock itself is
never stale. The file's content names the holder (host, pid, start time, mode) for the
message a second writer prints; content found by a process that did get the lock was left
by a holder that died before it could clear it, and is taken over with a warning.

- Local disks: flock is exact.
- NFS: Linux clients turn flock into an NFS byte-range lock, which the server arbitrates
  between hosts (NFSv4 natively; NFSv3 through the lock manager, so not on a mount with
  `nolock` or `local_lock=flock|all`, where each host only sees its own locks). A holder
  on a host that crashed keeps the lock until the server's lease expires (about 90 s).
- A file system that refuses locks (ENOLCK, EOPNOTSUPP; e.g. Lustre without `-o flock`):
  the holder file alone guards the workdir. A live holder on the same host is detected
  through its pid; one on another host cannot be told from a dead one, so it is refused
  too and the message says to delete the file if that run has ended.

Only process 0 of a multi-process run locks, for all of them (`sharding.is_main_process`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from cers_jax.errors import WorkdirError

LOCK_FILE = '.lock'
# Modes that write checkpoints, data or predictions (`retrieval` only while warm-up runs).
WRITING_MODES = frozenset(('prepare', 'warmup', 'train', 'all', 'predict'))
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def holder_record(mode: str) -> dict:
  """What the lock file says about this process."""
  return dict(host=socket.gethostname(), pid=os.getpid(), mode=mode,
              started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec='seconds'))


def describe(holder: dict) -> str:
  """'pid 12 on host h, mode train, started 2026-...' from a lock file's record."""
  if not holder:
    return 'a process that left no record'
  return (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")}, mode '
          f'{holder.get("mode", "?")}, started {holder.get("started", "?")}')


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode('utf-8', 'replace').strip()
  if not text:
    return {}
  try:
    record = json.loads(text)
  except ValueError:
    return {'unreadable': text[:200]}
  return record if isinstance(record, dict) else {'unreadable': text[:200]}


def _write_holder(fd: int, record: dict) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(record) + '\n').encode())
  os.fsync(fd)


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (OSError, ValueError, TypeError) as error:
    return isinstance(error, PermissionError)  # Alive, but someone else's.
  return True


def _in_use(path: str, workdir: str, holder: dict, how: str) -> WorkdirError:
  return WorkdirError(
      f'{workdir} is in use by another run ({describe(holder)}; {how} {path}). Wait for it '
      'to end or stop it, or use another --workdir; --mode eval and --mode retrieval may '
      'read its checkpoints meanwhile.')


class WorkdirLock:
  """The exclusive lock of one workdir, a context manager.

  Raises WorkdirError on entry when another process holds it; releasing clears the holder
  record but keeps the file (deleting it would let a process that opened the old file
  and one that creates a new one both hold "the" lock).
  """

  def __init__(self, workdir: str, mode: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.mode = mode
    self._fd: int | None = None

  def __enter__(self) -> 'WorkdirLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      self._acquire(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    return self

  def _acquire(self, fd: int) -> None:
    record = holder_record(self.mode)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise _in_use(self.path, self.workdir, _read_holder(fd), 'its lock:') from None
      if error.errno not in _UNSUPPORTED:
        raise
      self._acquire_without_flock(fd, record, error)
      return
    left = _read_holder(fd)
    if left:
      logging.warning('Taking over the lock of %s: it was left by %s, which no longer '
                      'holds it (the process ended without releasing it).', self.workdir,
                      describe(left))
    _write_holder(fd, record)

  def _acquire_without_flock(self, fd: int, record: dict, error: OSError) -> None:
    """The holder file alone, where the file system refuses flock."""
    left = _read_holder(fd)
    if left and left.get('host') == record['host'] and not _pid_alive(left.get('pid')):
      logging.warning('Taking over the lock of %s: %s no longer runs.', self.workdir,
                      describe(left))
    elif left:
      raise _in_use(self.path, self.workdir, left,
                    'this file system has no flock, so if that run has ended, delete')
    logging.warning('%s cannot be locked (%s): only the holder record in %s keeps a '
                    'second run out of this workdir.', self.workdir, os.strerror(error.errno),
                    self.path)
    _write_holder(fd, record)

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    finally:
      os.close(self._fd)  # Closing the descriptor releases the flock.
      self._fd = None

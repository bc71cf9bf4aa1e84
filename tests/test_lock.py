"""The workdir lock: one writer at a time, a holder that is named, a stale record taken over."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from cers_jax.errors import WorkdirError
from cers_jax.training import lock
from cers_jax.training import loop


def _record(workdir):
  with open(os.path.join(workdir, lock.LOCK_FILE)) as f:
    text = f.read()
  return json.loads(text) if text.strip() else {}


def test_a_second_lock_is_refused_and_names_the_holder(tmp_path):
  with lock.WorkdirLock(str(tmp_path), 'train'):
    held = _record(tmp_path)
    assert held['pid'] == os.getpid() and held['mode'] == 'train'
    assert held['host'] == socket.gethostname()
    # flock conflicts between two open files of one process too, so this is a real second
    # writer as far as the kernel is concerned.
    with pytest.raises(WorkdirError) as refused:
      with lock.WorkdirLock(str(tmp_path), 'prepare'):
        pass
    message = str(refused.value)
    assert f'pid {os.getpid()}' in message and 'mode train' in message
    assert held['started'] in message and 'another --workdir' in message
    assert _record(tmp_path) == held  # The refused writer did not touch the record.
  assert _record(tmp_path) == {}  # Released: the record is cleared, the file kept.
  with lock.WorkdirLock(str(tmp_path), 'all'):
    assert _record(tmp_path)['mode'] == 'all'


def test_a_lock_held_by_another_process_is_refused(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\n'
       'from cers_jax.training import lock\n'
       f'with lock.WorkdirLock({str(tmp_path)!r}, "train"):\n'
       '  print("held", flush=True); sys.stdin.read()'],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(WorkdirError, match=f'pid {holder.pid} on host'):
      with lock.WorkdirLock(str(tmp_path), 'train'):
        pass
  finally:
    holder.communicate('', timeout=60)
  # The holder ended, so the kernel dropped its lock: the workdir is free again.
  with lock.WorkdirLock(str(tmp_path), 'train'):
    pass


def test_a_record_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  left = dict(host='elsewhere', pid=4242, mode='train', started='2026-01-01T00:00:00+00:00')
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps(left))
  with caplog.at_level('WARNING'):
    with lock.WorkdirLock(str(tmp_path), 'train'):
      assert _record(tmp_path)['pid'] == os.getpid()
  assert 'Taking over the lock' in caplog.text and 'pid 4242 on host elsewhere' in caplog.text


@pytest.fixture
def no_flock(monkeypatch):
  def refuse(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(lock.fcntl, 'flock', refuse)


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_without_flock_the_record_alone_guards_the_workdir(tmp_path, no_flock, caplog):
  path = tmp_path / lock.LOCK_FILE
  host = socket.gethostname()
  path.write_text(json.dumps(dict(host=host, pid=_dead_pid(), mode='train', started='t')))
  with caplog.at_level('WARNING'):
    with lock.WorkdirLock(str(tmp_path), 'train'):  # Same host, dead pid: taken over.
      assert _record(tmp_path)['pid'] == os.getpid()
  assert 'no longer runs' in caplog.text and 'cannot be locked' in caplog.text
  for holder in (dict(host=host, pid=os.getppid()), dict(host='other-node', pid=1)):
    path.write_text(json.dumps(dict(holder, mode='train', started='t')))
    with pytest.raises(WorkdirError, match='if that run has ended, delete'):
      with lock.WorkdirLock(str(tmp_path), 'train'):
        pass


def test_which_modes_write(tmp_path):
  for mode in ('prepare', 'warmup', 'train', 'all', 'predict'):
    assert loop._writes(str(tmp_path), mode)
  assert not loop._writes(str(tmp_path), 'eval')
  # No checkpoint yet: retrieval runs warm-up first, so it writes.
  assert loop._writes(str(tmp_path), 'retrieval')

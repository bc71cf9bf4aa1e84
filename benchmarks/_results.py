"""One JSON file of a benchmark's results, rewritten whole after every item.

A device call can be killed at its time limit at any moment (scripts/gpu_run.sh); whatever
finished by then must already be on disk, as valid JSON. `JsonResults(path, meta)` writes
`{"meta": ..., "items": [...], "complete": false}` at once, `add(item)` appends an item and
rewrites the file (a temporary file renamed over it, so a reader never sees half of one),
and `finish(**extra)` adds the closing fields and sets `complete`. With an empty path it
writes nothing, so a benchmark needs no branch.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


class JsonResults:

  def __init__(self, path: str, meta: dict[str, Any]):
    self.path = path
    self.data: dict[str, Any] = dict(meta=dict(meta, started=time.strftime(
        '%Y-%m-%dT%H:%M:%S%z')), items=[], complete=False)
    self._write()

  def add(self, item: dict[str, Any]) -> None:
    self.data['items'].append(item)
    self._write()

  def finish(self, **extra: Any) -> None:
    self.data.update(extra, complete=True)
    self._write()

  def _write(self) -> None:
    if not self.path:
      return
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f'.{os.path.basename(self.path)}.tmp')
    with open(temporary, 'w') as f:
      json.dump(self.data, f, indent=2)
    os.replace(temporary, self.path)

"""Loading converted numpy weights into an nnx.Module by state path.

Converters map checkpoint names onto '/'-joined nnx state paths relative to the module they
fill (e.g. 'stages/0/1/dwconv/kernel'); `load_into` checks names and shapes and fails with
the complete list of problems, so a wrong checkpoint is caught at load time rather than as
a silently half-random model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

_LIST_LIMIT = 20


class WeightLoadError(ValueError):
  """Raised when a checkpoint does not fit the module (strict loading)."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What a load did: module paths loaded or missing (missing ones keep their init), given names
  that are not module paths, (path, checkpoint shape, module shape) mismatches, and
  checkpoint names the converter skipped on purpose (heads, buffers).
  """
  loaded: tuple[str, ...] = ()
  missing: tuple[str, ...] = ()
  unexpected: tuple[str, ...] = ()
  shape_mismatch: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
  ignored: tuple[str, ...] = ()

  @property
  def ok(self) -> bool:
    """True when every module path was loaded and every given tensor used."""
    return not (self.missing or self.unexpected or self.shape_mismatch)

  def summary(self) -> str:
    return (f'loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected '
            f'{len(self.unexpected)}, shape mismatch {len(self.shape_mismatch)}, ignored '
            f'{len(self.ignored)}')


def _path_str(path: Iterable[object]) -> str:
  return '/'.join(str(p) for p in path)


def _loadable_state(module: nnx.Module) -> nnx.State:
  # RNG keys and counters are run state, not weights.
  return nnx.state(module, nnx.Not(nnx.RngState))


def nnx_paths(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Every loadable variable of `module` as '/'-joined path -> shape."""
  return {_path_str(path): tuple(var.shape)
          for path, var in nnx.to_flat_state(_loadable_state(module))}


def _listing(title: str, names: list[str]) -> str:
  shown = names[:_LIST_LIMIT]
  more = f' ... and {len(names) - len(shown)} more' if len(names) > len(shown) else ''
  return f'  {title} ({len(names)}): ' + ', '.join(shown) + more


def _error_message(report: LoadReport, source: str, module: nnx.Module,
                   strict: bool) -> str:
  verb = 'does not fit' if strict else 'only partly fits'
  lines = [f'{source}: the checkpoint {verb} {type(module).__name__} ({report.summary()}).']
  if report.missing:
    lines.append(_listing('missing from the checkpoint', list(report.missing)))
  if report.unexpected:
    lines.append(_listing('unexpected in the checkpoint', list(report.unexpected)))
  if report.shape_mismatch:
    lines.append(_listing('shape mismatch (checkpoint vs module)', [
        f'{p} {tuple(a)} vs {tuple(b)}' for p, a, b in report.shape_mismatch]))
  if strict:
    lines.append('Check that the model config (depths/dims/hidden sizes) matches the '
                 'checkpoint, or load with strict=False to keep what does not fit at its '
                 'initial values.')
  return '\n'.join(lines)


def load_into(module: nnx.Module, weights: Mapping[str, np.ndarray], *, strict: bool = True,
              source: str = '<weights>', ignored: Iterable[str] = ()) -> LoadReport:
  """Copies `weights` ('/'-joined nnx path -> array in JAX layout) into `module`, in place.

  Params and batch statistics are filled; each tensor is cast to its variable's dtype. With
  `strict`, any missing, unexpected or mis-shaped tensor raises `WeightLoadError` and nothing
  is loaded; otherwise what fits is loaded and the rest logged. `source` names the
  checkpoint in messages; `ignored` is carried into the report.
  """
  state = _loadable_state(module)
  flat = nnx.to_flat_state(state)
  targets = {_path_str(path): var for path, var in flat}
  loaded, missing, mismatch = [], [], []
  for name, var in targets.items():
    if name not in weights:
      missing.append(name)
      continue
    given = tuple(np.shape(weights[name]))
    if given != tuple(var.shape):
      mismatch.append((name, given, tuple(var.shape)))
    else:
      loaded.append(name)
  unexpected = sorted(set(weights) - set(targets))
  report = LoadReport(loaded=tuple(loaded), missing=tuple(missing),
                      unexpected=tuple(unexpected), shape_mismatch=tuple(mismatch),
                      ignored=tuple(ignored))
  if strict and not report.ok:
    raise WeightLoadError(_error_message(report, source, module, strict=True))
  for name in loaded:
    var = targets[name]
    var.set_value(jnp.asarray(weights[name], dtype=var.dtype))
  nnx.update(module, state)
  if not report.ok:
    logging.warning('%s', _error_message(report, source, module, strict=False))
  logging.info('%s -> %s: %s', source, type(module).__name__, report.summary())
  return report


def find_prefix(sd: Mapping[str, object], marker: str, *, prefix: str | None = None,
                what: str, source: str) -> str:
  """The key prefix ('' at the root) under which a sub-model sits in a state dict.

  `marker` is a name only this sub-model has, relative to its root (e.g.
  'embeddings.word_embeddings.weight'); an explicit `prefix` is only checked. Raises
  `WeightLoadError` for no or several candidates, or a `prefix` without the marker.
  """
  if prefix is not None:
    if prefix + marker not in sd:
      raise WeightLoadError(f'{source}: no {prefix}{marker}; the given prefix {prefix!r} '
                            f'does not hold a {what}.')
    return prefix
  found = sorted(k[:-len(marker)] for k in sd
                 if k.endswith(marker) and (k == marker or k[:-len(marker)].endswith('.')))
  if len(found) == 1:
    return found[0]
  if not found:
    raise WeightLoadError(f'{source}: no key ending in {marker!r}, so this is not a {what} '
                          'checkpoint (or uses a naming this loader does not know).')
  raise WeightLoadError(f'{source}: several {what}s in this checkpoint (prefixes {found}); '
                        'pass prefix=... to choose one.')

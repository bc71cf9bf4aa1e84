"""Loading converted numpy weights into an nnx.Module by state path.

Every converter maps checkpoint names onto '/'-joined nnx state paths relative to the
module it fills (e.g. 'stages/0/1/dwconv/kernel') and hands the result to `load_into`,
which checks names and shapes and fails with the complete list of problems, so a wrong
checkpoint is caught at load time rather than as a silently half-random model.
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
  """What a load did.

  Attributes:
    loaded: module paths that received a tensor.
    missing: module paths no tensor was given for (they keep their init).
    unexpected: given names that are not module paths (not loaded).
    shape_mismatch: (path, checkpoint shape, module shape) triples (not loaded).
    ignored: checkpoint names the converter deliberately skipped (heads, buffers).
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
    """One line of counts."""
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
  """Copies `weights` into `module`'s variables (Params and batch statistics), in place.

  Each tensor is cast to the variable's dtype (parameters keep their dtype whatever the
  checkpoint's).

  Args:
    module: the module to fill.
    weights: '/'-joined nnx state path (relative to `module`) -> array in JAX layout.
    strict: raise on any missing, unexpected or mis-shaped tensor (nothing is loaded
      then); when False, load what fits and log a warning summary.
    source: the checkpoint's name for messages (usually its path).
    ignored: checkpoint names the converter skipped on purpose, carried into the report.

  Returns:
    A LoadReport.

  Raises:
    WeightLoadError: strict and the checkpoint does not fit.
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
  """The key prefix under which a sub-model sits in a state dict.

  Args:
    sd: state dict.
    marker: a name only this sub-model has, relative to its root (e.g.
      'embeddings.word_embeddings.weight').
    prefix: an explicit prefix (with its trailing dot, '' for none); only checked.
    what: the sub-model's name for messages.
    source: the checkpoint's name for messages.

  Returns:
    The prefix, '' when the sub-model is at the root.

  Raises:
    WeightLoadError: no or several candidates, or `prefix` does not hold the marker.
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

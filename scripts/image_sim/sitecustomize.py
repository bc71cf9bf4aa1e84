"""Makes this Python import only what the GPU image has (scripts/gpu_preflight.py).

Python imports `sitecustomize` at start-up from the first folder of PYTHONPATH that holds
one; scripts/gpu_preflight.py puts this folder there, so every process of the dry run
(pytest, run.py, the benchmarks, grain's workers) starts with the finder below in front of
the usual ones. A module found in the environment's site-packages is allowed only when its
distribution is on the image's list ($CERS_IMAGE_PACKAGES, one name per line: the project's
scripts/gpu_image.txt); anything else fails as it would on the image, with
ModuleNotFoundError. The standard library, the repository's own code and the wheels that
travel (installed for the run into a folder on PYTHONPATH, as on the device) are found as
usual; a travelling package whose wheel is missing is refused like any other.

Only imports made outside site-packages are checked: by the project, the travelling wheels,
the standard library (`python -m`) or a script. What an installed library imports for
itself is its own business: the image's versions of those libraries have their own
requirements installed, while this environment's newer ones may need packages the image
has no use for (this environment's huggingface_hub imports httpx2; the image's does not). Names the environment has for version drift only, outside
the list, are allowed by $CERS_IMAGE_ALLOW (comma-separated distribution names).
"""

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import sys
import sysconfig


_IMPORTLIB = os.path.dirname(importlib.__file__)


def _canonical(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _names_in(path: str) -> set[str]:
  names = set()
  with open(path) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line:
        names.add(_canonical(re.split(r'[=<>!~ \[;]', line, 1)[0]))
  return names


class ImageFinder(importlib.abc.MetaPathFinder):
  """Refuses top-level modules whose distribution the image lacks."""

  def __init__(self, allowed: set[str], site_dirs: list[str]):
    self.allowed = allowed
    self.site_dirs = [os.path.realpath(d) + os.sep for d in site_dirs]
    self._distributions = None

  def _owners(self, name: str) -> list[str]:
    if self._distributions is None:
      self._distributions = importlib.metadata.packages_distributions()
    return [_canonical(d) for d in self._distributions.get(name, [])]

  def _from_site_packages(self) -> bool:
    """Whether the import statement being run is in an installed library's code."""
    frame = sys._getframe(2)  # pylint: disable=protected-access
    while frame is not None:
      filename = frame.f_code.co_filename
      if not (filename.startswith('<frozen importlib') or filename.startswith(_IMPORTLIB)):
        return any(os.path.realpath(filename).startswith(d) for d in self.site_dirs)
      frame = frame.f_back
    return False

  def find_spec(self, fullname, path=None, target=None):
    if path is not None or fullname in sys.stdlib_module_names:
      return None  # Submodules follow their package; the standard library is there.
    if self._from_site_packages():
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname)
    if spec is None or not spec.origin:
      return None
    origin = os.path.realpath(spec.origin)
    if not any(origin.startswith(d) for d in self.site_dirs):
      return None  # The repository, or a wheel installed for the run on PYTHONPATH.
    owners = self._owners(fullname)
    if owners and not any(o in self.allowed for o in owners):
      raise ModuleNotFoundError(
          f"No module named '{fullname}' (the GPU image has no {' or '.join(owners)}: "
          'scripts/gpu_preflight.py simulates it; bring it as a wheel, '
          'scripts/gpu_wheels.txt)', name=fullname)
    return None


def _install() -> None:
  packages = os.environ.get('CERS_IMAGE_PACKAGES')
  if not packages:
    return
  allowed = _names_in(packages)
  allowed |= {_canonical(n) for n in os.environ.get('CERS_IMAGE_ALLOW', '').split(',') if n}
  site_dirs = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
  sys.meta_path.insert(0, ImageFinder(allowed, sorted(site_dirs)))


_install()

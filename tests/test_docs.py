"""Every reference to docs/design.md names a section (or habit) that the page has.

Docstrings cite "docs/design.md section N", "docs/design.md sections N and M" (or "N-M",
"N, M") and "docs/design.md, habit N"; references to design, style or brief files outside
the repository (the pattern `STALE`) must not come back.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = ROOT / 'docs' / 'design.md'
SEARCHED = ('cers_jax', 'configs', 'benchmarks', 'scripts', 'examples', 'tests')
SUFFIXES = ('.py', '.md', '.sh')
SECTION_REF = re.compile(r'docs/design\.md,? sections? (\d+(?:\s*(?:-|–|,|and)\s*\d+)*)')
HABIT_REF = re.compile(r'docs/design\.md, habits? (\d+(?:\s*(?:-|,|and)\s*\d+)*)')
# Assembled so that this file does not match its own patterns.
STALE = re.compile('|'.join(['DESIGN' + r'\.md', 'STYLE' + r' habit', 'STYLE' + r'\.md',
                             '/work/' + 'briefs']))


def _numbers(text: str) -> list[int]:
  """'9 and 12' -> [9, 12]; '2-9' -> [2, ..., 9]."""
  out = []
  for part in re.split(r'\s*(?:,|and)\s*', text.strip()):
    bounds = [int(x) for x in re.split(r'\s*[-–]\s*', part) if x]
    out.extend(range(bounds[0], bounds[-1] + 1))
  return out


def _design_sections() -> set[int]:
  return {int(m) for m in re.findall(r'^## (\d+)\. ', DESIGN.read_text(), re.M)}


def _design_habits() -> set[int]:
  text = DESIGN.read_text()
  start = re.search(r'^## \d+\. Code habits$', text, re.M)
  assert start, 'docs/design.md has no "Code habits" section'
  body = text[start.end():]
  end = re.search(r'^## ', body, re.M)
  body = body[:end.start()] if end else body
  return {int(m) for m in re.findall(r'^(\d+)\. ', body, re.M)}


def _files() -> list[pathlib.Path]:
  files = [ROOT / 'README.md']
  for folder in SEARCHED:
    files.extend(p for p in sorted((ROOT / folder).rglob('*'))
                 if p.suffix in SUFFIXES and p.is_file() and 'fixtures' not in p.parts)
  return files


def _text(path: pathlib.Path) -> str:
  # Docstrings wrap lines: a citation may continue on the next line after its indent.
  return re.sub(r'\s*\n\s*', ' ', path.read_text(encoding='utf-8', errors='replace'))


def test_sections_are_numbered_in_order():
  numbers = [int(m) for m in re.findall(r'^## (\d+)\. ', DESIGN.read_text(), re.M)]
  assert numbers == list(range(1, len(numbers) + 1))
  assert re.search(r"^## \d+\. Deliberate differences from the authors' code$",
                   DESIGN.read_text(), re.M)


@pytest.mark.parametrize('kind', ['section', 'habit'])
def test_every_citation_resolves(kind):
  pattern, known = ((SECTION_REF, _design_sections()) if kind == 'section'
                    else (HABIT_REF, _design_habits()))
  assert known
  missing, cited = [], 0
  for path in _files():
    for match in pattern.finditer(_text(path)):
      for number in _numbers(match.group(1)):
        cited += 1
        if number not in known:
          missing.append(f'{path.relative_to(ROOT)}: {match.group(0)!r} ({kind} {number})')
  assert cited, f'no docs/design.md {kind} citations found at all'
  assert not missing, f'{kind}s cited but not in docs/design.md:\n' + '\n'.join(missing)


def test_no_reference_outside_the_repository():
  stale = []
  for path in _files():
    for line_no, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
      if STALE.search(line):
        stale.append(f'{path.relative_to(ROOT)}:{line_no}: {line.strip()}')
  assert not stale, ('references to files outside the repository (cite docs/design.md '
                     'instead):\n' + '\n'.join(stale))


def test_numbers_parser():
  assert _numbers('9 and 12') == [9, 12]
  assert _numbers('2-9') == list(range(2, 10))
  assert _numbers('10, 12') == [10, 12]

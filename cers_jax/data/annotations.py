"""Report-text and chain-of-thought annotation files (docs/design.md section 10).

Reads the CSVs the CERS authors published (image,text and image,cot) and LViT's text
workbooks (Image,Description, on whichever sheet has such columns) into entries keyed by
sample id. The authors' files have quirks this parser survives and reports instead of hiding:
a UTF-8 byte-order mark, CRLF records holding LF-separated multi-line quoted fields, CoTs
cut off before all four parts (Texture, Boundary, Context, Summary), a row whose parts read
'Step 1 Texture:', and garbled characters (U+FFFD, stray Hangul, '?' in place of a lost
character). Every such finding is a `Problem` with file, line and id; rows are never dropped
silently.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import os
import re
from typing import Any

from cers_jax.data.images import id_from_name
from cers_jax.data.records import DataError, Problem

COT_PARTS = ('Texture', 'Boundary', 'Context', 'Summary')

# Accepted header names (compared case-insensitively): (key columns, value columns).
KIND_COLUMNS = {
    'text': (('image', 'image_name', 'filename', 'file', 'name'),
             ('text', 'description', 'report')),
    'cot_mask': (('image', 'image_name', 'filename', 'file', 'name'), ('cot',)),
    'cot_no_mask': (('image', 'image_name', 'filename', 'file', 'name'), ('cot',)),
}

_UTF8_BOM = b'\xef\xbb\xbf'

# A CoT part header at the start of a line, optionally decorated ('**Texture**:', '- ') or
# numbered ('Step 1 Texture:'); the 'prefix' group catches what deviates from 'Texture:'.
_PART_RE = re.compile(
    r'^[ \t]*(?P<prefix>(?:[-*#>]+[ \t]*)?(?:step[ \t]*\d+[ \t]*[:.)-]?[ \t]*)?(?:\*\*)?)'
    r'(?P<part>texture|boundary|context|summary)(?:\*\*)?[ \t]*:',
    re.IGNORECASE | re.MULTILINE)

_GARBLE_CHECKS = (
    (re.compile('\ufffd'), 'U+FFFD replacement character'),
    (re.compile('[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac'), 'mojibake (UTF-8 read as cp1252)'),
    (re.compile('[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u4e00-\u9fff\uac00-\ud7af]'),
     'CJK/Hangul characters'),
    (re.compile(r'[A-Za-z]\?[A-Za-z]'), "'?' inside a word (a lost character)"),
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One annotation: the value for sample `id`, from `file` at `line`."""

  id: str
  value: str
  file: str
  line: int


@dataclasses.dataclass
class AnnotationFile:
  """A parsed annotation file.

  `kind` is 'text' | 'cot_mask' | 'cot_no_mask'; `entries` hold the first entry per id in
  file order; `rows` counts data records (blank lines not counted); `encoding` is 'utf-8' or
  the fallback used when the file is not valid UTF-8; `sheet` is '' for CSV files.
  """

  path: str
  kind: str
  entries: dict[str, Entry]
  rows: int
  bom: bool
  encoding: str
  problems: list[Problem]
  sheet: str = ''

  def summary(self) -> dict[str, Any]:
    """Counts for report.json."""
    return {'path': self.path, 'kind': self.kind, 'rows': self.rows,
            'entries': len(self.entries), 'bom_stripped': self.bom, 'encoding': self.encoding,
            'problems': dict(collections.Counter(p.kind for p in self.problems)),
            **({'sheet': self.sheet} if self.sheet else {})}


def _decode(raw: bytes) -> tuple[str, bool, str]:
  """Text of a CSV file, whether it had a BOM, and the encoding used."""
  bom = raw.startswith(_UTF8_BOM)
  if bom:
    raw = raw[len(_UTF8_BOM):]
  for encoding in ('utf-8', 'cp1252', 'latin-1'):
    try:
      return raw.decode(encoding), bom, encoding
    except UnicodeDecodeError:
      continue
  raise AssertionError('latin-1 decodes any bytes')


def _read_csv(path: str) -> tuple[list[str], list[tuple[int, list[str]]], bool, str]:
  with open(path, 'rb') as f:
    text, bom, encoding = _decode(f.read())
  first_line = text.split('\n', 1)[0]
  delimiter = ','
  if ',' not in first_line:
    delimiter = next((d for d in ('\t', ';') if d in first_line), ',')
  # newline='' keeps CRLF record ends and LF inside quoted fields as the csv module wants.
  reader = csv.reader(io.StringIO(text, newline=''), delimiter=delimiter)
  records = []
  start = 1
  try:
    for fields in reader:
      if any(field.strip() for field in fields):
        records.append((start, fields))
      start = reader.line_num + 1
  except csv.Error as e:
    raise DataError(f'{path} line {start}: cannot parse CSV ({e}). Fix the quoting there.'
                    ) from e
  if not records:
    raise DataError(f'{path} is empty: expected a header row and one row per image.')
  header = [h.strip() for h in records[0][1]]
  return header, records[1:], bom, encoding


SPREADSHEET_EXTENSIONS = ('.xlsx', '.xlsm', '.xls')


def is_spreadsheet(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in SPREADSHEET_EXTENSIONS


def sheet_headers(path: str) -> dict[str, list[str]]:
  """{sheet name: header row} of every sheet of a workbook, in workbook order."""
  import pandas as pd  # Only spreadsheets need pandas (openpyxl behind it).

  try:
    with pd.ExcelFile(path) as book:
      return {str(name): [str(c).strip() for c in pd.read_excel(book, sheet_name=name,
                                                                 nrows=0).columns]
              for name in book.sheet_names}
  except Exception as e:  # pandas/openpyxl raise many types for a bad workbook.
    raise DataError(f'Cannot read spreadsheet {path}: {e}. Is it a valid .xlsx file?'
                    ) from e


def has_columns(header: list[str], kind: str) -> bool:
  """Whether a header row has the key and value columns of annotation `kind`."""
  key_names, value_names = KIND_COLUMNS[kind]
  return (_column_index(header, key_names) is not None
          and _column_index(header, value_names) is not None)


def _first_sheet(headers: dict[str, list[str]], kind: str) -> str | None:
  return next((name for name, header in headers.items() if has_columns(header, kind)), None)


def _read_spreadsheet(path: str, sheet: str | int = 0
                      ) -> tuple[list[str], list[tuple[int, list[str]]], bool, str]:
  import pandas as pd  # Only spreadsheets need pandas (openpyxl behind it).

  try:
    frame = pd.read_excel(path, sheet_name=sheet, dtype=str, header=0)
  except Exception as e:  # pandas/openpyxl raise many types for a bad workbook.
    raise DataError(f'Cannot read spreadsheet {path}: {e}. Is it a valid .xlsx file?'
                    ) from e
  frame = frame.fillna('')
  header = [str(c).strip() for c in frame.columns]
  # Spreadsheet row numbers as a user sees them: row 1 is the header.
  records = [(i + 2, [str(v) for v in row]) for i, row in enumerate(frame.itertuples(
      index=False, name=None))]
  return header, records, False, 'xlsx'


def read_table(path: str, sheet: str | int = 0
               ) -> tuple[list[str], list[tuple[int, list[str]]], bool, str]:
  """Reads a CSV/TSV or .xlsx table: (header, [(line, fields), ...], bom_stripped, encoding).

  `line` is the first physical line of a CSV record or the spreadsheet row number.
  """
  if not os.path.isfile(path):
    raise DataError(f'Annotation file {path} does not exist. Fix the path in the config.')
  if is_spreadsheet(path):
    return _read_spreadsheet(path, sheet)
  return _read_csv(path)


def _column_index(header: list[str], names: tuple[str, ...]) -> int | None:
  lowered = [h.lower().lstrip('\ufeff').strip() for h in header]
  return next((lowered.index(name) for name in names if name in lowered), None)


def _find_column(header: list[str], names: tuple[str, ...], path: str, role: str) -> int:
  index = _column_index(header, names)
  if index is not None:
    return index
  raise DataError(
      f'{path} has no {role} column: found columns {header}, expected one of '
      f'{list(names)} (case-insensitive). Rename the header row.')


def cot_parts(cot: str) -> tuple[list[str], bool]:
  """The CoT parts present in `cot` (in canonical order) and whether any header deviates.

  A part counts when its header ('Texture:' ...) starts a line and some text follows it
  before the next part or the end.
  """
  found: dict[str, bool] = {}
  matches = list(_PART_RE.finditer(cot))
  nonstandard = False
  for i, m in enumerate(matches):
    end = matches[i + 1].start() if i + 1 < len(matches) else len(cot)
    if cot[m.end():end].strip():
      found[m.group('part').capitalize()] = True
    nonstandard |= bool(m.group('prefix').strip())
  return [p for p in COT_PARTS if p in found], nonstandard


def garbled_reasons(text: str) -> list[str]:
  """Why `text` looks garbled (empty when it looks clean)."""
  return [reason for pattern, reason in _GARBLE_CHECKS if pattern.search(text)]


def _check_value(kind: str, entry: Entry) -> list[Problem]:
  problems = []
  reasons = garbled_reasons(entry.value)
  if reasons:
    problems.append(Problem('garbled_text', entry.file, entry.line, entry.id,
                            '; '.join(reasons)))
  if kind.startswith('cot'):
    parts, nonstandard = cot_parts(entry.value)
    if len(parts) < len(COT_PARTS):
      missing = [p for p in COT_PARTS if p not in parts]
      problems.append(Problem('truncated_cot', entry.file, entry.line, entry.id,
                              f'has {parts or "no parts"}, missing {missing}; kept as is'))
    if nonstandard:
      problems.append(Problem('nonstandard_cot_prefix', entry.file, entry.line, entry.id,
                              'part headers are not plain "Texture:" ...; kept as is'))
  return problems


def _annotation_sheet(path: str, kind: str) -> str | int:
  """The sheet to read `kind` from: the first with its columns (CSV files: 0)."""
  if not (is_spreadsheet(path) and os.path.isfile(path)):
    return 0
  headers = sheet_headers(path)
  sheet = _first_sheet(headers, kind)
  if sheet is None and len(headers) > 1:
    key_names, value_names = KIND_COLUMNS[kind]
    raise DataError(f'{path} has no sheet with {kind} columns: found {headers}, expected an '
                    f'image-name column (one of {list(key_names)}) and a value column (one '
                    f'of {list(value_names)}), case-insensitive. Rename a header row.')
  return 0 if sheet is None else sheet


def read_annotations(path: str, kind: str) -> AnnotationFile:
  """Parses a text or CoT annotation file (.csv with ',', ';' or tab, or .xlsx) by sample id.

  Ids are image stems ('x.jpg' and 'x' are both id 'x'). Values are stripped and CRLF inside
  them becomes LF. Duplicated ids keep the first entry; empty values are not entries. Both
  are reported, as are garbled values and CoTs lacking some of the four parts. A DataError
  for missing columns lists the columns found.
  """
  if kind not in KIND_COLUMNS:
    raise DataError(f'Unknown annotation kind {kind!r}; expected one of {list(KIND_COLUMNS)}.')
  sheet = _annotation_sheet(path, kind)
  header, records, bom, encoding = read_table(path, sheet)
  key_names, value_names = KIND_COLUMNS[kind]
  key_col = _find_column(header, key_names, path, 'image-name')
  value_col = _find_column(header, value_names, path, f'{kind} value')
  problems: list[Problem] = []
  if encoding not in ('utf-8', 'xlsx'):
    problems.append(Problem('encoding_fallback', path, 0, '',
                            f'not valid UTF-8; decoded as {encoding}'))
  entries: dict[str, Entry] = {}
  for line, fields in records:
    if len(fields) <= max(key_col, value_col):
      problems.append(Problem('malformed_row', path, line, '',
                              f'{len(fields)} fields, header has {len(header)}; skipped'))
      continue
    value = fields[value_col]
    if len(fields) > len(header) and value_col == len(header) - 1:
      # An unquoted comma inside the last column: keep the whole value.
      value = ','.join(fields[value_col:])
      problems.append(Problem('extra_fields', path, line, id_from_name(fields[key_col]),
                              'unquoted commas in the last column; fields re-joined'))
    sample_id = id_from_name(fields[key_col])
    if not sample_id:
      problems.append(Problem('empty_id', path, line, '', 'no image name; skipped'))
      continue
    value = value.replace('\r\n', '\n').replace('\r', '\n').strip()
    if not value:
      problems.append(Problem('empty_value', path, line, sample_id, f'empty {kind}; skipped'))
      continue
    if sample_id in entries:
      problems.append(Problem('duplicate_id', path, line, sample_id,
                              f'first seen at line {entries[sample_id].line}; kept the first'))
      continue
    entry = Entry(sample_id, value, path, line)
    entries[sample_id] = entry
    problems.extend(_check_value(kind, entry))
  return AnnotationFile(path, kind, entries, len(records), bom, encoding, problems,
                        sheet if isinstance(sheet, str) else '')


def read_label_column(path: str, column: str) -> dict[str, str]:
  """{id: value} of one column of a table keyed by image name (retrieval-report labels)."""
  header, records, _, _ = read_table(path)
  key = _find_column(header, KIND_COLUMNS['text'][0], path, 'image')
  value = _find_column(header, (column.lower(),), path, f'label ({column!r})')
  return {id_from_name(fields[key].strip()): fields[value].strip()
          for _, fields in records if len(fields) > max(key, value) and fields[key].strip()}

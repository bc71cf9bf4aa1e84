"""Tests for cers_jax.data.annotations: the authors' real CSVs and crafted broken files."""

import os
import pathlib

import pandas as pd
import pytest

from cers_jax.data import annotations
from cers_jax.data.images import id_from_name
from cers_jax.data.records import DataError

SHARED = pathlib.Path(os.environ.get(
    'CERS_SHARED_DIR', pathlib.Path(__file__).resolve().parents[1].parent / 'shared'))
COT_DIR = SHARED / 'data' / 'cers_cot'


def _real(relative: str) -> str:
  path = COT_DIR / relative
  if not path.is_file():
    pytest.skip(f'{path} is absent (set CERS_SHARED_DIR to the shared folder with '
                'data/cers_cot/ to run the tests on the authors\' CSVs)')
  return str(path)


def _kinds(parsed):
  return {k: v for k, v in parsed.summary()['problems'].items()}


# (file, kind, rows, bom, problem counts) measured on the authors' published files.
REAL_FILES = [
    ('MosMedData/cot_output_gpt5_mask.csv', 'cot_mask', 2729, True,
     {'garbled_text': 11, 'truncated_cot': 1, 'nonstandard_cot_prefix': 1}),
    ('MosMedData/cot_output_gpt5_no_mask.csv', 'cot_no_mask', 2729, True,
     {'garbled_text': 72, 'truncated_cot': 2}),
    ('MosMedData/text.csv', 'text', 2729, False, {}),
    ('QaTa-COV19/text.csv', 'text', 9258, False, {}),
    ('brisc2025/cot_output_gpt5_mask.csv', 'cot_mask', 4793, True, {'garbled_text': 31}),
    ('brisc2025/cot_output_gpt5_no_mask.csv', 'cot_no_mask', 4793, True,
     {'garbled_text': 60, 'truncated_cot': 2}),
    ('brisc2025/text.csv', 'text', 4793, False, {}),
]


@pytest.mark.parametrize('relative,kind,rows,bom,problems', REAL_FILES,
                         ids=[f[0] for f in REAL_FILES])
def test_real_csv_counts(relative, kind, rows, bom, problems):
  parsed = annotations.read_annotations(_real(relative), kind)
  assert parsed.rows == rows
  assert len(parsed.entries) == rows  # No duplicates or empty values in these files.
  assert parsed.bom is bom
  assert parsed.encoding == 'utf-8'
  assert _kinds(parsed) == problems
  assert not any(i.startswith('\ufeff') or '.' in i for i in parsed.entries)


def test_real_cot_multiline_fields_intact_and_lines_located():
  parsed = annotations.read_annotations(
      _real('MosMedData/cot_output_gpt5_mask.csv'), 'cot_mask')
  first = parsed.entries['Jun_coronacases_case10_100']
  assert first.line == 2
  assert first.value.count('\n') == 3 and '\r' not in first.value
  assert [line.split(':')[0] for line in first.value.split('\n')] == list(
      annotations.COT_PARTS)
  truncated = [p for p in parsed.problems if p.kind == 'truncated_cot']
  assert [(p.id, p.line) for p in truncated] == [('Jun_coronacases_case6_76', 3630)]
  # The unquoted, truncated row is kept as is.
  assert parsed.entries['Jun_coronacases_case6_76'].value.startswith('Texture:')
  # The 'Step 1 Texture:' row is complete but reported.
  step = parsed.entries['Jun_radiopaedia_7_85703_0_case20_6']
  assert step.value.startswith('Step 1 Texture:')
  assert annotations.cot_parts(step.value) == (list(annotations.COT_PARTS), True)


def test_real_text_csv_keys_drop_extension():
  parsed = annotations.read_annotations(_real('brisc2025/text.csv'), 'text')
  entry = parsed.entries['brisc2025_test_00001_gl_ax_t1']
  assert entry.value == 'An axial MRI scan with one small glioma lesion.'


def test_id_from_name():
  assert id_from_name('x.jpg') == 'x'
  assert id_from_name('frames/x.PNG') == 'x'
  assert id_from_name(' case.1 ') == 'case.1'
  assert id_from_name('a\\b\\mask_covid_1.png') == 'mask_covid_1'


def test_cot_parts():
  full = 'Texture: a\nBoundary: b\nContext: c\nSummary: d'
  assert annotations.cot_parts(full) == (list(annotations.COT_PARTS), False)
  assert annotations.cot_parts('**Texture**: a\n**Boundary**: b') == (
      ['Texture', 'Boundary'], True)
  # A header with nothing after it is not a part.
  assert annotations.cot_parts('Texture: a\nBoundary: b\nContext: c\nSummary:  ') == (
      ['Texture', 'Boundary', 'Context'], False)
  assert annotations.cot_parts('no structure at all') == ([], False)


def test_garbled_reasons():
  assert annotations.garbled_reasons('clean text – with an en dash') == []
  assert annotations.garbled_reasons('bad \ufffd char')
  assert annotations.garbled_reasons('non?enhancing')
  assert annotations.garbled_reasons('경계 unclear')
  assert annotations.garbled_reasons('airâ€“tissue')
  assert annotations.garbled_reasons('Is it? Yes.') == []


def test_bom_crlf_multiline_duplicates_and_empty(tmp_path):
  content = ('image,cot\r\n'
             'a,"Texture: t\nBoundary: b\nContext: c\nSummary: s"\r\n'
             '\r\n'
             'b.png,"Texture: only"\r\n'
             'a,"Texture: second copy"\r\n'
             'c,   \r\n'
             ',"Texture: x"\r\n')
  path = tmp_path / 'cot.csv'
  path.write_bytes(b'\xef\xbb\xbf' + content.encode())
  parsed = annotations.read_annotations(str(path), 'cot_mask')
  assert parsed.bom and parsed.rows == 5
  assert list(parsed.entries) == ['a', 'b']
  assert parsed.entries['a'].value == 'Texture: t\nBoundary: b\nContext: c\nSummary: s'
  # Lines are physical: record 'a' spans lines 2-5, line 6 is blank.
  assert parsed.entries['b'].line == 7
  found = {(p.kind, p.id, p.line) for p in parsed.problems}
  assert found == {('truncated_cot', 'b', 7), ('duplicate_id', 'a', 8),
                   ('empty_value', 'c', 9), ('empty_id', '', 10)}


def test_missing_columns_names_found_columns(tmp_path):
  path = tmp_path / 'text.csv'
  path.write_text('filename_x,report_text\na.png,hello\n')
  with pytest.raises(DataError, match=r"text.csv has no image-name column: found "
                     r"columns \['filename_x', 'report_text'\]"):
    annotations.read_annotations(str(path), 'text')
  path.write_text('image,caption\na.png,hello\n')
  with pytest.raises(DataError, match=r"no text value column.*\['image', 'caption'\]"):
    annotations.read_annotations(str(path), 'text')


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    annotations.read_annotations(str(tmp_path / 'nope.csv'), 'text')
  (tmp_path / 'empty.csv').write_text('')
  with pytest.raises(DataError, match='empty.csv is empty'):
    annotations.read_annotations(str(tmp_path / 'empty.csv'), 'text')
  with pytest.raises(DataError, match='Unknown annotation kind'):
    annotations.read_annotations(str(tmp_path / 'empty.csv'), 'caption')


def test_unquoted_commas_cp1252_and_semicolons(tmp_path):
  path = tmp_path / 'text.csv'
  path.write_bytes('Image,Text\na.png,left lung, right lung\nb.png,caf\xe9\n'.encode('cp1252'))
  parsed = annotations.read_annotations(str(path), 'text')
  assert parsed.entries['a'].value == 'left lung, right lung'
  assert parsed.entries['b'].value == 'caf\xe9'
  assert {p.kind for p in parsed.problems} == {'extra_fields', 'encoding_fallback'}
  semi = tmp_path / 'semi.csv'
  semi.write_text('image;text\na.png;hello, world\n')
  assert annotations.read_annotations(str(semi), 'text').entries['a'].value == 'hello, world'


def test_lvit_xlsx(tmp_path):
  path = tmp_path / 'Train_text.xlsx'
  pd.DataFrame({'Image': ['mask_covid_1.png', 'mask_covid_2.png', 'mask_covid_3.png'],
                'Description': ['Bilateral infection.', None, 'Unilateral.']}).to_excel(
                    path, index=False)
  parsed = annotations.read_annotations(str(path), 'text')
  assert parsed.encoding == 'xlsx' and parsed.rows == 3
  assert parsed.entries['mask_covid_1'].value == 'Bilateral infection.'
  assert parsed.entries['mask_covid_3'].line == 4  # Spreadsheet row (header is row 1).
  assert [(p.kind, p.id, p.line) for p in parsed.problems] == [
      ('empty_value', 'mask_covid_2', 3)]


def test_xlsx_text_on_any_sheet(tmp_path):
  path = tmp_path / 'Test_text_for_Covid19.xlsx'
  with pd.ExcelWriter(path) as writer:
    pd.DataFrame({'Note': ['exported 2022']}).to_excel(writer, sheet_name='Info', index=False)
    pd.DataFrame({'Image': ['mask_covid_9.png'], 'Description': ['Unilateral.']}).to_excel(
        writer, sheet_name='Texts', index=False)
  parsed = annotations.read_annotations(str(path), 'text')
  assert parsed.entries['mask_covid_9'].value == 'Unilateral.'
  assert parsed.summary()['sheet'] == 'Texts'
  assert annotations.has_columns(['IMAGE ', 'report'], 'text')
  assert not annotations.has_columns(['Image', 'cot'], 'text')
  with pytest.raises(DataError, match=r"has no sheet with cot_mask columns: found \{'Info': "
                     r"\['Note'\], 'Texts': \['Image', 'Description'\]\}"):
    annotations.read_annotations(str(path), 'cot_mask')

"""Tests for cers_jax.cot against a real chat-completions server on 127.0.0.1.

The server (http.server in a thread, port 0) reads a scenario from the prompt's report text
and answers accordingly: good replies, 429 with Retry-After, 500s, replies slower than the
client timeout, malformed JSON, replies without choices, 401, and CoTs lacking a part.
"""

import base64
import collections
import csv
import http.server
import io
import json
import logging
import pathlib
import re
import threading
import time

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest

from cers_jax.cot import client as client_lib
from cers_jax.cot import generate
from cers_jax.cot import prompts

API_KEY = 'sk-test-SECRET-9f3a1c'
KEY_ENV = 'CERS_TEST_COT_KEY'
CLIENT_TIMEOUT_S = 0.4
SLOW_REPLY_S = 1.0
RETRY_AFTER_S = 1

_SCENARIO_RE = re.compile(r'scenario=(\w+) id=(\w+)')


def _cot(image_id: str, parts=prompts.SECTIONS) -> str:
  lines = {
      'Texture': f'Texture: "Dense", uneven signal in {image_id}.',
      'Boundary': 'Boundary: Sharp on one side, blurred on the other.',
      'Context': 'Context: Near vessels of similar intensity.',
      'Summary': 'Summary: Mixed margins make the outline hard.',
  }
  return '  \n'.join(lines[p] for p in parts)


def _completion(content: str) -> bytes:
  return json.dumps({'id': 'x', 'object': 'chat.completion', 'choices': [
      {'index': 0, 'finish_reason': 'stop',
       'message': {'role': 'assistant', 'content': content}}]}).encode()


class _State:

  def __init__(self):
    self.lock = threading.Lock()
    self.requests = []
    self.attempts = collections.Counter()
    self.inflight = 0
    self.max_inflight = 0
    self.healed = False  # True: every scenario answers well (the resume run).


class _Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):  # Keep pytest output clean.
    del args

  def _reply(self, status: int, payload: bytes, headers=()):
    try:
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(payload)))
      for key, value in headers:
        self.send_header(key, value)
      self.end_headers()
      self.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
      pass  # The client gave up on a slow reply.

  def do_POST(self):
    state: _State = self.server.state
    body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
    text = next(p['text'] for p in body['messages'][0]['content'] if p['type'] == 'text')
    scenario, image_id = _SCENARIO_RE.search(text).groups()
    with state.lock:
      state.attempts[image_id] += 1
      attempt = state.attempts[image_id]
      state.requests.append({'id': image_id, 'scenario': scenario, 'attempt': attempt,
                             'time': time.monotonic(), 'path': self.path,
                             'auth': self.headers.get('Authorization'), 'body': body})
      state.inflight += 1
      state.max_inflight = max(state.max_inflight, state.inflight)
      healed = state.healed
    try:
      self._serve(scenario, image_id, attempt, healed)
    finally:
      with state.lock:
        state.inflight -= 1

  def _serve(self, scenario, image_id, attempt, healed):
    good = _completion(_cot(image_id))
    if healed or scenario == 'ok':
      self._reply(200, good)
    elif scenario == 'r429':
      if attempt == 1:
        self._reply(429, b'{"error": "slow down"}', [('Retry-After', str(RETRY_AFTER_S))])
      else:
        self._reply(200, good)
    elif scenario == 'r500':
      self._reply(500, b'{"error": "oops"}') if attempt <= 2 else self._reply(200, good)
    elif scenario == 'slow':
      if attempt == 1:
        time.sleep(SLOW_REPLY_S)
      self._reply(200, good)
    elif scenario == 'dead':
      self._reply(503, b'{"error": "unavailable"}')
    elif scenario == 'badjson':
      self._reply(200, b'{"choices": [{"message": ')
    elif scenario == 'nochoices':
      self._reply(200, b'{"error": {"message": "no"}}')
    elif scenario == 'auth':
      self._reply(401, b'{"error": "invalid key"}')
    elif scenario == 'partial':
      self._reply(200, _completion(_cot(image_id, prompts.SECTIONS[:3])))
    else:
      raise AssertionError(scenario)


@pytest.fixture
def server(monkeypatch):
  for name in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy',
               'ALL_PROXY'):
    monkeypatch.delenv(name, raising=False)
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.daemon_threads = True
  httpd.state = _State()
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def log_records():
  """Every log record emitted during the test (absl included), at DEBUG."""
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record)

  handler = Keep(level=logging.DEBUG)
  root = logging.getLogger()
  old_level, old_verbosity = root.level, absl_logging.get_verbosity()
  root.addHandler(handler)
  root.setLevel(logging.DEBUG)
  absl_logging.set_verbosity(absl_logging.DEBUG)
  yield records
  root.removeHandler(handler)
  root.setLevel(old_level)
  absl_logging.set_verbosity(old_verbosity)


def _write_image(path: pathlib.Path, value: int = 100):
  Image.fromarray(np.full((8, 8), value, np.uint8), 'L').save(path)


def _write_mask(path: pathlib.Path):
  mask = np.zeros((8, 8), np.uint8)
  mask[:4, :4] = 255
  Image.fromarray(mask, 'L').save(path)


def _decode_image(body) -> np.ndarray:
  url = next(p['image_url']['url'] for p in body['messages'][0]['content']
             if p['type'] == 'image_url')
  assert url.startswith('data:image/png;base64,')
  png = base64.b64decode(url[len('data:image/png;base64,'):])
  return np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))


def _read_csv(path: pathlib.Path) -> list[list[str]]:
  with open(path, newline='', encoding='utf-8-sig') as f:
    return list(csv.reader(f))


def _requests(tmp_path, scenarios, labeled=()):
  folder = tmp_path / 'img'
  folder.mkdir(exist_ok=True)
  items = []
  for image_id, scenario in scenarios.items():
    image = folder / f'{image_id}.png'
    _write_image(image)
    mask = None
    if image_id in labeled:
      mask = folder / f'{image_id}_mask.png'
      _write_mask(mask)
    items.append(generate.CotRequest(image_id, image, mask,
                                     f'scenario={scenario} id={image_id}'))
  return items


def _run(items, tmp_path, server, **kwargs):
  options = dict(out_csv=tmp_path / 'cot.csv', failures_csv=tmp_path / 'failures.csv',
                 base_url=f'http://127.0.0.1:{server.server_port}/v1', model='test-vlm',
                 api_key_env=KEY_ENV, concurrency=3, max_retries=2,
                 timeout_s=CLIENT_TIMEOUT_S, backoff_base_s=0.02, backoff_max_s=0.1)
  options.update(kwargs)
  return generate.generate_cots(items, **options)


SCENARIOS = {
    'okA': 'ok', 'okB': 'ok', 'lim': 'r429', 'err': 'r500', 'slow': 'slow',
    'dead': 'dead', 'bad': 'badjson', 'nochoice': 'nochoices', 'auth': 'auth',
    'part': 'partial',
}
SUCCEEDING = {'okA', 'okB', 'lim', 'err', 'slow', 'part'}
FAILING = set(SCENARIOS) - SUCCEEDING


def test_generate_retries_failures_resume_and_secrecy(tmp_path, server, monkeypatch,
                                                        log_records):
  monkeypatch.setenv(KEY_ENV, API_KEY)
  # A row already done, in the published format (BOM, CRLF, multi-line quoted field).
  out_csv = tmp_path / 'cot.csv'
  done_cot = 'Texture: a.  \nBoundary: b.  \nContext: c.  \nSummary: d.'
  with open(out_csv, 'w', newline='', encoding='utf-8-sig') as f:
    csv.writer(f).writerows([('image', 'cot'), ('done', done_cot)])
  items = _requests(tmp_path, {'done': 'ok', **SCENARIOS}, labeled={'okA', 'lim'})

  start = time.monotonic()
  summary = _run(items, tmp_path, server)
  elapsed = time.monotonic() - start
  state = server.state

  assert summary == generate.CotSummary(total=11, skipped=1, written=6, failed=4,
                                        incomplete=1)
  assert 'done' not in state.attempts  # Resume: rows already in the CSV are not sent.
  # Retries: transient errors are retried, permanent ones are not.
  assert state.attempts == {'okA': 1, 'okB': 1, 'lim': 2, 'err': 3, 'slow': 2, 'dead': 3,
                            'bad': 1, 'nochoice': 1, 'auth': 1, 'part': 1}
  lim = sorted((r for r in state.requests if r['id'] == 'lim'), key=lambda r: r['attempt'])
  assert lim[1]['time'] - lim[0]['time'] >= RETRY_AFTER_S - 0.05  # Retry-After honoured.
  assert state.max_inflight <= 3
  assert elapsed < 10

  # The CoT CSV holds exactly the successful rows, in the published format.
  rows = _read_csv(out_csv)
  assert rows[0] == ['image', 'cot']
  assert rows[1] == ['done', done_cot]
  got = {image_id: cot for image_id, cot in rows[1:]}
  assert len(rows) - 1 == len(got) == 7
  assert set(got) == SUCCEEDING | {'done'}
  assert got['err'] == _cot('err')
  assert got['part'] == _cot('part', prompts.SECTIONS[:3])
  assert b'\r\n' in out_csv.read_bytes()

  # Failures go to their own file, never to the CoT CSV.
  failures = _read_csv(tmp_path / 'failures.csv')
  assert failures[0] == ['image', 'error']
  errors = dict(failures[1:])
  assert set(errors) == FAILING
  assert 'HTTP 503' in errors['dead'] and '3 attempts' in errors['dead']
  assert 'malformed JSON' in errors['bad']
  assert 'choices' in errors['nochoice']
  assert 'HTTP 401' in errors['auth']

  # Request contents: the endpoint, the key header, temperature 0, overlay only if labeled.
  for r in state.requests:
    assert r['path'] == '/v1/chat/completions'
    assert r['auth'] == f'Bearer {API_KEY}'
    assert r['body']['temperature'] == 0
    assert r['body']['model'] == 'test-vlm'
    text = r['body']['messages'][0]['content'][0]['text']
    pixels = _decode_image(r['body'])
    if r['id'] in ('okA', 'lim'):
      assert 'highlighted in red' in text
      np.testing.assert_array_equal(pixels[0, 0], [170, 55, 55])  # Inside the mask.
      np.testing.assert_array_equal(pixels[7, 7], [100, 100, 100])  # Outside.
    else:
      assert 'without any annotation' in text
      assert np.all(pixels == 100)

  # Resume: only the failed images are sent again, and each id ends up once.
  state.healed = True
  before = len(state.requests)
  summary = _run(items, tmp_path, server, progress=False)
  assert summary == generate.CotSummary(total=11, skipped=7, written=4, failed=0,
                                        incomplete=0)
  assert {r['id'] for r in state.requests[before:]} == FAILING
  ids = [row[0] for row in _read_csv(out_csv)[1:]]
  assert set(ids) == set(SCENARIOS) | {'done'}
  assert len(ids) == len(set(ids)) == 11
  assert _read_csv(tmp_path / 'failures.csv') == [['image', 'error']]

  # The key is in no file written and no log record (and logging did capture records).
  for path in tmp_path.rglob('*'):
    if path.is_file():
      assert API_KEY.encode() not in path.read_bytes(), path
  messages = [r.getMessage() for r in log_records]
  assert any('retrying' in m for m in messages)
  assert any('lacks Summary' in m for m in messages)
  assert not any(API_KEY in m for m in messages)


def test_missing_key_env_fails_early(tmp_path, server, monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  items = _requests(tmp_path, {'okA': 'ok'})
  with pytest.raises(ValueError, match=KEY_ENV):
    _run(items, tmp_path, server)
  assert not server.state.requests
  # No key at all (a local server): no Authorization header is sent.
  summary = _run(items, tmp_path, server, api_key_env='')
  assert summary.written == 1
  assert server.state.requests[0]['auth'] is None


def test_duplicate_ids_and_bad_output_are_rejected(tmp_path, server, monkeypatch):
  monkeypatch.setenv(KEY_ENV, API_KEY)
  items = _requests(tmp_path, {'okA': 'ok'})
  with pytest.raises(ValueError, match='duplicate'):
    _run(items * 2, tmp_path, server)
  wrong = tmp_path / 'wrong.csv'
  wrong.write_text('image,text\r\na,b\r\n', encoding='utf-8')
  with pytest.raises(ValueError, match='image,cot'):
    _run(items, tmp_path, server, out_csv=wrong)
  cut = tmp_path / 'cut.csv'
  cut.write_text('image,cot\r\na,"Texture: half', encoding='utf-8')
  with pytest.raises(ValueError, match='incomplete'):
    _run(items, tmp_path, server, out_csv=cut)
  assert not server.state.requests


def test_client_honours_http_date_retry_after_and_caps_it():
  chat = client_lib.ChatClient(base_url='http://127.0.0.1:9/v1/', model='m',
                               backoff_base_s=0.01, backoff_max_s=0.02,
                               retry_after_max_s=5.0)
  assert chat.url == 'http://127.0.0.1:9/v1/chat/completions'
  assert 0.005 <= chat.backoff(0) <= 0.01
  assert chat.backoff(10) <= 0.02  # Capped exponential.
  assert chat.backoff(0, retry_after=2.0) == 2.0
  assert chat.backoff(0, retry_after=3600.0) == 5.0
  assert client_lib._parse_retry_after('Wed, 21 Oct 2015 07:28:00 GMT') == 0.0
  assert client_lib._parse_retry_after('7') == 7.0
  with pytest.raises(ValueError, match='http'):
    client_lib.ChatClient(base_url='api.example.com', model='m')


def test_extract_content_variants():
  assert client_lib.extract_content(_completion('hi')) == 'hi'
  parts = json.dumps({'choices': [{'message': {'content': [
      {'type': 'text', 'text': 'a'}, {'type': 'text', 'text': 'b'}]}}]}).encode()
  assert client_lib.extract_content(parts) == 'ab'
  for bad in (b'not json', b'{"choices": []}', _completion('  ')):
    with pytest.raises(client_lib.ChatError):
      client_lib.extract_content(bad)


def test_missing_sections():
  assert prompts.missing_sections(_cot('x')) == []
  assert prompts.missing_sections('**Texture:** a\n- Boundary: b\nContext: c') == [
      'Summary']
  assert prompts.missing_sections('The texture: is dense') == list(prompts.SECTIONS)
  assert 'no report is available' in prompts.build_prompt('  ', with_mask=False)


def test_cli_over_folders(tmp_path, server, monkeypatch, capsys):
  monkeypatch.setenv(KEY_ENV, API_KEY)
  images, masks = tmp_path / 'frames', tmp_path / 'masks'
  images.mkdir()
  masks.mkdir()
  for stem in ('a', 'b', 'c'):
    _write_image(images / f'{stem}.jpg' if stem == 'c' else images / f'{stem}.png')
  _write_mask(masks / 'b.png')
  text_csv = tmp_path / 'text.csv'
  with open(text_csv, 'w', newline='', encoding='utf-8-sig') as f:
    csv.writer(f).writerows([('image', 'text'), ('a.png', 'scenario=ok id=a'),
                             ('b', 'scenario=ok id=b'), ('c', 'scenario=ok id=c')])
  out = tmp_path / 'out' / 'cot.csv'
  argv = ['--images', str(images), '--masks', str(masks), '--text-csv', str(text_csv),
          '--out', str(out), '--base-url', f'http://127.0.0.1:{server.server_port}/v1',
          '--model', 'test-vlm', '--api-key-env', KEY_ENV, '--timeout', '2']
  assert generate.main(argv) == 0
  assert 'written 3' in capsys.readouterr().out
  assert sorted(row[0] for row in _read_csv(out)[1:]) == ['a', 'b', 'c']
  assert (tmp_path / 'out' / 'cot.csv.failures.csv').exists()
  masked = {r['id'] for r in server.state.requests
            if 'highlighted' in r['body']['messages'][0]['content'][0]['text']}
  assert masked == {'b'}
  # Rerun: nothing left to do.
  assert generate.main(argv) == 0
  assert 'written 0, skipped 3' in capsys.readouterr().out
  # Images without a report row fail loudly, naming the file.
  _write_image(images / 'd.png')
  assert generate.main(argv) == 2
  assert 'text.csv' in capsys.readouterr().err

"""A minimal chat-completions client for any OpenAI-compatible endpoint (paper Sec. 3.1).

Standard library only, so any server that speaks ``POST {base_url}/chat/completions`` works
(OpenAI, vLLM, Ollama, LM Studio...). HTTP 408/409/425/429, every 5xx, timeouts and dropped
connections are retried with backoff and jitter, honouring ``Retry-After``; other 4xx answers
and malformed replies fail at once, since resending would not change them. The API key goes
only into the ``Authorization`` header; it is never logged and error text is redacted.
"""

import dataclasses
import email.utils
import http.client
import json
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from absl import logging

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
_BODY_EXCERPT = 300


class ChatError(Exception):
  """A request that failed for good (after retries, or with a non-retryable answer)."""


class _Retryable(Exception):
  """One attempt failed in a way worth retrying."""

  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


def _parse_retry_after(value: str | None) -> float | None:
  """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
  if not value:
    return None
  value = value.strip()
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def chat_completions_url(base_url: str) -> str:
  """``{base_url}/chat/completions`` unless ``base_url`` already ends with it."""
  base = base_url.rstrip('/')
  if not base.startswith(('http://', 'https://')):
    raise ValueError(f'base_url {base_url!r} must start with http:// or https:// '
                     '(e.g. https://api.openai.com/v1).')
  if base.endswith('/chat/completions'):
    return base
  return base + '/chat/completions'


def extract_content(payload: bytes) -> str:
  """The text of ``choices[0].message.content`` (list-of-parts content joined).

  Raises ChatError when the body is not JSON or has no usable content.
  """
  try:
    data = json.loads(payload)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ChatError(f'malformed JSON in reply: {e}') from None
  try:
    content = data['choices'][0]['message']['content']
  except (KeyError, IndexError, TypeError):
    raise ChatError('reply has no choices[0].message.content: '
                    + _excerpt(payload)) from None
  if isinstance(content, list):  # Some servers return content as a list of parts.
    content = ''.join(part.get('text', '') for part in content if isinstance(part, dict))
  if not isinstance(content, str) or not content.strip():
    raise ChatError('reply has an empty message content: ' + _excerpt(payload))
  return content


def _excerpt(payload: bytes) -> str:
  text = payload.decode('utf-8', errors='replace')
  return ' '.join(text.split())[:_BODY_EXCERPT]


@dataclasses.dataclass
class ChatClient:
  """Sends chat-completions requests with retries.

  Attributes:
    api_key: bearer token; None or '' sends no Authorization header (local servers).
    max_retries: retries after the first attempt (at most ``max_retries + 1`` tries).
    backoff_base_s: first backoff; attempt n waits about ``backoff_base_s * 2**n``.
    retry_after_max_s: cap on a server's Retry-After (a misconfigured server asking for an
      hour should not stall the run).
    sleep: the sleep function (tests inject one).
  """

  base_url: str
  model: str
  api_key: str | None = dataclasses.field(default=None, repr=False)
  timeout_s: float = 60.0
  max_retries: int = 5
  backoff_base_s: float = 1.0
  backoff_max_s: float = 60.0
  retry_after_max_s: float = 300.0
  sleep: Callable[[float], None] = time.sleep
  rng: random.Random = dataclasses.field(default_factory=random.Random)

  def __post_init__(self):
    self.url = chat_completions_url(self.base_url)
    if self.max_retries < 0:
      raise ValueError(f'max_retries must be >= 0, got {self.max_retries}.')

  def _redact(self, text: str) -> str:
    return text.replace(self.api_key, '***') if self.api_key else text

  def backoff(self, attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt + 1``.

    Equal jitter: half the capped exponential delay plus a uniform share of the other half,
    so concurrent workers spread out but never retry immediately. A Retry-After from the
    server wins when it is longer.
    """
    delay = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt))
    delay = 0.5 * delay + self.rng.uniform(0.0, 0.5 * delay)
    if retry_after is not None:
      delay = max(delay, min(retry_after, self.retry_after_max_s))
    return delay

  def _attempt(self, body: bytes) -> bytes:
    """One POST; returns the body of a 2xx reply or raises _Retryable / ChatError."""
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json',
               'User-Agent': 'cers_jax-cot/1'}
    if self.api_key:
      headers['Authorization'] = f'Bearer {self.api_key}'
    request = urllib.request.Request(self.url, data=body, headers=headers, method='POST')
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        return response.read()
    except urllib.error.HTTPError as e:
      detail = _excerpt(e.read() or b'')
      message = f'HTTP {e.code} from {self.url}: {detail}'
      if e.code in _RETRYABLE_STATUS or e.code >= 500:
        raise _Retryable(message, _parse_retry_after(e.headers.get('Retry-After')))
      raise ChatError(message) from None
    except urllib.error.URLError as e:
      # Connection refused/reset, DNS hiccups and connect timeouts arrive wrapped.
      raise _Retryable(f'connection error to {self.url}: {e.reason}')
    except (TimeoutError, socket.timeout):
      raise _Retryable(f'timed out after {self.timeout_s:g}s waiting for {self.url}')
    except (ConnectionError, http.client.HTTPException) as e:
      raise _Retryable(f'connection error to {self.url}: {type(e).__name__}: {e}')

  def complete(self, messages: list[dict[str, Any]], *, temperature: float = 0.0,
               max_tokens: int | None = None, label: str = '') -> str:
    """Sends one chat request and returns the reply text, retrying transient failures.

    Raises ChatError for a non-retryable answer, a malformed reply, or retries exhausted.
    """
    payload: dict[str, Any] = {'model': self.model, 'messages': messages,
                               'temperature': temperature}
    if max_tokens is not None:
      payload['max_tokens'] = max_tokens
    body = json.dumps(payload).encode('utf-8')
    for attempt in range(self.max_retries + 1):
      try:
        return extract_content(self._attempt(body))
      except _Retryable as e:
        message = self._redact(str(e))
        if attempt == self.max_retries:
          raise ChatError(f'{message} (gave up after {attempt + 1} attempts)') from None
        delay = self.backoff(attempt, e.retry_after)
        logging.warning('%s: attempt %d failed (%s); retrying in %.2fs', label or 'request',
                        attempt + 1, message, delay)
        self.sleep(delay)
      except ChatError as e:
        raise ChatError(self._redact(str(e))) from None
    raise AssertionError('unreachable')

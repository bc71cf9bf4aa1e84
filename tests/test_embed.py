"""cers_jax.core.embed.with_text_features: which CoT each row aligns, queries and pools with."""

import flax
import jax
import numpy as np
import pytest

from cers_jax import sharding
from cers_jax.core import embed
from cers_jax.core.state import EmbeddingTables, empty_tables
from cers_jax.data.cache import Cache
from cers_jax.data.dataset import Data
from cers_jax.data.records import Sample
from cers_jax.errors import ConfigError
from cers_jax.methods import cers
from tests import train_helpers as th

ROWS = 6
LABELED = np.array([0, 2], np.int32)
# Each CoT column's token ids encode (column, row): the stub BERT's feature is the first id.
COLUMNS = {'cot_mask': 100, 'cot_no_mask': 200, 'report_cot': 300}


@flax.struct.dataclass
class _State:
  tables: EmbeddingTables


class _Steps:
  """The one step with_text_features calls: pooled CoT features (here: the first token id)."""

  def __init__(self):
    self.mesh = sharding.make_mesh()

  def cot_cls(self, state, ids, mask):
    del state, mask
    return jax.numpy.repeat(ids[:, :1].astype(np.float32), 4, axis=1)


def _data() -> Data:
  samples = [Sample(id=f's{r}', image_path=f's{r}.png', mask_path=None, text='',
                    cot_mask=None, cot_no_mask=None) for r in range(ROWS)]
  images = np.zeros((ROWS, 4, 4, 3), np.uint8)
  cache = Cache('unused', images, np.zeros((ROWS, 4, 4), np.uint8), np.ones(ROWS, bool),
                samples, {})
  tokens = {}
  for column, code in COLUMNS.items():
    tokens[f'{column}_ids'] = np.repeat((code + np.arange(ROWS))[:, None], 3, 1).astype(
        np.int32)
    tokens[f'{column}_mask'] = np.ones((ROWS, 3), np.int32)
  return Data(cache=cache, rows={'train_labeled': LABELED}, tokens=tokens,
              text_tokenizer=None, cot_tokenizer=None)


@pytest.mark.parametrize('source, pooled', [('mask', 100), ('no_mask', 200)])
def test_labeled_rows_query_with_the_configured_cot(source, pooled):
  config = th.tiny_config()
  config.pool.cot_source = source
  state = _State(tables=empty_tables(ROWS, 4, 4))
  tables = embed.with_text_features(state, _Steps(), _data(), config).tables
  first = lambda table: np.asarray(table)[:, 0]  # noqa: E731
  rows = np.arange(ROWS)
  labeled = np.isin(rows, LABELED)
  # Alignment always uses the mask CoT (the authors'); report text its own column.
  np.testing.assert_array_equal(first(tables.cot_cls), 100 + rows)
  np.testing.assert_array_equal(first(tables.text_cls), 300 + rows)
  np.testing.assert_array_equal(first(tables.query_cls),
                                np.where(labeled, pooled, 200) + rows)


def test_an_unknown_cot_source_is_refused():
  config = th.tiny_config()
  config.pool.cot_source = 'both'
  with pytest.raises(ConfigError, match="pool.cot_source='both': choose one of"):
    cers.METHOD.check(config)

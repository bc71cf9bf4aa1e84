"""The training-method protocol: a second method, defined only in this file, runs through
the machinery of run.py (`loop.train_and_evaluate`) — it trains, checkpoints, resumes,
evaluates and predicts with no change outside this file.

`PlainMethod` is a two-layer convolutional segmenter with one decoder named 'seg' (not
CERS's 'r'/'s') and two stages, 'fit' (labeled batches) and 'polish' (labeled and unlabeled
batches), both validated, with its own train state. It is chosen the way a research project
would choose its method: `--config.method=tests.test_method_protocol:METHOD`.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import flax
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from cers_jax import metrics as metrics_lib
from cers_jax import sharding
from cers_jax.core import losses
from cers_jax.core import method as method_lib
from cers_jax.core import optim
from cers_jax.core.method import Built, Stage
from cers_jax.errors import ConfigError
from cers_jax.training import curves
from cers_jax.training import experiment
from cers_jax.training import loop
from tests.run_configs import method_runs

NAME = 'tests.test_method_protocol:METHOD'
STAGES = ('fit', 'polish')


class PlainNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.hidden = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.head = nnx.Conv(8, 1, (1, 1), rngs=rngs)

  def __call__(self, image):  # (B, H, W, 3) -> (B, H, W, 1) logits
    return self.head(jax.nn.relu(self.hidden(image)))


@flax.struct.dataclass
class PlainState:
  step: jax.Array  # () int32
  params: nnx.State
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class PlainSteps:
  mesh: jax.sharding.Mesh
  train: object
  evaluate: object


def _make_steps(graphdef, tx, mesh, threshold) -> PlainSteps:
  def train(state, labeled, unlabeled=None):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(labeled['image'])
      loss = losses.dice_ce_from_logits(logits, labeled['mask'])
      if unlabeled is not None:  # A second term, so the two stages differ.
        loss = loss + 0.0 * jnp.mean(nnx.merge(graphdef, params)(unlabeled['image']))
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, opt_state=opt_state,
                          params=optax.apply_updates(state.params, updates))
    return state, {'loss': loss}

  def evaluate(state, batch):
    prob = jax.nn.sigmoid(nnx.merge(graphdef, state.params)(batch['image']))
    out = {'prob_seg': prob}
    if 'mask' in batch:
      out['dice_seg'], out['iou_seg'] = metrics_lib.dice_iou_per_image(prob, batch['mask'],
                                                                       threshold)
    return out

  return PlainSteps(mesh=mesh, train=jax.jit(train, donate_argnums=0),
                    evaluate=jax.jit(evaluate))


@dataclasses.dataclass(frozen=True)
class PlainMethod:
  name: str = 'plain'
  decoders: tuple[str, ...] = ('seg',)
  primary: str = 'seg'
  stage_names: tuple[str, ...] = STAGES
  retrieval_stage: str | None = None

  def check(self, config) -> None:
    if config.train.batch_size < 2:
      raise ConfigError('plain: --config.train.batch_size must be at least 2.')

  def build(self, config, data, workdir, mesh) -> Built:
    steps_per_epoch = len(data.rows['train_labeled']) // config.train.batch_size
    total = (config.train.warmup_epochs + config.train.epochs) * steps_per_epoch
    tx = optim.make_optimizer(config, total)
    graphdef, params = nnx.split(PlainNet(rngs=nnx.Rngs(config.seed)))
    state = PlainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params))
    steps = _make_steps(graphdef, tx, mesh, config.eval.threshold)
    fit = Stage(name='fit', epochs=config.train.warmup_epochs,
                steps_per_epoch=steps_per_epoch, streams=('labeled',),
                epoch_step=lambda epoch: (lambda s, b: steps.train(s, b['labeled']), {}),
                images_per_step=config.train.batch_size, validates=True)
    polish = Stage(
        name='polish', epochs=config.train.epochs, steps_per_epoch=steps_per_epoch,
        streams=('labeled', 'unlabeled'),
        epoch_step=lambda epoch: (lambda s, b: steps.train(s, b['labeled'], b['unlabeled']),
                                  {'polish_epoch': epoch}),
        images_per_step=2 * config.train.batch_size, validates=True)
    return Built(graphdef=graphdef, state=sharding.replicate(state, mesh), steps=steps,
                 schedule=optim.make_schedule(config, total), stages=(fit, polish))

  def imported_state(self, exp, state):
    return None


METHOD = PlainMethod()


def _config(**train):
  return method_runs.method_config(NAME, warmup_epochs=2, epochs=3, **train)


_records = method_runs.records


def test_resolve_finds_registered_and_importable_methods():
  assert method_lib.resolve('cers').name == 'cers'
  loaded = method_lib.resolve(NAME)  # This file, imported by name (pytest's copy differs).
  assert (loaded.name, loaded.decoders, loaded.stage_names) == ('plain', ('seg',), STAGES)


@pytest.mark.parametrize('name, message', [
    ('nope', "choose one of \\('cers', 'supervised', 'mean_teacher', 'ucmt', 'bcp'\\)"),
    ('tests.no_such_module:METHOD', 'cannot load'),
    ('tests.test_method_protocol:PlainNet', 'is not a training method'),
])
def test_resolve_names_what_is_wrong(name, message):
  with pytest.raises(ConfigError, match=message):
    method_lib.resolve(name)


@pytest.mark.slow
def test_a_method_from_tests_trains_resumes_evaluates_and_predicts(tmp_path):
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  summary = loop.train_and_evaluate(_config(), whole, mode='all')
  assert summary['stage'] == 'done' and 'best_val_dice_seg' in summary
  assert summary['test']['decoders'] == ['seg'] and 0 <= summary['test']['dice_seg_mean'] <= 1

  records = _records(whole)
  assert [(r['stage'], r['epoch']) for r in records] == [
      ('fit', 0), ('fit', 1), ('polish', 0), ('polish', 1), ('polish', 2)]
  assert records[-1]['polish_epoch'] == 2
  assert all('val_dice_seg_mean' in r for r in records)  # Both stages validate.
  assert records[0]['loss'] > records[-1]['loss']  # It learns.

  # Stopped after each epoch and resumed: the same records, and the same test scores.
  for _ in range(5):
    loop.train_and_evaluate(_config(stop_after_epochs=1), split, mode='train')
  for got, want in zip(_records(split), records, strict=True):
    assert got.keys() == want.keys()
    assert got == {k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v
                   for k, v in want.items()}
  resumed = loop.train_and_evaluate(_config(), split, mode='eval')['test']
  assert resumed['dice_seg_mean'] == pytest.approx(summary['test']['dice_seg_mean'], abs=1e-6)

  with open(os.path.join(whole, 'eval', 'test_per_image.csv')) as f:
    header = next(csv.reader(f))
  assert {'dice_seg', 'iou_seg', 'pred_px_seg'} <= set(header)
  assert not any(name.endswith('_r') for name in header)
  with open(os.path.join(whole, 'predictions', 'predictions.csv')) as f:
    rows = list(csv.DictReader(f))
  assert rows and rows[0]['dice_seg'] != '' and rows[0]['retrieved_ids'] == ''
  assert os.path.isfile(os.path.join(whole, 'curves.png'))
  ordered, x, before_last = curves.epoch_axis(curves.read_records(whole))
  assert (x, before_last) == ([1, 2, 3, 4, 5], 2)

  exp, state, meta = experiment.from_workdir(whole, 'best')
  assert type(state).__name__ == 'PlainState' and meta['stage'] == 'done'
  exp.checkpoints.close()

  with pytest.raises(ConfigError, match='has no knowledge pool'):
    loop.train_and_evaluate(_config(), whole, mode='retrieval')
  with pytest.raises(ConfigError, match='at least 2'):
    loop.train_and_evaluate(_config(batch_size=1), str(tmp_path / 'bad'), mode='train')

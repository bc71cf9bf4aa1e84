"""Times the jitted warm-up, semi-supervised and eval steps; prints a markdown table.

  python benchmarks/train_step.py                          # full model, B=16, 224x224
  python benchmarks/train_step.py --size=tiny --image=64 --batch=8 --steps=20
  python benchmarks/train_step.py --dtypes=float32,bfloat16 --pool=3700
  python benchmarks/train_step.py --size=tiny --image=96 \
      --modes=none,text,cot,image,image+text,image+cot \
      --latency_json=benchmarks/results/latency_cpu.json  # Table 2's latency column

The model is the full-size CERS (ConvNeXt-T, BERT-base report encoder, 64 text tokens) or
the synthetic default's tiny one; inputs and the knowledge pool are random (retrieval cost
depends only on shapes). Each step is compiled first, then run `--steps` times; the table
gives the median wall time per step after device synchronisation, images per second (a
semi-supervised step consumes a labeled and an unlabeled batch: 2B images), FLOPs per step
from XLA's cost analysis, the achieved TFLOP/s, XLA's memory footprint of each program
(arguments + temporaries + outputs not aliased to donated inputs) and the compile time.
Under the table: the device's peak memory over the whole run (GPU/TPU only), and the
retrieval's share of the semi-supervised step, from timing the step's two retrievals alone.

`--modes` adds Table 2's latency column: the semi-supervised step timed once per retrieval
mode (`pool.mode`) in the same process, first dtype only, and each mode's time minus the
time of `none` (the paper: +0.047 s to +0.103 s per step on an RTX 4090).
`--latency_json` also writes those rows (scripts/ablate.py table2 --latency reads them).

`--json PATH` writes every row to PATH as soon as it is measured (benchmarks/_results.py:
the file is valid JSON after each row, so a run stopped at a device call's time limit
keeps what it finished). Rows are printed as they finish too, the semi-supervised step of
each dtype first: on a GPU, pass `--dtypes=bfloat16,float32` for the headline row first.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import base as base_config
from configs import brisc_small as brisc_small_config
from configs import synthetic as synthetic_config
from cers_jax import cli
from cers_jax.core import steps as ts
from cers_jax.core.optim import make_optimizer
from cers_jax.core.state import create_train_state, empty_tables
from cers_jax.models.cers import CERS
from cers_jax.retrieval import pool as kp

import _results  # benchmarks/_results.py, beside this script.

_SIZE = flags.DEFINE_enum('size', 'full', ['full', 'tiny', 'brisc_small'],
                          "Model size: the paper's, the synthetic default's, or "
                          "configs/brisc_small.py's (the CPU recipe; use --image=96).")
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size B (per sub-batch).')
_IMAGE = flags.DEFINE_integer('image', 224, 'Square image side.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per function (median).')
_POOL = flags.DEFINE_integer('pool', 3700, 'Knowledge-pool rows (labeled images).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_TEXT_LEN = flags.DEFINE_integer('text_len', 64, 'Report-text tokens.')
_MODES = flags.DEFINE_list('modes', [], 'Retrieval modes (pool.mode) whose semi-supervised '
                           'step to time against none: the latency column of Table 2.')
_LATENCY_JSON = flags.DEFINE_string('latency_json', '', 'Write the per-mode rows here.')
_JSON = flags.DEFINE_string('json', '', 'Write every row here as soon as it is measured.')
_SCAN_BLOCKS = flags.DEFINE_bool(
    'scan_blocks', False, 'config.model.scan_blocks: ConvNeXt stages and BERT layers as '
    'lax.scan (default: unrolled loops).')


_DEPTHWISE = flags.DEFINE_enum('depthwise', 'conv', ['conv', 'shift'],
                               'config.model.depthwise: how depthwise convolutions compute.')


def _config(dtype: str):
  configs = dict(full=base_config, tiny=synthetic_config, brisc_small=brisc_small_config)
  config = configs[_SIZE.value].get_config()
  config.model.compute_dtype = dtype
  config.model.scan_blocks = _SCAN_BLOCKS.value
  config.model.depthwise = _DEPTHWISE.value
  return config


def _random_batch(rng: np.random.Generator, config, batch: int, size: int, offset: int):
  vocab = config.model.text.vocab_size
  text_mask = np.ones((batch, _TEXT_LEN.value), np.int32)
  text_mask[:, _TEXT_LEN.value // 2:] = 0
  return dict(
      image=rng.standard_normal((batch, size, size, 3), np.float32),
      mask=(rng.random((batch, size, size, 1)) > 0.7).astype(np.float32),
      text_ids=rng.integers(0, vocab, (batch, _TEXT_LEN.value), dtype=np.int32),
      text_mask=text_mask,
      index=np.arange(offset, offset + batch, dtype=np.int32),
      is_labeled=np.ones((batch,), bool), valid=np.ones((batch,), bool))


def _state(config, num_samples: int):
  model = CERS(config.model, rngs=nnx.Rngs(0))
  h, w, c = model.f4_shape(_IMAGE.value)
  rng = np.random.default_rng(0)
  n, e = _POOL.value, config.model.embed_dim
  pool = kp.build_pool(
      rng.standard_normal((n, h, w, c), np.float32), rng.standard_normal((n, e), np.float32),
      rng.standard_normal((n, e), np.float32), np.arange(n, dtype=np.int32))
  tables = empty_tables(num_samples, config.model.cot.hidden_size, e)
  tables = tables.replace(query_cot=jnp.asarray(rng.standard_normal((num_samples, e)),
                                                jnp.float32),
                          query_text=jnp.asarray(rng.standard_normal((num_samples, e)),
                                                 jnp.float32))
  tx = make_optimizer(config, 1000)
  graphdef, state = create_train_state(model, tx, text_trainable=True, pool=pool,
                                       tables=tables, rng=jax.random.key(0))
  return graphdef, tx, state


def _memory_gib(compiled) -> float | None:
  """XLA's footprint of this one program in GiB: arguments + temporaries + outputs not
  aliased to (donated) arguments. The device's own peak is process-wide, so it is printed
  once, under the table."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  total = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
           + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  return total / 2**30


def _device_peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / 2**30


def _gib(value: float | None, missing: str) -> str:
  return missing if value is None else f'{value:.2f} GiB'


def _time(fn, args, steps: int, *, carry_state: bool):
  """Median seconds per call; train steps feed their output state back in."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0 if carry_state else ()).lower(*args).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', float('nan')))
  times = []
  state, rest = args[0], args[1:]
  out = compiled(state, *rest)  # Warm-up run (allocations, autotuning).
  jax.block_until_ready(out)
  if carry_state:
    state = out[0]
  for _ in range(steps):
    start = time.perf_counter()
    out = compiled(state, *rest)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
    if carry_state:
      state = out[0]
  return statistics.median(times), flops, _memory_gib(compiled), compile_s


def _setup(dtype: str, batch: int, size: int):
  """(config, graphdef, tx, state, labeled batch, unlabeled batch) of one compute dtype."""
  config = _config(dtype)
  config.pool.k_coarse = min(config.pool.k_coarse, _POOL.value)
  graphdef, tx, state = _state(config, num_samples=_POOL.value + 4 * batch)
  rng = np.random.default_rng(1)
  labeled = {k: jnp.asarray(v) for k, v in _random_batch(rng, config, batch, size, 0).items()}
  unlabeled = {k: jnp.asarray(v) for k, v in
               _random_batch(rng, config, batch, size, _POOL.value).items()}
  return config, graphdef, tx, state, labeled, unlabeled


def _mode_latency(batch: int, size: int) -> list[dict]:
  """The semi-supervised step's median time per retrieval mode, first dtype, one pool."""
  config, graphdef, tx, state, labeled, unlabeled = _setup(_DTYPES.value[0], batch, size)
  modes = list(dict.fromkeys(['none', *_MODES.value]))  # `none` first: the reference.
  rows = []
  for mode in modes:
    config.pool.mode = mode
    cfg = ts.StepConfig.from_config(config)
    fn = lambda s, l, u, cfg=cfg: ts.semi_step(  # noqa: E731
        s, l, u, jnp.float32(0.003), graphdef=graphdef, tx=tx, cfg=cfg)
    seconds, *_ = _time(fn, (jax.tree.map(jnp.copy, state), labeled, unlabeled),
                        _STEPS.value, carry_state=True)
    rows.append(dict(mode=mode, seconds=seconds))
  for row in rows:
    row['added_seconds'] = row['seconds'] - rows[0]['seconds']
  return rows


def _row_line(row: dict) -> str:
  # Retrieval rows count queries, not images.
  ips = '–' if row['step'].startswith('retrieval') else f'{row["images_per_s"]:.1f}'
  return (f'| {row["dtype"]} | {row["step"]} | {row["ms"]:.1f} | {ips} | {row["tflop"]:.3f} | '
          f'{row["tflop_per_s"]:.2f} | {_gib(row["xla_memory_gib"], "n/a")} | '
          f'{row["compile_s"]:.1f} |')


def main(argv):
  del argv
  batch, size = _BATCH.value, _IMAGE.value
  device = jax.devices()[0]
  results = _results.JsonResults(_JSON.value, dict(
      benchmark='train_step', size=_SIZE.value, batch=batch, image=size, pool=_POOL.value,
      steps=_STEPS.value, scan_blocks=_SCAN_BLOCKS.value, dtypes=_DTYPES.value,
      depthwise=_DEPTHWISE.value,
      platform=device.platform, device_kind=device.device_kind,
      device_count=jax.device_count(), jax=jax.__version__,
      host=platform.processor() or platform.machine()))
  print(f'\nCERS {_SIZE.value} model, batch {batch}, {size}x{size}, pool {_POOL.value} rows, '
        f'{_STEPS.value} timed steps, scan_blocks={_SCAN_BLOCKS.value}, depthwise='
        f'{_DEPTHWISE.value}, device: '
        f'{device.platform} ({device.device_kind}), {jax.device_count()} device(s)\n')
  print('| compute dtype | step | ms/step | images/s | TFLOP/step | TFLOP/s | XLA memory '
        '| compile (s) |')
  print('|---|---|---:|---:|---:|---:|---:|---:|', flush=True)
  rows = []
  for dtype in _DTYPES.value:
    config, graphdef, tx, state, labeled, unlabeled = _setup(dtype, batch, size)
    cfg = ts.StepConfig.from_config(config)
    f4 = jax.random.normal(jax.random.key(2), (batch,) + state.pool.feat.shape[1:],
                           jnp.float32)

    def retrieval_only(s, l, u):
      # The semi step's two retrievals (labeled and unlabeled sub-batch), nothing else.
      return [ts._retrieve(f4, sub, s.pool, s.tables, cfg).feat for sub in (l, u)]

    # The semi-supervised step first: the headline, kept if a time limit stops the rest.
    steps = {
        'semi-supervised': (lambda s, l, u: ts.semi_step(
            s, l, u, jnp.float32(0.003), graphdef=graphdef, tx=tx, cfg=cfg),
                            (state, labeled, unlabeled), 2 * batch, True),
        'warm-up': (lambda s, b: ts.warmup_step(s, b, graphdef=graphdef, tx=tx, cfg=cfg),
                    (state, labeled), batch, True),
        'eval (with retrieval)': (lambda s, b: ts.eval_step(
            s, b, graphdef=graphdef, cfg=cfg), (state, unlabeled),
                                  batch, False),
        'retrieval alone (2 x B queries)': (retrieval_only, (state, labeled, unlabeled),
                                            2 * batch, False),
    }
    for name, (fn, args, images, carry) in steps.items():
      args = (jax.tree.map(jnp.copy, args[0]),) + args[1:]
      seconds, flops, memory, compile_s = _time(fn, args, _STEPS.value, carry_state=carry)
      row = dict(dtype=dtype, step=name, ms=seconds * 1e3, images_per_s=images / seconds,
                 tflop=flops / 1e12, tflop_per_s=flops / seconds / 1e12,
                 xla_memory_gib=memory, compile_s=compile_s,
                 device_peak_gib_so_far=_device_peak_gib())
      rows.append(row)
      results.add(row)
      print(_row_line(row), flush=True)
  peak = _device_peak_gib()
  print(f'\nDevice peak memory over the whole run: '
        f'{_gib(peak, "not reported by this backend")}.')
  semi = {r['dtype']: r['ms'] for r in rows if r['step'] == 'semi-supervised'}
  shares = {}
  for row in rows:
    if row['step'].startswith('retrieval'):
      shares[row['dtype']] = row['ms'] / semi[row['dtype']]
      print(f'Retrieval, {row["dtype"]}: {row["ms"]:.2f} ms = '
            f'{100 * shares[row["dtype"]]:.2f}% of the semi-supervised step (timed alone: '
            'an upper bound on its share).')
  latency = []
  if _MODES.value:
    latency = _mode_latency(batch, size)
    print(f'\nTable 2 latency, {_DTYPES.value[0]}: the semi-supervised step per retrieval '
          'mode, against none\n')
    print('| pool.mode | ms/step | added s/step |')
    print('|---|---:|---:|')
    for row in latency:
      print(f'| {row["mode"]} | {1e3 * row["seconds"]:.1f} | {row["added_seconds"]:+.4f} |')
    if _LATENCY_JSON.value:
      with open(_LATENCY_JSON.value, 'w') as f:
        json.dump(dict(device=f'{device.platform} ({device.device_kind})', size=_SIZE.value,
                       batch=batch, image=size, pool=_POOL.value, steps=_STEPS.value,
                       dtype=_DTYPES.value[0], modes=latency), f, indent=2)
  results.finish(device_peak_gib=peak, retrieval_share_of_semi_step=shares,
                 mode_latency=latency)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

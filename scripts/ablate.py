"""The paper's ablations as grids of CERS runs, resumable: Table 2, Table 3 (the decoders and
MCAM's parts), the pool's CoT source and Fig. 3's number of references.

  python scripts/ablate.py STUDY --config configs/brisc_small.py --out runs/ablate \
      [--seeds 0,1,2] [--fractions 0.25,0.5,1.0] [--variants a,b] [--reference v] \
      [--latency JSON] [--dry-run] [--table-only] [--config.x=y ...]

STUDY is one of:

  table2       pool.mode none / text / cot / image / image+text / image+cot (default
               image+cot). Retrieval modes differ only after the warm-up, so every mode of
               a seed and fraction continues one warmed-up run (a copy of it).
               `--latency` names the JSON of `benchmarks/train_step.py --modes=...
               --latency_json=...`, whose per-mode added seconds per step become the
               table's last column, as the paper's.
  table3       D_r: MCAM (default), a U-Net or Swin-UNet decoder (model.decoder=unet,
               swin_unet), MCAM without its coordinate attention or its multi-scale branch
               (model.mcam.*=False): Table 3's rows, each a run from scratch (the decoder
               differs from the first step).
  cot_source   pool.cot_source mask (default, the authors') / no_mask, continuing the same
               warm-up (which reads only the mask CoTs): the no_mask run builds its pool
               again when it starts from the warm-up's checkpoint.
  topk         pool.k 1 / 3 / 5 / 7 / 9 (default 5), continuing one warm-up per seed and
               fraction; also draws Fig. 3 (test Dice of D_r against k, one line per
               labeled fraction) as OUT/topk/fig3.png.

Each study's default row is one of two shared runs, trained by whichever study comes
first: CERS as configured from scratch (table3: OUT/default/frac<f>/seed<s>, DEFAULT_RUN),
or continued from the warm-up (table2, cot_source: OUT/default_fork/frac<f>/seed<s>,
DEFAULT_FORK).

Every run is `python run.py --config CONFIG --workdir OUT/STUDY/frac<f>/seed<s>/<variant>
--config.seed=<s> --config.data.labeled_fraction=<f> <the variant's flags> --mode=all` plus
the extra `--config.*` flags given here; the runs of a seed and fraction share one data
cache and split manifest (OUT/data/seed<s>_frac<f>), and the studies that continue a
warm-up share it too (OUT/warmup/frac<f>/seed<s>, `--mode=warmup` with the default
variant's flags), and each of their runs is tested at its last checkpoint
(--config.eval.which=latest, FORK_FLAGS): the best by val Dice can be the shared warm-up's
own (CPU recipes peak there), which would score every variant with the same weights. One
run at a time; finished runs are skipped, interrupted ones resume (cers_jax/grid.py), so a
later invocation with more seeds adds them.

Prints, per labeled fraction, the study's table: test Dice and IoU of D_r and Dice of D_s
(mean ± std over seeds) and each variant's paired per-image Dice difference (D_r) to the
default variant (or the variant `--reference` names: OUT/STUDY/table_vs_<it>.*) with its
bootstrap 95% CI and Wilcoxon p; also to OUT/STUDY/table.md and table.json. table2 adds
what each mode retrieves from the warm-up's pool (reference mask Dice, label match: the
warm-up's after-warm-up retrieval report), the retrieval question beside the segmentation;
cot_source adds the same for the CoT modes (and image) from each variant's own run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cers_jax import grid  # noqa: E402

WARMUP_DONE = 'ablate_warmup_done.json'
# Runs that continue the shared warm-up are tested at their own last state; a later
# --config.eval.which=best on the command line overrides it.
FORK_FLAGS = ('--config.eval.which=latest',)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  flags: tuple[tuple[str, object], ...]  # (config field, value) pairs.

  def args(self) -> list[str]:
    return [f'--config.{field}={value}' for field, value in self.flags]


@dataclasses.dataclass(frozen=True)
class Study:
  title: str
  variants: tuple[Variant, ...]
  default: str
  forks: bool  # Variants continue one warmed-up run instead of training from scratch.
  shares_default: bool = True  # Its default row is DEFAULT_FORK's or DEFAULT_RUN's run.

  def variant(self, name: str) -> Variant:
    return next(v for v in self.variants if v.name == name)


def _one(name: str, field: str, value) -> Variant:
  return Variant(name, ((field, value),))


# The default variant of every study that trains from scratch is one and the same run
# (OUT/default/frac<f>/seed<s>), its every ablated setting spelt out at its default value:
# CERS as configured. Trained once, it is Table 3's reference.
DEFAULT_RUN = Variant('default', (
    ('model.decoder', 'mcam'), ('model.mcam.coord_attention', True),
    ('model.mcam.multi_scale', True), ('pool.cot_source', 'mask')))
# Likewise the default variant of table2 and cot_source is one run (OUT/default_fork/
# frac<f>/seed<s>): CERS as configured, continued from the shared warm-up and tested at its
# last checkpoint. (topk's default, k5, is pool.k=5 whatever the config's k: its own run.)
DEFAULT_FORK = Variant('default_fork', (('pool.mode', 'image+cot'),
                                        ('pool.cot_source', 'mask')))

MODES = ('none', 'text', 'cot', 'image', 'image+text', 'image+cot')
STUDIES = {
    'table2': Study('Table 2: retrieval signals (pool.mode)',
                    tuple(dataclasses.replace(DEFAULT_FORK, name=m) if m == 'image+cot'
                          else _one(m, 'pool.mode', m) for m in MODES), 'image+cot',
                    forks=True),
    'table3': Study('Table 3: the retrieval-aware decoder (model.decoder, model.mcam)', (
        dataclasses.replace(DEFAULT_RUN, name='mcam'),
        _one('unet', 'model.decoder', 'unet'),
        _one('swin_unet', 'model.decoder', 'swin_unet'),
        _one('no_coord_attention', 'model.mcam.coord_attention', False),
        _one('no_multi_scale', 'model.mcam.multi_scale', False)), 'mcam', forks=False),
    # Warm-up reads only the mask CoTs (its CLIP loss): the pool's CoT differs from the
    # pool build on, so a fork of the warm-up builds its pool again (cers.py, 'resumed').
    'cot_source': Study("The pool's CoT (pool.cot_source)", (
        dataclasses.replace(DEFAULT_FORK, name='mask'),
        _one('no_mask', 'pool.cot_source', 'no_mask')), 'mask', forks=True),
    'topk': Study('Fig. 3: references fused (pool.k)',
                  tuple(_one(f'k{k}', 'pool.k', k) for k in (1, 3, 5, 7, 9)), 'k5',
                  forks=True, shares_default=False),
}


def workdir(out: str, study: str, fraction: float, seed: int, variant: str) -> str:
  spec = STUDIES[study]
  if spec.shares_default and variant == spec.default:  # DEFAULT_FORK's or DEFAULT_RUN's.
    shared = DEFAULT_FORK if spec.forks else DEFAULT_RUN
    return os.path.join(out, shared.name, f'frac{fraction:g}', f'seed{seed}')
  return os.path.join(out, study, f'frac{fraction:g}', f'seed{seed}', variant)


def _runs_log(out: str, run: str) -> str:
  """OUT/<study, or default for the shared default run>/runs.json: commands and times."""
  return os.path.join(out, os.path.relpath(run, out).split(os.sep)[0], 'runs.json')


def warmup_dir(out: str, fraction: float, seed: int) -> str:
  return os.path.join(out, 'warmup', f'frac{fraction:g}', f'seed{seed}')


def command(config: str, run: str, fraction: float, seed: int, out: str, flags: list[str],
            mode: str, extra: list[str]) -> list[str]:
  """A run.py command (after the interpreter)."""
  return ['run.py', f'--config={config}', f'--workdir={run}', f'--config.seed={seed}',
          f'--config.data.labeled_fraction={fraction:g}',
          f'--config.data.cache_dir={grid.cache_dir(out, fraction, seed)}', *flags,
          f'--mode={mode}', *extra]


def _warm_up(args, study: Study, fraction: float, seed: int, extra: list[str]) -> str:
  """The shared warmed-up run of a seed and fraction (trained once, marked when done)."""
  warm = warmup_dir(args.out, fraction, seed)
  marker = os.path.join(warm, WARMUP_DONE)
  cmd = command(args.config, warm, fraction, seed, args.out,
                study.variant(study.default).args(), 'warmup', extra)
  if grid.run_command(warm, cmd, label='warm-up', dry_run=args.dry_run,
                      log_path=os.path.join(args.out, 'warmup', 'runs.json'),
                      done=lambda: os.path.isfile(marker)):
    with open(marker, 'w') as f:
      json.dump(dict(command=cmd), f, indent=2)
  return warm


def run_study(args, study: Study, extra: list[str]) -> None:
  cells = [(f, s, v) for f in args.fractions for s in args.seeds for v in args.variants]
  warm = {}
  for index, (fraction, seed, name) in enumerate(cells, 1):
    run = workdir(args.out, args.study, fraction, seed, name)
    prepare = None
    if study.forks and grid.summary(run) is None:
      if (fraction, seed) not in warm:
        warm[fraction, seed] = _warm_up(args, study, fraction, seed, extra)
      source = warm[fraction, seed]

      def prepare(run=run, source=source):
        if not os.path.isdir(run):  # A half-finished fork resumes from its own checkpoint.
          shutil.copytree(source, run)
          os.remove(os.path.join(run, WARMUP_DONE))

    flags = study.variant(name).args() + list(FORK_FLAGS if study.forks else ())
    grid.run_command(run, command(args.config, run, fraction, seed, args.out, flags, 'all',
                                  extra),
                     label=f'[{index}/{len(cells)}]',
                     log_path=_runs_log(args.out, run),
                     dry_run=args.dry_run, prepare=prepare)


def _latency(path: str | None) -> dict[str, float]:
  if not path:
    return {}
  with open(path) as f:
    return {row['mode']: row['added_seconds'] for row in json.load(f)['modes']}


def tables(args, study: Study) -> tuple[list[str], dict]:
  """Markdown lines of the study's table per fraction, and its numbers; paired differences
  are to args.reference (main sets it: the default variant unless --reference names one)."""
  latency = _latency(args.latency)
  reference = args.reference
  lines, numbers = [], {}
  for fraction in args.fractions:
    reference_runs = grid.finished([workdir(args.out, args.study, fraction, s, reference)
                                    for s in args.seeds])
    header = (f'| variant | flags | Dice D_r | IoU D_r | Dice D_s | D_r − {reference} '
              '| 95% CI | Wilcoxon p |')
    rule = '|---|---|---:|---:|---:|---:|---:|---:|'
    if latency:
      header, rule = header + ' added s/step |', rule + '---:|'
    lines += [f'Labeled fraction {fraction:g}, test split, seeds '
              f'{",".join(map(str, args.seeds))}; paired differences in points:', '',
              header, rule]
    for name in args.variants:
      variant = study.variant(name)
      runs = grid.finished([workdir(args.out, args.study, fraction, s, name)
                            for s in args.seeds])
      scores = [grid.summary(r) for r in runs]
      row = dict(seeds=len(runs), dice_r=[s['dice_r_mean'] for s in scores],
                 iou_r=[s['iou_r_mean'] for s in scores],
                 dice_s=[s['dice_s_mean'] for s in scores if 'dice_s_mean' in s])
      paired = '– | – | –'
      if name != reference and runs and len(runs) == len(reference_runs):
        row['paired'] = grid.paired_dice(runs, reference_runs, decoder='r',
                                         reference_decoder='r', resamples=args.resamples)
        paired = grid.paired_cells(row['paired'])
      flags = ' '.join(f'{field}={value}' for field, value in variant.flags)
      cells = (f'| {name} | `{flags}` | {grid.mean_std(row["dice_r"])} | '
               f'{grid.mean_std(row["iou_r"])} | {grid.mean_std(row["dice_s"])} | {paired} |')
      if latency:
        mode = dict(variant.flags).get('pool.mode')
        cells += f' {latency[mode]:+.4f} |' if mode in latency else ' – |'
      lines.append(cells)
      numbers[f'{name}/{fraction:g}'] = row
    lines.append('')
  return lines, numbers


RETRIEVAL_REPORT = os.path.join('retrieval', 'after_warmup', 'report.json')
# The cot_source study's retrieval rows: the modes that read the pool's CoT, and image
# (no CoT) to show whether the two runs' warm-ups themselves differ.
COT_SOURCE_MODES = ('image', 'cot', 'image+cot')


def _reports(runs: list[str]) -> list[dict]:
  """The after-warm-up retrieval reports of the runs that have one."""
  reports = []
  for run in runs:
    path = os.path.join(run, RETRIEVAL_REPORT)
    if os.path.isfile(path):
      with open(path) as f:
        reports.append(json.load(f))
  return reports


def _retrieval_header(what: str, fraction: float, reports: list[dict], first_column: str):
  first = reports[0]
  return [f'{what}, labeled fraction {fraction:g} (the after-warm-up retrieval report: '
          f'{first["num_queries"]} {first["split"]} queries, k = {first["k"]}, K = '
          f'{first["k_coarse"]}, pool of {first["pool_size"]}; {len(reports)} seed(s)), '
          'in points:', '', f'| {first_column} | reference mask Dice | label match |',
          '|---|---:|---:|']


def _retrieval_row(label: str, reports: list[dict], mode: str) -> tuple[str, dict]:
  rows = [r['modes'][mode] for r in reports if mode in r['modes']]
  row = dict(ref_mask_dice=[m['ref_mask_dice'] for m in rows],
             label_match=[m['label_match'] for m in rows if 'label_match' in m])
  return (f'| {label} | {grid.mean_std(row["ref_mask_dice"])} | '
          f'{grid.mean_std(row["label_match"])} |', row)


def retrieval_lines(args) -> tuple[list[str], dict]:
  """What each pool mode retrieves from the shared warm-up's pool (its after-warm-up
  retrieval report, val queries): markdown lines per fraction and the numbers, mean ± std
  over the seeds whose warm-up has one."""
  lines, numbers = [], {}
  for fraction in args.fractions:
    reports = _reports([warmup_dir(args.out, fraction, s) for s in args.seeds])
    if not reports:
      continue
    lines += _retrieval_header('What each mode retrieves after the warm-up', fraction,
                               reports, 'mode')
    for mode in reports[0]['modes']:
      line, numbers[f'{mode}/{fraction:g}'] = _retrieval_row(mode, reports, mode)
      lines.append(line)
    lines.append('')
  return lines, numbers


def cot_source_retrieval_lines(args) -> tuple[list[str], dict]:
  """What the CoT modes retrieve from each variant's own pool right after the warm-up (the
  no_mask run builds its pool again from the shared warm-up's state): the CoT-encoder half
  of the question, beside the segmentation table."""
  lines, numbers = [], {}
  for fraction in args.fractions:
    block = []
    for name in args.variants:
      reports = _reports([workdir(args.out, args.study, fraction, s, name)
                          for s in args.seeds])
      if not reports:
        continue
      if not block:
        block = _retrieval_header("What the pool's CoTs retrieve", fraction, reports,
                                  'pool.cot_source, mode')
      for mode in COT_SOURCE_MODES:
        line, numbers[f'{name}/{mode}/{fraction:g}'] = _retrieval_row(
            f'{name}, {mode}', reports, mode)
        block.append(line)
    lines += block + [''] if block else []
  return lines, numbers


# The studies whose table is followed by what their pools retrieve.
RETRIEVAL_LINES = {'table2': retrieval_lines, 'cot_source': cot_source_retrieval_lines}

FIG3_MIN_SPAN = 2.0  # Dice points: the y axis spans at least this, so that noise-sized
# differences between k (0.04 points on BRISC at CPU scale) do not fill the plot.


def draw_fig3(args, numbers: dict, path: str) -> tuple[float, float]:
  """Test Dice of D_r against pool.k, one line per labeled fraction (error bars: std over
  seeds; a line's legend says how many). Returns the y axis' limits."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(figsize=(5, 3.5))
  low, high = np.inf, -np.inf
  for fraction in args.fractions:
    ks, means, stds, seeds = [], [], [], set()
    for name in args.variants:
      dice = numbers[f'{name}/{fraction:g}']['dice_r']
      if dice:
        ks.append(int(name[1:]))
        means.append(100 * np.mean(dice))
        stds.append(100 * np.std(dice, ddof=1) if len(dice) > 1 else 0.0)
        seeds.add(len(dice))
    if not ks:
      continue
    ax.errorbar(ks, means, yerr=stds, marker='o', capsize=3,
                label=f'{100 * fraction:g}% labeled, {"/".join(map(str, sorted(seeds)))} '
                      f'seed(s)')
    low = min(low, min(m - s for m, s in zip(means, stds)))
    high = max(high, max(m + s for m, s in zip(means, stds)))
  if np.isfinite(low):
    pad = max(0.0, FIG3_MIN_SPAN - (high - low)) / 2
    ax.set_ylim(low - pad, high + pad)
    ax.legend()
  ax.set_xlabel('references fused (pool.k)')
  ax.set_ylabel('test Dice of D_r (%)')
  ax.set_title(f'Fig. 3 at this config ({os.path.basename(args.config)})')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  limits = ax.get_ylim()
  plt.close(fig)
  return limits


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python scripts/ablate.py', description=__doc__.split('\n\n')[0],
      epilog='Flags this script does not know (--config.x=y) are passed to every run.py.')
  parser.add_argument('study', choices=sorted(STUDIES))
  parser.add_argument('--config', required=True, help='config file of every run')
  parser.add_argument('--out', required=True, help='folder of the grids')
  parser.add_argument('--variants', type=grid.parse_list, default=None,
                      help="a subset of the study's variants (default: all); the default "
                      'variant always runs')
  parser.add_argument('--fractions', type=lambda t: grid.parse_list(t, float), default=[0.25])
  parser.add_argument('--seeds', type=lambda t: grid.parse_list(t, int), default=[0])
  parser.add_argument('--reference', default=None,
                      help='the variant paired differences are to (default: the '
                      "study's default variant), e.g. none for Table 2")
  parser.add_argument('--latency', default=None,
                      help='table2: benchmarks/train_step.py --latency_json output')
  parser.add_argument('--resamples', type=int, default=2000, help='bootstrap resamples')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  parser.add_argument('--table-only', action='store_true', help='train nothing; print')
  return parser


def main(argv=None) -> dict:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  grid.passthrough_flags(extra)
  study = STUDIES[args.study]
  names = [v.name for v in study.variants]
  chosen = args.variants or names
  unknown = sorted(set(chosen) - set(names))
  if unknown:
    parser.error(f'--variants: {args.study} has no {unknown}; it has {names}.')
  if args.reference and args.reference not in chosen + [study.default]:
    parser.error(f'--reference {args.reference}: not among the variants run '
                 f'({", ".join(sorted(set(chosen + [study.default])))}).')
  # The default variant always runs: it is the paired differences' reference by default.
  args.variants = [n for n in names if n in chosen or n == study.default]
  args.reference = args.reference or study.default
  if not args.table_only:
    run_study(args, study, extra)
  if args.dry_run:
    return {}
  lines, numbers = tables(args, study)
  retrieved = {}
  if args.study in RETRIEVAL_LINES:
    more, retrieved = RETRIEVAL_LINES[args.study](args)
    lines += more
  text = '\n'.join([f'{study.title}; config {args.config} {" ".join(extra)}'.rstrip(), '',
                    *lines])
  print(text)
  folder = os.path.join(args.out, args.study)
  os.makedirs(folder, exist_ok=True)
  stem = 'table' if args.reference == study.default else f'table_vs_{args.reference}'
  with open(os.path.join(folder, f'{stem}.md'), 'w') as f:
    f.write(text + '\n')
  result = dict(study=args.study, config=args.config, extra=extra, seeds=args.seeds,
                default=study.default, reference=args.reference, variants=numbers)
  if retrieved:
    result['after_warmup'] = retrieved
  if args.study == 'topk':
    result['figure'] = os.path.join(folder, 'fig3.png')
    result['figure_ylim'] = draw_fig3(args, numbers, result['figure'])
  with open(os.path.join(folder, f'{stem}.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()

r"""Several runs side by side: a table of their results and one plot of test accuracy per epoch.

  python -m hybrid_flax.compare --run "paper hybrid=runs/hybrid" --run "cnn=runs/cnn" \
      [--reference "paper hybrid=0.816"] [--out docs/results_accuracy.png]

Each --run is LABEL=WORKDIR of a launch.py run (finished or not); --reference draws a dashed
line at a published accuracy for the run of that label. Prints one markdown row per run.
"""

import argparse

from hybrid_flax import figures
from hybrid_flax import inference
from hybrid_flax import metric_writer


def _pair(text: str) -> tuple[str, str]:
  label, sep, value = text.partition('=')
  if not sep or not label or not value:
    raise argparse.ArgumentTypeError(f'expected LABEL=VALUE, got {text!r}')
  return label, value


def summary(records) -> dict:
  """The last evaluated epoch's accuracy, and the training and evaluation seconds summed."""
  epochs = [r for r in records if r.get('kind') == 'epoch' and 'test_accuracy' in r]
  if not epochs:
    raise ValueError('no evaluated epoch in the metrics yet')
  seconds = sum(r.get('epoch_seconds', 0) + r.get('eval_seconds', 0) for r in records
                if r.get('kind') == 'epoch')
  return {'epochs': epochs[-1]['epoch'], 'test_accuracy': epochs[-1]['test_accuracy'],
          'seconds': seconds}


@inference.cli
def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m hybrid_flax.compare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--run', type=_pair, action='append', required=True,
                      help='LABEL=WORKDIR (repeat)')
  parser.add_argument('--reference', type=_pair, action='append', default=[],
                      help='LABEL=ACCURACY in [0, 1] (repeat)')
  parser.add_argument('--out', default='', help='PNG path (none: no plot)')
  parser.add_argument('--title', default='CIFAR-10 (JPEG copy): test accuracy per epoch')
  args = parser.parse_args(argv)
  runs = {label: metric_writer.read_metrics(workdir) for label, workdir in args.run}
  references = {}
  for label, value in args.reference:
    if label not in runs:
      raise ValueError(f'--reference {label!r} names no --run')
    references[label] = float(value)
  print('| run | epochs | test accuracy | train + eval time |')
  print('|---|---|---|---|')
  for label, records in runs.items():
    try:
      s = summary(records)
    except ValueError as e:
      raise ValueError(f'run {label!r}: {e}') from None
    print(f'| {label} | {s["epochs"]} | {s["test_accuracy"]:.2%} | {s["seconds"] / 60:.1f} min |')
  if args.out:
    print(f'wrote {figures.accuracy_per_epoch(runs, args.out, args.title, references)}')


if __name__ == '__main__':
  main()

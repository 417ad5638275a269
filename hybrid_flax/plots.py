r"""Training curves of a run (loss, accuracy, learning rate, throughput) as a PNG.

  python -m hybrid_flax.plots --workdir runs/hybrid [--out curves.png]

Reads WORKDIR/metrics.jsonl (a resumed run's replayed records are counted once); works while
the run is still training.
"""

import json
import os

from hybrid_flax import figures
from hybrid_flax import inference
from hybrid_flax import metric_writer


def _eval_split(workdir: str) -> str:
  """What the run's test_* metrics were measured on: its eval_split ('test' unless changed)."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return json.load(f).get('eval_split', 'test')
  except FileNotFoundError:  # a metrics file copied without its run
    return 'test'


@inference.cli
def main(argv=None):
  parser = inference.tool_parser(__doc__, 'python -m hybrid_flax.plots')
  parser.add_argument('--out', default='', help='PNG path (default: WORKDIR/figures/curves.png)')
  args = parser.parse_args(argv)
  records = metric_writer.read_metrics(args.workdir)
  out = args.out or os.path.join(args.workdir, 'figures', 'curves.png')
  figures.training_curves(records, out, title=args.workdir, eval_label=_eval_split(args.workdir))
  print(f'wrote {out}')
  return out


if __name__ == '__main__':
  main()

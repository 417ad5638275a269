r"""Training curves of a run (loss, accuracy, learning rate, throughput) as a PNG.

  python -m hybrid_flax.plots --workdir runs/hybrid [--out curves.png]

Reads WORKDIR/metrics.jsonl (a resumed run's replayed records are counted once); works while
the run is still training.
"""

import os

from hybrid_flax import figures
from hybrid_flax import inference
from hybrid_flax import metric_writer

@inference.cli
def main(argv=None):
  parser = inference.tool_parser(__doc__, 'python -m hybrid_flax.plots')
  parser.add_argument('--out', default='', help='PNG path (default: WORKDIR/figures/curves.png)')
  args = parser.parse_args(argv)
  records = metric_writer.read_metrics(args.workdir)
  out = args.out or os.path.join(args.workdir, 'figures', 'curves.png')
  print(f'wrote {figures.training_curves(records, out, title=args.workdir)}')
  return out


if __name__ == '__main__':
  main()

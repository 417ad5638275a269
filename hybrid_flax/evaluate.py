r"""Evaluates a run's latest checkpoint: accuracy, per-class accuracy and the confusion matrix.

  python -m hybrid_flax.evaluate --workdir runs/hybrid [--split test] [--dataset D --data_dir DIR]
      [--eval_flip true|false] [--eval_translate N]

Prints the report and writes WORKDIR/eval/step_<N>.json and WORKDIR/figures/confusion_step_<N>.png,
named step_<N>_<dataset>_<split> where --dataset or --split is not the run's own evaluation data
(a run that held out part of the training split, say, evaluated once on `test`). The data set,
data dir and split default to the run's own.
"""

import json
import os
import re

import numpy as np
import optax

from hybrid_flax import figures
from hybrid_flax import inference
from hybrid_flax import input_pipeline
from hybrid_flax import train


def evaluate_run(run: inference.Run, images: np.ndarray, labels: np.ndarray,
                 batch_size: int = 500) -> dict:
  logits = inference.predict_logits(run, images, batch_size)
  num_classes = logits.shape[-1]
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels outside the model\'s {num_classes} classes')
  predicted = logits.argmax(-1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
  return {'step': run.step, 'examples': int(len(labels)),
          'accuracy': float((predicted == labels).mean()),
          'loss': float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()),
          'per_class_accuracy': [float(a) for a in per_class],
          'confusion_matrix': confusion.tolist()}


def report(result: dict, classes) -> str:
  confusion = np.asarray(result['confusion_matrix'])
  width = max(len(c) for c in classes)
  lines = [f'accuracy {result["accuracy"]:.4f} ({confusion.trace()}/{result["examples"]}), '
           f'loss {result["loss"]:.4f}', '', 'per-class accuracy:']
  for name, acc, total in zip(classes, result['per_class_accuracy'], confusion.sum(1)):
    lines.append(f'  {name:<{width}}  {acc:.4f}  ({round(acc * total)}/{total})')
  lines += ['', 'confusion matrix (rows: true class, columns: predicted):',
            ' ' * (width + 2) + ''.join(f'{c[:5]:>6}' for c in classes)]
  for name, row in zip(classes, confusion):
    lines.append(f'  {name:<{width}}' + ''.join(f'{v:>6}' for v in row))
  return '\n'.join(lines)


@inference.cli
def main(argv=None):
  parser = inference.tool_parser(__doc__, 'python -m hybrid_flax.evaluate')
  parser.add_argument('--split', default='', help="TFDS split (default: the run's eval_split)")
  parser.add_argument('--dataset', default='', help="TFDS data set (default: the run's)")
  parser.add_argument('--data_dir', default=None, help="TFDS data dir (default: the run's)")
  parser.add_argument('--batch_size', type=int, default=500)
  parser.add_argument('--eval_flip', choices=('true', 'false'), default=None,
                      help="test-time flip averaging (default: the run's config)")
  parser.add_argument('--eval_translate', type=int, default=None,
                      help="test-time shifted views, in pixels (default: the run's config)")
  args = parser.parse_args(argv)
  input_pipeline.hide_gpus_from_tensorflow()
  run = inference.load_run(args.workdir)
  config = run.config
  if args.eval_flip is not None:
    config.eval_flip = args.eval_flip == 'true'
  if args.eval_translate is not None:
    config.eval_translate = args.eval_translate
  train.validate_eval_config(config)
  dataset = args.dataset or config.dataset
  split = args.split or config.eval_split
  data_dir = config.data_dir if args.data_dir is None else args.data_dir
  images, labels = input_pipeline.load_split(dataset, split, data_dir)
  result = evaluate_run(run, images, labels, args.batch_size)
  result.update(dataset=dataset, split=split, workdir=run.workdir)
  classes = input_pipeline.CIFAR10_CLASSES
  tta = train.test_time_augmentation(config)
  result.update(eval_flip=tta['flip'], eval_translate=tta['translate'])
  print(f'{run.workdir}: checkpoint at step {run.step}, {dataset}[{split}], '
        f'{len(labels)} examples, test-time flip {tta["flip"]}, translate '
        f'{tta["translate"]}\n{report(result, classes)}')
  name = f'step_{run.step}'
  if (dataset, split) != (config.dataset, config.eval_split):
    name += '_' + re.sub(r'[^0-9A-Za-z]+', '_', f'{dataset}_{split}').strip('_')
  json_path = os.path.join(run.workdir, 'eval', f'{name}.json')
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  with open(json_path, 'w') as f:
    json.dump(result, f, indent=1)
  png = figures.confusion_matrix(
      result['confusion_matrix'], classes,
      os.path.join(run.workdir, 'figures', f'confusion_{name}.png'),
      title=f'{dataset}[{split}], step {run.step}: accuracy {result["accuracy"]:.2%}')
  print(f'\nwrote {json_path}\nwrote {png}')
  return result


if __name__ == '__main__':
  main()

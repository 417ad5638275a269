"""PNG figures of a run: training curves, confusion matrix, attention maps.

Rendered with matplotlib's Agg backend, so they work on a machine with no display.
"""

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def _series(records, key):
  points = [(r['epoch'], r[key]) for r in records if key in r]
  return ([p[0] for p in points], [float(p[1]) for p in points]) if points else ([], [])


def training_curves(records: Sequence[dict], path: str, title: str = '',
                    eval_label: str = 'test') -> str:
  """Loss, accuracy, learning rate and throughput against epochs, from metrics.jsonl records.

  `eval_label` names what the records' test_* figures were measured on (the run's eval_split).
  """
  train = [r for r in records if r.get('kind') == 'train']
  epochs = [r for r in records if r.get('kind') == 'epoch']
  if not train and not epochs:
    raise ValueError('the metrics hold no train or epoch records yet: nothing to plot')
  fig, axes = plt.subplots(2, 2, figsize=(11, 7), layout='constrained')
  panels = [
      (axes[0, 0], 'loss', [(train, 'train_loss', 'train (per log interval)', '-', 0.4),
                            (epochs, 'train_loss', 'train (epoch mean)', 'o-', 1.0),
                            (epochs, 'test_loss', eval_label, 's-', 1.0)]),
      (axes[0, 1], 'accuracy', [(train, 'train_accuracy', 'train (per log interval)', '-', 0.4),
                                (epochs, 'train_accuracy', 'train (epoch mean)', 'o-', 1.0),
                                (epochs, 'test_accuracy', eval_label, 's-', 1.0)]),
      (axes[1, 0], 'learning rate', [(train, 'learning_rate', None, '-', 1.0)]),
      (axes[1, 1], 'images / s', [(train, 'images_per_sec', 'training', '-', 1.0)]),
  ]
  for ax, name, lines in panels:
    for subset, key, label, style, alpha in lines:
      x, y = _series(subset, key)
      if x:
        ax.plot(x, y, style, label=label, alpha=alpha, markersize=4)
    ax.set_xlabel('epoch')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    if any(label for _, _, label, _, _ in lines) and ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  final = [r['test_accuracy'] for r in epochs if 'test_accuracy' in r]
  suffix = f' (final {eval_label} accuracy {final[-1]:.2%})' if final else ''
  fig.suptitle(f'{title}{suffix}')
  return _save(fig, path)


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str,
                     title: str = '') -> str:
  """Row-normalised confusion matrix (rows: true class), each cell annotated with its count."""
  matrix = np.asarray(matrix)
  rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(8, 7), layout='constrained')
  im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  ax.set_xticks(range(len(classes)), classes, rotation=45, ha='right')
  ax.set_yticks(range(len(classes)), classes)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  for i in range(len(classes)):
    for j in range(len(classes)):
      ax.text(j, i, str(matrix[i, j]), ha='center', va='center', fontsize=7,
              color='white' if rates[i, j] > 0.5 else 'black')
  fig.colorbar(im, ax=ax, fraction=0.046, label='fraction of the true class')
  ax.set_title(title)
  return _save(fig, path)


def attention_grid(images: np.ndarray, maps: dict[str, np.ndarray], captions: Sequence[str],
                   path: str, title: str = '') -> str:
  """One row per image: the image, then each attention block's map overlaid on it.

  `maps` holds, per block, [N, h, w] attention over the block's spatial positions.
  """
  n, cols = len(images), 1 + len(maps)
  fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False,
                           layout='constrained')
  size = images.shape[1]
  for i in range(n):
    axes[i, 0].imshow(images[i], interpolation='nearest')
    axes[i, 0].set_title(captions[i], fontsize=8)
    for j, (name, block) in enumerate(maps.items(), start=1):
      h, w = block.shape[1:]
      axes[i, j].imshow(images[i], interpolation='nearest')
      axes[i, j].imshow(block[i], cmap='jet', alpha=0.5, interpolation='bilinear',
                        extent=(-0.5, size - 0.5, size - 0.5, -0.5))
      if i == 0:
        axes[i, j].set_title(f'{name} ({h}x{w})', fontsize=8)
  for ax in axes.flat:
    ax.axis('off')
  fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def run_styles(count: int) -> list[tuple[tuple[float, ...], str]]:
  """(colour, marker) for each of `count` lines, no two alike (matplotlib's default cycle
  repeats its colours after 10, and the results plot has more runs than that)."""
  colours = plt.get_cmap('tab10' if count <= 10 else 'tab20').colors
  markers = 'os^Dv'
  if count > len(colours) * len(markers):
    raise ValueError(f'{count} lines are more than {len(colours) * len(markers)} distinct styles')
  return [(colours[i % len(colours)], markers[i // len(colours)]) for i in range(count)]


def accuracy_per_epoch(runs: dict[str, Sequence[dict]], path: str, title: str = '',
                       references: dict[str, float] | None = None) -> str:
  """Test accuracy after each epoch, one line per run; dashed lines mark reference accuracies."""
  fig, ax = plt.subplots(figsize=(12, 5.5), layout='constrained')
  for (label, records), (colour, marker) in zip(runs.items(), run_styles(len(runs))):
    x, y = _series([r for r in records if r.get('kind') == 'epoch'], 'test_accuracy')
    if not x:
      raise ValueError(f'run {label!r} has no evaluated epoch yet: nothing to plot')
    line, = ax.plot(x, [100 * v for v in y], '-', marker=marker, color=colour, markersize=4,
                    label=f'{label}: {y[-1]:.2%}')
    if references and label in references:
      ax.axhline(100 * references[label], color=line.get_color(), ls='--', alpha=0.6, lw=1,
                 label=f'{label}: reference {references[label]:.1%}')
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(alpha=0.3)
  # Beside the axes, not over them: with many runs the legend would hide the curves.
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1))
  ax.set_title(title)
  return _save(fig, path)

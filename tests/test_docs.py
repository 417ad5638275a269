"""The docs point at files that exist, and CI runs the test command README.md gives."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# README.md and every Markdown file under docs/, so a new page is checked without listing it.
DOCS = ['README.md'] + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob('docs/**/*.md'))
# A repository path: one of the project's top-level folders, then a file or folder name.
_PATH = re.compile(r'(?<![\w./-])((?:configs|hybrid_flax|tests|docs|\.ci)/[\w./-]*[\w/])')


def _mentioned_paths(text):
  return sorted(set(_PATH.findall(text)))


def test_path_pattern_finds_paths_in_prose_and_code():
  text = ('see `docs/results.md`, and ![plot](docs/results_accuracy.png); run '
          '`python -m hybrid_flax.bench` (hybrid_flax/bench.py). Not /tmp/configs/x.py.')
  assert _mentioned_paths(text) == ['docs/results.md', 'docs/results_accuracy.png',
                                    'hybrid_flax/bench.py']


@pytest.mark.parametrize('doc', DOCS)
def test_every_path_a_doc_mentions_exists(doc):
  paths = _mentioned_paths((ROOT / doc).read_text())
  assert paths, f'{doc} mentions no repository paths: the pattern is broken'
  missing = [p for p in paths if not (ROOT / p).exists()]
  assert not missing, f'{doc} mentions paths that do not exist: {missing}'


def test_ci_runs_the_test_command_that_readme_gives():
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('\n## Tests\n', 1)[1]
  command = re.search(r'```bash\n(.+?)\n```', section, re.S).group(1).strip()
  ci = (ROOT / '.ci/run').read_text().splitlines()
  assert command.startswith('python -m pytest')
  assert command in [line.strip() for line in ci]


def test_layout_names_every_module_and_config():
  # A reader finds each file's job in README's Layout; a new module must get a row.
  layout = (ROOT / 'README.md').read_text().split('\n## Layout\n', 1)[1]
  files = [p for pattern in ('hybrid_flax/*.py', 'hybrid_flax/csrc/*', 'configs/*.py')
           for p in sorted(ROOT.glob(pattern)) if p.name != '__init__.py']
  assert len(files) > 30, 'the globs found too few files: the test is broken'
  # Rows may group several files of one folder: `hybrid_flax/evaluate.py`, `predict.py`.
  unnamed = [str(p.relative_to(ROOT)) for p in files if f'{p.name}`' not in layout]
  assert not unnamed, f"README's Layout has no row for {unnamed}"


# Scripts whose `--help` is absl's: it prints the module docstring with every '%s'-like '%' in
# it replaced by the program's path ('10% and' printed "10'/path/bench.py'nd").
_ABSL_MAINS = sorted(str(p.relative_to(ROOT)) for pattern in ('*.py', 'hybrid_flax/*.py',
                                                              'docs/**/*.py')
                     for p in ROOT.glob(pattern) if 'app.run(' in p.read_text())


def test_absl_mains_are_found():
  assert {'launch.py', 'hybrid_flax/bench.py'} <= set(_ABSL_MAINS), _ABSL_MAINS


@pytest.mark.parametrize('script', _ABSL_MAINS)
def test_help_prints_the_docstring_as_written(script):
  doc = ast.get_docstring(ast.parse((ROOT / script).read_text()), clean=False) or ''
  lone = [line for line in doc.splitlines() if '%' in line.replace('%%', '')]
  assert not lone, (f"{script}: absl's --help would put the program's path in place of the "
                    f"'%' in {lone}; write it out ('per cent') or as '%%'")

"""config.xla_cpu_convolutions: XLA's own CPU convolutions instead of YNNPACK's (xla_cpu_flags.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hybrid_flax import xla_cpu_flags

# As launch.py does: JAX imported, then the flag applied before anything starts a backend; then
# a 3x3 convolution compiled and run.
_CHILD = '''
import os, sys
import jax, jax.numpy as jnp, numpy as np
from hybrid_flax import xla_cpu_flags
xla_cpu_flags.apply(sys.argv[1])
x = jax.random.normal(jax.random.key(0), (4, 32, 32, 16))
k = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
np.save(sys.argv[2], np.asarray(conv(x, k)))
print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''))
print('ynn' if 'ynn_fusion' in conv.lower(x, k).compile().as_text() else 'plain')
'''


@pytest.fixture
def knows_flag(monkeypatch):
  monkeypatch.setattr(xla_cpu_flags, '_jaxlib_knows_flag', lambda: True)


def test_xla_appends_the_flag_to_the_users_xla_flags(knows_flag):
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  xla_cpu_flags.apply('xla', env)
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=4 {xla_cpu_flags.FLAG}'
  assert 'XLA\'s own' in xla_cpu_flags.status('xla', env)
  env = {}
  xla_cpu_flags.apply('xla', env)
  assert env == {'XLA_FLAGS': xla_cpu_flags.FLAG}


@pytest.mark.parametrize('choice, env, says', [
    ('default', {}, "jaxlib's default (xla_cpu_convolutions='default')"),
    ('xla', {xla_cpu_flags.OPT_OUT: '0'}, 'HYBRID_FLAX_XLA_CPU_FLAGS=0'),
    ('xla', {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=individual_dot'},
     'as XLA_FLAGS sets'),
])
def test_default_opting_out_or_the_users_own_value_leave_xla_flags_alone(knows_flag, choice, env,
                                                                        says):
  before = dict(env)
  xla_cpu_flags.apply(choice, env)
  assert env == before
  assert says in xla_cpu_flags.status(choice, env)


def test_a_jaxlib_without_the_flag_gets_nothing(monkeypatch):
  # XLA aborts the process on a flag value it does not know.
  monkeypatch.setattr(xla_cpu_flags, '_jaxlib_knows_flag', lambda: False)
  env = {}
  xla_cpu_flags.apply('xla', env)
  assert env == {}
  assert 'does not know the flag' in xla_cpu_flags.status('xla', env)


def test_an_unknown_choice_is_refused(knows_flag):
  with pytest.raises(ValueError, match="must be one of \\('xla', 'default'\\), got 'fast'"):
    xla_cpu_flags.apply('fast', {})


def test_the_binary_check_needs_both_the_flag_and_its_value(tmp_path):
  name, value = xla_cpu_flags._MARKERS
  (tmp_path / 'empty.so').write_bytes(b'')
  (tmp_path / 'a.so').write_bytes(b'\0' * 100 + name + b'\0' * 100)
  assert not xla_cpu_flags.binaries_name_flag(str(tmp_path))
  (tmp_path / 'b.so').write_bytes(value + b'\0' + name)
  assert xla_cpu_flags.binaries_name_flag(str(tmp_path))


@pytest.mark.skipif(not xla_cpu_flags._jaxlib_knows_flag(), reason='this jaxlib lacks the flag')
def test_xla_accepts_the_flag_after_jax_is_imported_and_the_convolution_is_the_same(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', xla_cpu_flags.OPT_OUT)}
  outputs = {}
  for choice in xla_cpu_flags.CHOICES:
    outputs[choice] = tmp_path / f'{choice}.npy'
    proc = subprocess.run([sys.executable, '-c', _CHILD, choice, str(outputs[choice])],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if choice == 'xla':
      assert proc.stdout.splitlines() == [f'XLA_FLAGS={xla_cpu_flags.FLAG}', 'plain'], proc.stdout
  np.testing.assert_allclose(np.load(outputs['xla']), np.load(outputs['default']),
                             rtol=1e-5, atol=1e-5)

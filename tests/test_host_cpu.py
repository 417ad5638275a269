"""The host CPU line in logs and benchmark headers tells CPU generations apart."""

from hybrid_flax import host_cpu

_ZEN1_FLAGS = ('fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c '
               'bmi1 avx2 smep bmi2 sha_ni')
_ZEN4_FLAGS = _ZEN1_FLAGS + ' avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni'


def _x86(name, family, model, flags, processors=2):
  block = (f'processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\n'
           f'model\t\t: {model}\nmodel name\t: {name}\nflags\t\t: {flags}\n\n')
  return ''.join(block.format(i) for i in range(processors))


def test_same_name_different_generations_are_told_apart():
  zen1 = host_cpu.describe(_x86('AMD EPYC', 23, 1, _ZEN1_FLAGS), cpu_count=2)
  zen4 = host_cpu.describe(_x86('AMD EPYC', 25, 17, _ZEN4_FLAGS), cpu_count=2)
  assert zen1 == 'host CPU: AMD EPYC (family 23 model 1), 2 CPUs usable, AVX2 (no AVX-512)'
  assert zen4 == 'host CPU: AMD EPYC (family 25 model 17), 2 CPUs usable, AVX-512 with BF16'


def test_widest_level_wins():
  sapphire = _ZEN4_FLAGS + ' amx_tile amx_bf16 amx_int8'
  assert host_cpu.describe(_x86('Xeon', 6, 143, sapphire), 8).endswith(', AMX')
  assert host_cpu.describe(_x86('Xeon', 6, 85, _ZEN1_FLAGS + ' avx512f'), 8).endswith(', AVX-512')
  assert host_cpu.describe(_x86('Old', 6, 42, 'sse sse2 avx'), 8).endswith(', AVX (no AVX-512)')
  assert host_cpu.describe(_x86('Older', 6, 15, 'sse sse2'), 8).endswith(', no AVX or NEON')


def test_arm_and_no_cpuinfo():
  arm = ('processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd evtstrm aes sve sve2\n'
         'CPU implementer\t: 0x41\nCPU part\t: 0xd4f\n\n')
  assert host_cpu.describe(arm, 4).endswith('(implementer 0x41 part 0xd4f), 4 CPUs usable, SVE2')
  bare = host_cpu.describe('', 3)  # macOS, Windows: no /proc/cpuinfo
  assert bare.startswith('host CPU: ') and bare.endswith(', 3 CPUs usable, '
                                                         'vector instructions unknown')


def test_this_host_is_described():
  line = host_cpu.describe()
  assert line.startswith('host CPU: ') and 'CPUs usable' in line

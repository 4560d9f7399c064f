"""Hides AVX-512 from the copy of cpuinfo inside jaxlib, so YNNPACK picks its AVX2 kernels.

A measurement aid for `experiments/as_avx2_cpu.sh`, not part of cifarjax: XLA's own
code obeys `--xla_cpu_max_isa=AVX2`, but YNNPACK (the 1x1 convolutions' matmuls)
chooses its kernels from cpuinfo and has no switch. Python runs this file at start-up
when its directory is on PYTHONPATH; it acts only with CIFARJAX_HIDE_AVX512=1 and
jaxlib installed, before jax is imported, and clears the AVX-512 flags in cpuinfo's
`cpuinfo_isa` after cpuinfo has filled it in. Both symbols are private, so their
addresses come from the library's symbol table (`nm`), and the offsets of the flags
are those that this jaxlib's `ynn::get_supported_arch_flags` reads (its disassembly:
avx2 at 0x1c, avx512f at 0x1d, avx512dq/bw/vl at 0x21-0x23, vnni/bf16/fp16 at
0x29-0x2b); the whole run of cpuinfo's AVX-512 fields, 0x1d-0x2e, is cleared.
"""

import ctypes
import importlib.util
import os
import subprocess
import sys

_JAXLIB_VERSION = "0.10.2"  # the build whose offsets are read below
_AVX2, _AVX512_FIELDS = 0x1C, range(0x1D, 0x2F)


def _fail(message):
  sys.exit(f"as_avx2_cpu: {message}")


def _symbol_offsets(library, names):
  try:
    listing = subprocess.run(["nm", library], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    _fail(f"cannot read {library}'s symbols with nm (binutils): {e}")
  found = {}
  for line in listing.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[2] in names:
      found[parts[2]] = int(parts[0], 16)
  if set(found) != set(names):
    _fail(f"{library} lacks the symbols {sorted(set(names) - set(found))}")
  return found


def _load_address(library):
  """Where the loader put `library` (the start of its mapping at file offset 0)."""
  with open("/proc/self/maps") as maps:
    for line in maps:
      fields = line.split()
      if len(fields) >= 6 and fields[5] == library and int(fields[2], 16) == 0:
        return int(fields[0].split("-")[0], 16)
  _fail(f"{library} is not mapped into this process")


def hide_avx512():
  spec = importlib.util.find_spec("jaxlib")
  if spec is None:  # e.g. the PyTorch twin's interpreter
    return
  from importlib.metadata import version
  if version("jaxlib") != _JAXLIB_VERSION:
    _fail(f"the offsets here are jaxlib {_JAXLIB_VERSION}'s; this is jaxlib {version('jaxlib')}")
  library = os.path.realpath(os.path.join(os.path.dirname(spec.origin), "libjax_common.so"))
  symbols = _symbol_offsets(library, ("cpuinfo_initialize", "cpuinfo_isa"))
  ctypes.CDLL(library, mode=os.RTLD_NOW | os.RTLD_GLOBAL)  # the same mapping jaxlib uses later
  base = _load_address(library)
  if not ctypes.CFUNCTYPE(ctypes.c_bool)(base + symbols["cpuinfo_initialize"])():
    _fail("cpuinfo_initialize failed")
  isa = (ctypes.c_uint8 * (_AVX512_FIELDS.stop)).from_address(base + symbols["cpuinfo_isa"])
  if isa[_AVX2] != 1:
    _fail("this CPU has no AVX2; nothing to stand in for")
  were_set = sum(isa[i] for i in _AVX512_FIELDS)
  for i in _AVX512_FIELDS:
    isa[i] = 0
  print(f"as_avx2_cpu: cpuinfo's AVX-512 flags cleared in jaxlib ({were_set} were set)", file=sys.stderr)


if os.environ.get("CIFARJAX_HIDE_AVX512") == "1":
  hide_avx512()

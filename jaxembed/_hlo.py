"""The collectives of a compiled XLA program, read from its HLO text: tooling, not API.

The multi-device tests, `examples/sharded_finetune.py` and `benchmarks/bench_sharded.py` ask
the same questions of `jax.jit(f).lower(*args).compile().as_text()`: which collectives does
the program run, how many bytes do they produce on each device, and does it all-gather a whole
table? This module answers them once. It is private (not re-exported, no stability promise);
it lives in the package so that scripts run from the repository root can import it.

A collective is an instruction whose opcode is one of `COLLECTIVE_OPS`, in its synchronous
form (`all-gather(...)`, what XLA:CPU emits) or as an async pair (`all-gather-start(...)` then
`all-gather-done(...)`, what GPUs and TPUs emit). An async pair counts once, at its `-done`,
whose result is the collective's output; its replica groups are read from the `-start`.

>>> text = '''
... %ag = f32[64,16]{1,0} all-gather(f32[8,16]{1,0} %p), replica_groups=[1,8]<=[8], dimensions={0}
... %ars = f32[8]{0} all-reduce-start(f32[8]{0} %x), replica_groups={{0,1},{2,3}}, to_apply=%add
... %rss = ((bf16[8]), bf16[2]) reduce-scatter-start(bf16[8] %y), replica_groups=[2,4]<=[8]
... %ard = f32[8]{0} all-reduce-done(f32[8]{0} %ars)
... %rsd = bf16[2] reduce-scatter-done(((bf16[8]), bf16[2]) %rss)
... ROOT %out = (f32[64,16]{1,0}, f32[8]{0}, bf16[2]) tuple(%ag, %ard, %rsd)
... '''
>>> for c in collectives(text):
...     print(c)
Collective(op='all-gather', shapes=('f32[64,16]',), nbytes=4096, group_size=8)
Collective(op='all-reduce', shapes=('f32[8]',), nbytes=32, group_size=2)
Collective(op='reduce-scatter', shapes=('bf16[2]',), nbytes=4, group_size=4)
>>> all_gathers(text, (64, 16)), all_gathers(text, (8, 16))
(True, False)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

# The collective opcodes reported, as HLO spells them.
COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# One instruction line: `[ROOT] %name = <result type> <opcode>(`. The result type is one
# array shape (`f32[8,16]{1,0}`) or a tuple of them (nested once in async starts, and with
# `/*index=5*/` comments); anchoring at the line's start keeps op names in metadata out.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*"
    r"(?P<result>\((?:[^()]|\([^()]*\))*\)|[a-z][a-z0-9]*\[[\d,]*\]\S*)\s+"
    r"(?P<op>" + "|".join(COLLECTIVE_OPS) + r")(?P<phase>-start|-done)?\("
)
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")  # f32[8,16] -> ("f32", "8,16")
_DONE_OPERAND = re.compile(r"-done\(.*?%?([\w.\-]+)\)(?:,|\s*$)")  # the -start it waits on


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program, as seen by one device."""

    op: str
    """Its opcode, one of `COLLECTIVE_OPS` (`-start`/`-done` dropped)."""
    shapes: tuple[str, ...]
    """Its result array shapes as HLO spells them (`"f32[64,16]"`); several for a tuple."""
    nbytes: int
    """Bytes of its result buffers on each device."""
    group_size: int | None
    """Devices per replica group; None where HLO gives none (collective-permute's pairs)."""

    def has_shape(self, shape: Sequence[int]) -> bool:
        """Whether one of its results is an array of `shape`, of any dtype."""
        dims = ",".join(str(int(d)) for d in shape)
        return any(s[s.index("[") + 1 : -1] == dims for s in self.shapes)


def compiled_text(fn: Callable[..., Any], *args: Any) -> str:
    """The compiled HLO text of `fn` (`jax.jit` applied unless it already can `lower`) on
    `args`: the per-device program after sharding propagation and partitioning."""
    lowerable = fn if hasattr(fn, "lower") else jax.jit(fn)
    return lowerable.lower(*args).compile().as_text()


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled program, in program order (see the module docstring)."""
    lines = hlo_text.splitlines()
    matches = [(line, _INSTRUCTION.match(line)) for line in lines]
    starts = {m["name"]: line for line, m in matches if m and m["phase"] == "-start"}
    found = []
    for line, match in matches:
        if match is None or match["phase"] == "-start":
            continue
        groups_line = line
        if match["phase"] == "-done":
            operand = _DONE_OPERAND.search(line)
            groups_line = starts.get(operand[1], line) if operand else line
        shapes = _SHAPE.findall(match["result"])
        found.append(
            Collective(
                op=match["op"],
                shapes=tuple(f"{dtype}[{dims}]" for dtype, dims in shapes),
                nbytes=sum(_array_bytes(dtype, dims) for dtype, dims in shapes),
                group_size=group_size(groups_line),
            )
        )
    return found


def all_gathered_shapes(hlo_text: str) -> list[str]:
    """The result shapes of every all-gather of a compiled program (`"f32[64,16]"`, ...)."""
    return [shape for c in collectives(hlo_text) if c.op == "all-gather" for shape in c.shapes]


def all_gathers(hlo_text: str, shape: Sequence[int]) -> bool:
    """Whether the program all-gathers an array of `shape` (of any dtype): with a table's
    `(input_dim, output_dim)`, whether some device ends up holding the whole table."""
    return any(c.op == "all-gather" and c.has_shape(shape) for c in collectives(hlo_text))


def group_size(instruction: str) -> int | None:
    """Devices per replica group of one collective instruction's HLO line, from any of the
    three forms XLA prints; None where it has none (collective-permute) or is not parsed.

    >>> group_size("all-reduce(%x), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add")
    4
    """
    found = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", instruction)
    if found:  # replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=(...) {'axis_1'}
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", found[1])}
        return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", found[2]))
    found = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", instruction)
    if found:  # iota form: [groups, size]<=[...]
        return int(found[2])
    found = re.search(r"replica_groups=\{\{([\d,]*)\}", instruction)
    if found:  # explicit groups: {{0,1,2,3},{4,5,6,7}}
        return len(found[1].split(","))
    return None


def _array_bytes(dtype: str, dims: str) -> int:
    """Bytes of one HLO array (`"bf16"`, `"8,16"`); the bits are read from the dtype's name
    (`f8e4m3fn`: 8, `c64`: 64), `pred` is one byte."""
    bits = re.search(r"\d+", dtype)
    size = math.prod(int(d) for d in dims.split(",") if d)
    return size * (int(bits[0]) if bits else 8) // 8

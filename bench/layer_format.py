"""The layer format: how a compressed layer stores its weights and how its inputs run, as typed fields. Methods
return one per compressed layer (`Packed.layer_format`); backends decide what they can execute from the fields,
never from a method's name or the words of a label.

Weights (`kind`):
- `int`: an integer grid of `bits`-bit codes, `symmetric` or with zero points, one scale per output channel
  (`granularity="channel"`), per `group` input columns (`"group"`) or per tensor (`"tensor"`); `mixed`: per-column
  widths whose average is `bits`; `levels`: fewer levels than 2^bits (ABQ's 5-level 2-bit grid), packed several
  codes per byte; `act_order`: groups follow a stored column order (GPTQ). An int grid packed at `bits` with no
  `levels` and no `mixed` stores `bench.quant.integer.stored_int_layer`'s tensors (qweight, scale, qzero, bias,
  perm).
- `float`: low-bit floating-point codes (`bits` = sign + exponent + mantissa bits), scaled per channel or group.
- `power`: a power-function grid (NUPES/PowerQuant): `bits`-bit codes of a uniform grid over sign(w)|w|^a, scaled per
  channel or group (`symmetric` or with zero points as `int`), each level mapped back through the inverse power; the
  exponent a is a stored per-layer tensor, so the levels are not equally spaced and no integer kernel computes them.
- `binary`: sign planes (`bits` = planes per weight) with their scales; `ternary`: trits {-1, 0, 1} (1.6 bits,
  five per byte); `sparse`: fp16 kept values and their positions (`pattern`: "2:4" or "unstructured0.5").
`name` is the weight encoding as records spell it (e.g. "gptq-int4-asym-g128-actorder"): descriptive only.
`act` is how the method runs the layer's inputs (None: untouched), `notes` what else the label records
(e.g. a real-valued shortcut), `adapter` a recovery branch (LoRA/DoRA/RoRA) stored beside the weights.

The label (`str(fmt)`) is derived from the fields, weight name first, then "+"-joined activation, notes and
adapter: "int4-asym-g128+a8-per_token-dynamic+lora64". It is identical to the strings earlier versions wrote.

In the artifact metadata the formats are JSON objects of these fields. Artifacts written before this type existed
hold label strings: `LayerFormat.from_label` reads those, in this one place.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

WEIGHT_KINDS = ("int", "float", "power", "binary", "ternary", "sparse")
GRANULARITIES = ("channel", "group", "tensor")  # what one weight scale covers (int, float and power grids)
ACT_KINDS = ("int", "float", "binary")


@dataclass(frozen=True)
class ActFormat:
    """How a layer's input activations run: `bits` (32: full-precision float, stated by the method), integers,
    a low-bit float format (`name` as the method spells it, e.g. fp4_e2m1, e4m3) or signs; per token or per
    tensor; with a dynamic, static (calibrated) or mean-|x| scale; `detail`: further words of the label."""

    bits: int
    kind: str = "int"
    granularity: str = ""  # per_token | per_tensor ("": not stated)
    scale: str = ""  # dynamic | static | meanabs ("": not stated)
    name: str = ""
    detail: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ACT_KINDS:
            raise ValueError(f"activation kind '{self.kind}' is not one of {ACT_KINDS}")
        object.__setattr__(self, "detail", tuple(self.detail))

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def label(self) -> str:
        return "-".join(p for p in (self.name or f"a{self.bits}", self.granularity, self.scale, *self.detail) if p)


@dataclass(frozen=True)
class AdapterBranch:
    """A recovery adapter stored beside the compressed weight (bench/recover.py)."""

    kind: str  # lora | dora | rora
    rank: int

    @property
    def label(self) -> str:
        return f"{self.kind}{self.rank}"


@dataclass(frozen=True)
class LayerFormat:
    kind: str
    bits: int | float
    name: str
    granularity: str | None = None  # int, float and power grids
    group: int | None = None  # granularity "group": input columns per scale
    symmetric: bool | None = None  # int and power grids
    mixed: bool = False
    levels: int | None = None
    act_order: bool = False
    pattern: str = ""  # sparse
    act: ActFormat | None = None
    notes: tuple[str, ...] = ()
    adapter: AdapterBranch | None = None

    def __post_init__(self):
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"weight kind '{self.kind}' is not one of {WEIGHT_KINDS}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity '{self.granularity}' is not one of {GRANULARITIES}")
        if (self.granularity == "group") != (self.group is not None):
            raise ValueError("a group size is given exactly when the granularity is 'group'")
        object.__setattr__(self, "notes", tuple(self.notes))

    # --- the label -----------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        parts = [self.name, self.act.label if self.act else None, *self.notes,
                 self.adapter.label if self.adapter else None]
        return "+".join(p for p in parts if p)

    def __str__(self) -> str:
        return self.label

    @property
    def packing(self) -> str:
        """How the weight codes are laid out in bytes (bench.quant.bitpack)."""
        if self.levels:
            return f"base{self.levels}"  # several codes per byte group (3 levels: 5 per 8 bits, 5: 3 per 7)
        return "values+positions" if self.kind == "sparse" else "bitstream"  # bitstream: `bits` per code

    # --- derived formats ------------------------------------------------------------------------------------
    def with_act(self, act: ActFormat | None) -> LayerFormat:
        return dataclasses.replace(self, act=act)

    def with_notes(self, *notes: str) -> LayerFormat:
        return dataclasses.replace(self, notes=notes)

    def with_adapter(self, adapter: AdapterBranch) -> LayerFormat:
        return dataclasses.replace(self, adapter=adapter)

    # --- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def int_grid(cls, bits: int, group_size: int, symmetric: bool, prefix: str = "", levels: int | None = None,
                 act_order: bool = False) -> LayerFormat:
        """An integer grid per output channel (`group_size` -1 or 0) or per group of input columns, named as
        "[prefix-]int4[-5level]-asym-g128[-actorder]"."""
        group = None if group_size in (-1, 0) else group_size
        name = (f"{prefix}-" if prefix else "") + f"int{bits}" + (f"-{levels}level" if levels else "") + \
            f"-{'sym' if symmetric else 'asym'}-{'ch' if group is None else f'g{group}'}" + \
            ("-actorder" if act_order else "")
        return cls("int", bits, name, "channel" if group is None else "group", group, symmetric, levels=levels,
                   act_order=act_order)

    @classmethod
    def float_grid(cls, format_name: str, bits: int, group_size: int, prefix: str = "") -> LayerFormat:
        """Low-bit float codes (`format_name` as the method spells it, e.g. fp4_e2m1, e4m3, fp4-e2m1), named as
        "[prefix-]<format>-ch" or "-g<size>"."""
        group = None if group_size in (-1, 0) else group_size
        name = (f"{prefix}-" if prefix else "") + f"{format_name}-{'ch' if group is None else f'g{group}'}"
        return cls("float", bits, name, "channel" if group is None else "group", group)

    @classmethod
    def power_grid(cls, bits: int, group_size: int, symmetric: bool, prefix: str = "") -> LayerFormat:
        """A uniform `bits`-bit grid over sign(w)|w|^a mapped back by the inverse power (a per layer, stored), named
        as "[prefix-]pow4-asym-g128"."""
        int_fmt = cls.int_grid(bits, group_size, symmetric)
        name = (f"{prefix}-" if prefix else "") + "pow" + int_fmt.name[len("int"):]
        return dataclasses.replace(int_fmt, kind="power", name=name)

    @classmethod
    def binary(cls, name: str, planes: int = 1, act: ActFormat | None = None) -> LayerFormat:
        return cls("binary", planes, name, act=act)

    @classmethod
    def ternary(cls, name: str) -> LayerFormat:
        return cls("ternary", 1.6, name, levels=3)

    @classmethod
    def sparse(cls, prefix: str, pattern: str) -> LayerFormat:
        """fp16 kept values + their positions, named "<prefix>-<pattern>-fp16"."""
        return cls("sparse", 16, f"{prefix}-{pattern}-fp16", pattern=pattern)

    # --- JSON (artifact metadata) ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict | str) -> LayerFormat:
        """A format as `to_json` wrote it, or a label string written before formats were typed."""
        if isinstance(d, str):
            return cls.from_label(d)
        d = dict(d)
        if d.get("act") is not None:
            d["act"] = ActFormat(**d["act"])
        if d.get("adapter") is not None:
            d["adapter"] = AdapterBranch(**d["adapter"])
        return cls(**d)

    @classmethod
    def from_label(cls, label: str) -> LayerFormat:
        """The format behind a label that an earlier version wrote (every spelling of its 37 methods). Raises
        ValueError for a label it does not know."""
        return _parse_label(label)


# --- labels written before formats were typed: parsed here and nowhere else ---------------------------------
_ADAPTER = re.compile(r"(lora|dora|rora)(\d+)")
_ACT = re.compile(r"(?P<name>a\d+|fp\d+[_-]e\d+m\d+|e\d+m\d+)(?:-(?P<gran>per_token|per_tensor))?"
                  r"(?:-(?P<scale>dynamic|static|meanabs))?(?P<detail>(?:-\w+)*)")
_WEIGHT_EXTRA = re.compile(r"layernorm|int\d+-[\d.]+salient")  # onebit's output norm, pbllm's salient grid
_INT = re.compile(r"(?:(?P<prefix>[a-z][\w.]*?)-)?int(?P<bits>\d+)(?:-(?P<levels>\d+)level)?-(?P<sym>sym|asym)"
                  r"-(?P<g>ch|g\d+)(?P<actorder>-actorder)?")
_BAQ = re.compile(r"baq-int(?P<bits>[\d.]+)avg-\w+-rowminmax")  # per-column widths, per-row min/max grid
_EDGEQAT = re.compile(r"edgeqat-w(?P<bits>\d+)-per_tensor-sym")
_FLOAT = re.compile(r"(?:(?P<prefix>[a-z]+)-)?(?P<fmt>fp\d+(?:[_-]e\d+m\d+)?|e\d+m\d+)-(?P<g>ch|g\d+)")
_SPARSE = re.compile(r"(?P<prefix>[a-z_]+)-(?P<pattern>\d+:\d+|unstructured[\d.]+)-fp16")
_BINARY_WORDS = ("sign", "xnor", "binary", "1bit", "onebit", "billm", "pbllm")


def _number(text: str) -> int | float:
    v = float(text)
    return int(v) if v.is_integer() else v


def _float_bits(fmt: str) -> int:
    m = re.match(r"fp(\d+)", fmt)
    if m:
        return int(m.group(1))
    e, man = (int(v) for v in re.fullmatch(r"e(\d+)m(\d+)", fmt).groups())
    return 1 + e + man


def _group(g: str) -> int:
    return -1 if g == "ch" else int(g[1:])


def _parse_act(text: str) -> ActFormat | None:
    m = _ACT.fullmatch(text)
    if m is None:
        return None
    name, gran, scale = m.group("name"), m.group("gran") or "", m.group("scale") or ""
    detail = tuple(d for d in m.group("detail").split("-") if d)
    if name.startswith("a"):
        bits = int(name[1:])
        kind = "binary" if bits == 1 else "float" if bits >= 16 else "int"
        return ActFormat(bits, kind, gran, scale, "", detail)
    return ActFormat(_float_bits(name), "float", gran, scale, name, detail)


def _parse_weights(name: str) -> LayerFormat:
    base = name.split("+")[0]
    if m := _INT.fullmatch(base):
        levels = int(m.group("levels")) if m.group("levels") else None
        return LayerFormat.int_grid(int(m.group("bits")), _group(m.group("g")), m.group("sym") == "sym",
                                    m.group("prefix") or "", levels, bool(m.group("actorder")))
    if m := _BAQ.fullmatch(base):
        return LayerFormat("int", _number(m.group("bits")), name, "channel", symmetric=False, mixed=True)
    if m := _EDGEQAT.fullmatch(base):
        return LayerFormat("int", int(m.group("bits")), name, "tensor", symmetric=True)
    if any(w in base for w in _BINARY_WORDS):
        planes = 2 if re.search(r"2x1bit|2basis", base) else 1
        return LayerFormat.binary(name, planes)
    if base.startswith("ternary-"):
        return LayerFormat.ternary(name)
    if m := _SPARSE.fullmatch(base):
        return LayerFormat.sparse(m.group("prefix"), m.group("pattern"))
    if m := _FLOAT.fullmatch(base):
        return LayerFormat.float_grid(m.group("fmt"), _float_bits(m.group("fmt")), _group(m.group("g")),
                                      m.group("prefix") or "")
    raise ValueError(f"layer format label '{name}' is not one this version reads")


def _parse_label(label: str) -> LayerFormat:
    weight, *rest = label.split("+")
    while rest and _WEIGHT_EXTRA.fullmatch(rest[0]):  # '+' inside the weight name
        weight += "+" + rest.pop(0)
    act, notes, adapter = None, [], None
    for part in rest:
        if m := _ADAPTER.fullmatch(part):
            adapter = AdapterBranch(m.group(1), int(m.group(2)))
        elif act is None and not notes and (a := _parse_act(part)) is not None:
            act = a
        else:
            notes.append(part)
    fmt = _parse_weights(weight)
    return dataclasses.replace(fmt, act=act, notes=tuple(notes), adapter=adapter)

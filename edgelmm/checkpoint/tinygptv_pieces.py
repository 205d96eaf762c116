"""TinyGPT-V's released pieces as one table of edgelmm parameter names → tensors (docs/model-formats.md §3.1).

Per piece: key renames; the Phi-2 4.36 ``query_key_value`` (rows interleaved per head as [heads, 3, head_dim])
split into q/k/v (a Phi-2 saved by transformers >= 4.37, q/k/v apart, is fused first); LoRA (``lora_A``/
``lora_B``, scale alpha/r) merged into its base weight first; EVA's ``pos_embed`` interpolated to the input size;
norm tensors no file carries (q/k LayerNorm biases, ...) set to their fresh-module values, as upstream's
``strict=False`` loads leave them. Tensors are made on demand, so a
multi-GB file is read one tensor at a time. The table has the interface ``loader.load_into`` reads."""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from edgelmm.checkpoint.loader import WeightFiles, map_key
from edgelmm.errors import CheckpointError, ShapeMismatchError
from edgelmm.spec import KeyRules

PHI_RULES: KeyRules = (("model.", "text."), ("lm_head.", "text.lm_head."))
EVA_RULES: KeyRules = (("", "vision."),)
QFORMER_RULES: KeyRules = (("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
                           ("Qformer.bert.encoder.layer.", "qformer.layer."),
                           ("query_tokens", "qformer.query_tokens"), ("ln_vision.", "ln_vision."))
STAGE_RULES: KeyRules = (("llama_model.base_model.model.model.", "text."),  # PEFT-wrapped (LoRA stages)
                         ("llama_model.base_model.model.lm_head.", "text.lm_head."),
                         ("llama_model.model.", "text."), ("llama_model.lm_head.", "text.lm_head."),
                         ("llama_proj.", "llama_proj."), ("llama_proj2.", "llama_proj2."),
                         ("ln_vision.", "ln_vision."), ("query_tokens", "qformer.query_tokens"))
_LORA = re.compile(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$")  # peft 0.2.0 has no adapter name
_FRESH = {"q_layernorm.weight": 1.0, "q_layernorm.bias": 0.0, "k_layernorm.weight": 1.0,
          "k_layernorm.bias": 0.0, "post_layernorm.weight": 1.0}  # modules the stock Phi-2 files lack


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize learned positions [1, 1+g*g, D] to [1, 1+grid*grid, D] as LAVIS ``interpolate_pos_embed`` does:
    the CLS position is kept, the g x g patch grid is resized bicubically (align_corners=False) in fp32."""
    pos_embed = pos_embed.float()
    old = int((pos_embed.shape[1] - 1) ** 0.5)
    if old == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, g*g, D)
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)  # (1, D, G, G)
    return torch.cat((cls, patches.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)  # (1, 1+G*G, D)


class TensorTable:
    """Named tensors made on demand: ``put`` registers a name with its shape, a maker and the file it comes
    from; a later ``put`` of the same name replaces the earlier (checkpoints load in upstream order)."""

    def __init__(self):
        self._items: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
        self.file_of: dict[str, Path] = {}

    def put(self, name: str, shape, make: Callable[[], torch.Tensor], origin: Path) -> None:
        self._items[name] = (tuple(shape), make)
        self.file_of[name] = origin

    def keys(self):
        return self._items.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._items[name][0]

    def get(self, name: str) -> torch.Tensor:
        return self._items[name][1]()

    def release(self, path: Path) -> None:
        """Drop the entries read from ``path`` (``load_into`` calls this when it is done with a file), so the
        memory-mapped piece they come from can be unmapped instead of counting towards RSS until the end."""
        for name in [n for n, origin in self.file_of.items() if origin == path]:
            self.pop(name)

    def pop(self, name: str) -> tuple[tuple[int, ...], Callable[[], torch.Tensor], Path]:
        shape, make = self._items.pop(name)
        return shape, make, self.file_of.pop(name)


def read_pth(path: Path, what: str) -> dict:
    """A torch pickle's dict (memory-mapped, tensors and plain data only)."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found; download it and fix the path in the description file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # saved in the pre-1.6 format, which cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read {what} {path} ({type(e).__name__}: {reason}); it is damaged or not a "
                              "plain tensor file, download it again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def state_dict(obj: dict, path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a training-runner save (``{"model": state_dict, ...}``) or of a bare state dict."""
    state = obj.get("model", obj)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise CheckpointError(f"{what} {path} holds no tensors; is it the right file?")
    return tensors


def add_tensors(table: TensorTable, state: dict[str, torch.Tensor], rules: KeyRules, origin: Path) -> None:
    """Rename a loaded state dict's keys by ``rules`` into ``table`` (keys no rule matches are skipped)."""
    for key, tensor in state.items():
        name = map_key(key, rules)
        if name is not None:
            table.put(name, tensor.shape, lambda t=tensor: t, origin)


def add_files(table: TensorTable, files: WeightFiles, rules: KeyRules) -> None:
    """Register every tensor of an HF folder under its renamed key, read lazily."""
    keys = files.keys()
    for key in keys:
        name = map_key(key, rules)
        if name is not None:
            table.put(name, files.shape(key), lambda k=key: files.get(k), files.file_of[key])


def take_lora(table: TensorTable) -> dict[str, tuple[torch.Tensor, torch.Tensor, Path]]:
    """Remove the LoRA pairs from ``table``: base weight name → (A [r, in], B [out, r], file)."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    origin: dict[str, Path] = {}
    for name in [n for n in table if _LORA.match(n)]:
        prefix, half = _LORA.match(name).groups()
        base = prefix + ".weight"
        _, make, origin[base] = table.pop(name)
        halves.setdefault(base, {})[half] = make()
    pairs = {}
    for base, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{origin[base].name} has lora_{''.join(ab)} but not its partner for {base}; "
                                  "the stage checkpoint is incomplete, download it again")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(f"LoRA for {base} in {origin[base].name}: A is {tuple(a.shape)}, B is "
                                     f"{tuple(b.shape)}; their ranks differ")
        pairs[base] = (a, b, origin[base])
    return pairs


def merge_lora(table: TensorTable, pairs: dict, alpha: float, rank: int | None) -> None:
    """Fold each LoRA pair into its base weight once: W + (alpha / r) * B @ A, computed in fp32."""
    for base, (a, b, origin) in pairs.items():
        r = a.shape[0]
        if rank is not None and r != rank:
            raise ShapeMismatchError(f"{origin.name} has rank-{r} LoRA on {base}, but the description says lora_r "
                                     f"{rank}; fix lora_r or use the matching checkpoint")
        if base not in table:
            raise CheckpointError(f"{origin.name} has LoRA for {base}, which the Phi-2 folder lacks")
        want = (b.shape[0], a.shape[1])
        if table.shape(base) != want:
            raise ShapeMismatchError(f"LoRA for {base} in {origin.name} is {want} but the base weight in "
                                     f"{table.file_of[base].name} is {table.shape(base)}")
        shape, make, src = table.pop(base)
        scale = alpha / r
        table.put(base, shape, lambda make=make, a=a, b=b, s=scale: make().float() + s * (b.float() @ a.float()), src)


def split_fused_qkv(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v rows of a 4.36-layout ``query_key_value`` weight [3*H*Dh, D] or bias [3*H*Dh], whose rows are
    ordered [heads, 3, head_dim] (upstream views the output as (B, T, H, 3, Dh))."""
    rest = fused.shape[1:]
    per_head = fused.reshape(heads, 3, -1, *rest)  # (H, 3, Dh[, D])
    return tuple(per_head[:, i].reshape(-1, *rest) for i in range(3))  # 3 x (H*Dh[, D])


def fuse_qkv(table: TensorTable, heads: int) -> None:
    """Turn a Phi-2 folder saved by transformers >= 4.37 (``q_proj``/``k_proj``/``v_proj`` apart) into the 4.36
    fused layout the LoRA targets: rows [heads, 3, head_dim] (the 4.36 converter's order)."""
    for name in [n for n in table if ".self_attn.q_proj." in n]:
        parts = [table.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        shape, origin = parts[0][0], parts[0][2]

        def fused(makes=tuple(p[1] for p in parts), rest=shape[1:]) -> torch.Tensor:
            qkv = torch.stack([make() for make in makes])  # (3, H*Dh[, D])
            return qkv.view(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)  # (H*3*Dh[, D])
        table.put(name.replace("q_proj", "query_key_value"), (3 * shape[0], *shape[1:]), fused, origin)


def split_qkv(table: TensorTable, heads: int) -> None:
    """Replace every ``query_key_value`` entry by its q_proj/k_proj/v_proj parts (after any LoRA merge)."""
    last: dict[str, object] = {}  # load_into reads q, k, v one after another: keep one fused tensor at a time

    def part(name: str, make: Callable[[], torch.Tensor], i: int) -> torch.Tensor:
        if last.get("name") != name:
            last.update(name=name, parts=split_fused_qkv(make(), heads))
        return last["parts"][i]

    for name in [n for n in table if ".self_attn.query_key_value." in n]:
        shape, make, origin = table.pop(name)
        if shape[0] % (3 * heads):
            raise ShapeMismatchError(f"{name} in {origin.name} has {shape[0]} rows, not 3 x {heads} heads x head_dim")
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            table.put(name.replace("query_key_value", proj), (shape[0] // 3, *shape[1:]),
                      lambda name=name, make=make, i=i: part(name, make, i), origin)


def resize_pos_embed(table: TensorTable, grid: int) -> None:
    """Interpolate EVA's learned positions to a grid x grid patch grid (224 → 16, 448 → 32 for patch 14)."""
    if "vision.pos_embed" not in table:
        return
    shape, make, origin = table.pop("vision.pos_embed")
    resized = (1, grid * grid + 1, shape[-1])  # (1, 1+G*G, D)
    table.put("vision.pos_embed", resized, lambda: interpolate_pos_embed(make(), grid), origin)


def fill_fresh(table: TensorTable, params: dict[str, torch.nn.Parameter], origin: Path) -> None:
    """Give the norm tensors no file carries the values a freshly built module has (as upstream does)."""
    for name, p in params.items():
        suffix = ".".join(name.split(".")[-2:])
        if name not in table and suffix in _FRESH:
            table.put(name, p.shape, lambda s=tuple(p.shape), v=_FRESH[suffix]: torch.full(s, v), origin)

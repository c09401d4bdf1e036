"""Load HF-format checkpoints: `config.json` + `*.safetensors` from a local directory.

The trunk (everything but the routed experts) loads into a `Transformer`; routed experts
load separately, and only those asked for, by slicing the safetensors files, so an expert
shard never reads the rest of the model. Both expert layouts are accepted:

- fused (transformers 5 modules): `mlp.experts.gate_up_proj [E, 2I, D]`, `mlp.experts.down_proj [E, D, I]`
- per expert (published checkpoints): `mlp.experts.N.{gate,up,down}_proj.weight`, and
  Mixtral's `block_sparse_moe.experts.N.{w1,w3,w2}.weight`

Block-quantized fp8 checkpoints (DeepSeek-V3/R1: `quantization_config.quant_method="fp8"`,
`weight_block_size=[B0, B1]`) store a quantized linear weight as `W` in float8_e4m3fn plus
`W_scale_inv` in float32, one scale per [B0, B1] block (partial blocks at the right and bottom
edges). `CheckpointIndex.get_weight` dequantizes them on load (`W * scale` per block, then the
model dtype); an expert's weights and scales are read alone, so a shard reads only its experts.

DeepSeek-V3's multi-token-prediction module (`num_nextn_predict_layers`) is stored as the layer
after the last decoder layer, `model.layers.{num_hidden_layers}.*`; `load_trunk` skips it and
`load_mtp` builds it (`MTPHead`) for `draft="mtp"`.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import torch
from safetensors import safe_open

from specmoe_ray.errors import CheckpointError, UnsupportedArchitectureError
from specmoe_ray.models.args import ModelArgs
from specmoe_ray.models.deepseek import DeepseekTransformer, MTPHead
from specmoe_ray.models.transformer import Transformer, rope_inv_freq
from specmoe_ray.moe.experts import ExpertStore, LocalExperts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPERT_RE = re.compile(r"\.(mlp|block_sparse_moe)\.experts\.")
SCALE_SUFFIX = "_scale_inv"


def resolve_dtype(dtype: str | torch.dtype | None, args: ModelArgs) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} not supported (use one of {', '.join(DTYPES)})")
        return dtype
    name = args.torch_dtype if dtype in (None, "auto") else dtype
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} not supported (use 'auto' or one of {', '.join(DTYPES)})")
    return DTYPES[name]


def read_config(path: str) -> tuple[ModelArgs, dict[str, Any]]:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path!r}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path!r} has no config.json: not a Hugging Face checkpoint directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    return ModelArgs.from_hf_config(cfg, source=cfg_path), cfg


class CheckpointIndex:
    """tensor name -> safetensors file, read from the files' headers (no tensor data)."""

    def __init__(self, path: str, fp8_block: tuple[int, int] | None = None):
        self.path = path
        self.fp8_block = fp8_block  # quantization_config.weight_block_size, for get_weight
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path!r} has no *.safetensors files")
        self.file_of: dict[str, str] = {}
        for name in files:
            full = os.path.join(path, name)
            try:
                with safe_open(full, framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                        self.file_of[key] = full
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{full}: corrupt or unreadable safetensors file ({e})") from e
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """A tensor, or only row `index` of its first dimension (read as a slice)."""
        if name not in self.file_of:
            raise CheckpointError(f"{self.path!r}: tensor {name!r} is missing from the checkpoint")
        file = self.file_of[name]
        try:
            handle = self._handle(file)
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e

    def get_weight(self, name: str, index: int | None = None) -> torch.Tensor:
        """`get`, dequantized (to float32) where the checkpoint has `name + "_scale_inv"`."""
        tensor = self.get(name, index)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.file_of:
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise CheckpointError(
                    f"{self.file_of[name]}: tensor {name!r} is {tensor.dtype} but the checkpoint has "
                    f"no {scale_name!r} to dequantize it with"
                )
            return tensor
        if self.fp8_block is None:
            raise CheckpointError(
                f"{self.path!r}: tensor {scale_name!r} (fp8 block scales) but config.json has no "
                "quantization_config with quant_method='fp8' and weight_block_size"
            )
        return dequantize_fp8(tensor, self.get(scale_name, index), self.fp8_block, name, self.file_of[name])

    def shape(self, name: str) -> list[int]:
        return list(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def close(self) -> None:
        self._handles.clear()


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "", file: str = ""
) -> torch.Tensor:
    """float32 `weight * scale_inv`, one scale per [B0, B1] block of the last two dims.

    weight: [..., rows, cols] (fp8); scale_inv: [..., ceil(rows / B0), ceil(cols / B1)]. The
    blocks at the bottom and right edges may be partial: the expanded scales are cut to size.
    """
    if weight.dim() < 2:
        raise CheckpointError(f"{file}: fp8 tensor {name!r} has shape {tuple(weight.shape)} (need >= 2 dims)")
    (rows, cols), (b0, b1) = weight.shape[-2:], block
    want = (*weight.shape[:-2], -(-rows // b0), -(-cols // b1))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{file}: {name + SCALE_SUFFIX!r} has shape {tuple(scale_inv.shape)}, but weight {name!r} "
            f"{tuple(weight.shape)} in blocks of {list(block)} (weight_block_size) needs {want}"
        )
    scale = scale_inv.float().repeat_interleave(b0, dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(b1, dim=-1)[..., :cols]
    return weight.float() * scale


def _is_expert_tensor(name: str) -> bool:
    return bool(_EXPERT_RE.search(name))


def build_model(args: ModelArgs) -> Transformer:
    """The model class for these args (DeepSeek's MLA, or the common decoder)."""
    return DeepseekTransformer(args) if args.mla is not None else Transformer(args)


def load_trunk(path: str, dtype: str | torch.dtype | None = "auto", device: str = "cpu") -> Transformer:
    """Build the model and load every tensor except the routed experts."""
    args, _ = read_config(path)
    index = CheckpointIndex(path, args.fp8_block)
    dtype = resolve_dtype(dtype, args)
    with torch.device("meta"):
        model = build_model(args)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, file in index.file_of.items():
        if _is_expert_tensor(name) or "rotary_emb" in name or name.endswith(SCALE_SUFFIX):
            continue  # scales are read with their weights (get_weight)
        key = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        if key not in expected:
            continue  # e.g. extra heads we do not use
        tensor = index.get_weight(name)
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[key].shape)}"
            )
        state[key] = tensor.to(torch.float32 if key.endswith(model.float32_tensors) else dtype)
    if args.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path!r}: checkpoint lacks {len(missing)} tensors the model needs: {shown}")
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = rope_inv_freq(args.rope, args.head_dim)  # built on meta above
    index.close()
    return model.to(device).eval()


def _expert_names(index: CheckpointIndex, layer: int, expert: int) -> tuple[str, str, str] | None:
    for prefix, (g, u, d) in (
        (f"model.layers.{layer}.mlp.experts.{expert}", ("gate_proj", "up_proj", "down_proj")),
        (f"model.layers.{layer}.block_sparse_moe.experts.{expert}", ("w1", "w3", "w2")),
    ):
        names = tuple(f"{prefix}.{n}.weight" for n in (g, u, d))
        if names[0] in index:
            return names
    return None


def _expert_weights(
    index: CheckpointIndex, path: str, layer: int, e: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert e's (gate [I, D], up [I, D], down [D, I]) of an MoE layer, from fused
    `experts.gate_up_proj` / `down_proj` tensors or per-expert ones (dequantized if fp8)."""
    fused = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    if fused in index:
        gu = index.get_weight(fused, e)
        dn = index.get_weight(f"model.layers.{layer}.mlp.experts.down_proj", e)
        half = gu.shape[0] // 2  # an odd count: gate and up differ, which the caller reports
        return gu[:half], gu[half:], dn
    names = _expert_names(index, layer, e)
    if names is None:
        raise CheckpointError(
            f"{path!r}: no weights for expert {e} of layer {layer} (looked for {fused!r} "
            f"and model.layers.{layer}.mlp.experts.{e}.gate_proj.weight)"
        )
    return tuple(index.get_weight(n) for n in names)


def load_experts(
    path: str,
    assignment: dict[int, list[int]],
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    args: ModelArgs | None = None,
    part: tuple[int, int] = (0, 1),
) -> ExpertStore:
    """Load only the experts in `assignment` ({moe layer: [expert ids]}). part = (p, parts):
    of each expert, only slice p of `parts` near-equal slices of its intermediate size (gate and
    up rows, down columns): the expert's output is then the sum of its parts' outputs
    (`ShardOptions.replica_split = "intermediate"`)."""
    if args is None:
        args, _ = read_config(path)
    dtype = resolve_dtype(dtype, args)
    index = CheckpointIndex(path, args.fp8_block)
    D, I = args.hidden_size, args.moe_intermediate_size
    p, parts = part
    if not 0 <= p < parts <= I:
        raise ValueError(f"part {part}: expected 0 <= p < parts <= the intermediate size {I}")
    lo, hi = I * p // parts, I * (p + 1) // parts
    layers: dict[int, LocalExperts] = {}
    reading = copying = 0.0  # seconds: the tensors read from the files, copied to the device
    staging = None  # a part's down projection: the whole [D, I] copied over first (see below)
    for layer, experts in assignment.items():
        if not experts:
            continue
        # Written in place on the device, expert by expert: no stacked host copy of the layer.
        gate_up = torch.empty(len(experts), 2 * (hi - lo), D, dtype=dtype, device=device)
        down = torch.empty(len(experts), D, hi - lo, dtype=dtype, device=device)
        for i, e in enumerate(experts):
            t0 = time.perf_counter()
            gate, up, dn = _expert_weights(index, path, layer, e)
            t1 = time.perf_counter()
            reading += t1 - t0
            for what, shape, want in (
                ("gate_up", (gate.shape[0] + up.shape[0], *gate.shape[1:]), (2 * I, D)),
                ("down", tuple(dn.shape), (D, I)),
            ):
                if tuple(shape) != want or (what == "gate_up" and gate.shape != up.shape):
                    raise CheckpointError(
                        f"{path!r}: layer {layer} expert {e} {what} has shape {tuple(shape)}, expected {want}"
                    )
            # Of a part: gate rows lo..hi, then up rows lo..hi; down columns lo..hi.
            gate_up[i, : hi - lo].copy_(gate[lo:hi])
            gate_up[i, hi - lo :].copy_(up[lo:hi])
            if hi - lo < I:
                # Its columns lo..hi are strided on the host: copying them from there makes a
                # contiguous host copy per expert first (torch's thread pool; slow in a process
                # whose threads compete with its shards'). Whole onto the device, sliced there.
                if staging is None or staging.dtype != dn.dtype:
                    staging = torch.empty(D, I, dtype=dn.dtype, device=device)
                staging.copy_(dn)
                down[i].copy_(staging[:, lo:hi])
            else:
                down[i].copy_(dn)
            copying += time.perf_counter() - t1
        layers[layer] = LocalExperts(experts, gate_up, down, args.num_experts)
    index.close()
    store = ExpertStore(layers)
    store.load_times = {"read": round(reading, 2), "copy": round(copying, 2)}
    return store


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _mtp_layout(path: str) -> tuple[ModelArgs, CheckpointIndex, int, bool]:
    """(args, index, MTP layer index, whether its MLP is MoE), or a clear error naming what is
    missing. Reads config.json and the safetensors headers only."""
    args, cfg = read_config(path)
    if args.mla is None:
        raise UnsupportedArchitectureError(
            f"{path!r}: draft='mtp' needs a DeepSeek-V3 checkpoint with a multi-token-prediction "
            f"module; this one is {args.model_type!r}, which has none"
        )
    if args.num_nextn_predict_layers < 1:
        raise CheckpointError(
            f"{path!r}: draft='mtp' needs a multi-token-prediction module, but config.json has "
            f"num_nextn_predict_layers={cfg.get('num_nextn_predict_layers')!r} (DeepSeek-V3/R1 checkpoints "
            "have 1)"
        )
    layer = args.num_layers  # depth 0; deeper ones (if any) are not used: depth 0 chains to k drafts
    index = CheckpointIndex(path, args.fp8_block)
    prefix = f"model.layers.{layer}."
    if not any(name.startswith(prefix) for name in index.file_of):
        raise CheckpointError(
            f"{path!r}: config.json has num_nextn_predict_layers={args.num_nextn_predict_layers}, but "
            f"the checkpoint has no tensors {prefix}* (the multi-token-prediction layer after the "
            f"{layer} decoder layers); draft='mtp' needs them"
        )
    moe = args.is_moe and prefix + "mlp.gate_proj.weight" not in index
    with torch.device("meta"):
        head = MTPHead(args, layer, moe)
    missing = [
        prefix + key
        for key in head.state_dict()
        if key not in MTPHead.shared_with_trunk and prefix + key not in index
    ]
    if moe and prefix + "mlp.experts.gate_up_proj" not in index:
        missing += [
            name
            for e in range(args.num_experts)
            for name in (f"{prefix}mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down"))
            if name not in index
        ]
    if missing:
        raise CheckpointError(
            f"{path!r}: the multi-token-prediction layer {prefix}* lacks {len(missing)} tensors "
            f"draft='mtp' needs: {_shown(missing)}"
        )
    return args, index, layer, moe


def check_mtp(path: str) -> int:
    """The checkpoint's MTP layer index (`num_hidden_layers`), or a clear error when it has none."""
    _, index, layer, _ = _mtp_layout(path)
    index.close()
    return layer


def load_mtp(
    path: str, dtype: str | torch.dtype | None = "auto", device: str = "cpu", trunk: Transformer | None = None
) -> MTPHead:
    """Build DeepSeek-V3's multi-token-prediction head from `model.layers.{num_hidden_layers}.*`,
    routed experts excepted (`load_experts(path, {head.layer: ...})` loads those). Its embedding
    and LM head are the checkpoint's own where stored, else `trunk`'s (the same tensors, shared)."""
    args, index, layer, moe = _mtp_layout(path)
    dtype = resolve_dtype(dtype, args)
    with torch.device("meta"):
        head = MTPHead(args, layer, moe)
    prefix = f"model.layers.{layer}."
    trunk_state = trunk.state_dict() if trunk is not None else {}
    state: dict[str, torch.Tensor] = {}
    for key, want in head.state_dict().items():
        name = prefix + key
        if name not in index:  # only the shareable ones: _mtp_layout checked the rest
            trunk_key = MTPHead.shared_with_trunk[key]
            if trunk_key not in trunk_state:
                raise CheckpointError(f"{path!r}: tensor {name!r} is missing and no trunk was given to share")
            state[key] = trunk_state[trunk_key]
            continue
        tensor = index.get_weight(name)
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{index.file_of[name]}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(want.shape)}"
            )
        state[key] = tensor.to(torch.float32 if key.endswith(head.float32_tensors) else dtype)
    index.close()
    head.load_state_dict(state, assign=True, strict=True)
    head.inv_freq = rope_inv_freq(args.rope, args.head_dim)  # built on meta above
    return head.to(device).eval()

"""Bad checkpoints and bad parameters get errors that name what is wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import PROMPTS
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from specmoe_ray import CheckpointError, Engine, RequestError, SamplingParams, UnsupportedArchitectureError


@pytest.fixture
def ckpt_copy(checkpoints, tmp_path):
    def copy(arch: str = "qwen2_moe") -> str:
        dst = str(tmp_path / arch)
        shutil.copytree(checkpoints(arch), dst)
        return dst

    return copy


def edit_config(path: str, drop: tuple[str, ...] = (), **changes) -> None:
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    for key in drop:
        del cfg[key]
    cfg_path.write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found: .*nowhere"):
        Engine.from_pretrained(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        Engine.from_pretrained(str(tmp_path))


def test_config_not_json(ckpt_copy):
    path = ckpt_copy()
    (Path(path) / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        Engine.from_pretrained(path)


def test_unsupported_architecture_is_named_and_supported_ones_listed(ckpt_copy):
    path = ckpt_copy()
    edit_config(path, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(
        UnsupportedArchitectureError, match=r"unsupported architecture 'gpt_neox'.*qwen3_moe.*mixtral"
    ):
        Engine.from_pretrained(path)


def test_unsupported_rope(ckpt_copy):
    path = ckpt_copy()
    edit_config(path, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(UnsupportedArchitectureError, match="rope type 'longrope'"):
        Engine.from_pretrained(path)


def test_missing_required_field(ckpt_copy):
    path = ckpt_copy()
    edit_config(path, drop=("hidden_size",))
    with pytest.raises(CheckpointError, match="missing required field 'hidden_size'"):
        Engine.from_pretrained(path)


def test_no_weights(ckpt_copy):
    path = ckpt_copy()
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"has no \*.safetensors files"):
        Engine.from_pretrained(path)


def test_corrupt_safetensors(ckpt_copy):
    path = ckpt_copy()
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or unreadable safetensors file"):
        Engine.from_pretrained(path)


def test_truncated_safetensors(ckpt_copy):
    path = ckpt_copy()
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Engine.from_pretrained(path)


def test_missing_trunk_tensor(ckpt_copy):
    path = ckpt_copy()
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, file)
    with pytest.raises(
        CheckpointError, match=r"lacks 1 tensors the model needs: model.layers.1.self_attn.q_proj"
    ):
        Engine.from_pretrained(path)


def test_missing_expert_tensor_in_process(ckpt_copy):
    path = ckpt_copy("mixtral")
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    del state["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"experts.3.w2.weight' is missing"):
        Engine.from_pretrained(path)


def test_shape_mismatch_between_config_and_weights(ckpt_copy):
    path = ckpt_copy()
    edit_config(path, vocab_size=200)
    with pytest.raises(
        CheckpointError,
        match=r"(embed_tokens|lm_head).weight' has shape \(96, 32\), config.json implies \(200, 32\)",
    ):
        Engine.from_pretrained(path)


def test_expert_shape_mismatch(ckpt_copy):
    path = ckpt_copy()
    edit_config(path, moe_intermediate_size=8)
    with pytest.raises(
        CheckpointError, match=r"layer 0 expert 0 gate_up has shape \(32, 32\), expected \(16, 32\)"
    ):
        Engine.from_pretrained(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("seed", -3)],
)
def test_out_of_range_sampling_params_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})


def test_unknown_sampling_param():
    with pytest.raises(ValidationError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=3)


def test_bad_engine_arguments(checkpoints):
    path = checkpoints("qwen3")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        Engine.from_pretrained(path, device="tpu")
    with pytest.raises(ValueError, match="num_shards must be >= 0"):
        Engine.from_pretrained(path, num_shards=-1)
    with pytest.raises(ValueError, match=r"max_model_len must be in \[2, 256\]"):
        Engine.from_pretrained(path, max_model_len=100000)
    with pytest.raises(ValueError, match="dtype 'float8' not supported"):
        Engine.from_pretrained(path, dtype="float8")


def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(checkpoints):
    with Engine.from_pretrained(checkpoints("qwen3"), max_model_len=32) as engine:
        with pytest.raises(RequestError, match="prompt is empty"):
            engine.generate([[]])
        with pytest.raises(RequestError, match=r"outside the vocabulary \[0, 96\): \[96, -1\]"):
            engine.generate([[1, 96, -1]])
        with pytest.raises(RequestError, match="prompt has 40 tokens; the context holds 32"):
            engine.generate([list(range(40))])
        with pytest.raises(RequestError, match="no tokenizer"):
            engine.generate(["hello"])
        with pytest.raises(RequestError, match="2 prompts but 1 SamplingParams"):
            engine.generate(PROMPTS[:2], [SamplingParams()])
        # A bad prompt in a batch leaves nothing behind; good requests still run.
        with pytest.raises(RequestError):
            engine.generate([PROMPTS[0], []])
        assert not engine.has_unfinished()
        out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[
            0
        ]
        # Generation stops at the context length.
        assert out.finish_reason == "length" and len(out.token_ids) == 32 - len(PROMPTS[0])

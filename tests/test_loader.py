"""Checkpoint loading: sharded vs single file, dtypes, dummy, orbax, errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model
from jpaged.config.model import ModelConfig
from jpaged.model_loader.loader import load_model, save_orbax


def _flat(params):
    return {k: np.asarray(v, np.float32) for k, v in nnx.to_flat_state(params)}


def test_sharded_equals_single_file(tmp_path_factory, llama_dir):
    sharded = tiny_model(tmp_path_factory, "llama_sharded", arch="llama", num_shards=3)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = _flat(load_model(llama_dir)[2]), _flat(load_model(sharded)[2])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("dtype,expected", [("auto", jnp.float32), ("bfloat16", jnp.bfloat16),
                                            ("float16", jnp.float16), ("fp32", jnp.float32)])
def test_dtypes(llama_dir, dtype, expected):
    cfg, _, params = load_model(llama_dir, dtype=dtype)
    leaves = jax.tree.leaves(params)
    assert leaves and all(x.dtype == expected for x in leaves)


def test_bad_dtype(llama_dir):
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_model(llama_dir, dtype="int8")


def test_dummy_needs_only_config(tmp_path, llama_dir):
    shutil.copy(os.path.join(llama_dir, "config.json"), tmp_path / "config.json")
    cfg, _, params = load_model(str(tmp_path), load_format="dummy", seed=3)
    real = _flat(load_model(llama_dir)[2])
    dummy = _flat(params)
    assert {k: v.shape for k, v in real.items()} == {k: v.shape for k, v in dummy.items()}
    again = _flat(load_model(str(tmp_path), load_format="dummy", seed=3)[2])
    assert all(np.array_equal(dummy[k], again[k]) for k in dummy)  # seeded
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, llama_dir):
    from safetensors.numpy import load_file, save_file

    for f in os.listdir(llama_dir):
        shutil.copy(os.path.join(llama_dir, f), tmp_path / f)
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(tmp_path))


def test_misshaped_tensor_is_named(tmp_path, llama_dir):
    from safetensors.numpy import load_file, save_file

    for f in os.listdir(llama_dir):
        shutil.copy(os.path.join(llama_dir, f), tmp_path / f)
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    tensors["model.norm.weight"] = np.ones((3,), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(3,\)"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'.*llama3"),
])
def test_unsupported_config_is_named(change, match):
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    hf.update(change)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(hf)


def test_orbax_round_trip(tmp_path, llama_dir):
    for f in os.listdir(llama_dir):
        shutil.copy(os.path.join(llama_dir, f), tmp_path / f)
    cfg, _, params = load_model(str(tmp_path))
    save_orbax(str(tmp_path), cfg, params)
    os.remove(tmp_path / "model.safetensors")  # auto must now use the orbax copy
    _, _, restored = load_model(str(tmp_path))
    a, b = _flat(params), _flat(restored)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_dummy_weights_can_be_quantized(tmp_path, llama_dir):
    from jpaged.layers.linear import is_quantized

    shutil.copy(os.path.join(llama_dir, "config.json"), tmp_path / "config.json")
    _, _, params = load_model(str(tmp_path), load_format="dummy", quantization="int4",
                              group_size=32)
    qkv = params["model"]["layers"][0]["self_attn"]["qkv_proj"]["weight"].get_value()
    assert is_quantized(qkv) and qkv.qvalue.dtype == jnp.uint8
    with pytest.raises(ValueError, match="quantization='gptq' needs a checkpoint"):
        load_model(str(tmp_path), load_format="dummy", quantization="gptq")


def test_orbax_holds_float_params_only(llama_dir):
    with pytest.raises(ValueError, match="load_format='orbax' holds float params"):
        load_model(llama_dir, load_format="orbax", quantization="int8")

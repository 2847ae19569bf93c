"""Quantized weights: each pre-quantized format (GPTQ v1/v2 with act-order,
AWQ GEMM, compressed-tensors int4/int8/fp8), packed here in numpy from the
formats' documented layouts, dequantizes exactly to its reference; the
int8/int4/fp8 quantizers and matmuls stay within stated bounds; and
``--load-8bit``/``--load-4bit`` run end to end with weights quantized on the
device."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jpaged.layers.linear import (QuantizedWeight, dense, dequantize, is_quantized,
                                  quantize_fp8, quantize_int4, quantize_int8)
from jpaged.model_loader import load_model, weight_bytes
from jpaged.models.llama import checkpoint_names, is_linear_weight

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def pack_rows(vals, bits=4):
    """[R * 32 / bits, C] values -> int32 [R, C], value j of a word in bits j*bits.."""
    n = 32 // bits
    v = vals.astype(np.uint32).reshape(-1, n, vals.shape[1])
    word = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for j in range(n):
        word |= v[:, j, :] << np.uint32(bits * j)
    return word.view(np.int32)


def pack_cols(vals, bits=4, order=None):
    """[R, C] -> int32 [R, C * bits / 32] packing consecutive columns (in ``order``)."""
    n = 32 // bits
    order = order or list(range(n))
    v = vals.astype(np.uint32).reshape(vals.shape[0], -1, n)
    word = np.zeros(v.shape[:2], np.uint32)
    for i in range(n):
        word |= v[:, :, order[i]] << np.uint32(bits * i)
    return word.view(np.int32)


def _gptq(rng, k, n, v2, g_idx):
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0 if v2 else 1, 16, (k // GROUP, n))
    s = (rng.random((k // GROUP, n)) * 0.02 + 0.001).astype(np.float16)
    tensors = {"qweight": pack_rows(q), "qzeros": pack_cols(z if v2 else z - 1),
               "scales": s, "g_idx": g_idx.astype(np.int32)}
    ref = (s.astype(np.float32)[g_idx] * (q - z[g_idx]).astype(np.float32)).T  # [n, k]
    return tensors, ref


def _act_order(rng, k):
    """GPTQ desc_act: inputs visited in a permuted order, GROUP per group."""
    g_idx = np.empty(k, np.int64)
    g_idx[rng.permutation(k)] = np.arange(k) // GROUP
    return g_idx


def _awq(rng, k, n, g_idx):
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0, 16, (k // GROUP, n))
    s = (rng.random((k // GROUP, n)) * 0.02 + 0.001).astype(np.float16)
    tensors = {"qweight": pack_cols(q, order=AWQ_ORDER), "qzeros": pack_cols(z, order=AWQ_ORDER),
               "scales": s}
    g = np.arange(k) // GROUP
    return tensors, ((q - z[g]).astype(np.float32) * s.astype(np.float32)[g]).T


def _ct_int4(rng, k, n, g_idx, symmetric):
    v = rng.integers(-8, 8, (n, k))
    s = (rng.random((n, k // GROUP)) * 0.02 + 0.001).astype(ml_dtypes.bfloat16)
    tensors = {"weight_packed": pack_cols(v + 8), "weight_scale": s,
               "weight_shape": np.array([n, k], np.int64)}
    zp = np.zeros((n, k // GROUP), np.int64)
    if not symmetric:
        zp = rng.integers(-8, 8, (n, k // GROUP))
        tensors["weight_zero_point"] = pack_rows(zp + 8)
    g = np.arange(k) // GROUP
    return tensors, (v - zp[:, g]).astype(np.float32) * s.astype(np.float32)[:, g]


def _ct_int8(rng, k, n, g_idx):
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    s = (rng.random((n, 1)) * 0.01).astype(np.float32)
    return {"weight": q, "weight_scale": s}, q.astype(np.float32) * s


def _ct_fp8(rng, k, n, g_idx):
    q = (rng.standard_normal((n, k)) * 50).astype(ml_dtypes.float8_e4m3fn)
    s = (rng.random((n, 1)) * 0.01).astype(ml_dtypes.bfloat16)
    return {"weight": q, "weight_scale": s}, q.astype(np.float32) * s.astype(np.float32)


FORMATS = {
    "gptq_v1": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True},
                lambda r, k, n, g: _gptq(r, k, n, False, g)),
    "gptq_v2": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True,
                 "checkpoint_format": "gptq_v2"},
                lambda r, k, n, g: _gptq(r, k, n, True, g)),
    "gptq_v1_in_order": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP},
                         lambda r, k, n, g: _gptq(r, k, n, False, np.arange(k) // GROUP)),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm"}, _awq),
    "ct_int4_sym": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                     "config_groups": {"group_0": {"weights": {"num_bits": 4}}}},
                    lambda r, k, n, g: _ct_int4(r, k, n, g, True)),
    "ct_int4_asym": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                      "config_groups": {"group_0": {"weights": {"num_bits": 4}}}},
                     lambda r, k, n, g: _ct_int4(r, k, n, g, False)),
    "ct_int8": ({"quant_method": "compressed-tensors", "format": "int-quantized",
                 "config_groups": {"group_0": {"weights": {"num_bits": 8}}}}, _ct_int8),
    "ct_fp8": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}},
               _ct_fp8),
}


def _quantized_checkpoint(src, dst, fmt):
    """Copy the tiny float checkpoint with every projection replaced by random
    tensors in ``fmt``; returns the reference float32 weights by HF name."""
    from safetensors.numpy import load_file, save_file

    qc, make = FORMATS[fmt]
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if os.path.isfile(os.path.join(src, f)) and f != "model.safetensors":
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qc
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    rng = np.random.default_rng(1)
    refs, g_idx = {}, {}
    for name in list(tensors):
        prefix = name[:-len(".weight")]
        if not any(prefix.endswith(p) for p in PROJ):
            refs[name] = tensors[name].astype(np.float32)
            continue
        n, k = tensors.pop(name).shape
        # q/k/v (and gate/up) read the same input, so GPTQ gives them one g_idx
        shared = prefix if prefix.endswith(("o_proj", "down_proj")) else prefix.rsplit(".", 1)[0]
        g = g_idx.setdefault(shared, _act_order(rng, k))
        parts, refs[name] = make(rng, k, n, g)
        tensors.update({f"{prefix}.{t}": v for t, v in parts.items()})
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return refs


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prequantized_formats_dequantize_exactly(tmp_path, llama_dir, fmt):
    refs = _quantized_checkpoint(llama_dir, str(tmp_path / fmt), fmt)
    cfg, _, params = load_model(str(tmp_path / fmt))
    n_quantized = 0
    for path, var in nnx.to_flat_state(params):
        name = ".".join(map(str, path))
        w = var.get_value()
        ref = np.concatenate([refs[n] for n in checkpoint_names(name)], axis=0)
        if is_linear_weight(name):
            assert is_quantized(w), name
            assert w.qvalue.dtype in (np.uint8, np.int8, ml_dtypes.float8_e4m3fn), name
            n_quantized += 1
            np.testing.assert_array_equal(np.asarray(dequantize(w)), ref, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(w, np.float32), ref, err_msg=name)
    assert n_quantized == 4 * cfg.num_hidden_layers


def test_gptq_runs_in_the_engine(tmp_path, llama_dir):
    from jpaged import LLM, SamplingParams

    _quantized_checkpoint(llama_dir, str(tmp_path / "g"), "gptq_v1")
    llm = LLM(model=str(tmp_path / "g"), max_num_seqs=2, max_num_batched_tokens=64,
              max_model_len=128, compile_all_buckets=False)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_format_mismatch_is_named(tmp_path, llama_dir):
    _quantized_checkpoint(llama_dir, str(tmp_path / "a"), "awq")
    with pytest.raises(ValueError, match="quantization='gptq'.*quantized with 'awq'"):
        load_model(str(tmp_path / "a"), quantization="gptq")
    with pytest.raises(ValueError, match="already quantized with 'awq'"):
        load_model(str(tmp_path / "a"), quantization="int8")
    with pytest.raises(ValueError, match="quantization='int3'"):
        load_model(llama_dir, quantization="int3")


# ------------------------------------------------------- quantizers and matmul
def _weights(rng, out=96, n=256):
    return rng.standard_normal((out, n)).astype(np.float32) * 0.05


def test_quantizers_bound_the_error():
    """Round to nearest: each weight is within half a step of the original
    (fp8 e4m3: within 2**-4 relative, 3 mantissa bits)."""
    rng = np.random.default_rng(0)
    w = _weights(rng)
    q8 = quantize_int8(w)
    assert q8.qvalue.dtype == np.int8 and q8.scale.shape == (96, 1)
    err = np.abs(np.asarray(dequantize(q8)) - w)
    assert np.all(err <= q8.scale / 2 * (1 + 1e-6))
    for g in (32, 64, 128):
        q4 = quantize_int4(w, g)
        assert q4.qvalue.shape == (96, 128) and q4.qvalue.dtype == np.uint8
        assert q4.scale.shape == q4.zero.shape == (96, 256 // g)
        step = np.repeat(q4.scale, g, axis=1)
        assert np.all(np.abs(np.asarray(dequantize(q4)) - w) <= step / 2 * (1 + 1e-5))
    f8 = quantize_fp8(w)
    assert f8.qvalue.dtype == ml_dtypes.float8_e4m3fn
    rel = np.abs(np.asarray(dequantize(f8)) - w) / np.maximum(np.abs(w), f8.scale * 2**-6)
    assert rel.max() <= 2**-4 + 1e-6


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_matmul_matches_dequantize_then_matmul(kind, dtype):
    """``dense`` (jitted, dequantized in the step) equals x @ dequantize(w).T:
    bitwise-close in float32 (1e-6 relative), and within bfloat16's rounding
    of the products (2**-7 of sum |x| |w|) in bfloat16."""
    rng = np.random.default_rng(1)
    w = _weights(rng)
    qw = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}[kind](w)
    qw = jax.tree.map(jnp.asarray, qw)
    x = jnp.asarray(rng.standard_normal((8, 256)), dtype)
    y = jax.jit(dense)(x, qw)
    wd = np.asarray(dequantize(qw), np.float64)
    ref = np.asarray(x, np.float64) @ wd.T
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(wd).T
    tol = 1e-6 if dtype == jnp.float32 else 2**-7
    assert y.dtype == dtype
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= tol * scale + 1e-30)


def test_permuted_weight_matmul():
    """A GPTQ act-order weight (columns permuted on the device) multiplies
    like its dequantized original."""
    from jpaged.model_loader.weights import from_unpacked

    rng = np.random.default_rng(2)
    q = rng.integers(0, 16, (16, 64)).astype(np.uint8)
    perm = rng.permutation(64)
    g_idx = np.empty(64, np.int64)
    g_idx[perm] = np.arange(64) // 32
    scale = rng.random((16, 2)).astype(np.float32)
    zero = rng.integers(0, 16, (16, 2)).astype(np.uint8)
    w = from_unpacked(q, scale, bits=4, zero=zero, g_idx=g_idx)
    assert w.perm is not None
    ref = (q.astype(np.int64) - zero[:, g_idx]).astype(np.float32) * scale[:, g_idx]
    np.testing.assert_array_equal(np.asarray(dequantize(w)), ref)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x), w)), x @ ref.T, rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------ on-the-fly quantization
@pytest.mark.parametrize("kind,dtype,bits", [("int8", np.int8, 8), ("int4", np.uint8, 4),
                                             ("fp8", ml_dtypes.float8_e4m3fn, 8)])
def test_quantize_at_load_keeps_weights_quantized(llama_dir, kind, dtype, bits):
    _, _, ref = load_model(llama_dir)
    cfg, _, params = load_model(llama_dir, quantization=kind, group_size=32)
    for path, var in nnx.to_flat_state(params):
        name = ".".join(map(str, path))
        w = var.get_value()
        if is_linear_weight(name):
            assert is_quantized(w) and w.qvalue.dtype == dtype and w.bits == bits, name
            assert isinstance(w.qvalue, jax.Array)  # on the device, packed
        else:
            assert not is_quantized(w) and w.dtype == jnp.float32, name
    lin = sum(int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(ref)
              if is_linear_weight(".".join(map(str, p))))
    saved = weight_bytes(ref) - weight_bytes(params)
    per_weight = {"int8": 1, "fp8": 1, "int4": 0.5}[kind]
    assert saved >= lin * (4 - per_weight) * 0.95  # float32 -> 1 or 0.5 byte per weight


@pytest.mark.parametrize("flag", ["--load-8bit", "--load-4bit"])
def test_load_8bit_4bit_end_to_end(tmp_path, llama_dir, flag):
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged.cli", "generate", "--model", llama_dir, flag,
         "--quantization-group-size", "32", "--prompt", "Hello", "--max-tokens", "6",
         "--ignore-eos", "--max-num-seqs", "2", "--max-num-batched-tokens", "64",
         "--max-model-len", "128", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert len(rec["token_ids"]) == 6


def test_conflicting_quantization_flags():
    from jpaged.config.engine import EngineConfig

    assert EngineConfig(load_4bit=True).weight_quantization == "int4"
    assert EngineConfig(quantization="fp8").weight_quantization == "fp8"
    with pytest.raises(ValueError, match="conflicting weight quantizations: int4, int8"):
        EngineConfig(load_4bit=True, load_8bit=True).weight_quantization


def test_int4_group_size_falls_back_to_a_divisor():
    """SmolLM2's 576-wide inputs take groups of 64 under group_size=128."""
    assert quantize_int4(np.ones((2, 576), np.float32), 128).group_size == 64
    assert quantize_int4(np.ones((2, 1536), np.float32), 128).group_size == 128
    with pytest.raises(ValueError, match=r"shape \(2, 40\) in groups of 32"):
        quantize_int4(np.ones((2, 40), np.float32), 128)

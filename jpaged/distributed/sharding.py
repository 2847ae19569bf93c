"""Logical axis names -> mesh axes: the one place a PartitionSpec is written.

The model names the axes of its parameters (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``mlp``) and never a mesh axis; `RULES` says which of them are
cut along ``model`` (Megatron's layout: q/k/v and gate/up by output columns,
o and down by input rows, so each layer needs one all-reduce after attention
and one after the MLP, and the vocabulary for the embedding and lm_head).
Norms and anything unnamed are replicated. When there are fewer KV heads
than devices, k/v projections are replicated (``kv_replicated``) and the KV
cache holds one copy of a KV head per device (`kv_cache_heads`), as vLLM
does. The mesh comes from JAX's own context (`jax.set_mesh`) while a model is
built and loaded, so the loader needs no extra argument.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jpaged.distributed.mesh import MODEL_AXIS
from jpaged.layers.linear import is_quantized

RULES = {
    "vocab": MODEL_AXIS,
    "heads": MODEL_AXIS,
    "kv_heads": MODEL_AXIS,
    "kv_replicated": None,
    "mlp": MODEL_AXIS,
    "embed": None,
    # Attention activations and the KV cache: [.., kv heads, head_dim].
    "cache_heads": MODEL_AXIS,
}
AXES_KEY = "axes"  # Variable metadata holding a parameter's logical axis names


def spec(axes) -> PartitionSpec:
    """Logical axis names (None = not sharded) -> PartitionSpec."""
    return PartitionSpec(*(RULES[a] if a is not None else None for a in axes))


def tp_size() -> int:
    """Size of the ``model`` axis of the mesh in context (1 without one); read
    by the model while it is built, to pick its layout."""
    mesh = jax.sharding.get_abstract_mesh()
    return dict(mesh.shape).get(MODEL_AXIS, 1) if not mesh.empty else 1


def kv_heads_axis(num_kv_heads: int) -> str:
    """Logical axis of the k/v projections' outputs: split when the KV heads
    divide among the devices, else replicated (each device computes them all
    and keeps its copy)."""
    return "kv_heads" if num_kv_heads % tp_size() == 0 else "kv_replicated"


def kv_cache_heads(num_kv_heads: int, n: int) -> int:
    """KV heads the cache stores in total: the model's, or one per device when
    there are fewer (each a copy of KV head ``device // (n // num_kv_heads)``)."""
    return max(num_kv_heads, n)


def kv_cache_spec() -> PartitionSpec:
    return spec((None, None, "cache_heads", None))  # [blocks, block_size, heads, head_dim]


def heads_spec() -> PartitionSpec:
    return spec((None, "cache_heads", None))  # [tokens, heads, head_dim]


def logits_spec() -> PartitionSpec:
    return spec((None, "vocab"))  # [rows, vocab]


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_spec(var) -> PartitionSpec:
    """A parameter's PartitionSpec, from its `AXES_KEY` metadata."""
    if not isinstance(var, nnx.Variable) or is_quantized(var.get_value()):
        return PartitionSpec()  # quantized weights load only at TP 1 (see the loader)
    axes = var.get_metadata().get(AXES_KEY)
    return spec(axes) if axes else PartitionSpec()


def param_sharding(var, mesh=None) -> NamedSharding | None:
    """The NamedSharding of one parameter on ``mesh`` or the mesh in context;
    None with no mesh (the default device)."""
    if mesh is None:
        mesh = jax.sharding.get_mesh()
        if mesh.empty:
            return None
    return NamedSharding(mesh, param_spec(var))


def param_shardings(state, mesh):
    """A pytree of NamedShardings matching a params state."""
    return jax.tree.map(lambda v: v.replace(param_sharding(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain_params(state):
    """Inside jit, under a mesh in context: lay each parameter out as its axes
    say, so that each device computes only its shard."""
    if jax.sharding.get_abstract_mesh().empty:
        return state
    return jax.tree.map(
        lambda v: v.replace(jax.lax.with_sharding_constraint(v.get_value(), param_spec(v))),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))

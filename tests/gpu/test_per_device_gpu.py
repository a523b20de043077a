"""The compiled Pallas kernels inside ``jax.shard_map`` (how ``models/per_device.py`` runs them on a mesh), on a
one-device mesh: they lower there, alias their state pool in place under donation, and give what they give
outside it. (On several devices each device runs the same program on its own heads.)"""

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.gated_delta_rule import gated_delta_rule_step_slots
from qwenvl_jax.models.per_device import TENSOR
from qwenvl_jax.sharding import make_mesh
from tests.test_decode_attention import make_inputs


def _heads(ndim: int, axis: int) -> P:
    return P(*(TENSOR if i == axis else None for i in range(ndim)))


def test_decode_attention_in_shard_map():
    q, k, v, lengths = make_inputs(0, [300, 1, 77], 5, 320, 4, 4, 128, jnp.bfloat16)
    mesh = make_mesh(1)  # the library's own mesh ("expert", "tensor"), one device
    local = jax.shard_map(lambda q, k, v, n: decode_attention(q, k, v, n, impl="pallas"), mesh=mesh,
                          in_specs=(_heads(3, 1), _heads(4, 2), _heads(4, 2), P()), out_specs=_heads(3, 1),
                          check_vma=False)
    got = jax.jit(local)(q, k, v, lengths)
    want = decode_attention(q, k, v, lengths, impl="pallas")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_gated_delta_rule_step_in_shard_map_advances_the_donated_pool_in_place():
    b, s, hk, hv, d = 3, 5, 4, 8, 128
    keys = jax.random.split(jax.random.key(1), 6)
    q = jax.random.normal(keys[0], (b, hk, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, hk, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, hv, d), jnp.bfloat16)
    g = -jax.random.uniform(keys[3], (b, hv), jnp.float32)
    beta = jax.random.uniform(keys[4], (b, hv), jnp.float32)
    lengths = jnp.array([1, 0, 1], jnp.int32)
    mesh = make_mesh(1)  # the library's own mesh ("expert", "tensor"), one device
    specs = (_heads(3, 1), _heads(3, 1), _heads(3, 1), _heads(2, 1), _heads(2, 1), _heads(4, 1), P())
    step = jax.jit(jax.shard_map(lambda *a: gated_delta_rule_step_slots(*a, impl="pallas"), mesh=mesh,
                                 in_specs=specs, out_specs=(_heads(3, 1), _heads(4, 1)), check_vma=False),
                   donate_argnums=5)
    pool = jax.random.normal(keys[5], (s, hv, d, d), jnp.float32)
    want_o, want_pool = gated_delta_rule_step_slots(q, k, v, g, beta, pool.copy(), lengths, impl="pallas")
    pointer = pool.unsafe_buffer_pointer()
    got_o, got_pool = step(q, k, v, g, beta, pool, lengths)
    assert got_pool.unsafe_buffer_pointer() == pointer  # advanced where it lives
    np.testing.assert_array_equal(np.asarray(got_o, np.float32), np.asarray(want_o, np.float32))
    np.testing.assert_array_equal(np.asarray(got_pool), np.asarray(want_pool))

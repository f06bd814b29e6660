"""Essential Subspace Merging: activation capture (toy, open_clip, BERT) and the merge rules."""

import math

import pytest
import torch
from torch import nn

from subboost.esm import (
    capture_block_inputs,
    essential_basis,
    essential_subspace_merge,
    esm_cost,
    polarized_factors,
    project_onto_subspace,
)
from subboost.merging import METHODS, merge

A0 = "visual.transformer.resblocks.0.attn.out_proj.weight"
C0 = "visual.transformer.resblocks.0.mlp.c_fc.weight"
C1 = "visual.transformer.resblocks.1.mlp.c_fc.weight"
BIAS = "visual.transformer.resblocks.0.mlp.c_fc.bias"
TEXT = "transformer.resblocks.0.mlp.c_fc.weight"


# ---------------------------------------------------------------- capture: toy model


def _record_outputs(modules):
    """Forward hooks storing every (input, output) of the given modules."""
    seen = {name: [] for name in modules}
    handles = [
        mod.register_forward_hook(lambda m, a, o, name=name: seen[name].append((a[0], o)))
        for name, mod in modules.items()
    ]
    return seen, handles


def test_hooks_capture_the_right_layer_input_toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model.train()
    batches = [torch.randn(5, 4), torch.randn(2, 7, 4)]  # tokens are flattened into samples
    acts = capture_block_inputs(model, ["0.weight", "2.weight"], batches, max_samples=None)
    x = torch.cat([b.reshape(-1, 4) for b in batches])
    assert torch.equal(acts["0.weight"], x)
    hidden = torch.relu(x @ model[0].weight.T + model[0].bias)
    torch.testing.assert_close(acts["2.weight"], hidden)
    # each X is what its own weight multiplies: X Wᵀ + b is the layer's output
    torch.testing.assert_close(acts["2.weight"] @ model[2].weight.T + model[2].bias, model(x).detach())
    # state restored: training flag back, no hook left
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_capture_default_forward_batches_and_limits():
    model = nn.Sequential(nn.Linear(3, 2))
    xs = [torch.randn(4, 3) for _ in range(3)]
    # (inputs, labels) tuples: labels are ignored; max_batches stops early
    acts = capture_block_inputs(model, ["0.weight"], [(x, torch.zeros(4)) for x in xs], max_samples=None, max_batches=2)
    assert torch.equal(acts["0.weight"], torch.cat(xs[:2]))

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, inputs):
            return self.lin(inputs)

    acts = capture_block_inputs(Named(), ["lin.weight"], [{"inputs": xs[0]}], max_samples=None)
    assert torch.equal(acts["lin.weight"], xs[0])


def test_capture_subsamples_rows_seeded_without_replacement():
    model = nn.Sequential(nn.Linear(2, 2))
    rows = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    batches = [rows[:7], rows[7:15], rows[15:]]
    a = capture_block_inputs(model, ["0.weight"], batches, max_samples=6, seed=1)["0.weight"]
    b = capture_block_inputs(model, ["0.weight"], batches, max_samples=6, seed=1)["0.weight"]
    c = capture_block_inputs(model, ["0.weight"], batches, max_samples=6, seed=2)["0.weight"]
    assert a.shape == (6, 2) and torch.equal(a, b) and not torch.equal(a, c)
    idx = (a[:, 0] / 2).long()
    assert torch.equal(a, rows[idx]) and idx.unique().numel() == 6  # real rows, no repeats
    with pytest.raises(ValueError, match="max_samples"):
        capture_block_inputs(model, ["0.weight"], batches, max_samples=0)


def test_capture_rejects_unsupported_and_unused_keys():
    model = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Conv1d"):
        capture_block_inputs(model, ["0.weight"], [torch.randn(1, 2, 3)])
    with pytest.raises(ValueError, match="no module"):
        capture_block_inputs(model, ["7.weight"], [torch.randn(1, 2, 3)])
    with pytest.raises(ValueError, match="not a weight matrix"):
        capture_block_inputs(model, ["1.bias"], [torch.randn(1, 2, 3)])
    twin = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    with pytest.raises(RuntimeError, match="no input reached 'b.weight'"):
        capture_block_inputs(twin, ["b.weight"], [torch.randn(3, 2)], forward=lambda m, x: m["a"](x))
    assert not twin["b"]._forward_pre_hooks


def test_capture_mha_cross_attention_in_proj_raises():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    q, kv = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match="cross-attention"):
        capture_block_inputs(mha, ["in_proj_weight"], [q], forward=lambda m, x: m(x, kv, kv))
    # its out-projection input is still well defined
    acts = capture_block_inputs(mha, ["out_proj.weight"], [q], forward=lambda m, x: m(x, kv, kv), max_samples=None)
    out = mha(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(acts["out_proj.weight"] @ mha.out_proj.weight.T + mha.out_proj.bias, out.reshape(-1, 4).detach())


# ---------------------------------------------------------------- capture: open_clip and BERT


@pytest.fixture(scope="module")
def tiny_clip():
    open_clip_model = pytest.importorskip("open_clip.model")
    torch.manual_seed(0)
    return open_clip_model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2.0),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1),
    ).eval()


def _manual_self_attention(x, mha, n_seq, mask=None):
    """Reference multi-head self-attention context (before out_proj) from the in_proj input
    (rows: batch-first sequences of length n_seq, flattened)."""
    width = x.shape[-1]
    heads = mha.num_heads
    q, k, v = (x @ mha.in_proj_weight.T + mha.in_proj_bias).chunk(3, dim=-1)

    def split(t):
        return t.reshape(-1, n_seq, heads, width // heads).transpose(1, 2)

    att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        att = att + mask
    ctx = att.softmax(-1) @ split(v)
    return ctx.transpose(1, 2).reshape(-1, width)


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_capture_open_clip_attention_and_mlp(tiny_clip, tower):
    model = tiny_clip
    prefix = "visual.transformer.resblocks.1." if tower == "visual" else "transformer.resblocks.0."
    keys = [prefix + s for s in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]
    block = model.get_submodule(prefix.rstrip("."))
    if tower == "visual":
        batch = torch.randn(2, 3, 32, 32)
        forward = lambda m, b: m.encode_image(b)  # noqa: E731  (no mask: MHA's fused fast path)
        mask, n_seq = None, 17
    else:
        batch = torch.randint(0, 50, (2, 8))
        forward = lambda m, b: m.encode_text(b)  # noqa: E731  (float causal mask: slow path)
        mask, n_seq = model.attn_mask, 8
    seen, handles = _record_outputs({"attn": block.attn, "out_proj": block.attn.out_proj,
                                     "c_fc": block.mlp.c_fc, "c_proj": block.mlp.c_proj})
    try:
        acts = capture_block_inputs(model, keys, [batch], forward=forward, max_samples=None)
    finally:
        for h in handles:
            h.remove()
    assert seen["out_proj"] == []  # MHA never calls out_proj.forward: a plain hook would see nothing
    x_in, x_out, x_fc, x_proj = (acts[k] for k in keys)
    width = block.attn.embed_dim
    # in_proj: X is the MHA's query (the ln_1 output); q/k/v = X W_inᵀ + b, and attention over them
    # reproduces the captured out_proj input, whose projection is the MHA's actual output
    torch.testing.assert_close(x_in, seen["attn"][0][0].reshape(-1, width))
    torch.testing.assert_close(x_out, _manual_self_attention(x_in, block.attn, n_seq, mask), atol=1e-5, rtol=1e-4)
    attn_out = seen["attn"][0][1][0].reshape(-1, width)
    torch.testing.assert_close(x_out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias, attn_out,
                               atol=1e-5, rtol=1e-4)
    # Linear layers: X Wᵀ + b is the layer's output
    for x, name, mod in ((x_fc, "c_fc", block.mlp.c_fc), (x_proj, "c_proj", block.mlp.c_proj)):
        torch.testing.assert_close(x @ mod.weight.T + mod.bias, seen[name][0][1].reshape(x.shape[0], -1))


def test_capture_bert_linears():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    layer = model.encoder.layer[1]
    names = {
        "attention.self.query": layer.attention.self.query,
        "attention.output.dense": layer.attention.output.dense,
        "intermediate.dense": layer.intermediate.dense,
        "output.dense": layer.output.dense,
    }
    keys = [f"encoder.layer.1.{n}.weight" for n in names]
    batch = {"input_ids": torch.randint(0, 100, (2, 6))}
    seen, handles = _record_outputs(names)
    try:
        acts = capture_block_inputs(model, keys, [batch], max_samples=None)
    finally:
        for h in handles:
            h.remove()
    for key, (name, mod) in zip(keys, names.items()):
        x = acts[key]
        assert x.shape == (12, mod.in_features)
        torch.testing.assert_close(x @ mod.weight.T + mod.bias, seen[name][0][1].reshape(12, -1))


# ---------------------------------------------------------------- essential subspace


def test_essential_basis_energy_and_rank():
    x = torch.eye(2, dtype=torch.float64)
    delta = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))  # shift energies 9 and 1
    assert essential_basis(delta, x, energy=0.9).rank == 1  # 9/10 reaches 0.9 exactly
    assert essential_basis(delta, x, energy=0.95).rank == 2
    assert essential_basis(delta, x, rank=1).rank == 1
    assert essential_basis(delta, x, rank=5).rank == 2
    basis = essential_basis(delta, x, energy=0.9).basis
    assert torch.allclose(basis.abs(), torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="energy"):
        essential_basis(delta, x, energy=0.0)
    with pytest.raises(ValueError, match="rank"):
        essential_basis(delta, x, rank=0)
    with pytest.raises(ValueError, match="input columns"):
        essential_basis(delta, torch.randn(3, 5, dtype=torch.float64))


def test_subspace_follows_the_data_not_the_weights():
    # ΔW = u1 v1ᵀ + 5 u2 v2ᵀ, but the task's inputs never excite v2: the essential subspace is
    # span(u1), and the bigger component (invisible on this data) is removed
    u = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(4, 2, dtype=torch.float64)).Q
    delta = torch.outer(u[:, 0], v[:, 0]) + 5 * torch.outer(u[:, 1], v[:, 1])
    x = torch.randn(30, 4, dtype=torch.float64)
    x = x - (x @ v[:, 1:2]) @ v[:, 1:2].T
    sub = essential_basis(delta, x, energy=1.0)
    assert sub.rank == 1
    torch.testing.assert_close(project_onto_subspace(delta, sub.basis), torch.outer(u[:, 0], v[:, 0]))


@pytest.mark.parametrize("center", [False, True])
def test_full_subspace_projection_is_identity(center):
    torch.manual_seed(1)
    delta = torch.randn(5, 3, dtype=torch.float64)
    x = torch.randn(40, 3, dtype=torch.float64) + 2.0
    for kwargs in ({"energy": 1.0}, {"rank": 5}):
        sub = essential_basis(delta, x, center=center, **kwargs)
        torch.testing.assert_close(project_onto_subspace(delta, sub.basis), delta)
    # fewer samples than inputs: the QR reduction is skipped, still exact on the seen span
    wide = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(project_onto_subspace(delta, essential_basis(delta, wide, energy=1.0).basis), delta)


def test_polarized_factors():
    imp = torch.tensor([0.1, 5.0, 3.0, 0.2, 3.0])
    f = polarized_factors(imp, 0.5, 0.4)  # top ⌈0.4·5⌉ = 2, the tie at 3.0 is included
    assert f.tolist() == pytest.approx([0.5, 1.5, 1.5, 0.5, 1.5])
    assert polarized_factors(imp, 0.0, 0.4).tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="positive"):
        polarized_factors(imp, 1.0, 0.4)


# ---------------------------------------------------------------- merge


def _toy(n_tasks=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    vectors, acts = [], []
    for _ in range(n_tasks):
        vectors.append({
            A0: torch.randn(4, 4, generator=g, dtype=dtype),
            C0: torch.randn(8, 4, generator=g, dtype=dtype),
            C1: torch.randn(8, 4, generator=g, dtype=dtype),
            BIAS: torch.randn(8, generator=g, dtype=dtype),
            TEXT: torch.zeros(8, 4, dtype=dtype),  # frozen text tower: no activations needed
        })
        acts.append({k: torch.randn(25, 4, generator=g, dtype=dtype) for k in (A0, C0, C1)})
    return vectors, acts


def test_esm_full_subspace_no_scaling_is_task_arithmetic():
    vectors, acts = _toy()
    for kwargs in ({"energy": 1.0}, {"rank": 8}):
        out = merge(vectors, "esm", activations=acts, layer_gamma=0.0, param_gamma=0.0, **kwargs)
        ta = merge(vectors, "ta")
        for key in (A0, C0, C1):
            torch.testing.assert_close(out[key], ta[key])
        torch.testing.assert_close(out[BIAS], ta[BIAS] / 3)
        assert torch.equal(out[TEXT], torch.zeros(8, 4, dtype=torch.float64))
        assert list(out) == list(vectors[0]) and all(out[k].dtype == torch.float64 for k in out)


def test_esm_scaling_keeps_signs_and_uses_polarised_factors():
    vectors, acts = _toy(seed=3)
    plain = essential_subspace_merge(vectors, acts, energy=0.8, layer_gamma=0.0, param_gamma=0.0)
    scaled = essential_subspace_merge(vectors, acts, energy=0.8, layer_gamma=0.3, param_gamma=0.5)
    allowed = torch.tensor([a * b for a in (0.7, 1.3) for b in (0.5, 1.5)], dtype=torch.float64)
    for key in (A0, C0, C1):
        assert torch.equal(torch.sign(scaled[key]), torch.sign(plain[key]))
        ratio = (scaled[key] / plain[key])[plain[key] != 0]
        assert (ratio > 0).all()
        assert torch.isclose(ratio.unsqueeze(-1), allowed).any(-1).all()
        # parameter level: about param_top of the entries are amplified
        amplified = (ratio > ratio.min() * 2.0).double().mean()
        assert 0.15 <= float(amplified) <= 0.4
    # energy < 1 really projects: the merged block differs from the unprojected sum
    assert not torch.allclose(plain[C0], merge(vectors, "ta")[C0])


def test_esm_layer_level_amplifies_the_layer_with_larger_feature_shifts():
    eye = torch.eye(4, dtype=torch.float64)
    base = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vectors = [{C0: 10 * base, C1: base}, {C0: 2 * base, C1: base}]
    acts = [{C0: eye, C1: eye}, {C0: eye, C1: eye}]
    out = essential_subspace_merge(vectors, acts, energy=1.0, layer_gamma=0.25, param_gamma=0.0)
    torch.testing.assert_close(out[C0], 1.25 * 12 * base)
    torch.testing.assert_close(out[C1], 0.75 * 2 * base)


def test_esm_validation():
    vectors, acts = _toy()
    with pytest.raises(ValueError, match="activation sets"):
        essential_subspace_merge(vectors, acts[:2])
    missing = [dict(a) for a in acts]
    del missing[1][C1]
    with pytest.raises(KeyError, match="task 1"):
        essential_subspace_merge(vectors, missing)
    bad = [dict(a) for a in acts]
    bad[0][A0] = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="samples"):
        essential_subspace_merge(vectors, bad)
    with pytest.raises(ValueError, match="layer_gamma"):
        essential_subspace_merge(vectors, acts, layer_gamma=1.0)
    with pytest.raises(ValueError, match="esm needs activations"):
        merge(vectors, "esm")
    # a task whose update of a matrix is zero needs no activations for it
    vectors[2][C1] = torch.zeros(8, 4, dtype=torch.float64)
    del acts[2][C1]
    out = essential_subspace_merge(vectors, acts)
    assert torch.isfinite(out[C1]).all()


def test_esm_registered_and_cost():
    assert "esm" in METHODS and max(METHODS["esm"].alpha_grid) == pytest.approx(3.0)
    vectors, acts = _toy()
    cost = esm_cost(vectors, acts)
    # 3 non-zero block matrices × 3 tasks; X is 25 × 4 → QR, then SVDs of 4 × out
    assert cost["svds"] == 9
    assert cost["largest_svd"] == 4 * 8
    assert cost["activation_rows"] == 9 * 25


def test_esm_end_to_end_on_open_clip(tiny_clip):
    """Two perturbed 'experts' of the tiny CLIP: capture, merge, apply."""
    from subboost.taskvector import apply_task_vector, select_block_keys, task_vector

    base = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    keys = [k for k in select_block_keys(base) if k.startswith("visual.")]
    g = torch.Generator().manual_seed(0)
    vectors, acts = [], []
    for t in range(2):
        expert = {k: v + 0.01 * torch.randn(v.shape, generator=g) if k.startswith("visual.") and v.is_floating_point()
                  else v.clone() for k, v in base.items()}
        tiny_clip.load_state_dict(expert)
        images = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
        acts.append(capture_block_inputs(tiny_clip, keys, images, forward=lambda m, b: m.encode_image(b),
                                         max_samples=40, seed=t))
        vectors.append(task_vector(base, expert, name=f"expert{t}"))
    tiny_clip.load_state_dict(base)
    assert all(a[k].shape == (40, base[k].shape[1]) for a in acts for k in keys)
    delta = merge(vectors, "esm", activations=acts)
    merged = apply_task_vector(base, delta, alpha=1.0)
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    assert torch.equal(delta[TEXT], torch.zeros_like(base[TEXT]))

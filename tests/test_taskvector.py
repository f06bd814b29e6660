"""Task vectors, key classification and applying updates."""

import pytest
import torch

from subboost.taskvector import (
    all_finite,
    apply_task_vector,
    layer_index,
    parse_block_key,
    select_block_keys,
    task_vector,
)


def test_task_vector_and_apply_roundtrip():
    base = {"a.weight": torch.randn(3, 2), "b": torch.randn(4), "ids": torch.arange(5)}
    expert = {"a.weight": base["a.weight"] + 1.0, "b": base["b"] * 2, "ids": torch.arange(5)}
    tv = task_vector(base, expert)
    assert set(tv) == {"a.weight", "b"}  # integer buffers are not part of a task vector
    assert torch.allclose(tv["a.weight"], torch.ones(3, 2))
    merged = apply_task_vector(base, tv, alpha=0.5)
    assert torch.allclose(merged["a.weight"], base["a.weight"] + 0.5)
    assert torch.equal(merged["ids"], base["ids"])


def test_apply_keeps_dtype():
    base = {"w": torch.ones(2, 2, dtype=torch.bfloat16)}
    out = apply_task_vector(base, {"w": torch.full((2, 2), 0.5)}, alpha=2.0)
    assert out["w"].dtype == torch.bfloat16 and torch.all(out["w"] == 2.0)


def test_bad_inputs_name_keys():
    base = {"x": torch.zeros(2, 2), "y": torch.zeros(3)}
    with pytest.raises(ValueError, match="'y'"):
        task_vector(base, {"x": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shape mismatch for key 'x'"):
        task_vector(base, {"x": torch.zeros(2, 3), "y": torch.zeros(3)})
    bad = {"x": torch.zeros(2, 2), "y": torch.tensor([0.0, float("inf"), 0.0])}
    with pytest.raises(ValueError, match="'y'.*NaN or Inf"):
        task_vector(base, bad, name="expert Cars")
    with pytest.raises(ValueError, match="not in the base"):
        apply_task_vector(base, {"z": torch.zeros(1)})


def test_open_clip_vit_b32_keys():
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    sd = model.state_dict()
    keys = select_block_keys(sd)
    visual = [k for k in keys if k.startswith("visual.")]
    text = [k for k in keys if k.startswith("transformer.")]
    assert len(visual) == 48 and len(text) == 48
    assert "visual.transformer.resblocks.11.attn.in_proj_weight" in keys
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (2304, 768)
    assert len(select_block_keys(sd, ["attn"])) == 48
    assert "visual.proj" in select_block_keys(sd, include_proj=True)
    info = parse_block_key("visual.transformer.resblocks.7.mlp.c_proj.weight")
    assert (info.layer, info.sublayer, info.layer_type) == (7, "mlp.c_proj", "mlp")


def test_transformers_bert_and_t5_keys():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    keys = select_block_keys(bert.state_dict())
    assert len(keys) == 3 * 6
    assert "encoder.layer.2.attention.self.query.weight" in keys
    assert parse_block_key("encoder.layer.2.output.dense.weight").layer_type == "mlp"
    assert parse_block_key("encoder.layer.2.attention.output.dense.weight").layer_type == "attn"
    t5 = transformers.T5Model(transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=100))
    keys = select_block_keys(t5.state_dict())
    # encoder: q,k,v,o + wi,wo per block; decoder adds cross-attention q,k,v,o
    assert len(keys) == 2 * 6 + 2 * 10
    assert layer_index("decoder.block.1.layer.2.DenseReluDense.wo.weight") == ("decoder.block", 1)
    assert parse_block_key("decoder.block.1.layer.1.EncDecAttention.k.weight").layer_type == "attn"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_entrywise_check(dtype):
    big = torch.finfo(dtype).max
    cases = {
        "finite": torch.tensor([1.0, -2.0, 3.5]),
        "nan": torch.tensor([1.0, float("nan"), 3.0]),
        "inf": torch.tensor([1.0, float("inf")]),
        "-inf": torch.tensor([float("-inf"), 0.0]),
        "inf and -inf": torch.tensor([float("inf"), float("-inf")]),
        "sum overflows, entries finite": torch.tensor([big, big, big]),
        "empty": torch.zeros(0),
    }
    for name, t in cases.items():
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), name
    assert all_finite(torch.tensor([1, 2, 3]))  # integers are always finite

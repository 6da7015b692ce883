"""MACs from torch's own flop counter: rows, exclusive attribution, unattributed MACs, notes."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.core.cost import (
    ModelCost,
    dense_macs,
    is_cost_row,
    layer_costs,
    model_costs,
)


def _counter_macs(model: nn.Module, args: tuple, batch: int) -> float:
    """Independent reference: torch's stock counter, grad on (no MHA fast path), math attention."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops() / 2 / batch


def _accounted(cost: ModelCost) -> int:
    return sum(layer.dense_macs for layer in cost.layers) + sum(cost.unattributed.values())


def _by_name(cost: ModelCost) -> dict:
    return {layer.name: layer for layer in cost.layers}


# ---------------------------------------------------------------- the counter equals the shape formula


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Linear(10, 20), (4, 10)),
        (nn.Linear(10, 20, bias=False), (2, 7, 10)),  # 3-d input: every position counts
        (nn.Linear(6, 3), (2, 3, 5, 6)),
        (nn.Conv1d(4, 8, 3, stride=2, padding=1), (2, 4, 16)),
        (nn.Conv2d(6, 12, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=3), (2, 6, 10, 11)),
        (nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False), (3, 8, 5, 7)),
        (nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1), (1, 2, 5, 6, 7)),
    ],
    ids=["linear-2d", "linear-3d", "linear-4d", "conv1d-stride", "conv2d-groups", "depthwise-same", "conv3d"],
)
def test_flop_counter_macs_equal_shape_formula(module, shape):
    x = torch.randn(shape)
    (cost,) = layer_costs(nn.Sequential(module), x)
    expected = dense_macs(module, shape, tuple(module(x).shape))
    assert cost.dense_macs == expected
    assert cost.dense_macs == _counter_macs(module, (x,), shape[0])
    assert (cost.calls, cost.macs_note) == (1, None)


def test_factorized_pair_and_unbatched_linear():
    pair = nn.Sequential(nn.Linear(64, 8, bias=False), nn.Linear(8, 64))  # low-rank factorization
    costs = layer_costs(pair, torch.randn(5, 64))
    assert [c.dense_macs for c in costs] == [64 * 8, 8 * 64]
    # A 1-d input is one sample; the matrix-vector product is counted too.
    assert layer_costs(nn.Sequential(nn.Linear(10, 20)), torch.randn(10))[0].dense_macs == 200


# ---------------------------------------------------------------- attention


def _mha_macs(seq: int, embed: int) -> int:
    # in_proj (q, k, v) + q @ k^T + scores @ v (all heads together) + out_proj
    return seq * 3 * embed * embed + 2 * seq * seq * embed + seq * embed * embed


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_counted_once_and_out_proj_marked(batch_first, need_weights):
    torch.manual_seed(0)
    batch, seq, embed = 3, 5, 16
    mha = nn.MultiheadAttention(embed, 4, batch_first=batch_first)
    x = torch.randn(batch, seq, embed) if batch_first else torch.randn(seq, batch, embed)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=need_weights)[0]

    model = Wrapper()
    cost = model_costs(model, x, batch_size=None if batch_first else batch)
    assert cost.batch_size == batch
    rows = _by_name(cost)
    assert list(rows) == ["attn", "attn.out_proj"]
    assert rows["attn"].kind == "MultiheadAttention"
    assert rows["attn"].dense_macs == _mha_macs(seq, embed)
    assert rows["attn"].params == 3 * embed * embed + 3 * embed  # in_proj; out_proj is its own row
    out_proj = rows["attn.out_proj"]
    assert (out_proj.dense_macs, out_proj.effective_macs, out_proj.calls) == (0, 0, 0)
    assert out_proj.macs_note == "counted in parent 'attn'"
    assert out_proj.params == embed * embed + embed
    assert cost.unattributed == {}
    assert _accounted(cost) == _counter_macs(model, (x,), batch)


def test_attention_effective_macs_include_the_absorbed_out_proj_weights():
    embed, seq = 8, 4
    mha = nn.MultiheadAttention(embed, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.fill_(1.0)
        mha.out_proj.weight.fill_(1.0)
        mha.out_proj.weight[: embed // 2] = 0.0  # 32 of the 192 + 64 weights are zero
    x = torch.randn(2, seq, embed)
    rows = _by_name(model_costs(mha, (x, x, x)))
    macs = _mha_macs(seq, embed)
    assert rows[""].dense_macs == macs
    assert rows[""].effective_macs == macs * (192 + 32) // (192 + 64)
    assert rows["out_proj"].macs_note == "counted in parent '(root)'"


@pytest.mark.parametrize("num_layers", [1, 2])
def test_transformer_encoder_nothing_double_counted(num_layers):
    torch.manual_seed(0)
    batch, seq, embed, ff = 2, 6, 16, 32
    layer = nn.TransformerEncoderLayer(embed, 4, ff, batch_first=True)
    model = layer if num_layers == 1 else nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
    model.train()
    x = torch.randn(batch, seq, embed)
    cost = model_costs(model, x)
    rows = _by_name(cost)
    prefix = "" if num_layers == 1 else "layers.0."
    assert rows[f"{prefix}self_attn"].dense_macs == _mha_macs(seq, embed)
    assert rows[f"{prefix}self_attn.out_proj"].macs_note == f"counted in parent '{prefix}self_attn'"
    assert rows[f"{prefix}linear1"].dense_macs == seq * embed * ff
    assert rows[f"{prefix}linear2"].dense_macs == seq * ff * embed
    assert rows[f"{prefix}norm1"].kind == "LayerNorm"
    assert (rows[f"{prefix}norm1"].dense_macs, rows[f"{prefix}norm1"].params) == (0, 2 * embed)
    assert cost.unattributed == {}
    per_layer = _mha_macs(seq, embed) + 2 * seq * embed * ff
    assert _accounted(cost) == per_layer * num_layers == _counter_macs(model, (x,), batch)
    assert model.training  # the eval-mode measurement restored the flag


# ---------------------------------------------------------------- custom modules and unattributed MACs


class _OwnWeight(nn.Module):
    """A custom layer: its own Parameter in torch.matmul, plus a bias-named parameter."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.ones(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.matmul(x, self.kernel) + self.bias


class _Mix(nn.Module):
    """Parameter-free attention-like mixing: two bmm."""

    def forward(self, x):
        scores = torch.bmm(x, x.transpose(1, 2)).softmax(-1)
        return torch.bmm(scores, x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = _OwnWeight(16, 8)
        self.mix = _Mix()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.mix(self.proj(x))
        gram = torch.bmm(h, h.transpose(1, 2))  # in the root's own forward
        return self.head(h) + gram.mean()


def test_custom_parameter_row_and_unattributed_bmm():
    batch, seq = 3, 5
    model = _Net()
    with torch.no_grad():
        model.proj.kernel[:4] = 0.0  # a quarter of the 16 x 8 kernel
    x = torch.randn(batch, seq, 16)
    cost = model_costs(model, x)
    rows = _by_name(cost)
    assert list(rows) == ["proj", "head"]
    assert rows["proj"].kind == "_OwnWeight"
    assert rows["proj"].dense_macs == seq * 16 * 8
    assert rows["proj"].effective_macs == seq * 12 * 8  # the bias does not count as weight
    assert rows["proj"].params == 16 * 8 + 8
    assert rows["head"].dense_macs == seq * 8 * 4
    mix = 2 * seq * seq * 8
    assert cost.unattributed == {"mix": mix, "": seq * seq * 8}
    assert _accounted(cost) == _counter_macs(model, (x,), batch)
    assert is_cost_row(model.proj)
    assert not is_cost_row(model.mix)
    assert not is_cost_row(model)


def test_flops_of_a_parameter_free_child_belong_to_the_enclosing_row():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.mix = _Mix()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.mix(x)) * self.scale

    x = torch.randn(2, 5, 8)
    cost = model_costs(Block(), x)
    rows = _by_name(cost)
    assert rows[""].dense_macs == 2 * 5 * 5 * 8  # the mixing bmm: exclusive of the fc row
    assert rows["fc"].dense_macs == 5 * 8 * 8
    assert cost.unattributed == {}


def test_weights_used_outside_their_module_are_noted():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.body = nn.Linear(8, 8)
            self.spare = nn.Linear(8, 8)
            self.helper = nn.Linear(8, 8)  # only its weight is used, by the body's caller

        def forward(self, tokens):
            h = self.body(self.emb(tokens))
            h = F.linear(h, self.helper.weight)
            return F.linear(h, self.emb.weight)  # tied output projection

    tokens = torch.randint(0, 50, (2, 6))
    cost = model_costs(TiedLM(), tokens)
    rows = _by_name(cost)
    assert rows["emb"].calls == 1
    assert rows["emb"].dense_macs == 0
    assert rows["emb"].macs_note == "weights also used in unattributed '(root)'"
    assert rows["helper"].macs_note == "counted in unattributed '(root)'"
    assert rows["spare"].macs_note == "not run"
    assert (rows["spare"].dense_macs, rows["spare"].calls) == (0, 0)
    assert rows["body"].macs_note is None
    assert cost.unattributed == {"": 6 * 8 * 8 + 6 * 8 * 50}


def test_not_called_module_counted_in_a_sibling_row():
    class Borrow(nn.Module):
        def __init__(self, lender: nn.Linear):
            super().__init__()
            self.own = nn.Parameter(torch.ones(8, 8))
            object.__setattr__(self, "lender", lender)  # not a child: it is registered elsewhere

        def forward(self, x):
            return x @ self.own @ self.lender.weight.t()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(8, 8, bias=False)
            self.a = Borrow(self.b)

        def forward(self, x):
            return self.a(x)

    rows = _by_name(model_costs(Model(), torch.randn(1, 8)))
    assert rows["b"].macs_note == "counted in 'a'"  # a sibling, not a parent
    assert rows["a"].dense_macs == 2 * 64


# ---------------------------------------------------------------- batch size and no-forward behaviour


def test_batch_size_inference_and_validation():
    model = nn.Sequential(nn.Linear(4, 2))
    assert model_costs(model, torch.randn(6, 4)).batch_size == 6
    assert model_costs(model, (torch.randn(3, 4),)).batch_size == 3
    assert model_costs(model, {"input": torch.randn(2, 4)}).batch_size == 2
    assert model_costs(model, torch.randn(4)).batch_size == 1
    seq_first = model_costs(model, torch.randn(5, 2, 4), batch_size=2)
    assert seq_first.layers[0].dense_macs == 5 * 8  # 10 rows of 8 MACs over 2 samples
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"`batch_size` must be None or a positive int, got"):
            model_costs(model, torch.randn(2, 4), batch_size=bad)
    with pytest.raises(ValueError, match=r"`example_input` has an empty batch"):
        model_costs(model, torch.randn(0, 4))


def test_without_example_input_no_forward_and_unknown_macs():
    calls = []
    model = _Net()
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    cost = model_costs(model)
    assert calls == []
    assert (cost.batch_size, cost.unattributed) == (None, {})
    rows = _by_name(cost)
    assert rows["head"].dense_macs == 32  # the shape formula: one position
    assert (rows["head"].calls, rows["head"].macs_note) == (None, None)
    assert rows["proj"].dense_macs is None
    assert rows["proj"].effective_macs is None
    assert rows["proj"].macs_note == "needs example_input"
    assert model_costs(nn.Conv2d(1, 1, 3)).layers[0].macs_note == "needs example_input"


def test_measurement_restores_hooks_fast_path_and_modes_even_on_error():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            self.attn(x, x, x)
            raise RuntimeError("boom")

    model = Boom()
    model.train()
    before = torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        model_costs(model, torch.randn(1, 3, 8))
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


def test_fast_path_would_hide_attention_flops():
    # Why the measurement switches the fast path off: in eval + no_grad the fused kernel is invisible.
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mha(x, x, x)
    assert counter.get_total_flops() == 0
    assert model_costs(mha, (x, x, x)).layers[0].dense_macs == _mha_macs(3, 8)


def test_lazy_custom_row_is_rejected():
    with pytest.raises(ValueError, match=r"LazyBatchNorm1d has uninitialized \(lazy\) parameters"):
        model_costs(nn.Sequential(nn.LazyBatchNorm1d()))


# ---------------------------------------------------------------- ops torch's counter does not know


def test_lstm_and_gru_macs_on_cpu():
    # nn.LSTM on CPU runs aten.mkldnn_rnn_layer, which torch's registry lacks: counted here.
    lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    (row,) = layer_costs(lstm, torch.randn(2, 5, 8))
    layer0 = 2 * 5 * (4 * 16 * 8 + 4 * 16 * 16)  # two directions, 5 steps, W_ih and W_hh
    layer1 = 2 * 5 * (4 * 16 * 32 + 4 * 16 * 16)  # input: both directions' 16 features
    assert row.dense_macs == layer0 + layer1
    assert row.macs_note is None
    (gru,) = layer_costs(nn.GRU(8, 16), torch.randn(5, 2, 8), batch_size=2)  # (L, N, E) input
    assert gru.dense_macs == 5 * (3 * 16 * 8 + 3 * 16 * 16)


def test_op_without_flop_formula_is_reported_not_silently_zero():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = nn.Bilinear(4, 5, 3)  # aten._trilinear: no formula in torch
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.fc(self.bil(a, b))

    cost = model_costs(Pair(), (torch.randn(2, 4), torch.randn(2, 5)))
    rows = _by_name(cost)
    assert cost.uncounted == {"bil": ["aten._trilinear"]}
    assert rows["bil"].dense_macs == 0
    assert rows["bil"].macs_note == "missing MACs of aten._trilinear (no flop formula in torch)"
    assert rows["fc"].macs_note is None
    assert rows["fc"].dense_macs == 3 * 2

"""core/params.py: parameter-level target selection and activation lookup from forward hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.core.params import (
    PRUNABLE_PARAMS,
    TargetParam,
    activation_input,
    select_parameters,
)
from lightning_compress.functional.pruning import activation_score, channel_mean_abs


def _by_param(targets: list[TargetParam]) -> dict[str, TargetParam]:
    return {t.param: t for t in targets}


def _hook_inputs(root: nn.Module, targets: list[TargetParam]) -> tuple[dict[str, list], list]:
    """Register kwargs-aware forward hooks on every target module; record activation_input per parameter."""
    seen: dict[str, list] = {t.param: [] for t in targets}
    modules = dict(root.named_modules())
    handles = []
    for t in targets:

        def hook(module, args, kwargs, output, t=t):
            seen[t.param].append(activation_input(t, args, kwargs))

        handles.append(modules[t.module].register_forward_hook(hook, with_kwargs=True))
    return seen, handles


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3)
        self.c2 = nn.Conv2d(3, 5, 3)
        self.c3 = nn.Conv3d(2, 3, 2)
        self.fc = nn.Linear(6, 2)
        self.bn = nn.BatchNorm2d(5)


def test_linear_and_conv_targets() -> None:
    model = Convs()
    targets = select_parameters(model)
    assert [t.param for t in targets] == ["c1.weight", "c2.weight", "c3.weight", "fc.weight"]
    assert [(t.module, t.kind, t.input_dim, t.weight_dim, t.role) for t in targets] == [
        ("c1", "Conv1d", -2, 1, "input"),
        ("c2", "Conv2d", -3, 1, "input"),
        ("c3", "Conv3d", -4, 1, "input"),
        ("fc", "Linear", -1, 1, "input"),
    ]
    assert all(t.attr == "weight" for t in targets)
    with pytest.raises(AttributeError):
        targets[0].module = "x"  # frozen
    assert select_parameters(model, targets=["c*"], exclude=["c2"]) == [targets[0], targets[2]]


def test_activation_input_for_conv_matches_channels_batched_and_unbatched() -> None:
    model = Convs()
    targets = select_parameters(model, targets=["c*"])
    seen, _ = _hook_inputs(model, targets)
    params = dict(model.named_parameters())
    model.c1(torch.randn(2, 2, 7))  # batched
    model.c1(torch.randn(2, 7))  # unbatched: channel dim is 0 = -2
    model.c2(input=torch.randn(1, 3, 6, 6))  # keyword
    model.c3(torch.randn(2, 4, 4, 4))
    for t in targets:
        for x in seen[t.param]:
            assert x is not None
            assert x.shape[t.input_dim] == params[t.param].shape[t.weight_dim]
            stat = channel_mean_abs(x, t.input_dim)
            assert activation_score(params[t.param], stat).shape == params[t.param].shape
    assert len(seen["c1.weight"]) == 2
    assert len(seen["c2.weight"]) == 1


def test_multihead_attention_shared_qkv_layout_and_out_proj() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    targets = select_parameters(model)
    assert [t.param for t in targets] == ["0.weight", "1.in_proj_weight", "1.out_proj.weight"]
    mha, out = targets[1], targets[2]
    assert (mha.module, mha.kind, mha.input_dim, mha.weight_dim, mha.role) == (
        "1",
        "MultiheadAttention",
        -1,
        1,
        "query",
    )
    assert (out.module, out.kind, out.role) == ("1.out_proj", "NonDynamicallyQuantizableLinear", "input")
    # The attention never calls out_proj (it reads out_proj.weight): its hooks never fire.
    assert [t.observable for t in targets] == [True, True, False]
    seen, _ = _hook_inputs(model, targets)
    x = torch.randn(3, 2, 8)
    model[1](x, x, x)
    assert seen["1.in_proj_weight"] == [x]
    assert seen["1.out_proj.weight"] == []
    # Only the attention block (not its out_proj) when the pattern names it exactly.
    assert [t.param for t in select_parameters(model, targets=["1"])] == ["1.in_proj_weight"]
    assert [t.param for t in select_parameters(model, targets=["1.*"])] == ["1.out_proj.weight"]


def test_multihead_attention_separate_qkv_layout() -> None:
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
    targets = select_parameters(model)
    assert [(t.param, t.role) for t in targets] == [
        ("attn.q_proj_weight", "query"),
        ("attn.k_proj_weight", "key"),
        ("attn.v_proj_weight", "value"),
        ("attn.out_proj.weight", "input"),
    ]
    assert PRUNABLE_PARAMS[nn.MultiheadAttention] == (
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
    )


@pytest.mark.parametrize("call", ["positional", "keywords", "mixed"])
def test_activation_input_on_mha_hooks(call: str) -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
    model.self_attn = nn.MultiheadAttention(8, 2)
    targets = select_parameters(model, targets=["attn", "self_attn"])
    seen, handles = _hook_inputs(model, targets)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    s = torch.randn(4, 2, 8)
    if call == "positional":
        model.attn(q, k, v, need_weights=False)
        model.self_attn(s, s, s)
    elif call == "keywords":
        model.attn(query=q, key=k, value=v)
        model.self_attn(query=s, key=s, value=s, need_weights=False)
    else:
        model.attn(q, key=k, value=v)
        model.self_attn(s, s, value=s)
    assert seen["attn.q_proj_weight"][0] is q
    assert seen["attn.k_proj_weight"][0] is k
    assert seen["attn.v_proj_weight"][0] is v
    assert seen["self_attn.in_proj_weight"][0] is s
    params = dict(model.named_parameters())
    for t in targets:
        x = seen[t.param][0]
        assert x.shape[t.input_dim] == params[t.param].shape[t.weight_dim]
    for h in handles:
        h.remove()


def test_embedding_is_opt_in_and_tied_weights_appear_once() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied

    model = LM()
    assert [t.param for t in select_parameters(model)] == ["body.weight", "head.weight"]
    targets = select_parameters(model, include_embeddings=True)
    assert [t.param for t in targets] == ["emb.weight", "body.weight"]  # the tied tensor once, first name
    emb = targets[0]
    assert (emb.kind, emb.input_dim, emb.weight_dim, emb.role) == ("Embedding", -1, 0, "input")
    seen, _ = _hook_inputs(model, targets)
    model.emb(torch.tensor([[1, 2, 3]]))
    assert seen["emb.weight"] == [None]  # integer indices: no activation to measure
    with pytest.raises(
        ValueError, match=r"Supported layer types: .*MultiheadAttention\. Matching-type layers"
    ):
        select_parameters(model, targets=["emb"])  # opt-out: the embedding is no candidate
    with pytest.raises(
        ValueError, match=r"`include_embeddings`='yes' is not supported; expected True or False"
    ):
        select_parameters(model, include_embeddings="yes")


def test_module_used_twice_appears_once() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    assert [t.param for t in select_parameters(model)] == ["0.weight", "3.weight"]


def test_no_match_error_lists_candidates_and_bad_patterns() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.MultiheadAttention(4, 1))
    with pytest.raises(
        ValueError, match=r"GradualPruning: no layer matches targets=\['enc\*'\] exclude=\[\]"
    ) as err:
        select_parameters(model, targets=["enc*"], owner="GradualPruning")
    assert "Matching-type layers in this model: [0, 2, 2.out_proj]" in str(err.value)
    assert "MultiheadAttention" in str(err.value)
    with pytest.raises(ValueError, match="no layer matches"):
        select_parameters(model, exclude=["*"])
    with pytest.raises(
        ValueError, match=r"`targets`='\*' is not supported; expected a list of fnmatch patterns"
    ):
        select_parameters(model, targets="*")
    with pytest.raises(ValueError, match=r"`exclude` entries must be non-empty strings"):
        select_parameters(model, exclude=[""])


def test_non_floating_and_lazy_parameters_are_skipped() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.LazyLinear(2))
    model[0].weight = nn.Parameter(torch.zeros(3, 3, dtype=torch.int32), requires_grad=False)
    assert [t.param for t in select_parameters(model)] == ["1.weight"]
    with pytest.raises(
        ValueError, match=r"matching targets=\['0'\] .*\(\[0\]\) hold no floating-point prunable"
    ):
        select_parameters(model, targets=["0"])
    model[2](torch.randn(1, 3))  # materialize the lazy layer
    assert [t.param for t in select_parameters(model)] == ["1.weight", "2.weight"]


def test_transformer_encoder_layer() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    targets = select_parameters(layer)
    assert [t.param for t in targets] == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]
    seen, _ = _hook_inputs(layer, targets)
    x = torch.randn(2, 3, 8)
    layer(x)
    assert (
        seen["self_attn.in_proj_weight"][0] is x
    )  # called as self_attn(x, x, x, ...) on the norm_first=False path
    params = dict(layer.named_parameters())
    for t in targets:
        assert len(seen[t.param]) == int(t.observable)
        for a in seen[t.param]:
            assert a is not None
            assert a.shape[t.input_dim] == params[t.param].shape[t.weight_dim]
    assert [t.param for t in targets if not t.observable] == ["self_attn.out_proj.weight"]
    # The inference fast path (eval, no grad) would bypass self_attn; attached hooks switch it off.
    layer.eval()
    with torch.inference_mode():
        layer(torch.randn(2, 3, 8))
    assert len(seen["self_attn.in_proj_weight"]) == 2


def test_transformer_stack_names() -> None:
    class Stack(nn.Module):
        """nn.Transformer-like: embedding, encoder layers, decoder layers with cross-attention, head."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.layers = nn.ModuleList(
                [nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(2)]
            )
            self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True), 1)
            self.head = nn.Linear(8, 20)

        def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            h = self.embed(src)
            for layer in self.layers:
                h = layer(h)
            return self.head(self.decoder(self.embed(tgt), h))

    model = Stack()
    names = [t.param for t in select_parameters(model)]
    assert names[:4] == [
        "layers.0.self_attn.in_proj_weight",
        "layers.0.self_attn.out_proj.weight",
        "layers.0.linear1.weight",
        "layers.0.linear2.weight",
    ]
    assert names[4] == "layers.1.self_attn.in_proj_weight"
    assert names[8:] == [
        "decoder.layers.0.self_attn.in_proj_weight",
        "decoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.multihead_attn.in_proj_weight",
        "decoder.layers.0.multihead_attn.out_proj.weight",
        "decoder.layers.0.linear1.weight",
        "decoder.layers.0.linear2.weight",
        "head.weight",
    ]
    # Deterministic, and in the model's own parameter order.
    assert names == [t.param for t in select_parameters(model)]
    order = [n for n, _ in model.named_parameters()]
    assert names == sorted(names, key=order.index)
    attn_only = select_parameters(model, targets=["*attn"], exclude=["decoder.*"])
    assert [t.param for t in attn_only] == [
        "layers.0.self_attn.in_proj_weight",
        "layers.1.self_attn.in_proj_weight",
    ]
    assert select_parameters(model, include_embeddings=True)[0].param == "embed.weight"

    # Hooks see every selected tensor's input during a real forward, with matching feature sizes.
    targets = select_parameters(model)
    seen, _ = _hook_inputs(model, targets)
    model(torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 4)))
    params = dict(model.named_parameters())
    for t in targets:
        assert bool(seen[t.param]) == t.observable, t.param
        for a in seen[t.param]:
            assert a is not None
            assert a.shape[t.input_dim] == params[t.param].shape[t.weight_dim]
    assert all(t.param.endswith("out_proj.weight") for t in targets if not t.observable)


def test_nn_transformer() -> None:
    model = nn.Transformer(8, 2, 1, 1, 16)
    names = [t.param for t in select_parameters(model, targets=["encoder.layers.0.*", "encoder.layers.0"])]
    assert names == [
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.linear1.weight",
        "encoder.layers.0.linear2.weight",
    ]
    assert len(select_parameters(model)) == 4 + 6  # encoder 4, decoder 6 (self + cross attention)

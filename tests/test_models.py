"""The model zoo: every registered model trains and infers; paper names round-trip; bad input is refused."""

import io

import pandas as pd
import pytest
import torch

import dse.models.__main__ as models_main
from dse.measure import ModelProfile, state_dict_bytes
from dse.models import ModelConfig, build_model, create_model, list_models, paper_name, parse_name, resolve_config
from dse.models.names import candidate_blocks
from dse.paper import paper_table, size_note


@pytest.mark.parametrize("size", [32, 28])
@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, num_classes, in_channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    x = torch.randn(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("row", range(4))
def test_baseline_sizes_match_table1(row):
    published = paper_table(1).iloc[row]
    model = create_model(published["model"], num_classes=10, in_channels=3)
    ours = state_dict_bytes(model) / 1e6
    assert ours == pytest.approx(published["size_mb"], rel=0.03), published["model"]


@pytest.mark.parametrize(
    "name, family, blocks, width",
    [
        ("Shallow SqueezeNext-06-0.4x", "shallow_squeezenext", [1, 1, 1, 1], 0.4),
        ("Shallow SqueezeNext-14-1.5x", "shallow_squeezenext", [1, 2, 8, 1], 1.5),
        ("Shallow SqueezeNext-14-1x", "shallow_squeezenext", [1, 5, 5, 1], 1.0),
        ("Shallow SqueezeNext-21-0.2x-v1", "shallow_squeezenext", [2, 2, 14, 1], 0.2),
        ("Shallow SqueezeNext-09-0.5", "shallow_squeezenext", [1, 1, 4, 1], 0.5),
        ("SqueezeNext-23-2x", "squeezenext", [6, 6, 8, 1], 2.0),
        ("Baseline SqueezeNext-23-1x", "squeezenext", [6, 6, 8, 1], 1.0),
        ("SqueezeNext-23v5-1x", "squeezenext", [2, 4, 14, 1], 1.0),
        ("Modified SqueezeNext-23-1x", "modified_squeezenext", [6, 6, 8, 1], 1.0),
        ("SqueezeNet-v1.1", "squeezenet_v1_1", None, None),
        ("Baseline SqueezeNet-v1.0", "squeezenet_v1_0", None, None),
    ],
)
def test_parse_name(name, family, blocks, width):
    cfg = parse_name(name)
    assert (cfg.name, cfg.blocks, cfg.width) == (family, blocks, width)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig("shallow_squeezenext", [1, 1, 1, 1], 0.4),
        ModelConfig("shallow_squeezenext", [1, 5, 5, 1], 1.5),  # 14 at 1.5x is R=1281 in the paper
        ModelConfig("shallow_squeezenext", [1, 1, 2, 1], 0.7),  # depth 07: no R in the paper
        ModelConfig("shallow_squeezenext", [3, 3, 3, 3], 0.125),
        ModelConfig("squeezenext", [6, 6, 8, 1], 2.0),
        ModelConfig("squeezenext", [1, 2, 3, 4], 0.5),
        ModelConfig("squeezenext_23v5_1x"),
        ModelConfig("modified_squeezenext", [2, 2, 2, 2], 1.0),
        ModelConfig("squeezenet_v1_0"),
    ],
)
def test_paper_name_round_trips(cfg):
    name = paper_name(cfg)
    back = resolve_config(parse_name(name))
    full = resolve_config(cfg)
    assert (back.blocks, back.width) == (full.blocks, full.width), name
    assert paper_name(back) == name


def test_every_paper_row_parses_or_asks_for_blocks():
    for table in "1234567":
        for _, row in paper_table(table).iterrows():
            if not row["model"].startswith(("Shallow", "SqueezeNe", "Baseline")):
                continue  # Table 7's "Squeezed CNN" is not one of our families
            try:
                cfg = parse_name(row["model"])
            except ValueError as error:
                assert "blocks=" in str(error), row["model"]
                for blocks in candidate_blocks(row["model"]):
                    assert parse_name(row["model"], blocks=blocks).blocks == list(blocks)
                continue
            if isinstance(row.get("blocks"), list):
                assert cfg.blocks == row["blocks"], row["model"]


def test_ambiguous_depth_picks_paper_R_or_asks():
    assert parse_name("Shallow SqueezeNext-14-0.5x", blocks=[1, 5, 5, 1]).blocks == [1, 5, 5, 1]
    with pytest.raises(ValueError, match=r"ambiguous: depth 14 is R=1,2,8,1 or R=1,5,5,1.*blocks="):
        parse_name("Shallow SqueezeNext-14-0.5x")
    with pytest.raises(ValueError, match=r"no stage counts for 'Shallow SqueezeNext-07-0.7x'.*summing to 5"):
        parse_name("Shallow SqueezeNext-07-0.7x")
    with pytest.raises(ValueError, match=r"give depth 07, not the 06"):
        parse_name("Shallow SqueezeNext-06-0.4x", blocks=[1, 2, 1, 1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=0), r"width=0 must be > 0"),
        (dict(width=-1), r"width=-1 must be > 0"),
        (dict(width=0.05), r"width=0.05 is too small"),
        (dict(blocks=[1, 1, 1]), r"blocks=\[1, 1, 1\] must be four positive integers"),
        (dict(blocks=[1, 0, 1, 1]), r"blocks=\[1, 0, 1, 1\] must be four positive integers"),
        (dict(blocks=[1.5, 1, 1, 1]), r"must be four positive integers"),
        (dict(blocks="1111"), r"blocks='1111' must be four positive integers"),
        (dict(activation="tanh"), r"activation='tanh' is not allowed; allowed: 'elu', 'relu'"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(inplace="yes"), r"inplace='yes' must be true or false"),
        (dict(num_classes=1), r"num_classes=1 must be an integer >= 2"),
        (dict(in_channels=0), r"in_channels=0 must be an integer >= 1"),
        (dict(depth=3), r"does not take depth; it takes: blocks, width, dropout, activation, inplace"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("shallow_squeezenext", **kwargs)


def test_unknown_model_lists_registered_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'; registered models: .*shallow_squeezenext"):
        create_model("resnet18")
    with pytest.raises(ValueError, match=r"unknown model 'Shallow SqueezeNet-06'.*paper name such as"):
        create_model("Shallow SqueezeNet-06")


def test_build_model_from_config_matches_create_model():
    cfg = ModelConfig("shallow_squeezenext", [1, 2, 2, 1], 0.5, dropout=0.1, activation="relu", inplace=False)
    torch.manual_seed(0)
    a = build_model(cfg, num_classes=10, in_channels=3)
    torch.manual_seed(0)
    b = create_model("Shallow SqueezeNext-08-0.5x", blocks=[1, 2, 2, 1], dropout=0.1, activation="relu", inplace=False)
    assert [t.shape for t in a.state_dict().values()] == [t.shape for t in b.state_dict().values()]
    assert not any(isinstance(m, torch.nn.ELU) for m in a.modules())
    assert a.dropout.p == 0.1


def _sizes_only(model, input_shape, **_):
    """`dse.measure.profile` without the slow parts: the real fp32 size, nothing timed or counted."""
    size = state_dict_bytes(model)
    return ModelProfile(
        params=0,
        size_bytes=size,
        size_mb=size / 1e6,
        int8_bytes=0,
        int8_mb=0.0,
        macs=0,
        flops=0,
        input_shape=tuple(input_shape),
        latency_ms=0.0,
        latency_iqr_ms=0.0,
        latency_runs=0,
        threads=1,
    )


@pytest.mark.parametrize("fmt", ["markdown", "csv"])
def test_table1_compares_sizes_only_where_the_paper_agrees_with_itself(monkeypatch, capsys, fmt):
    monkeypatch.setattr(models_main, "profile", _sizes_only)
    assert models_main.main(["--format", fmt]) == 0
    out, err = capsys.readouterr()
    table = pd.read_csv(io.StringIO(out)) if fmt == "csv" else None
    lines = out.strip().splitlines()
    note = lines[-1] if fmt == "markdown" else err.strip()
    assert note == size_note(["1"]) and "\n" not in note
    assert (
        "Table 1 lists Shallow SqueezeNext-06-0.4x at 0.272 MB, no larger than the narrower Shallow "
        "SqueezeNext-06-0.2x at 0.273 MB" in note
    )
    rows = (
        table
        if table is not None
        else pd.DataFrame(
            [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:-1]],
            columns=[c.strip() for c in lines[0].strip("|").split("|")],
        )
    )
    diff = dict(zip(rows["model"], rows["diff_%"].astype(str)))
    shallow = [m for m in diff if m.startswith("Shallow")]
    assert len(shallow) == 5 and all(diff[m] == "not comparable" for m in shallow)
    assert all(abs(float(diff[m])) <= 1.5 for m in diff if m not in shallow)  # the baselines: a percentage

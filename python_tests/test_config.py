"""MindSkipConfig: the paper's default layers, validation, and the router directory's config file (JSON with a
format version: written and checked by config.py itself)."""

from __future__ import annotations

import json

import pytest

import mindskip_ext as msk
from mindskip_ext.config import CONFIG_FORMAT_VERSION, MindSkipConfig


def test_default_layers_follow_the_paper():
    assert msk.MindSkipConfig().resolve_layers(32) == list(range(15, 31))
    assert msk.MindSkipConfig().resolve_layers(30) == list(range(14, 29))


def test_wide_layers_leave_out_the_first_eighth_and_the_last():
    from mindskip_ext.config import wide_layers

    assert wide_layers(30) == list(range(4, 29)) and wide_layers(32) == list(range(4, 31))
    assert wide_layers(8) == list(range(1, 7)) and wide_layers(2) == [0]
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        wide_layers(1)


def test_capacity_for_skip_ratio_counts_all_attention_sublayers():
    from mindskip_ext.config import capacity_for_skip_ratio

    assert capacity_for_skip_ratio(0.125, 30, 25) == pytest.approx(0.85)
    assert capacity_for_skip_ratio(0.25, 8, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cannot be reached with routers on 4 of 8 layers"):
        capacity_for_skip_ratio(0.6, 8, 4)
    with pytest.raises(ValueError, match=r"skip_ratio must be in \(0, 1\)"):
        capacity_for_skip_ratio(0.0, 8, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=1.0), r"threshold must be in \(0, 1\)"),
        (dict(threshold=True), "threshold must be a number"),
        (dict(granularity="head"), "granularity must be one of"),
        (dict(packed_attention="maybe"), "packed_attention must be one of"),
        (dict(layers=[]), "at least one decoder layer"),
        (dict(layers=[3, 3]), "duplicates"),
        (dict(layers=[1.5]), "must be integers"),
        (dict(pool_padding=1), "must be a bool"),
    ],
)
def test_bad_fields_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MindSkipConfig(**kwargs)


def test_json_round_trip_writes_the_format_version_and_extra_fields():
    config = MindSkipConfig(granularity="mlp", layers=[5, 3], threshold=0.6)
    text = config.to_json(layers=[3, 5], base_model={"model_type": "llama"})
    data = json.loads(text)
    assert data["format_version"] == CONFIG_FORMAT_VERSION
    assert list(data) == sorted(data)  # sorted keys: the file is diff-stable
    loaded, extra = MindSkipConfig.from_json(text)
    assert loaded == config and loaded.layers == [3, 5]
    assert extra == {"layers": [3, 5], "base_model": {"model_type": "llama"}}


def test_a_file_without_a_format_version_is_version_1():
    text = json.dumps({"mindskip_config": MindSkipConfig().to_dict(), "layers": [1]})
    assert MindSkipConfig.from_json(text)[0] == MindSkipConfig()


def test_a_newer_format_or_unknown_field_says_to_upgrade():
    newer = json.dumps({"format_version": CONFIG_FORMAT_VERSION + 1, "mindskip_config": {}})
    with pytest.raises(ValueError, match=r"newer mindskip_ext \(config format 2\).*upgrade mindskip_ext"):
        MindSkipConfig.from_json(newer, "routers/mindskip_config.json")
    unknown = json.dumps({"mindskip_config": {**MindSkipConfig().to_dict(), "router_depth": 2}})
    with pytest.raises(ValueError, match="unknown MindSkip config field.*router_depth.*upgrade"):
        MindSkipConfig.from_json(unknown)
    for bad in ("{not json", "[1, 2]", json.dumps({"format_version": "one", "mindskip_config": {}})):
        with pytest.raises(ValueError, match="not valid JSON|lacks mindskip_config|invalid format_version"):
            MindSkipConfig.from_json(bad)

"""``attn-inject blocks``: every registered block with its paper, options and parameters."""

from __future__ import annotations

import torch
from torch import nn

from attn_inject.blocks import registered_block
from tests.helpers.cli import last_json, run_cli, run_cli_one_line


class Doubler(nn.Module):
    """Doubles its input (a made-up paper, 2026)."""

    def __init__(self, channels: int, scale: float = 2.0):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


def test_blocks_json_lists_every_block_with_paper_options_and_parameters(capsys):
    code, out, _ = run_cli(capsys, "blocks", "--json")
    assert code == 0
    rows = {row["name"]: row for row in last_json(out)["blocks"]}
    assert sorted(rows) == ["cbam", "coord", "eca", "gc", "gct", "ge", "se", "simam"]
    assert {name: row["parameters"] for name, row in rows.items()} == {
        "cbam": 2 * 256 * 16 + 2 * 7 * 7 + 2,
        "coord": (256 * 8 + 8) + 2 * 8 + 2 * (8 * 256 + 256),
        "eca": 5,
        "gc": (256 + 1) + (256 * 32 + 32) + 2 * 32 + (32 * 256 + 256),
        "gct": 3 * 256,
        "ge": (256 * 16 + 16) + (16 * 256 + 256),
        "se": (256 * 16 + 16) + (16 * 256 + 256),
        "simam": 1,
    }
    assert rows["cbam"]["paper"].startswith("CBAM, the Convolutional Block Attention Module (Woo, Park, Lee, Kweon")
    assert rows["simam"]["identity"] == "gate" and rows["cbam"]["identity"] == "init"
    assert rows["coord"]["options"]["reduction"] == 32 and rows["coord"]["gate"] == ["conv_h", "conv_w"]
    code, out, _ = run_cli(capsys, "blocks", "--json", "--channels", "64")
    assert {row["name"]: row["parameters"] for row in last_json(out)["blocks"]}["gct"] == 3 * 64


def test_blocks_table_and_a_users_gated_block(capsys):
    with registered_block("doubler", Doubler, identity="gate"):
        code, out, _ = run_cli(capsys, "blocks")
        assert code == 0
        assert "Attention blocks (parameters at 256 channels)" in " ".join(out.split())
        for name in ("cbam", "coord", "gc", "gct", "ge", "simam", "doubler"):
            assert f"│ {name} " in out
        (row,) = [r for r in last_json(run_cli(capsys, "blocks", "--json")[1])["blocks"] if r["name"] == "doubler"]
    assert row["paper"] == "Doubles its input (a made-up paper, 2026)." and row["identity"] == "gate"
    assert row["options"] == {"scale": 2.0, "init": "identity"} and row["parameters"] == 256 + 1


def test_blocks_refuses_bad_channels(capsys):
    code, _, err = run_cli_one_line(capsys, "blocks", "--channels", "0")
    assert code == 1 and err == "error: --channels must be at least 1, not 0"

"""Dense to MoE conversion, against the dense model it starts from."""

import sys

import pytest
import torch
import yaml
from helpers import tiny_config, train

from adamoe.convert import convert
from adamoe.transformer import Transformer, TransformerConfig


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


def pair(gate: str = "Top2Gate", dropout: float = 0.0, **shape):
    from adamoe import gates

    base = dict(
        d_model=16,
        n_heads=2,
        d_ff=24,
        num_encoder_layers=2,
        num_decoder_layers=2,
        num_experts=4,
        dropout=dropout,
        **shape,
    )
    torch.manual_seed(0)
    dense = Transformer(TransformerConfig(**base, moe_every=0, ffn_bias=False), vocab_size=50)
    torch.manual_seed(1)
    moe = Transformer(TransformerConfig(**base, moe_every=1, gate=getattr(gates, gate)), vocab_size=50)
    return dense, moe


def batch():
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(4, 50, (3, 7), generator=g), torch.randint(4, 50, (3, 5), generator=g)
    src_pad, tgt_pad = torch.zeros(3, 7, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)
    src_pad[0, 5:] = True
    return src, tgt, src_pad, tgt_pad


def test_copied_experts_under_top2_compute_the_dense_model():
    dense, moe = pair()
    assert convert(moe, dense.state_dict(), "copy") == []
    dense.eval(), moe.eval()
    src, tgt, src_pad, tgt_pad = batch()
    want, _ = dense(src, tgt, src_pad, tgt_pad)
    got, routings = moe(src, tgt, src_pad, tgt_pad)
    assert len(routings) == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    loss = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss(got.flatten(0, 1), tgt.flatten()), loss(want.flatten(0, 1), tgt.flatten()))


def test_random_experts_keep_every_other_weight_and_differ():
    dense, moe = pair()
    convert(moe, dense.state_dict(), "random")
    theirs = dense.state_dict()
    for k, v in moe.state_dict().items():
        if ".ffn." not in k:
            assert torch.equal(v, theirs[k]), k
    w0 = moe.encoder[0].ffn.experts.w0_EDF
    assert not torch.equal(w0[0], w0[1]) and not torch.equal(w0[0], theirs["encoder.0.ffn.fc1.weight"].t())


def test_copy_with_noise_makes_experts_differ_around_the_ffn():
    dense, moe = pair()
    convert(moe, dense.state_dict(), "copy", noise=0.01)
    w0, fc1 = moe.encoder[0].ffn.experts.w0_EDF, dense.state_dict()["encoder.0.ffn.fc1.weight"].t()
    assert not torch.equal(w0[0], w0[1])
    assert (w0 - fc1).std().item() == pytest.approx(0.01 * fc1.std().item(), rel=0.2)


def test_dropped_biases_are_said():
    from adamoe import gates

    base = dict(d_model=16, n_heads=2, d_ff=24, num_encoder_layers=1, num_decoder_layers=1, num_experts=4)
    dense = Transformer(TransformerConfig(**base, moe_every=0), vocab_size=50)
    moe = Transformer(TransformerConfig(**base, moe_every=1, gate=gates.Top2Gate), vocab_size=50)
    assert convert(moe, dense.state_dict(), "copy") == [
        "encoder.0.ffn: the dense FFN's biases are dropped (experts have none)",
        "decoder.0.ffn: the dense FFN's biases are dropped (experts have none)",
    ]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    cfg = tiny_config(tmp)
    train(
        "fit",
        "--config",
        cfg,
        "--trainer.max_steps",
        2,
        "--trainer.val_check_interval",
        2,
        "--model.init_args.net.moe_every",
        0,
        "--model.init_args.net.ffn_bias",
        "false",
        "--trainer.logger.init_args.name",
        "dense",
        cwd=tmp,
    )
    return tmp, cfg, tmp / "logs" / "dense" / "version_0" / "checkpoints" / "last.ckpt"


def test_a_converted_run_trains_and_resumes(dense_run, tmp_path, caplog):
    import json
    import logging

    caplog.set_level(logging.INFO)
    from helpers import scalars

    _, cfg, ckpt = dense_run
    args = [
        "--config",
        cfg,
        "--model.init_args.convert_from",
        ckpt,
        "--model.init_args.net.moe_every",
        1,
        "--model.init_args.net.ffn_bias",
        "false",
        "--trainer.logger.init_args.save_dir",
        tmp_path / "logs",
        "--trainer.logger.init_args.version",
        "run",
        "--trainer.val_check_interval",
        2,
    ]
    train("fit", *args, "--trainer.max_steps", 2, cwd=tmp_path)
    assert f"Converted {ckpt} into this MoE model (random experts)" in caplog.text
    run = tmp_path / "logs" / "tiny" / "run"
    assert json.loads((run / "metrics.json").read_text())["converted_from"] == str(ckpt)
    # A new run: its own step count from 0, not the dense run's.
    assert min(s for s, _ in scalars(run)["train/loss"]) == 0
    train("fit", *args, "--trainer.max_steps", 4, "--ckpt_path", "last", cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["convert_from"] == str(ckpt)

"""bf16-mixed training follows fp32's loss curve."""

import warnings

import pytest
import yaml
from helpers import scalars, tiny_config, train


def test_bf16_mixed_loss_curve_follows_fp32(tmp_path):
    """The same seed, data and dropout masks (drawn independently of the dtype): 40 steps
    of bf16-mixed must stay within 1% of fp32's training loss at every step (bf16 keeps 8
    bits of mantissa; the router, softmaxes and the loss stay fp32), while the loss falls by
    more than that, so the comparison is not between two flat lines."""
    cfg = tiny_config(tmp_path)
    config = yaml.safe_load(cfg.read_text())
    config["model"]["init_args"] |= {
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "fused": True}},
        "lr_scheduler": {"class_path": "adamoe.schedulers.WarmupInverseSqrt", "init_args": {"warmup_steps": 5}},
    }
    cfg.write_text(yaml.safe_dump(config))
    curves = {}
    for precision in ("32-true", "bf16-mixed"):
        train(
            "fit",
            "--config",
            cfg,
            "--trainer.precision",
            precision,
            "--trainer.max_steps",
            40,
            "--trainer.limit_val_batches",
            0,
            "--trainer.logger.init_args.version",
            precision,
            cwd=tmp_path,
        )
        curves[precision] = dict(scalars(tmp_path / "logs" / "tiny" / precision)["train/loss"])
    fp32, bf16 = curves["32-true"], curves["bf16-mixed"]
    assert sorted(fp32) == sorted(bf16) and len(fp32) == 40
    assert fp32[max(fp32)] < 0.8 * fp32[min(fp32)]
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=0.01), step
    assert bf16 != fp32  # the bf16 run did compute in bf16


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_fast_bf16_says_it_will_be_slower(tmp_path, monkeypatch, fast):
    import adamoe.cli

    monkeypatch.setattr(adamoe.cli, "cpu_has_fast_bf16", lambda: fast)
    cfg = tiny_config(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(
            "fit",
            "--config",
            cfg,
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_steps",
            1,
            "--trainer.limit_val_batches",
            0,
            cwd=tmp_path,
        )
    said = any("no fast bf16 matmul" in str(w.message) for w in caught)
    assert said == (not fast)

"""Encoder-only classification and decoder-only language modelling, end to end and exact."""

import math
from unittest.mock import ANY

import pytest
import torch
import torch.nn.functional as F
from helpers import scalars, tiny_task_config, train

from adamoe import ClassificationModule, LanguageModelModule
from adamoe.data import SyntheticSentiment, SyntheticText
from adamoe.data.batch import collate
from adamoe.transformer import TransformerConfig

LM_NET = TransformerConfig(
    d_model=16, n_heads=2, d_ff=32, num_encoder_layers=0, num_decoder_layers=2, num_experts=2, dropout=0.0
)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_task_trains_then_validates_tests_and_predicts_from_the_checkpoint(task, tmp_path):
    cfg = tiny_task_config(tmp_path, task)
    train(
        "fit",
        "--config",
        cfg,
        "--data.curriculum",
        "paper",
        "--trainer.max_epochs",
        6,
        "--trainer.max_steps",
        -1,
        cwd=tmp_path,
    )
    logged = scalars(tmp_path / "logs" / task / "version_0")
    losses = [v for _, v in logged["train/loss"]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert len(logged["curriculum/spearman"]) == 6  # the curriculum ran on this architecture
    ckpt = tmp_path / "logs" / task / "version_0" / "checkpoints" / "last.ckpt"
    for sub in ("validate", "test"):
        out = train(sub, "--config", cfg, "--ckpt_path", ckpt, cwd=tmp_path)
        assert f"{'val' if sub == 'validate' else 'test'}/loss" in out.stdout
    train("predict", "--config", cfg, "--ckpt_path", ckpt, cwd=tmp_path)
    lines = (tmp_path / "pred.txt").read_text().splitlines()
    assert len(lines) == 12
    # New text from a file: the same texts give the same outputs as from the split, and a
    # blank line still gets its line of output.
    texts = (SyntheticSentiment if task == "classification" else SyntheticText)(400, 16, 12).load("test")["text"]
    (tmp_path / "new.txt").write_text("\n".join([*texts[:5], "", texts[5]]) + "\n")
    train("predict", "--config", cfg, "--ckpt_path", ckpt, "--data.predict_file", tmp_path / "new.txt", cwd=tmp_path)
    assert (tmp_path / "pred.txt").read_text().splitlines() == [*lines[:5], ANY, lines[5]]
    if task == "classification":
        assert set(lines) <= {"0", "1"}
        assert {"val/acc", "val/f1"} <= set(logged)


def test_classification_metrics_are_exact_on_a_hand_made_batch():
    torch.manual_seed(0)
    net = TransformerConfig(d_model=8, n_heads=2, d_ff=16, num_encoder_layers=1, num_decoder_layers=0, num_experts=2)
    m = ClassificationModule(num_classes=3, vocab_size=20, net=net)
    assert len(ClassificationModule(**m.hparams).net.decoder) == 0  # its saved hyperparameters rebuild it
    with pytest.raises(ValueError, match="encoder-only"):
        ClassificationModule(vocab_size=20, net=TransformerConfig(num_decoder_layers=2))
    batch = collate([0, 1, 2, 3, 4], {"src": [[5, 2]] * 5, "label": [0, 1, 2, 2, 1]})
    # Fix the logits: predictions 0, 1, 1, 2, 0 against labels 0, 1, 2, 2, 1.
    logits = torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]])
    m.forward = lambda b: (logits, [])
    m.validation_step(batch, 0)
    acc = m.stage_metrics["val"]["acc"].compute().item()
    f1 = m.stage_metrics["val"]["f1"].compute().item()
    loss = m.stage_metrics["val"]["loss"].compute().item()
    assert acc == pytest.approx(3 / 5)
    # Per class: 0: P 1/2 R 1 -> 2/3; 1: P 1/2 R 1/2 -> 1/2; 2: P 1 R 1/2 -> 2/3.
    assert f1 == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert loss == pytest.approx(F.cross_entropy(logits, batch["label"]).item())


def test_lm_perplexity_is_exp_of_the_mean_token_loss():
    torch.manual_seed(0)
    m = LanguageModelModule(vocab_size=30, net=LM_NET).eval()
    texts = [[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 2]]
    batches = [collate([0, 1], {"tgt": texts[:2]}), collate([2], {"tgt": texts[2:]})]
    total, count = 0.0, 0
    for b in batches:
        m.validation_step(b, 0)
        logits, _ = m(b)
        for row in range(b["tgt_out"].shape[0]):
            for t in range(b["tgt_out"].shape[1]):
                if not b["tgt_pad"][row, t]:
                    total += -torch.log_softmax(logits[row, t], -1)[b["tgt_out"][row, t]].item()
                    count += 1
    logged = {}
    m.log_dict = lambda values, **kw: logged.update(values)
    m.on_validation_epoch_end()
    assert logged["val/loss"].item() == pytest.approx(total / count, rel=1e-5)
    assert logged["val/ppl"].item() == pytest.approx(math.exp(total / count), rel=1e-5)


def test_decoder_only_has_no_cross_attention_and_cached_continuation_matches():
    torch.manual_seed(0)
    m = LanguageModelModule(vocab_size=30, net=LM_NET).eval()
    assert all(b.cross_attn is None for b in m.net.decoder) and len(m.net.encoder) == 0
    prompt = torch.randint(3, 30, (3, 4))
    out = m.net.continue_text(prompt, eos_id=2, max_new_tokens=5)
    ys = prompt
    for _ in range(out.shape[1]):  # greedy without the cache
        logits, _ = m.net.decode(ys)
        ys = torch.cat([ys, logits[:, -1].argmax(-1, keepdim=True)], 1)
    for row in range(3):
        ref = ys[row, 4:].tolist()
        n = ref.index(2) + 1 if 2 in ref else len(ref)
        assert out[row, :n].tolist() == ref[:n]


def test_lm_data_packs_texts_without_dropping_any_token(tmp_path):
    from adamoe.data import LanguageModelData, TextLines

    (tmp_path / "train.txt").write_text("a b c\n\nd e\nf g h i j\n")
    (tmp_path / "val.txt").write_text("a b\n")
    src = TextLines(str(tmp_path / "train.txt"), str(tmp_path / "val.txt"))
    assert src.load("train")["text"] == ["a b c", "d e", "f g h i j"]  # the blank line is skipped
    padded = LanguageModelData(src, vocab_size=40, max_tokens=256, cache_dir=str(tmp_path / "cache"))
    padded.prepare_data()
    padded.setup("fit")
    packed = LanguageModelData(src, vocab_size=40, max_tokens=256, pack_to=4, cache_dir=str(tmp_path / "cache"))
    packed.setup("fit")
    stream = [t for ids in padded.splits["train"]["tgt"] for t in ids]
    blocks = packed.splits["train"]["tgt"]
    assert [t for b in blocks for t in b] == stream and all(len(b) == 4 for b in blocks[:-1])
    assert sorted(i for b in packed.train_dataloader() for i in b["index"].tolist()) == list(range(len(blocks)))


def test_classification_data_numbers_string_labels_and_checks_them(tmp_path):
    from adamoe.data import ClassificationData, TableFiles
    from adamoe.errors import DataError

    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood film\tpos\nbad film\tneg\nfine film\tneutral\n")
    val = tmp_path / "val.tsv"
    val.write_text("sentence\tlabel\ngood\tpos\n")
    src = TableFiles(str(train), str(val), columns={"text": "sentence", "label": "label"})
    dm = ClassificationData(src, num_classes=3, vocab_size=40, max_tokens=256, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.splits["train"]["label"] == [2, 0, 1] and dm.splits["val"]["label"] == [2]  # neg, neutral, pos
    with pytest.raises(DataError, match="outside num_classes=2"):
        ClassificationData(src, num_classes=2, vocab_size=40, max_tokens=256, cache_dir=str(tmp_path / "cache")).setup(
            "fit"
        )

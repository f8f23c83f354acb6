"""Two CPU processes (gloo) through train.py: statistics and metrics add up across ranks."""

import csv
import json
from collections import Counter

import pytest
import torch
import yaml
from helpers import scalars, tiny_config, train

from adamoe.data import TranslationData
from adamoe.data.batch import collate
from adamoe.data.sampler import ShardedBatchSampler
from adamoe.data.sources import SyntheticTranslation
from adamoe.tasks import TranslationModule

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", 2, "--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = tiny_config(tmp)
    # lr 0 keeps the weights of the checkpoint equal to those every logged step used,
    # so the test can recount each rank's routing on its own.
    train(
        "fit",
        "--config",
        cfg,
        *DDP,
        "--model.optimizer.lr",
        1e-30,  # below a weight's precision: the weights stay as they are (0 itself is refused)
        "--model.net.dropout",
        0.0,
        "--timer.target",
        100.0,
        "--analysis.min_count",
        2,
        cwd=tmp,
    )
    return tmp, cfg


def test_logged_expert_counts_are_the_sum_over_ranks(ddp_run):
    tmp, cfg = ddp_run
    run = tmp / "logs" / "tiny" / "version_0"
    model = TranslationModule.load_from_checkpoint(
        tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    ).train()
    dm, ds = train_split(cfg)
    lengths = [max(len(s), len(t)) for s, t in zip(ds["src"], ds["tgt"])]
    tokens, two, load = 0, 0, 0
    with torch.no_grad():
        for rank in (0, 1):
            first = next(iter(ShardedBatchSampler(lengths, dm.max_tokens, None, "length", dm.seed, 2, rank)))
            batch = collate(first, ds.gather(first, ["src", "tgt"]))
            _, routings = model(batch)
            enc = routings[0]  # enc.1
            tokens += enc.num_tokens
            two += int((enc.experts_per_token_T >= 2).sum())
            load = load + enc.expert_load_E
    logged = dict(scalars(run)["experts/enc.1/two_expert_share"])
    assert logged[1] == pytest.approx(two / tokens, rel=1e-6)
    assert dict(scalars(run)["experts/enc.1/load_imbalance"])[1] == pytest.approx(
        (load.max() / load.float().mean()).item(), rel=1e-6
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"histograms": 0, "images": 0})
    ea.Reload()
    hist = next(h.histogram_value for h in ea.Histograms("experts/enc.1/tokens_per_expert") if h.step == 1)
    assert (hist.sum, hist.min, hist.max) == (float(load.sum()), float(load.min()), float(load.max()))
    assert {"experts/load_heatmap", "experts/two_expert_share"} <= set(ea.Tags()["images"])


def train_split(cfg):
    data_cfg = yaml.safe_load(cfg.read_text())["data"]["init_args"]
    dm = TranslationData(
        SyntheticTranslation(**data_cfg["source"]["init_args"]),
        vocab_size=data_cfg["vocab_size"],
        max_tokens=data_cfg["max_tokens"],
        cache_dir=data_cfg["cache_dir"],
    )
    dm.setup("fit")
    return dm, dm.splits["train"]


def test_epoch_time_throughput_and_time_to_target(ddp_run):
    tmp, cfg = ddp_run
    metrics = json.loads((tmp / "logs" / "tiny" / "version_0" / "metrics.json").read_text())
    _, ds = train_split(cfg)
    # The first epoch is whole: both ranks together saw every training token once.
    first = metrics["epochs"][0]
    assert first["tokens"] == sum(len(s) + len(t) for s, t in zip(ds["src"], ds["tgt"]))
    assert first["tokens_per_s"] == pytest.approx(first["tokens"] / first["max_s"])
    done = metrics["epochs"]
    assert metrics["tokens_per_s"] == pytest.approx(sum(e["tokens"] for e in done) / sum(e["max_s"] for e in done))
    assert metrics["time_to_target"]["seconds"] > 0 and metrics["time_to_target"]["step"] == 3  # the first validation
    assert metrics["global_step"] == 6
    curve = metrics["curve"]
    assert [p["step"] for p in curve] == [3, 6]
    assert 0 < curve[0]["train_s"] < curve[1]["train_s"] and all(p["train_s"] < p["wall_s"] for p in curve)


def test_routing_analysis_lists_whole_words(ddp_run):
    tmp, cfg = ddp_run
    rows = list(csv.DictReader(open(tmp / "logs" / "tiny" / "version_0" / "routing_words.tsv"), delimiter="\t"))
    val = SyntheticTranslation(**yaml.safe_load(cfg.read_text())["data"]["init_args"]["source"]["init_args"]).load(
        "val"
    )
    words = {w for col in ("source", "target") for line in val[col] for w in line.split()}
    assert rows and {r["layer"] for r in rows} == {"enc.1", "dec.1"}
    assert all(r["word"] in words for r in rows)
    # Both ranks' halves of the validation set are counted: each word as often as it occurs
    # on its side, and its share is a whole number of those occurrences.
    occurrences = {col: Counter(w for line in val[col] for w in line.split()) for col in ("source", "target")}
    for r in rows:
        side = "source" if r["layer"].startswith("enc") else "target"
        assert int(r["count"]) == occurrences[side][r["word"]], r
        two = float(r["two_expert_share"]) * int(r["count"])
        assert two == pytest.approx(round(two), abs=1e-4), r


def test_validation_metrics_match_a_single_process(ddp_run):
    tmp, cfg = ddp_run
    ckpt = tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    version = "--trainer.logger.init_args.version"
    train("validate", "--config", cfg, "--ckpt_path", ckpt, *DDP, version, "two", cwd=tmp)
    train(
        "validate",
        "--config",
        cfg,
        "--ckpt_path",
        ckpt,
        "--trainer.devices",
        1,
        "--trainer.accelerator",
        "cpu",
        version,
        "one",
        cwd=tmp,
    )
    two, one = (scalars(tmp / "logs" / "tiny" / v) for v in ("two", "one"))
    for tag in ("val/loss", "val/bleu"):
        assert two[tag][-1][1] == pytest.approx(one[tag][-1][1], rel=1e-5, abs=1e-6)


def test_curriculum_under_ddp_keeps_one_full_table(tmp_path):
    cfg = tiny_config(tmp_path)
    train(
        "fit",
        "--config",
        cfg,
        *DDP,
        "--data.curriculum",
        "paper",
        "--trainer.max_steps",
        -1,
        "--trainer.max_epochs",
        2,
        "--trainer.val_check_interval",
        1.0,
        cwd=tmp_path,
    )
    ckpt = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    table = torch.load(ckpt, weights_only=True)["TranslationData"]["train_sampler"]
    assert table["epoch"] == 1 and table["order"] == "paper"
    dm = TranslationData(SyntheticTranslation(200, 16, 12), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    src_len = torch.tensor([float(len(s)) for s in dm.splits["train"]["src"]])
    # Rank 0's checkpoint holds both ranks' counts, each sample once (the epoch-end checkpoint
    # may come before or after the counts become the table).
    counted = table["epoch_tokens_NL"] + table.get("tokens_NL", 0) * (table["epoch_tokens_NL"].sum() == 0)
    assert torch.equal(counted[:, 0], src_len)
    logged = scalars(tmp_path / "logs" / "tiny" / "version_0")
    for tag in (
        "curriculum/spearman",
        "curriculum/within_batch_std",
        "curriculum/within_batch_std_random",
        "curriculum/ep_cost",
        "curriculum/ep_assignments",
        "val/loss",
    ):
        assert len(logged[tag]) == 2  # validation at the end of each epoch, however many batches the order made
    # The expert-parallel cost, recomputed from the per-step load histograms (summed over
    # ranks): with 4 experts over 8 modeled GPUs each group is one expert, so a step and
    # layer cost the largest load.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "logs" / "tiny" / "version_0"), size_guidance={"histograms": 0})
    ea.Reload()
    max_load, all_load = Counter(), Counter()
    for name in ("enc.1", "dec.1"):
        for h in ea.Histograms(f"experts/{name}/tokens_per_expert"):
            max_load[h.step] += h.histogram_value.max
            all_load[h.step] += h.histogram_value.sum
    start = 0
    for (end, cost), (_, assignments) in zip(logged["curriculum/ep_cost"], logged["curriculum/ep_assignments"]):
        assert cost == sum(v for step, v in max_load.items() if start < step <= end)
        assert assignments == sum(v for step, v in all_load.items() if start < step <= end)
        start = end


def test_expert_parallel_fit_checkpoint_validates_the_same_in_one_process(tmp_path):
    cfg = tiny_config(tmp_path)
    # lr 0: the checkpoint's weights are those of the first step, whose exchange is recounted below.
    train(
        "fit",
        "--config",
        cfg,
        *DDP,
        "--model.expert_parallel",
        "true",
        "--model.optimizer.lr",
        1e-30,  # below a weight's precision: the weights stay as they are (0 itself is refused)
        "--model.net.dropout",
        0.0,
        "--trainer.callbacks+",
        "adamoe.callbacks.CollectiveWait",
        cwd=tmp_path,
    )
    run = tmp_path / "logs" / "tiny" / "version_0"
    fit_loss = json.loads((run / "metrics.json").read_text())["final"]["val/loss"]
    # Each rank's wait in the exchanges, per step: part of that step's time, never more.
    logged = scalars(run)
    waits = [dict(logged[f"parallel/wait_s/rank{r}"]) for r in (0, 1)]
    assert sorted(waits[0]) == sorted(waits[1]) == list(range(6))
    for step, most in logged["parallel/wait_s_max"]:
        assert most == max(w[step] for w in waits) and 0 < most <= dict(logged["parallel/step_s"])[step]
    ckpt = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["state_dict"]["net.encoder.1.ffn.experts.w0_EDF"].shape[0] == 4  # all experts, gathered
    train("validate", "--config", cfg, "--ckpt_path", ckpt, "--trainer.devices", 1, cwd=tmp_path)
    assert scalars(run / "validate")["val/loss"][-1][1] == pytest.approx(fit_loss, rel=1e-5)
    # ... and resumes training on one device, optimizer state included, in the same run folder.
    train("fit", "--config", cfg, "--ckpt_path", ckpt, "--trainer.devices", 1, "--trainer.max_steps", 9, cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 9
    # Recount the first step's exchange: rank r holds experts 2r and 2r+1 of every layer.
    model = TranslationModule.load_from_checkpoint(ckpt).train()
    dm, ds = train_split(cfg)
    lengths = [max(len(s), len(t)) for s, t in zip(ds["src"], ds["tgt"])]
    load = {}
    with torch.no_grad():
        for rank in (0, 1):
            first = next(iter(ShardedBatchSampler(lengths, dm.max_tokens, None, "length", dm.seed, 2, rank)))
            for i, r in enumerate(model(collate(first, ds.gather(first, ["src", "tgt"])))[1]):
                load[rank, i] = r.expert_load_E.tolist()
    logged, sent_bytes = scalars(run), 0
    for i, name in enumerate(("enc.1", "dec.1")):
        received = [sum(load[src, i][2 * rank + e] for src in (0, 1) for e in (0, 1)) for rank in (0, 1)]
        assert logged[f"experts/{name}/ep_received_max"][0] == (1, max(received))
        assert logged[f"experts/{name}/ep_received_mean"][0] == (1, sum(received) / 2)
        for rank in (0, 1):
            away = sum(load[rank, i]) - load[rank, i][2 * rank] - load[rank, i][2 * rank + 1]
            arrived = load[1 - rank, i][2 * rank] + load[1 - rank, i][2 * rank + 1]
            sent_bytes += (away + arrived) * 32 * 4  # rows of d_model fp32 values, both exchanges
    assert logged["experts/model/ep_bytes_per_step"][0] == (1, sent_bytes)


def test_predict_under_ddp_writes_line_i_for_input_i(ddp_run):
    """Each line of the 2-process prediction file is the single-process greedy decode of the
    test input with that index."""
    tmp, cfg = ddp_run
    # The run's weights are the untrained initial ones, which decode every input to the
    # same string; noise makes each input decode differently.
    state = torch.load(tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["state_dict"] = {
        k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state["state_dict"].items()
    }
    ckpt = tmp / "noisy.ckpt"
    torch.save(state, ckpt)
    out = tmp / "ddp-predictions.txt"
    train(
        "predict",
        "--config",
        cfg,
        "--ckpt_path",
        ckpt,
        *DDP,
        "--model.beam_size",
        1,
        "--model.max_decode_len",
        8,
        "--model.predict_output",
        out,
        cwd=tmp,
    )
    lines = out.read_text().splitlines()
    model = TranslationModule.load_from_checkpoint(ckpt).eval()
    data_cfg = yaml.safe_load(cfg.read_text())["data"]["init_args"]
    dm = TranslationData(
        SyntheticTranslation(**data_cfg["source"]["init_args"]),
        vocab_size=data_cfg["vocab_size"],
        cache_dir=data_cfg["cache_dir"],
    )
    dm.setup("predict")
    expected = []
    with torch.no_grad():
        for ids in dm.splits["test"]["src"]:
            tokens = model.net.generate(torch.tensor([ids]), dm.bos_id, dm.eos_id, 8)[0].tolist()
            expected.append(dm.decode(tokens))
    assert len(set(expected)) > 3  # inputs decode differently, so a shuffled file would show
    assert lines == expected

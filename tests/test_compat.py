"""Each private API and message text `adamoe.compat` relies on, checked against the installed
libraries: a change in any of them fails here, by name, rather than deep inside a run."""

import inspect
import os
import subprocess
import sys
import tempfile
from datetime import timedelta

import jsonargparse
import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, tiny_config
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from adamoe import compat
from adamoe.cli import AdamoeCLI, main


class Stop(Exception):
    pass


def test_lightning_cli_applies_checkpoint_arguments_through_the_hook_we_replace(monkeypatch):
    source = inspect.getsource(LightningCLI.__init__)
    order = [
        source.index(s)
        for s in ("self.parse_arguments(", "self._parse_ckpt_path()", "self.before_instantiate_classes()")
    ]
    assert order == sorted(order)
    calls = []

    def record(cli):
        calls.append(cli.config.subcommand)
        raise Stop

    monkeypatch.setattr(AdamoeCLI, "apply_checkpoint_arguments", record)
    with pytest.raises(Stop):
        main(["fit", "--config", str(ROOT / "configs/task/translation.yaml")])
    assert calls == ["fit"]


def test_ddp_strategy_starts_its_process_group_with_the_timeout_we_set():
    strategy = DDPStrategy()
    compat.set_collective_timeout(strategy, timedelta(seconds=7))
    assert strategy._timeout == timedelta(seconds=7)
    assert '"timeout": self._timeout' in inspect.getsource(DDPStrategy.setup_distributed)


def test_ddp_leaves_out_the_parameters_we_name():
    store = tempfile.NamedTemporaryFile(prefix="adamoe-store-", delete=False).name
    os.unlink(store)
    dist.init_process_group("gloo", store=dist.FileStore(store, 1), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        compat.ddp_ignore(model, ["1.weight", "1.bias"])
        ddp = DistributedDataParallel(model)
        assert set(ddp.parameters_to_ignore) == {"1.weight", "1.bias"}
    finally:
        dist.destroy_process_group()


def test_jsonargparse_errors_still_name_the_key_and_the_reason():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model.size", type=int)
    with pytest.raises(jsonargparse.ArgumentError) as error:
        parser.parse_args(["--model.size", "big"])
    key, reason = compat.parser_error(str(error.value))
    assert key == "model.size" and "big" in reason


def test_lightning_raises_trainer_settings_checked_against_the_data_from_its_loops(tmp_path, monkeypatch):
    """The one case `compat.lightning_setting` is for: val_check_interval above the batches."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        main(
            [
                "fit",
                "--config",
                str(tiny_config(tmp_path)),
                "--trainer.max_steps",
                "40",
                "--trainer.val_check_interval",
                "30",
            ]
        )
    assert "val_check_interval" in str(error.value) and compat.lightning_setting(error.value)


PEER = """
import sys, time, torch, torch.distributed as dist
from datetime import timedelta
from adamoe import compat
rank = int(sys.argv[1])
store = "file://" + sys.argv[2]
dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=20))
dist.all_reduce(torch.ones(1))
if rank == 1:
    sys.exit(0)
time.sleep(0.5)
try:
    dist.all_reduce(torch.ones(1))
except Exception as e:
    print(compat.lost_peer(e), type(e).__name__)
"""


def test_the_error_a_rank_gets_when_its_peer_exits_reads_as_a_lost_peer(tmp_path):
    """gloo says so only in its text; a typed DistError always counts, another RuntimeError does not."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PEER, str(r), str(tmp_path / "store")], stdout=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    out = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert out[0] in ("True RuntimeError", "True DistBackendError", "True DistNetworkError"), out
    assert compat.lost_peer(dist.DistBackendError("NCCL communicator was aborted"))
    assert not compat.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))

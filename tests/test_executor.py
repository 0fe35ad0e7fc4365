"""The study fanned out: compare's probe jobs in two local worker processes (submitit) give
exactly the results of the serial run, and a failing worker names its log."""

from __future__ import annotations

import json

import pytest

from mechinterp.errors import UserError
from mechinterp.store.results import find_results, read_result
from mechinterp.study.compare import compare
from mechinterp.study.executor import Job, execute, parse_executor_options

PROBES = ["weight-change", "kl-drift", "task-accuracy", "mmlu"]


def _stored(folder) -> dict:
    return {read_result(d).probe: read_result(d).data for d in find_results(folder)}


@pytest.mark.slow
def test_two_local_workers_equal_the_serial_run(planted_variants, tmp_path, data_source,
                                                one_thread):
    serial, local = tmp_path / "serial", tmp_path / "local"
    said: list[str] = []
    compare("tiny-random-llama", planted_variants, serial, preset="smoke", probes=PROBES,
            echo=lambda m: None)
    compare("tiny-random-llama", planted_variants, local, preset="smoke", probes=PROBES,
            executor="local", workers=2, echo=said.append)
    assert sum("submitted (local job" in m for m in said) == len(PROBES)
    assert _stored(local) == _stored(serial)
    assert set(_stored(local)) == set(PROBES)
    assert (json.loads((local / "claims.json").read_text())
            == json.loads((serial / "claims.json").read_text()))
    assert not (local / ".jobs").exists()  # the workers' pickles and logs go once all succeeded


def test_a_failing_worker_names_its_log(tmp_path, data_source):
    job = Job("[compare 1/1] weight-change", "weight-change", {}, "tiny-random-llama",
              {"sft": str(tmp_path / "no-such-model")}, check=True, out=str(tmp_path / "o"),
              data_dir=str(data_source.root), model_kw={"device": "cpu"})
    with pytest.raises(UserError, match=r"failed in its worker .*read .*\.err"):
        execute([job], "local", workers=1, log_folder=tmp_path / "jobs", echo=lambda m: None)


def test_executor_options_and_bad_executor():
    assert parse_executor_options(["slurm_partition=gpu", "mem_gb=64", "x=1.5"]) == {
        "slurm_partition": "gpu", "mem_gb": 64, "x": 1.5}
    with pytest.raises(UserError, match="not KEY=VALUE"):
        parse_executor_options(["slurm_partition"])
    with pytest.raises(UserError, match="unknown executor"):
        execute([], "ray")
    with pytest.raises(UserError, match="below 1"):
        execute([], "local", workers=0)

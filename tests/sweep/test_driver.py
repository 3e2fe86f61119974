"""The trial kind: light (the loop in the Tune trial) for one worker, a TorchTrainer for
more; what each kind asks Tune for, and how Tune restarts it."""

from __future__ import annotations

import pytest

from cliptd.core.errors import SweepError
from cliptd.sweep import driver


def _meta(**kw):
    return {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 0.95, "max_failures": 2,
            **kw}


def test_auto_is_light_for_one_worker_and_train_for_more():
    assert driver.trial_kind("auto", 1) == "light"
    assert driver.trial_kind("auto", 2) == "train"
    assert driver.trial_kind("train", 1) == "train"  # overridable
    assert driver.trial_kind("light", 1) == "light"


def test_light_refuses_more_than_one_worker():
    with pytest.raises(SweepError, match="--trial-kind train"):
        driver.trial_kind("light", 2)
    with pytest.raises(SweepError, match="not one of"):
        driver.trial_kind("fast", 1)


def test_a_light_trial_holds_its_worker_resources_itself():
    sliver = {"CPU": 0.025, "cliptd_driver": 0.01}
    assert driver.trial_resources(_meta(trial_kind="light"), sliver) == {"CPU": 0.95}
    # on GPUs: the trial's own GPU, and no head-only driver resource (it trains)
    assert driver.trial_resources(_meta(trial_kind="light", gpus_per_worker=1,
                                        cpus_per_worker=4), sliver) == {"CPU": 4, "GPU": 1}
    assert driver.trial_resources(_meta(trial_kind="train"), sliver) == sliver
    # no kind given: chosen from the workers, as --trial-kind auto does
    assert driver.trial_resources(_meta(), sliver) == {"CPU": 0.95}
    assert driver.trial_resources(_meta(workers=2), sliver) == sliver


def test_tune_restarts_a_light_trial_as_train_restarts_workers():
    light = driver.tune_run_options(_meta(trial_kind="light", max_failures=3))
    assert light["failure_config"].max_failures == 3
    ckpt = light["checkpoint_config"]
    assert (ckpt.num_to_keep, ckpt.checkpoint_score_attribute,
            ckpt.checkpoint_score_order) == (2, "score", "max")
    train = driver.tune_run_options(_meta(trial_kind="train", max_failures=3))
    assert train["failure_config"].max_failures == 1  # the driver's own; Train has max 3
    assert "checkpoint_config" not in train

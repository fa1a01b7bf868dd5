"""Training that fits the machine: a wall-clock budget, resume after an interruption, the schedule."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lineside.export.synth import SynthSummary

pytestmark = pytest.mark.export

REPO = Path(__file__).resolve().parents[2]


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lineside.export.cli", "train-vae", "--data", str(data), "--out", str(out),
        "--batch-size", "4", "--seed", "1", *extra,
    ]  # fmt: skip


def _record(out: Path) -> dict:
    return json.loads((out / "train.json").read_text(encoding="utf-8"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_schedule_warms_up_then_decays_by_steps_or_by_time() -> None:
    from lineside.export.train import BudgetSchedule, TrainClock

    clock = TrainClock(budget_s=None)
    schedule = BudgetSchedule(max_update=1000, base_lr=1e-3, final_lr=1e-5, clock=clock)
    assert schedule.warmup == 50  # 5 % of the planned steps
    assert schedule(0) == pytest.approx(1e-4)  # a tenth of the rate at the first step
    assert schedule(50) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.05)) / 2)
    assert schedule(1000) == pytest.approx(1e-5)
    # with a budget, time used drives the decay when it runs ahead of the steps
    timed = TrainClock(budget_s=100.0)
    timed.before = 50.0  # half the budget spent in an earlier session
    schedule = BudgetSchedule(max_update=1000, base_lr=1e-3, final_lr=1e-5, clock=timed)
    assert schedule(100) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-2)
    timed.before = 1000.0
    assert schedule(100) == pytest.approx(1e-5)


def test_a_short_budget_keeps_time_for_the_batchnorm_re_estimate(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lineside.export.train import TrainClock, TrainOptions, run_loop

    # given a loop whose steps take 50 ms and whose BatchNorm re-estimate takes as long per batch
    # (a real one runs forward and backward, as a step does), and a budget of 1 s: about 20 steps
    optimizer = SimpleNamespace(num_update=0)
    trainer = SimpleNamespace(optimizer=optimizer, save_states=lambda path: Path(path).write_bytes(b"s"))
    refreshed: list[int] = []

    def step(_: bool) -> float:
        time.sleep(0.05)
        optimizer.num_update += 1
        return 1.0

    def refresh(batches: int) -> None:
        refreshed.append(batches)
        time.sleep(0.05 * batches)

    opts = TrainOptions(out=tmp_path, epochs=5, iters_per_epoch=1000)
    clock = TrainClock(budget_s=1.0)

    # when it trains within the budget
    history, seconds = run_loop("t", opts, trainer, step, lambda: 0.0, lambda *a, **k: None, clock, None, None, refresh)

    # then the re-estimate ran once, on as many batches as steps, and the whole fits the budget: training
    # stopped early enough (without the reserve it would train the full second, then re-estimate another)
    assert len(history) == 1 and refreshed == [optimizer.num_update]
    assert 8 <= optimizer.num_update <= 12
    assert seconds < 1.0 + 0.15


def test_a_budget_stops_training_mid_epoch_and_says_so(synth_set: tuple[Path, SynthSummary], tmp_path: Path) -> None:
    data, _ = synth_set
    out = tmp_path / "run"
    start = time.monotonic()

    # when: 1000 planned epochs of 50 iterations, 4 seconds of budget
    done = subprocess.run(
        _train_cmd(data, out, "--epochs", "1000", "--iters", "50", "--minutes", str(4 / 60)),
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    # then
    assert done.returncode == 0, done.stderr[-3000:]
    record = _record(out)
    assert record["training"]["params"]["stopped_by"] == "budget"
    assert record["training"]["params"]["planned_epochs"] == 1000
    assert len(record["history"]) < 1000
    # the budget is used, less the slack of estimating the BatchNorm re-estimate it kept back (a short run)
    assert 3.0 <= record["training"]["seconds"] < 60.0
    assert time.monotonic() - start < 240
    assert (out / "trainer.states").is_file()


def test_resume_continues_an_interrupted_run(synth_set: tuple[Path, SynthSummary], tmp_path: Path) -> None:
    data, _ = synth_set
    out = tmp_path / "run"
    cmd = _train_cmd(data, out, "--epochs", "4", "--iters", "15")

    # given a run killed (SIGKILL, like a power cut) once its first epochs were checkpointed
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "train.json").is_file() and (out / "trainer.states").is_file()):
            assert proc.poll() is None, "training ended before it could be interrupted"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    first = _record(out)
    done_before = len(first["history"])
    assert 1 <= done_before < 4

    # when
    resumed = subprocess.run([*cmd, "--resume"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)

    # then the run has all 4 epochs, the earlier ones unchanged, and counts the earlier time
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = _record(out)
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
    assert record["history"][:done_before] == first["history"]
    assert record["training"]["seconds"] > first["training"]["seconds"]
    assert record["preprocessing"] == first["preprocessing"]
    assert "resuming vae" in resumed.stderr

    # and resuming a finished run trains nothing more
    again = subprocess.run([*cmd, "--resume"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _record(out)["history"] == record["history"]
    assert "already complete" in again.stderr


def test_resume_refuses_a_run_of_another_architecture(synth_set: tuple[Path, SynthSummary], tmp_path: Path) -> None:
    data, _ = synth_set
    out = tmp_path / "run"
    first = subprocess.run(
        _train_cmd(data, out, "--epochs", "1", "--iters", "2"), env=_env(), cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    record = _record(out)
    record["architecture"]["width"] = 999
    (out / "train.json").write_text(json.dumps(record), encoding="utf-8")

    again = subprocess.run(
        [*_train_cmd(data, out, "--epochs", "2", "--iters", "2"), "--resume"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert again.returncode != 0
    assert "architecture" in again.stderr and "999" in again.stderr


def test_the_ssd_records_the_simulator_magnification_it_trained_with(
    synth_set: tuple[Path, SynthSummary], tmp_path: Path
) -> None:
    # given a short SSD run with simulated defects at a magnification of 4-8 px/mm
    data, _ = synth_set
    out = tmp_path / "ssd"
    cmd = [
        sys.executable, "-m", "lineside.export.cli", "train-ssd", "--data", str(data), "--out", str(out),
        "--epochs", "1", "--iters", "2", "--batch-size", "2", "--seed", "1", "--simulate", "0.5",
        "--sim-px-per-mm", "4,8", "--sim-flat", "0.25", "--sim-edges", "0.5",
    ]  # fmt: skip

    # when it trains, then train.json says which range drew the defects (and the default when none is given)
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _record(out)["training"]["params"]["sim_px_per_mm"] == [4.0, 8.0]
    assert _record(out)["training"]["params"]["sim_flat"] == 0.25
    assert _record(out)["training"]["params"]["sim_edges"] == 0.5
    from lineside.export.simulate import SimConfig

    assert SimConfig.chosen() == SimConfig()


def test_the_weight_average_follows_the_steps_and_is_swapped_in_only_inside_its_block() -> None:
    import mxnet as mx
    from mxnet import gluon

    from lineside.export.train import WeightAverage

    net = gluon.nn.Dense(2, in_units=3)
    net.initialize()
    average = WeightAverage(net, decay=0.5, ctx=mx.cpu())

    def set_weights(value: float) -> None:
        net.weight.set_data(mx.nd.full(net.weight.shape, value))

    # the first step's weights start the average; then the decay grows towards its cap: (t - 1) / (t + 2)
    set_weights(1.0)
    average.update(1)
    set_weights(3.0)
    average.update(2)  # decay 1/4: 0.25 * 1 + 0.75 * 3
    set_weights(5.0)
    average.update(5)  # decay min(0.5, 4/7) = 0.5: 0.5 * 2.5 + 0.5 * 5

    with average.applied():
        assert net.weight.data().asnumpy() == pytest.approx(3.75)
    assert net.weight.data().asnumpy() == pytest.approx(5.0)  # training goes on from its own weights


def test_ema_saves_the_average_and_resume_carries_it_on(synth_set: tuple[Path, SynthSummary], tmp_path: Path) -> None:
    import mxnet as mx

    data, _ = synth_set
    out = tmp_path / "run"
    cmd = _train_cmd(data, out, "--iters", "4")

    def load(name: str) -> dict[str, np.ndarray]:
        return {k: v.asnumpy() for k, v in mx.nd.load(str(out / name)).items()}

    # when: two epochs with the average
    first = subprocess.run(
        [*cmd, "--epochs", "2", "--ema", "0.9"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    saved, raw = load("model.params"), load("raw.params")

    # then model.params (what build reads) is the average, not the last weights, and train.json says so
    assert saved.keys() == raw.keys()
    assert any(not np.allclose(saved[k], raw[k]) for k in saved)
    assert _record(out)["training"]["params"]["ema"] == 0.9

    # and a third epoch without the average goes on from the raw weights, and leaves no stale raw.params
    # (at a learning rate of 0 the weights cannot move: the third epoch's are the ones it started from)
    resumed = subprocess.run(
        [*cmd, "--epochs", "3", "--lr", "0", "--resume"], env=_env(), cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [h["epoch"] for h in _record(out)["history"]] == [1, 2, 3]
    assert not (out / "raw.params").exists()
    after = load("model.params")
    learnt = [k for k in raw if "running" not in k]  # BatchNorm statistics move in any training forward pass
    assert learnt and all(np.allclose(after[k], raw[k]) for k in learnt)


def test_a_resumed_average_is_the_saved_one_and_the_net_keeps_its_raw_weights(tmp_path: Path) -> None:
    import mxnet as mx
    from mxnet import gluon

    from lineside.export.train import TrainOptions, WeightAverage

    # given a run folder whose model.params holds the average (2.0) and raw.params the trained weights (5.0)
    net = gluon.nn.Dense(2, in_units=3)
    net.initialize()
    for value, name in ((2.0, "model.params"), (5.0, "raw.params")):
        for p in net.collect_params().values():
            p.set_data(mx.nd.full(p.shape, value))
        net.save_parameters(str(tmp_path / name))
    # (resume_run has loaded the raw weights into the net)

    # when the average starts on the resumed run
    average = WeightAverage.start(net, TrainOptions(out=tmp_path, ema=0.9), [mx.cpu()], resumed=True)

    # then it carries on from the saved average, not from the net's weights
    assert average is not None
    with average.applied():
        assert net.weight.data().asnumpy() == pytest.approx(2.0)
    assert net.weight.data().asnumpy() == pytest.approx(5.0)


def test_swapping_the_average_in_keeps_every_device_and_the_optimiser_state() -> None:
    import mxnet as mx
    from mxnet import autograd, gluon

    from lineside.export.train import WeightAverage

    # given a net trained on two devices (two CPU contexts stand for two GPUs): its kvstore holds Adam's state
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = gluon.nn.Dense(2, in_units=3)
    net.initialize(ctx=ctxs)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.1})
    average = WeightAverage(net, decay=0.5, ctx=ctxs[0])

    def step() -> None:
        with autograd.record():
            losses = [net(mx.nd.ones((4, 3), ctx=c)).sum() for c in ctxs]
        autograd.backward(losses)
        trainer.step(8)

    step()
    average.update(1)
    step()
    average.update(2)
    raw = [a.asnumpy() for a in net.weight.list_data()]
    assert trainer._kv_initialized

    # when the average is swapped in and out
    with average.applied():
        held = [a.asnumpy() for a in net.weight.list_data()]

    # then both devices held it, both got their own weights back, and the optimiser state was not reset
    expected = average.shadow[average.params.index(net.weight)].asnumpy()
    assert all(np.allclose(h, expected) for h in held)
    assert not np.allclose(expected, raw[0])
    assert all(np.allclose(a.asnumpy(), r) for a, r in zip(net.weight.list_data(), raw, strict=True))
    assert trainer._kv_initialized


def test_a_bad_ema_decay_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        _train_cmd(tmp_path, tmp_path / "run", "--ema", "1.5"), env=_env(), cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--ema expects a decay in [0, 1)" in done.stderr

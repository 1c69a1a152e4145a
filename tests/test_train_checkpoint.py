"""Checkpoints: round trip, keep-last-K and best, and corrupt or truncated files detected with a fallback."""

import hashlib
import io
import tracemalloc

import pytest
import torch

from model.train import checkpoint
from model.train.checkpoint import CheckpointError


def _state(step):
    return {"step": step, "model": {"w": torch.full((3, 4), float(step))}, "history": [{"epoch": step, "loss": 0.5}]}


def test_round_trip_is_exact(tmp_path):
    state = {
        "model": {"w": torch.randn(5, 7)},
        "rng": [{"cpu": torch.get_rng_state()}],
        "config": {"lr": 0.01, "towers": 2},
    }
    path = checkpoint.save(tmp_path, state, step=12)
    assert path.name == "step-000000012.pt"
    back = checkpoint.read(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert torch.equal(back["rng"][0]["cpu"], state["rng"][0]["cpu"])
    assert back["config"] == state["config"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_a_save_streams_the_state_into_its_file_with_the_footer_the_reader_checks(tmp_path):
    """The file holds torch.save's bytes, then MAGIC, their sha256 and their length; no copy of them is held on the
    way (a 217 MiB AlexNet's held two: Python's allocations while saving stay far under the state's 64 MiB)."""
    state = {"model": {f"w{i}": torch.randn(256, 1024) for i in range(64)}}  # 64 MiB in 1 MiB tensors
    tracemalloc.start()
    try:
        path = checkpoint.save(tmp_path, state, step=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    data = path.read_bytes()
    payload = data[: -checkpoint.FOOTER]
    assert data[len(payload) :] == checkpoint.MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(
        8, "little"
    )
    assert torch.equal(torch.load(io.BytesIO(payload), weights_only=True)["model"]["w3"], state["model"]["w3"])
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB held while saving"


def test_keeps_last_k_and_best(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, _state(step), step, keep=2, best=step == 20)
    assert [p.name for p in checkpoint.step_files(tmp_path)] == ["step-000000040.pt", "step-000000030.pt"]
    assert checkpoint.read(tmp_path / checkpoint.BEST)["step"] == 20


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage):
    checkpoint.save(tmp_path, _state(1), 1)
    latest = checkpoint.save(tmp_path, _state(2), 2)
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 3] ^= 0xFF
    else:
        data = b""
    latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-000000002\.pt"):
        checkpoint.read(latest)
    warnings = []
    state, path = checkpoint.load_latest(tmp_path, warn=warnings.append)
    assert state["step"] == 1 and path.name == "step-000000001.pt"
    assert len(warnings) == 1 and "step-000000002.pt" in warnings[0]
    assert "falling back to step-000000001.pt" in warnings[0]


def test_nothing_usable(tmp_path):
    assert checkpoint.load_latest(tmp_path / "missing") is None
    (tmp_path / "step-000000005.pt").write_bytes(b"garbage")
    warnings = []
    assert checkpoint.load_latest(tmp_path, warn=warnings.append) is None
    assert "no older checkpoint" in warnings[0]


def test_training_state_restores_the_next_step_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(torch.ones(2, 4)).square().sum().backward()
        optimizer.step()

    model, optimizer = make()
    step(model, optimizer)
    checkpoint.save(tmp_path, checkpoint.training_state(model, optimizer, None), step=1)
    step(model, optimizer)
    again, again_opt = make()
    checkpoint.restore_training(checkpoint.read(tmp_path / "step-000000001.pt"), again, again_opt, None)
    step(again, again_opt)  # the momentum buffers came back too: the same second step
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_is_finite():
    model = torch.nn.Linear(4, 3)
    assert checkpoint.is_finite(model, "cpu")
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert not checkpoint.is_finite(model, "cpu")


def test_a_restored_rng_state_draws_what_followed_the_save(tmp_path):
    torch.manual_seed(3)
    torch.rand(2)
    checkpoint.save(tmp_path, {"rng": checkpoint.every_rank(checkpoint.rng_state(), 1)}, step=1)
    after = torch.rand(5)  # the dropout masks of the steps after the checkpoint
    torch.rand(7)  # the run went on past it, then died
    checkpoint.set_rng_state(checkpoint.read(tmp_path / "step-000000001.pt")["rng"][0])
    assert torch.equal(torch.rand(5), after)

"""The committed profiles (loadtest/profiles/, `make profile`) load into the scheduler and predict what they measured."""
from __future__ import annotations

from pathlib import Path

import pytest

from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.services.scheduler.__main__ import parse_args
from instgenie.services.scheduler.costmodel import ModelShape, request_cached_flops, request_flops
from instgenie.services.scheduler.profile import Profile, load_profiles
from instgenie.services.scheduler.registry import Registry
from instgenie.worker.v1 import worker_service_pb2 as wpb

PROFILES = Path(__file__).resolve().parents[2] / "loadtest" / "profiles"
FILES = sorted(PROFILES.glob("*.json"))


def test_there_are_committed_profiles():
    assert FILES, f"no profile under {PROFILES} (make profile writes them)"


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_a_committed_profile_round_trips_into_the_scheduler(path, tmp_path):
    prof = Profile.load(path)  # refuses an edited file: its id is a digest of the constants
    assert path.name.startswith(prof.model_id) and prof.device_kind == "cpu"
    # Written back and read again, nothing changes (the id included).
    again = Profile.load(prof.save(tmp_path / path.name))
    assert again.profile_id == prof.profile_id and again.to_dict() == prof.to_dict()
    # The scheduler's --profile flag takes the directory; a worker announcing the id is predicted with it.
    loaded = {p.profile_id: p for p in load_profiles(parse_args(["--profile", str(PROFILES)]).profile)}
    assert prof.profile_id in loaded
    shape = prof.details["shape"]
    worker = spb.WorkerInfo(worker_id="w", address="127.0.0.1:1", max_batch_size=8, profile=prof.profile_id,
                            device="cpu", model=wpb.ModelInfo(**shape))
    reg = Registry(profiles=list(loaded.values()))
    reg.register(worker, wpb.WorkerLoad())
    cost = reg.get("w").cost
    assert cost is not None and cost.profile.profile_id == prof.profile_id
    assert cost.pre_seconds == prof.pre_seconds and cost.post_seconds == prof.post_seconds
    # The scheduler counts a cell's FLOPs as the profiler did, and its step time is the profile's fitted value.
    model = ModelShape(**shape)
    for cell in prof.details["compute_cells"]:
        tokens, mode, batch = cell["tokens"], cell["mode"], cell["batch"]
        assert batch * request_flops(model, tokens, mode, prof.kv_attention) == pytest.approx(cell["flops"])
        assert batch * request_cached_flops(model, tokens, mode, prof.kv_attention) == pytest.approx(
            cell.get("cached_attention_flops", 0.0))
        # what placement and the simulator sum per request: FLOPs with the d term folded in
        assert cost.step_time(batch * cost.request_flops(model, tokens, mode), batch) == pytest.approx(cell["fitted"])
    for point in prof.details["store_points"]:
        assert cost.transfer_seconds(point["bytes"]) == pytest.approx(point["fitted"])

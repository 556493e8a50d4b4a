"""Stage offload: every weight belongs to exactly one stage.

The device round trip itself needs an accelerator (checked on an H100 during the review: offload and
no-offload PNGs byte-identical, no parameter left an inference tensor); this guards the CPU-checkable part.
"""

from __future__ import annotations

import pytest

from tests.support import load_tiny_engine
from worker.deepgen import tiny
from worker.deepgen.engine import DeepGenEngine
from worker.deepgen.offload import STAGES, stage_tensors


@pytest.fixture(scope="module")
def engine(tiny_model: tiny.TinyModelPaths) -> DeepGenEngine:
    return load_tiny_engine(tiny_model)


def test_stages_partition_every_parameter_and_buffer(engine: DeepGenEngine) -> None:
    """A weight left out of every stage would stay on the CPU and break the offloaded run."""
    owners: dict[int, str] = {}
    for stage in STAGES:
        for tensor in stage_tensors(engine.model, engine.vae, stage):
            assert id(tensor) not in owners, f"a tensor is in both {owners[id(tensor)]} and {stage}"
            owners[id(tensor)] = stage
    everything = [
        *engine.model.parameters(),
        *engine.model.buffers(),
        *engine.vae.parameters(),
        *engine.vae.buffers(),
    ]
    missing = [tensor.shape for tensor in everything if id(tensor) not in owners]
    assert not missing, f"tensors in no stage: {missing}"
    assert {owners[id(engine.model.meta_queries)], owners[id(engine.model.transformer.proj_out.weight)]} == {
        "encoder",
        "dit",
    }

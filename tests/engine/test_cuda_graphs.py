"""DG_DEEPGEN_CUDA_GRAPHS: the option, its CPU no-op, and the graph wrapper's plumbing with a fake graph.

A real capture needs a GPU (`bench/gpu_check.py`); here a stand-in "capture" runs the forward over the
wrapper's static buffers and a "replay" recomputes it into the same output tensor, as a graph would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.support import load_tiny_engine, png_bytes, striped_image
from worker.deepgen import cuda_graphs, sampling, tiny
from worker.deepgen.cuda_graphs import EagerDiT, GraphedDiT, dit_step
from worker.deepgen.engine import DeepGenEngine
from worker.deepgen.env import DeepGenEnvError, read_deepgen_env
from worker.deepgen.transformer import DeepGenSD3Transformer
from worker.deepgen.types import GenerationRequest, GenerationStopped

TINY_DIT = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    pos_embed_max_size=96,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)


class FakeCapture:
    """CPU stand-in for `capture_cuda_graph`: the replay reads whatever the static buffers hold now."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.captures = 0
        self.replays = 0

    def __call__(
        self, forward: Callable[[], torch.Tensor], device: torch.device
    ) -> tuple[Callable[[], None], torch.Tensor]:
        self.captures += 1
        if self.fail is not None:
            raise self.fail
        output = forward()

        def replay() -> None:
            self.replays += 1
            output.copy_(forward())  # a graph writes into its captured output's memory

        return replay, output


@pytest.fixture(scope="module")
def dit() -> DeepGenSD3Transformer:
    torch.manual_seed(0)
    return DeepGenSD3Transformer.from_config(TINY_DIT).eval().requires_grad_(False)


def dit_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 8, 8, generator=generator), torch.rand(1, generator=generator).mul(1000).expand(
        2
    )


def conditioning() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(100)
    references = [torch.randn(16, 6, 8, generator=generator), torch.randn(16, 8, 4, generator=generator)]
    return dict(
        encoder_hidden_states=torch.randn(2, 5, 32, generator=generator),
        pooled_projections=torch.randn(2, 32, generator=generator),
        reference_latents=[references] * 2,  # CFG rows share one list, as in `denoise`
    )


# --- the option ------------------------------------------------------------------------------------


def test_option_defaults_to_automatic_and_parses(tiny_env: dict[str, str]) -> None:
    assert read_deepgen_env(tiny_env).cuda_graphs is None  # on exactly when the DiT runs on CUDA
    for value, expected in (("1", True), ("on", True), ("false", False)):
        tiny_env["DG_DEEPGEN_CUDA_GRAPHS"] = value
        assert read_deepgen_env(tiny_env).cuda_graphs is expected
    tiny_env["DG_DEEPGEN_CUDA_GRAPHS"] = "sometimes"
    with pytest.raises(DeepGenEnvError) as error:
        read_deepgen_env(tiny_env)
    assert error.value.variable == "DG_DEEPGEN_CUDA_GRAPHS"


def test_cpu_engine_ignores_graphs_with_a_note_and_same_images(
    tiny_model: tiny.TinyModelPaths, caplog: pytest.LogCaptureFixture
) -> None:
    plain = load_tiny_engine(tiny_model)
    with caplog.at_level(logging.INFO, logger="worker.deepgen.engine"):
        graphed = load_tiny_engine(tiny_model, CUDA_GRAPHS="1")
    assert graphed.loaded.env.cuda_graphs is True and graphed.cuda_graphs is False
    assert [r.message for r in caplog.records if "CUDA_GRAPHS" in r.message] == [
        "DG_DEEPGEN_CUDA_GRAPHS ignored: the DiT runs on cpu, not CUDA"
    ]
    request = GenerationRequest(
        kind="t2i", prompt="a fox", width=64, height=64, num_inference_steps=3, seed=5
    )
    before = dict(cuda_graphs.graph_counts)
    assert png_bytes(graphed.generate(request).image) == png_bytes(plain.generate(request).image)
    assert dict(cuda_graphs.graph_counts) == before  # no graph was even attempted


def test_dit_step_is_eager_off_cuda(dit: DeepGenSD3Transformer) -> None:
    assert isinstance(dit_step(dit, cuda_graphs=True, **conditioning()), EagerDiT)


# --- the wrapper with a fake graph -----------------------------------------------------------------


def test_replays_follow_the_inputs_and_match_eager(dit: DeepGenSD3Transformer) -> None:
    capture = FakeCapture()
    with torch.inference_mode():
        eager = EagerDiT(dit, **conditioning())
        graphed = GraphedDiT(dit, capture=capture, **conditioning())
        outputs = []
        for seed in range(3):
            hidden, timestep = dit_inputs(seed)
            outputs.append(graphed(hidden, timestep))
            assert torch.equal(outputs[-1], eager(hidden, timestep))
    assert (capture.captures, capture.replays, graphed.captured) == (1, 3, True)
    # Each step got its own result: a returned velocity is not the (overwritten) static output.
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], eager(*dit_inputs(0)))


def test_static_buffers_are_owned_copies(dit: DeepGenSD3Transformer) -> None:
    inputs = conditioning()
    capture = FakeCapture()
    graphed = GraphedDiT(dit, capture=capture, **inputs)
    with torch.inference_mode():
        first = graphed(*dit_inputs(0))
        expected = EagerDiT(dit, **conditioning())(*dit_inputs(1))
        # The caller reusing its tensors after capture must not change what the graph reads.
        inputs["encoder_hidden_states"].zero_()
        inputs["reference_latents"][0][0].zero_()
        assert torch.equal(graphed(*dit_inputs(1)), expected)
    assert not torch.equal(first, expected)


def test_rows_keep_sharing_their_reference_tensors(
    dit: DeepGenSD3Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Sequence[Sequence[torch.Tensor]]] = []
    original = dit.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["reference_latents"])
        return original(*args, **kwargs)

    monkeypatch.setattr(dit, "forward", recording)
    inputs = conditioning()
    with torch.inference_mode():
        GraphedDiT(dit, capture=FakeCapture(), **inputs)(*dit_inputs(0))
    rows = seen[-1]
    assert rows[0] is rows[1]  # one list for both CFG rows: each reference is patchified once
    assert all(a is not b for a, b in zip(rows[0], inputs["reference_latents"][0], strict=True))


def test_capture_failure_falls_back_to_eager_with_one_warning(
    dit: DeepGenSD3Transformer, caplog: pytest.LogCaptureFixture
) -> None:
    capture = FakeCapture(fail=RuntimeError("operation not permitted when stream is capturing (test)"))
    before = cuda_graphs.graph_counts["fell_back"]
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="worker.deepgen.cuda_graphs"):
        for _ in range(2):  # two generations, same error
            graphed = GraphedDiT(dit, capture=capture, **conditioning())
            for seed in range(2):
                hidden, timestep = dit_inputs(seed)
                assert torch.equal(
                    graphed(hidden, timestep), EagerDiT(dit, **conditioning())(hidden, timestep)
                )
            assert graphed.fell_back and not graphed.captured
    assert capture.captures == 2  # tried once per generation, never per step
    assert cuda_graphs.graph_counts["fell_back"] == before + 2
    warnings = [r for r in caplog.records if "capture of the DiT failed" in r.message]
    assert len(warnings) == 1 and "stream is capturing (test)" in warnings[0].message


def test_changed_shape_is_refused(dit: DeepGenSD3Transformer) -> None:
    graphed = GraphedDiT(dit, capture=FakeCapture(), **conditioning())
    with torch.inference_mode():
        graphed(*dit_inputs(0))
        with pytest.raises(ValueError, match="hidden_states changed"):
            graphed(torch.zeros(2, 16, 8, 16), dit_inputs(0)[1])


def test_closed_wrapper_never_replays(dit: DeepGenSD3Transformer) -> None:
    capture = FakeCapture()
    graphed = GraphedDiT(dit, capture=capture, **conditioning())
    with torch.inference_mode():
        graphed(*dit_inputs(0))
        graphed.close()
        hidden, timestep = dit_inputs(1)
        assert torch.equal(graphed(hidden, timestep), EagerDiT(dit, **conditioning())(hidden, timestep))
    assert (capture.captures, capture.replays) == (1, 1)


# --- the engine through the wrapper ----------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model: tiny.TinyModelPaths) -> DeepGenEngine:
    return load_tiny_engine(tiny_model)


def route_through_fake_graphs(monkeypatch: pytest.MonkeyPatch) -> list[GraphedDiT]:
    """Make `denoise` use `GraphedDiT` with the fake capture; returns the wrappers it makes."""
    made: list[GraphedDiT] = []

    def graphed_step(transformer: torch.nn.Module, *, cuda_graphs: bool, **inputs: Any) -> GraphedDiT:
        made.append(GraphedDiT(transformer, capture=FakeCapture(), **inputs))
        return made[-1]

    monkeypatch.setattr(sampling, "dit_step", graphed_step)
    return made


RED_BLUE = striped_image(70, 50, ((220, 20, 20), (20, 20, 220)))
GREEN_WHITE = striped_image(40, 90, ((20, 200, 20), (250, 250, 250), (20, 200, 20)))
REQUESTS = {
    "t2i": GenerationRequest(kind="t2i", prompt="a fox", width=64, height=96, num_inference_steps=4, seed=3),
    "edit": GenerationRequest(
        kind="edit", prompt="make it purple", images=(RED_BLUE, GREEN_WHITE), num_inference_steps=4, seed=4
    ),
}


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_engine_images_are_identical_through_the_wrapper(
    engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    request = REQUESTS[kind]
    plain = png_bytes(engine.generate(request).image)
    made = route_through_fake_graphs(monkeypatch)
    before = dict(cuda_graphs.graph_counts)
    steps: list[int] = []

    def on_step(step: int, total: int) -> bool:
        steps.append(step)
        return False

    graphed = engine.generate(request, step_callback=on_step)
    assert png_bytes(graphed.image) == plain
    counts = cuda_graphs.graph_counts
    assert (
        counts["captured"] - before.get("captured", 0),
        counts["replayed"] - before.get("replayed", 0),
    ) == (1, 4)
    assert len(made) == 1 and not made[0].fell_back and not made[0].captured  # freed after the generation
    assert steps == [1, 2, 3, 4]  # progress still arrives per step


def test_cancel_mid_generation_frees_the_graph(
    engine: DeepGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = route_through_fake_graphs(monkeypatch)
    with pytest.raises(GenerationStopped) as stopped:
        engine.generate(REQUESTS["t2i"], step_callback=lambda step, total: step == 2)
    assert (stopped.value.step, stopped.value.total) == (2, 4)
    assert len(made) == 1 and not made[0].captured  # closed on the way out
    # A closed wrapper runs eagerly: it can never replay a freed graph.
    assert made[0].closed


# --- nothing in the DiT forward may sync with or copy from the host during a capture ---------------


class HostTouchProbe(TorchDispatchMode):
    """Records ops that, on CUDA, would sync with the host or use a host tensor (illegal in a capture).

    The forward runs on the "meta" device, where no op has data: a host tensor showing up means one
    was built from Python values (a host->device copy on CUDA), `_local_scalar_dense` is `.item()`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.offending: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [leaf for leaf in tree_leaves((args, kwargs, out)) if isinstance(leaf, torch.Tensor)]
        name = str(func)
        if (
            any(t.device.type != "meta" for t in tensors)
            or "_local_scalar_dense" in name
            or "nonzero" in name
        ):
            self.offending.append(name)
        return out


def meta_forward(module: torch.nn.Module, **kwargs: Any) -> list[str]:
    with torch.inference_mode(), HostTouchProbe() as probe:
        module(**kwargs)
    return probe.offending


def test_probe_catches_host_tensors_and_item() -> None:
    class Bad(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.tensor(1.0)  # a host scalar: baked into a graph as a constant

    assert meta_forward(Bad(), x=torch.zeros(2, device="meta"))
    with pytest.raises(RuntimeError), torch.inference_mode(), HostTouchProbe():
        torch.zeros(2, device="meta").sum().item()  # meta has no value: a sync cannot even run


@pytest.mark.parametrize("case", ["t2i", "shared references", "padded references"])
def test_dit_forward_never_touches_the_host(case: str) -> None:
    torch.manual_seed(0)
    meta_dit = DeepGenSD3Transformer.from_config(TINY_DIT).eval().requires_grad_(False).to("meta")
    big, small = torch.randn(16, 8, 8, device="meta"), torch.randn(16, 4, 8, device="meta")
    references = {
        "t2i": None,
        "shared references": [[big, small]] * 2,
        "padded references": [[big], [small]],
    }[case]
    offending = meta_forward(
        meta_dit,
        hidden_states=torch.randn(2, 16, 16, 16, device="meta"),
        encoder_hidden_states=torch.randn(2, 7, 32, device="meta"),
        pooled_projections=torch.randn(2, 32, device="meta"),
        timestep=torch.randn(2, device="meta"),
        reference_latents=references,
        return_dict=False,
    )
    assert offending == []

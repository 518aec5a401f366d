"""`OptVQQuantizer` under `torch.compile` in training: without a process group the Sinkhorn assignment is traced
(tensor ops only, no graph break); with one (`torch.distributed` initialized) the engine runs behind
`torch.compiler.disable`, one opaque call that dynamo never traces. Every test name here says "compile":
`make mutation` runs them in its slow tier only (docs/testing.md)."""

import pytest
import torch
import torch.distributed as dist

from optvq_hf import OptVQQuantizer


@pytest.fixture
def one_rank_world(tmp_path):
    """`torch.distributed` initialized with a single gloo rank, so a training quantizer's `sync_group()` is "world"."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _quantizer_and_features():
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=8, codebook_size=64, num_heads=2).train()
    return quantizer, torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(1))


def test_compiled_training_quantizer_with_a_process_group_calls_the_engine_untraced(one_rank_world):
    """With a process group the engine is one call behind `torch.compiler.disable`: the graph breaks at that call
    only (dynamo tracing into the engine would break at its data-dependent steps inside it), and the tokens are the
    eager ones."""
    quantizer, features = _quantizer_and_features()
    assert quantizer.sync_group() == "world"
    eager = quantizer(features)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(quantizer)(features)
    # one break per head (each head's rows are assigned on their own), each at the engine call in `assign`
    assert explanation.graph_break_count == quantizer.num_heads, explanation.break_reasons
    assert explanation.break_reasons, explanation
    assert all(reason.user_stack[-1].name == "assign" for reason in explanation.break_reasons), explanation.break_reasons
    compiled = torch.compile(quantizer, backend="aot_eager")(features)
    assert torch.equal(compiled.token_ids, eager.token_ids)
    torch._dynamo.reset()

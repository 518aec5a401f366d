"""Token grid <-> LM sequence conversion (optvq_hf.sequence and OptVQModel.tokens_to_sequence/sequence_to_tokens)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.sequence import ImageSequenceLayout, normalize_grid_size, sequence_to_tokens, tokens_to_sequence


def _expected_flat(token_ids, codebook_size, offset, boi, eoi, per_head):
    """Reference order written with plain loops: raster order over (i, j), heads innermost."""
    batch, heads, height, width = token_ids.shape
    rows = []
    for b in range(batch):
        row = [] if boi is None else [boi]
        for i in range(height):
            for j in range(width):
                for k in range(heads):
                    row.append(offset + (k * codebook_size if per_head else 0) + int(token_ids[b, k, i, j]))
        if eoi is not None:
            row.append(eoi)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=64, base_channels=8, latent_channels=8)
    return OptVQModel(config).eval()


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("specials", [(None, None), (0, 1), (None, 7)])
def test_flat_order_matches_reference_loops(per_head, specials):
    torch.manual_seed(1)
    boi, eoi = specials
    token_ids = torch.randint(0, 16, (3, 2, 3, 5))
    layout = ImageSequenceLayout(16, num_heads=2, offset=100, boi_token_id=boi, eoi_token_id=eoi,
                                 head_vocabulary="per_head" if per_head else "shared")
    sequence = layout.tokens_to_sequence(token_ids)
    expected = _expected_flat(token_ids, 16, 100, boi, eoi, per_head)
    assert sequence.dtype == torch.long
    assert torch.equal(sequence, expected)
    assert sequence.shape[1] == layout.sequence_length((3, 5))
    assert torch.equal(layout.sequence_to_tokens(sequence, (3, 5)), token_ids)


def test_heads_innermost_and_head_of_position():
    # head k of position (i, j) sits at (i * w + j) * H + k (+1 for the begin id).
    token_ids = torch.arange(2 * 3 * 4).reshape(1, 2, 3, 4)  # distinct codes
    layout = ImageSequenceLayout(codebook_size=24, num_heads=2, boi_token_id=30)
    sequence = layout.tokens_to_sequence(token_ids)
    for i in range(3):
        for j in range(4):
            for k in range(2):
                assert sequence[0, 1 + (i * 4 + j) * 2 + k] == token_ids[0, k, i, j]
    heads = layout.head_of_position((3, 4))
    assert heads.tolist() == [-1] + [0, 1] * 12


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 3), heads=st.integers(1, 4), height=st.integers(1, 4), width=st.integers(1, 4),
    codebook_size=st.integers(1, 50), offset=st.integers(0, 1000), use_boi=st.booleans(), use_eoi=st.booleans(),
    per_head=st.booleans(), factorized=st.booleans(), seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(batch, heads, height, width, codebook_size, offset, use_boi, use_eoi, per_head,
                             factorized, seed):
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, codebook_size, (batch, heads, height, width), generator=generator)
    kwargs = dict(head_vocabulary="per_head" if per_head else "shared", factorized=factorized)
    if not factorized:
        top = offset + codebook_size * (heads if per_head else 1)
        kwargs.update(boi_token_id=top if use_boi else None, eoi_token_id=top + 1 if use_eoi else None)
    layout = ImageSequenceLayout(codebook_size, num_heads=heads, offset=offset, **kwargs)
    sequence = layout.tokens_to_sequence(token_ids)
    if factorized:
        assert sequence.shape == (batch, height * width, heads)
    else:
        assert sequence.shape == (batch, layout.sequence_length((height, width)))
    if sequence.numel():
        assert int(sequence.max()) < layout.vocab_size
        assert int(sequence.min()) >= min([offset] + [v for v in (kwargs.get("boi_token_id"),) if v is not None])
    assert torch.equal(layout.sequence_to_tokens(sequence, (height, width)), token_ids)
    # Functional forms agree with the layout.
    assert torch.equal(tokens_to_sequence(token_ids, codebook_size, offset, **kwargs), sequence)
    assert torch.equal(sequence_to_tokens(sequence, (height, width), codebook_size, heads, offset, **kwargs), token_ids)


def test_factorized_rows_are_positions():
    token_ids = torch.randint(0, 8, (2, 3, 2, 2))
    layout = ImageSequenceLayout(8, num_heads=3, offset=4, head_vocabulary="per_head", factorized=True)
    rows = layout.tokens_to_sequence(token_ids)
    assert rows.shape == (2, 4, 3)
    # row p = i * w + j holds heads 0..2 of that position, head k shifted by k * codebook_size.
    assert rows[1, 3].tolist() == [4 + 0 + int(token_ids[1, 0, 1, 1]), 4 + 8 + int(token_ids[1, 1, 1, 1]),
                                   4 + 16 + int(token_ids[1, 2, 1, 1])]
    flat = ImageSequenceLayout(8, num_heads=3, offset=4, head_vocabulary="per_head").tokens_to_sequence(token_ids)
    assert torch.equal(rows.reshape(2, -1), flat)


def test_model_contract_round_trip_and_decoding(tiny_model):
    torch.manual_seed(2)
    pixels = torch.rand(3, 1, 16, 12) * 2 - 1
    with torch.no_grad():
        token_ids = tiny_model.encode(pixels).token_ids
        grid = tuple(token_ids.shape[-2:])
        assert grid == (4, 3)
        for offset in (0, 32000):
            sequence = tiny_model.tokens_to_sequence(token_ids, offset=offset)
            assert sequence.dtype == torch.long and sequence.shape == (3, 4 * 3 * 4)
            assert int(sequence.min()) >= offset and int(sequence.max()) < offset + 64
            back = tiny_model.sequence_to_tokens(sequence, grid_size=grid, offset=offset)
            assert torch.equal(back, token_ids)
            assert torch.equal(tiny_model.decode_tokens(back), tiny_model.decode_tokens(token_ids))
        # Begin/end ids pass through the model methods too.
        wrapped = tiny_model.tokens_to_sequence(token_ids, offset=2, boi_token_id=0, eoi_token_id=1)
        assert wrapped[:, 0].eq(0).all() and wrapped[:, -1].eq(1).all()
        assert torch.equal(tiny_model.sequence_to_tokens(wrapped, grid, offset=2, boi_token_id=0, eoi_token_id=1),
                           token_ids)


def test_single_head_accepts_three_dim_grids():
    layout = ImageSequenceLayout(10)
    token_ids = torch.randint(0, 10, (2, 3, 3))
    sequence = layout.tokens_to_sequence(token_ids)
    assert torch.equal(sequence, token_ids.reshape(2, 9))
    assert torch.equal(layout.sequence_to_tokens(sequence, (3, 3)), token_ids.unsqueeze(1))


def test_grid_size_forms():
    assert normalize_grid_size((2, 3)) == (2, 3)
    assert normalize_grid_size(torch.tensor([[2, 3], [2, 3]])) == (2, 3)
    assert normalize_grid_size([[4, 4]]) == (4, 4)
    with pytest.raises(ValueError, match="share one grid size"):
        normalize_grid_size(torch.tensor([[2, 3], [3, 2]]))
    for bad in ((2,), (0, 3), (2.0, 3), "23"):
        with pytest.raises(ValueError, match="grid_size"):
            normalize_grid_size(bad)


def test_errors_are_clear(tiny_model):
    layout = ImageSequenceLayout(16, num_heads=2, offset=10, boi_token_id=0, eoi_token_id=1)
    token_ids = torch.randint(0, 16, (2, 2, 2, 2))
    sequence = layout.tokens_to_sequence(token_ids)
    with pytest.raises(ValueError, match=r"shape \(B, 10\)"):
        layout.sequence_to_tokens(sequence[:, :-1], (2, 2))
    with pytest.raises(ValueError, match="start with boi_token_id=0"):
        layout.sequence_to_tokens(sequence.roll(1, dims=1), (2, 2))
    bad = sequence.clone()
    bad[0, 3] = 9  # below the offset
    with pytest.raises(ValueError, match=r"must lie in \[10, 26\).*got id 9"):
        layout.sequence_to_tokens(bad, (2, 2))
    bad[0, 3] = 26  # past the codebook
    with pytest.raises(ValueError, match="got id 26"):
        layout.sequence_to_tokens(bad, (2, 2))
    with pytest.raises(ValueError, match="integer"):
        layout.sequence_to_tokens(sequence.float(), (2, 2))
    with pytest.raises(ValueError, match="codebook_size=16"):
        layout.tokens_to_sequence(token_ids + 16)
    with pytest.raises(ValueError, match="num_heads=2"):
        layout.tokens_to_sequence(token_ids[:, :1])
    with pytest.raises(ValueError, match="integer tensor"):
        layout.tokens_to_sequence(token_ids.float())
    with pytest.raises(ValueError, match="inside the image token range"):
        ImageSequenceLayout(16, offset=10, boi_token_id=12)
    with pytest.raises(ValueError, match="must differ"):
        ImageSequenceLayout(16, offset=10, boi_token_id=3, eoi_token_id=3)
    with pytest.raises(ValueError, match="factorized"):
        ImageSequenceLayout(16, factorized=True, boi_token_id=100)
    with pytest.raises(ValueError, match="head_vocabulary"):
        ImageSequenceLayout(16, head_vocabulary="separate")
    # per-head vocabularies: a head-0 id in head 1's slot is rejected.
    per_head = ImageSequenceLayout(16, num_heads=2, head_vocabulary="per_head")
    flat = per_head.tokens_to_sequence(token_ids)
    flat[0, 1] = 3
    with pytest.raises(ValueError, match=r"head 1 must lie in \[16, 32\)"):
        per_head.sequence_to_tokens(flat, (2, 2))
    # The model methods validate with the model's codebook size.
    model_tokens = torch.randint(0, 64, (1, 4, 2, 2))
    with pytest.raises(ValueError, match="codebook_size=64"):
        tiny_model.tokens_to_sequence(model_tokens + 64)
    with pytest.raises(ValueError, match=r"\(B, 24\), got \(1, 16\)"):
        tiny_model.sequence_to_tokens(tiny_model.tokens_to_sequence(model_tokens), grid_size=(2, 3))

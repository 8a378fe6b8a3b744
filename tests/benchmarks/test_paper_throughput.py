"""benchmarks/paper_throughput.py: the Swiss-Prot length mix, each system's batches, and the one shared model switched
to the original recipe computing what a model built with `original_compat` computes."""

import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of scripts, not installed
from benchmarks.paper_geometry import sequences  # noqa: E402
from benchmarks.paper_throughput import (  # noqa: E402
    ORIGINAL,
    ORIGINAL_PROTEIN_POSITIONS,
    annotated_entries,
    length_mix,
    recipe_batches,
    training_rows,
    use_original_recipe,
    useful_tokens,
)
from dataset_card.build_dataset import DEMO_UNIPROT  # noqa: E402
from dataset_card.uniprot_reader import UniProtEntry  # noqa: E402
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor  # noqa: E402


def entry(length: int) -> UniProtEntry:
    return UniProtEntry(f"P{length:05d}", "N", "Protein", "Homo sapiens", "A" * length, function=["Binds."])


def test_length_mix_takes_the_nearest_unused_entry_at_each_quantile():
    entries = [entry(length) for length in (50, 100, 105, 300, 310, 900)]
    reference = list(range(1, 1001))  # quantiles of 4: 126, 376, 626, 876
    assert [len(e.sequence) for e in length_mix(entries, reference, 4)] == [105, 310, 900, 300]
    # Two targets nearest to the same entry: the second takes the next nearest.
    assert [len(e.sequence) for e in length_mix(entries, [100] * 10, 2)] == [100, 105]
    with pytest.raises(ValueError, match="proteins: 7 asked of 6"):
        length_mix(entries, reference, 7)


def test_the_demo_corpus_mix_follows_the_swissprot_lengths():
    reference = [len(sequence) for sequence in sequences()]
    chosen = length_mix(annotated_entries(DEMO_UNIPROT), reference, 6)
    lengths = [len(e.sequence) for e in chosen]
    assert len({e.accession for e in chosen}) == 6 and lengths == sorted(lengths)
    assert abs(statistics.median(lengths) - statistics.median(reference)) < 30
    rows = training_rows(chosen, stage=2)
    assert all("<protein>" in row["messages"][0]["content"] and row["messages"][1]["content"] for row in rows)


def test_original_recipe_batches_and_switch(tiny_parts):
    protein, language = tiny_parts / "protein_model", tiny_parts / "language_model"
    processor = SepitProcessor.from_pretrained_parts(protein, language)
    original_processor = SepitProcessor.from_pretrained_parts(
        protein, language, protein_padding_length=ORIGINAL_PROTEIN_POSITIONS, original_compat=True
    )
    rows = training_rows([entry(length) for length in (40, 70, 90, 120)], stage=1)
    systems = recipe_batches(rows, processor, original_processor, batch_size=2)
    assert list(systems) == ["ours, random batches", "ours, length-grouped batches", ORIGINAL]
    # The original: every protein 1024 positions in the encoder and in the LLM, every batch one width; the same rows
    # as ours' random batches.
    token = processor.protein_token_id
    for _, batch in systems[ORIGINAL]:
        assert batch["protein_input_ids"].shape[1] == ORIGINAL_PROTEIN_POSITIONS
        assert (batch["input_ids"] == token).sum(-1).tolist() == [ORIGINAL_PROTEIN_POSITIONS] * 2
    assert len({batch["input_ids"].shape[1] for _, batch in systems[ORIGINAL]}) == 1
    assert [chunk for chunk, _ in systems[ORIGINAL]] == [chunk for chunk, _ in systems["ours, random batches"]]
    useful = {
        name: sum(useful_tokens(batch, [rows[i]["sequence"] for i in chunk], token) for chunk, batch in batches)
        for name, batches in systems.items()
    }
    assert len(set(useful.values())) == 1, useful

    torch.manual_seed(0)
    model = SepitForConditionalGeneration.from_pretrained_parts(protein, language, protein_token_id=token)
    reference = SepitForConditionalGeneration.from_pretrained_parts(
        protein, language, protein_token_id=token, original_compat=True
    )
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    ours_batch, original_batch = systems["ours, random batches"][0][1], systems[ORIGINAL][0][1]
    with torch.no_grad():
        ours_loss = model(**ours_batch).loss
        use_original_recipe(model, True)
        torch.testing.assert_close(model(**original_batch).loss, reference(**original_batch).loss)
        use_original_recipe(model, False)
        torch.testing.assert_close(model(**ours_batch).loss, ours_loss)

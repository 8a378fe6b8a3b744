"""The model card's Hub metadata: no widget that cannot take a protein, the task named in the tags."""

import yaml

from modeling_sepit.hub_sepit import model_card


def test_model_card_yaml_declares_no_text_widget_and_names_the_protein_qa_task() -> None:
    card = model_card(
        "me/sepit-tiny",
        "trained on tiny parts",
        "| metric | value |",
        base_models=["facebook/esm2_t33_650M_UR50D", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"],
        datasets=["me/sepit-instructions"],
    )
    front_matter = str(card).split("---\n")[1]
    metadata = yaml.safe_load(front_matter)
    assert metadata["pipeline_tag"] == "other"  # a Hub task with no inference widget
    assert {"protein-qa", "protein", "custom_code"} <= set(metadata["tags"])
    assert metadata["library_name"] == "transformers" and metadata["license"] == "apache-2.0"
    assert metadata["base_model"] == ["facebook/esm2_t33_650M_UR50D", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    assert metadata["datasets"] == ["me/sepit-instructions"]
    assert card.data.to_dict() == metadata  # what huggingface_hub reads back is what was written
    assert 'pipeline("protein-qa", model="me/sepit-tiny", trust_remote_code=True)' in card.text

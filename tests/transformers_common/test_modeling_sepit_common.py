"""transformers' common model and generation tests (ModelTesterMixin, GenerationTesterMixin) and ConfigTester run
against SEPIT, with a tiny model built like LLaVA's tester (`tests/models/llava/test_modeling_llava.py`): every batch
row holds one protein, whose `<protein>` run sits after one text token, so the protein tensors share the batch
dimension (as LLaVA's `pixel_values` do) and the mixins' slicing and beam expansion keep them aligned."""

import copy
import unittest
from unittest import mock

import torch
from tests.generation.test_utils import GenerationTesterMixin
from tests.test_configuration_common import ConfigTester
from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from transformers import EsmConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.testing_utils import require_torch, torch_device

from modeling_sepit import SepitConfig, SepitForConditionalGeneration, SepitModel

# ESM-2 vocabulary: <cls>=0, <pad>=1, <eos>=2, amino acids 4..23.
ESM_CLS, ESM_PAD, ESM_EOS = 0, 1, 2
ESM_RESIDUES = (4, 24)


class SepitProteinText2TextModelTester:
    """Tiny SEPIT config and inputs, the SEPIT counterpart of `LlavaVisionText2TextModelTester`."""

    def __init__(
        self,
        parent: unittest.TestCase,
        batch_size: int = 7,
        text_seq_length: int = 7,
        protein_length: int = 5,
        protein_token_id: int = 0,
        use_coords: bool = True,
        num_experts: int | None = None,
        is_training: bool = True,
        text_config: dict | None = None,
        protein_config: dict | None = None,
    ) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.protein_length = protein_length
        self.protein_token_id = protein_token_id
        self.use_coords = use_coords
        self.num_experts = num_experts
        self.is_training = is_training
        self.text_config = text_config or {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 37,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": 1,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        self.protein_config = protein_config or {
            "vocab_size": 33,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "position_embedding_type": "rotary",
            "pad_token_id": ESM_PAD,
            "mask_token_id": 32,
            "token_dropout": True,
            "emb_layer_norm_before": False,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 64,
        }
        # Attributes the mixins read (text side: the LLM is the model's decoder).
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.pad_token_id = self.text_config["pad_token_id"]
        # One placeholder per feature position: <cls>, the residues, <eos>.
        self.num_protein_tokens = protein_length + 2
        self.seq_length = text_seq_length + self.num_protein_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self) -> SepitConfig:
        """The tiny SEPIT config (16 Gaussian kernels keep the structure module small); with `num_experts`, every LLM
        feed-forward is a mixture of experts (SEPIT stage 2), two of them per token."""
        moe = {"num_experts": self.num_experts, "num_experts_per_tok": 2} if self.num_experts else {}
        return SepitConfig(
            protein_config=EsmConfig(**self.protein_config),
            text_config=copy.deepcopy(self.text_config),
            protein_token_id=self.protein_token_id,
            num_gaussian_kernels=16,
            **moe,
        )

    def prepare_protein_inputs(self) -> dict[str, torch.Tensor]:
        """One protein per batch row: `<cls>`, random residues, `<eos>`, and C-alpha coordinates for the residues."""
        residues = ids_tensor([self.batch_size, self.protein_length], ESM_RESIDUES[1] - ESM_RESIDUES[0])
        residues = residues + ESM_RESIDUES[0]
        cls = torch.full((self.batch_size, 1), ESM_CLS, dtype=torch.long, device=torch_device)
        eos = torch.full((self.batch_size, 1), ESM_EOS, dtype=torch.long, device=torch_device)
        protein_input_ids = torch.cat([cls, residues, eos], dim=1)
        inputs = {
            "protein_input_ids": protein_input_ids,
            "protein_attention_mask": torch.ones_like(protein_input_ids),
        }
        if self.use_coords:
            # About 3.8 A between consecutive residues along x, plus noise; <cls>/<eos> have none.
            steps = torch.arange(protein_input_ids.shape[1], dtype=torch.float32, device=torch_device)
            coords = floats_tensor([self.batch_size, protein_input_ids.shape[1], 3], scale=1.0)
            coords[..., 0] += 3.8 * steps
            coords_mask = torch.ones_like(protein_input_ids, dtype=torch.bool)
            coords_mask[:, 0] = False
            coords_mask[:, -1] = False
            inputs["protein_coords"] = coords.masked_fill(~coords_mask.unsqueeze(-1), 0.0)
            inputs["protein_coords_mask"] = coords_mask
        return inputs

    def prepare_config_and_inputs(self) -> tuple[SepitConfig, dict[str, torch.Tensor]]:
        return self.get_config(), self.prepare_protein_inputs()

    def prepare_config_and_inputs_for_common(self) -> tuple[SepitConfig, dict[str, torch.Tensor]]:
        """`input_ids`: one text token, the `<protein>` run, then text; no other `<protein>` token anywhere."""
        config, protein_inputs = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[input_ids == self.protein_token_id] = self.pad_token_id
        input_ids[:, 1 : 1 + self.num_protein_tokens] = self.protein_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=torch_device)
        inputs_dict = {"input_ids": input_ids, "attention_mask": attention_mask, **protein_inputs}
        return config, inputs_dict


@require_torch
class SepitModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    """ModelTesterMixin + GenerationTesterMixin on SepitModel and SepitForConditionalGeneration, with coordinates.

    The tester's batch of 7 rows is what `test_eager_matches_sdpa_inference` runs on: with fewer it would pad the batch
    with random token ids and random "proteins" that no longer match the `<protein>` runs.
    """

    all_model_classes = (SepitModel, SepitForConditionalGeneration)
    # Inputs besides `input_ids` that tests building their own inputs (eager vs SDPA) must pass along.
    additional_model_inputs = ["protein_input_ids", "protein_attention_mask", "protein_coords", "protein_coords_mask"]
    _is_composite = True
    # The mixin skips `test_can_init_all_missing_weights` for models whose modeling file has no copyright year >= 2023.
    test_can_init_all_missing_weights_before_2023 = True
    use_coords = True
    num_experts: int | None = None

    def setUp(self) -> None:
        # The mixin tells base models (no loss: skipped by the training tests) and causal-LM heads (given labels, loss
        # checks) by their names in transformers' own auto mappings, where a model outside transformers is not: SEPIT's
        # classes are named there for each test, as a model shipped with transformers would be.
        for names, class_name in (
            (MODEL_MAPPING_NAMES, SepitModel.__name__),
            (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, SepitForConditionalGeneration.__name__),
        ):
            patcher = mock.patch.dict(names, {"sepit": class_name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = SepitProteinText2TextModelTester(
            self, use_coords=self.use_coords, num_experts=self.num_experts
        )
        self.config_tester = ConfigTester(
            self, config_class=SepitConfig, has_text_modality=False, common_properties=["protein_token_id"]
        )

    def _get_logits_processor_kwargs(self, do_sample: bool = False, config: SepitConfig | None = None) -> dict:
        """The mixin's band-aid for VLMs (never generate the image token, which would need new pixels) keyed on
        `image_token_id` & co.; the same for `protein_token_id`."""
        kwargs = super()._get_logits_processor_kwargs(do_sample=do_sample, config=config)
        kwargs["bad_words_ids"].append([self.model_tester.protein_token_id])
        return kwargs

    def test_config(self) -> None:
        self.config_tester.run_common_tests()


class SepitModelWithoutCoordsTest(SepitModelTest):
    """The same without `protein_coords`: sequence-only proteins (the structure module is skipped)."""

    use_coords = False
    # Without coordinates the structure module takes no part, so its parameters get no gradient.
    test_all_params_have_gradient = False


class SepitMoeModelTest(SepitModelTest):
    """The same with a mixture-of-experts LLM (4 experts per feed-forward, as `upcycle_to_moe` builds)."""

    num_experts = 4


class SepitConfigTest(unittest.TestCase):
    """ConfigTester's checks one by one on SepitConfig (with tiny sub-configs from the model tester)."""

    def setUp(self) -> None:
        self.model_tester = SepitProteinText2TextModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=SepitConfig,
            has_text_modality=False,
            common_properties=["protein_token_id", "protein_feature_layer", "protein_pooling"],
            protein_token_id=5,
            protein_pooling=2,
            num_gaussian_kernels=8,
        )

    def test_run_common_tests(self) -> None:
        self.config_tester.run_common_tests()

    def test_common_properties(self) -> None:
        self.config_tester.create_and_test_config_common_properties()

    def test_to_json_string(self) -> None:
        self.config_tester.create_and_test_config_to_json_string()

    def test_to_json_file(self) -> None:
        self.config_tester.create_and_test_config_to_json_file()

    def test_from_and_save_pretrained(self) -> None:
        self.config_tester.create_and_test_config_from_and_save_pretrained()

    def test_from_and_save_pretrained_subfolder(self) -> None:
        self.config_tester.create_and_test_config_from_and_save_pretrained_subfolder()

    def test_from_and_save_pretrained_composite(self) -> None:
        self.config_tester.create_and_test_config_from_and_save_pretrained_composite()

    def test_with_num_labels(self) -> None:
        self.config_tester.create_and_test_config_with_num_labels()

    def test_arguments_init(self) -> None:
        self.config_tester.check_config_arguments_init()

    def test_from_pretrained_custom_kwargs(self) -> None:
        self.config_tester.create_and_test_config_from_pretrained_custom_kwargs()

    def test_init_without_params(self) -> None:
        self.config_tester.check_config_can_be_init_without_params()

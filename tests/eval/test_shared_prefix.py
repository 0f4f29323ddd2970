"""The shared-prefix answerer gives the same greedy answers as `generate` on each prompt."""

import pytest
import torch
from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mquant.demo.easyvqa import load_split
from mquant.eval.generation import generate_texts
from mquant.eval.shared_prefix import answer_by_image, common_prefix_length


def test_common_prefix_leaves_a_suffix():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 1


@pytest.fixture(scope="module")
def tiny_default_shaped():
    from mquant.demo.processor import IMAGE_SIZE, IMAGE_TOKEN, NUM_IMAGE_TOKENS, DefaultProcessor
    from mquant.demo.smollm import load_smollm2_tokenizer

    tokenizer = load_smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=IMAGE_SIZE, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id),
        image_token_index=int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)), image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, DefaultProcessor(tokenizer)


def test_same_answers_and_first_logits_as_generate(tiny_default_shaped):
    model, processor = tiny_default_shaped
    items = [i for i in load_split("test") if i.image_path.endswith(("/0.png", "/1.png", "/2.png"))]
    paths, questions = [i.image_path for i in items], [i.question for i in items]
    fast, first_logits = answer_by_image(model, processor, paths, questions, max_new_tokens=3, images_per_batch=2)
    slow = generate_texts(model, processor, paths, questions, max_new_tokens=3, batch_size=len(items))
    assert fast == slow
    batch = processor([__import__("PIL.Image").Image.open(p).convert("RGB") for p in paths], questions)
    with torch.no_grad():
        reference = model(**batch).logits[:, -1].float()
    assert torch.allclose(first_logits, reference, atol=1e-4, rtol=1e-4)

"""Shared check: an exported VLM folder works through standard Hugging Face clients."""
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from Stage2.dataset import build_prompt


def assert_standard_clients_match(model_path, image, question, answer, max_new_tokens=16):
    """What a Hugging Face user writes: the processor's chat template renders exactly the
    training prompt, and processor + generate, and the image-text-to-text pipeline, answer
    like the inference CLI."""
    from transformers import AutoProcessor, pipeline
    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    pil = Image.open(image).convert("RGB")
    inputs = processor(images=pil, text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == build_prompt(processor.tokenizer, model.config, question)
    with torch.no_grad():
        # No decoding arguments: the export's own generation config must be the CLI's greedy one.
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    got = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert got == answer
    pipe = pipeline("image-text-to-text", model=str(model_path))
    chat = [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": question}]}]
    res = pipe(text=chat, max_new_tokens=max_new_tokens, return_full_text=False)
    assert res[0]["generated_text"].strip() == answer

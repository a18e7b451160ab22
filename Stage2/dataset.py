"""(image, question, answer) triplets for Stage 2, in Gemma3's chat format.

Each JSON row is `{"image": path relative to --image_root, "problem": question,
"normal_caption": answer}` (extra keys such as `question_type` are kept). A sample is

    <bos><start_of_turn>user\\n<image>*N{question}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>

with N the number of image features the VLM splices in (one per vision patch). Labels are -100
everywhere except the answer tokens and the closing <end_of_turn>, which is what teaches the
model to stop. The turn is assembled from token ids rather than a chat template: the packaged
Gemma 3 270M tokenizer has none, and ids cannot drift between training and inference the way a
re-rendered template string can. `build_prompt` is the one place that builds the prompt.

A `--base_vlm` model (MedGemma, Gemma 3 4B+) instead brings its own processor and chat template:
its prompt is what `processor.apply_chat_template` gives (base_vlm.encode_prompt), with
`token_type_ids` marking the image tokens; the answer part and its labels are built the same way.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from base_vlm import encode_prompt, is_base_vlm_config, prompt_length
from data_check import load_item
from data_rows import read_json_rows
from image_cache import load_cached, open_cache
from vlm import special_token_id

IGNORE_INDEX = -100
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
QUESTION_KEY, ANSWER_KEY = "problem", "normal_caption"


def read_rows(json_path, image_root, keys=("image", QUESTION_KEY, ANSWER_KEY), problems=None) -> list[dict]:
    return read_json_rows(json_path, image_root, keys, problems=problems)


# ---------------------------------------------------------------- the chat turn

def chat_token_ids(tokenizer) -> tuple[int, int]:
    """(<start_of_turn>, <end_of_turn>) ids; a tokenizer without them is not a Gemma3 one."""
    sot, eot = special_token_id(tokenizer, START_OF_TURN), special_token_id(tokenizer, END_OF_TURN)
    missing = [t for t, i in ((START_OF_TURN, sot), (END_OF_TURN, eot)) if i is None]
    if missing:
        raise ValueError(f"the LM tokenizer has no {missing} token(s): Stage 2 uses Gemma3's chat turns "
                         f"and needs a Gemma3 tokenizer (got {type(tokenizer).__name__}, {len(tokenizer)} tokens)")
    return sot, eot


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_prompt(tokenizer, config, question: str, max_q_len: int | None = None) -> list[int]:
    """Token ids of a user turn holding the image and the question, up to and including the
    `<start_of_turn>model\\n` that the answer follows. `config` is the VLM's config: its
    `image_token_index` and `image_seq_length` give the placeholder and how many of them
    (exactly one per image feature, or Llava refuses the batch). `max_q_len` truncates
    the question only, never the image or the turn markers."""
    sot, eot = chat_token_ids(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    q = _text_ids(tokenizer, str(question).strip())
    if max_q_len:
        q = q[:max_q_len]
    image = [config.image_token_index] * config.image_seq_length
    return (bos + [sot] + _text_ids(tokenizer, "user\n") + image + q
            + [eot] + _text_ids(tokenizer, "\n") + [sot] + _text_ids(tokenizer, "model\n"))


def answer_ids(tokenizer, answer: str, max_a_len: int | None = None) -> list[int]:
    """The supervised target: answer tokens then <end_of_turn>, which survives truncation
    (`max_a_len` counts it), so a cut answer still teaches the model to stop."""
    _, eot = chat_token_ids(tokenizer)
    a = _text_ids(tokenizer, str(answer).strip())
    if max_a_len:
        a = a[: max_a_len - 1]
    return a + [eot]


def build_example(tokenizer, config, question, answer, *, max_q_len=None, max_a_len=None):
    """(input_ids, labels) of one training turn; labels supervise the answer and <end_of_turn>."""
    prompt = build_prompt(tokenizer, config, question, max_q_len)
    target = answer_ids(tokenizer, answer, max_a_len)
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


# ---------------------------------------------------------------- data set and padding

class VQADataset(Dataset):
    """Training samples (`with_answers=True`: input_ids, labels, pixel_values) or prompts for
    generation (`with_answers=False`: the prompt only, plus the row index). `collect_bad_rows`:
    leave bad rows out into `bad_rows` (for data_check.check_datasets to report or drop) instead
    of raising at the first one. `processor`: a --base_vlm model's own processor (required for
    one), which then makes the prompt, its token_type_ids and the pixels."""

    def __init__(self, json_path, image_root, tokenizer, image_processor, config, *, max_q_len: int | None = 128,
                 max_a_len: int | None = 256, with_answers: bool = True, collect_bad_rows: bool = False,
                 processor=None):
        if max_a_len is not None and max_a_len < 2:
            raise ValueError("--max_a_len must be >= 2 (one answer token plus <end_of_turn>)")
        chat_token_ids(tokenizer)
        if is_base_vlm_config(config) and processor is None:
            raise ValueError(f"a {config.model_type} model makes its prompts with its own processor: pass processor=")
        self.processor = processor
        self.source = str(json_path)
        self.bad_rows = [] if collect_bad_rows else None
        self.rows = read_rows(json_path, image_root,
                              ("image", QUESTION_KEY, ANSWER_KEY) if with_answers else ("image", QUESTION_KEY),
                              problems=self.bad_rows)
        self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config
        self.image_cache = open_cache(json_path, image_processor, self.rows, image_root=image_root)
        self.max_q_len, self.max_a_len, self.with_answers = max_q_len, max_a_len, with_answers

    def __len__(self):
        return len(self.rows)

    def drop_rows(self, indices) -> None:
        drop = set(indices)
        self.rows = [r for k, r in enumerate(self.rows) if k not in drop]

    def lengths(self) -> list[int]:
        """Each sample's token count (prompt and answer), for length-grouped batching."""
        if self.processor is not None:
            return [prompt_length(self.processor, r[QUESTION_KEY], self.max_q_len)
                    + len(answer_ids(self.tokenizer, r.get(ANSWER_KEY, ""), self.max_a_len)) for r in self.rows]
        return [len(build_example(self.tokenizer, self.config, r[QUESTION_KEY], r.get(ANSWER_KEY, ""),
                                  max_q_len=self.max_q_len, max_a_len=self.max_a_len)[0]) for r in self.rows]

    def image(self, idx):
        row = self.rows[idx]
        return load_cached(row["image_path"], row=row["row"], source=self.source, cache=self.image_cache,
                           processor=self.image_processor)

    def pixel_values(self, idx) -> torch.Tensor:
        return self.image_processor(images=self.image(idx), return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, idx):
        return load_item(self, idx, self._item)

    def _item(self, idx):
        row = self.rows[idx]
        if self.processor is not None:
            return self._processor_item(idx, row)
        if not self.with_answers:
            ids = build_prompt(self.tokenizer, self.config, row[QUESTION_KEY], self.max_q_len)
            return {"input_ids": torch.tensor(ids), "pixel_values": self.pixel_values(idx), "index": idx}
        ids, labels = build_example(self.tokenizer, self.config, row[QUESTION_KEY], row[ANSWER_KEY],
                                    max_q_len=self.max_q_len, max_a_len=self.max_a_len)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": self.pixel_values(idx), "index": idx}  # index: names the row of a NaN loss

    def _processor_item(self, idx, row):
        """A --base_vlm sample: the processor's prompt (its pixel_values hold one image, or
        more with pan-and-scan crops), then the answer and <end_of_turn>, supervised alone."""
        enc = encode_prompt(self.processor, row[QUESTION_KEY], self.image(idx), max_q_len=self.max_q_len)
        item = {**enc, "index": idx}
        if self.with_answers:
            target = torch.tensor(answer_ids(self.tokenizer, row[ANSWER_KEY], self.max_a_len))
            n = len(enc["input_ids"])
            item["input_ids"] = torch.cat([enc["input_ids"], target])
            item["token_type_ids"] = torch.cat([enc["token_type_ids"], torch.zeros_like(target)])
            item["labels"] = torch.cat([torch.full((n,), IGNORE_INDEX), target])
        return item


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class VQACollator:
    """Pads to the longest sequence of the batch (dynamic padding). Right padding for training;
    left padding for batched generation, so every prompt ends where generation starts.
    `token_type_ids` (a --base_vlm model's image-token marks) are padded with 0; a sample's
    pixel_values of shape (n_images, C, H, W) are concatenated (Gemma 3 takes every image of
    the batch in one tensor, so pan-and-scan crops may differ in number per sample)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, batch):
        width = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if "labels" in batch[0] else None
        types = torch.zeros((len(batch), width), dtype=torch.long) if "token_type_ids" in batch[0] else None
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            span = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            input_ids[i, span], attention_mask[i, span] = b["input_ids"], 1
            if labels is not None:
                labels[i, span] = b["labels"]
            if types is not None:
                types[i, span] = b["token_type_ids"]
        pixels = [b["pixel_values"] for b in batch]
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "pixel_values": torch.cat(pixels) if pixels[0].ndim == 4 else torch.stack(pixels)}
        if labels is not None:
            out["labels"] = labels
        if types is not None:
            out["token_type_ids"] = types
        if "index" in batch[0]:
            out["index"] = torch.tensor([b["index"] for b in batch])
        return out

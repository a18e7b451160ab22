"""Image-caption pairs for Stage 1.

Each JSON row is `{"image": path relative to --image_root, "caption": text}`. A sample is

    <bos> <image>*N [instruction] caption <eos>

with N the number of image tokens the VLM splices features into (one per vision patch), and
labels -100 everywhere except the caption tokens and the EOS.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from data_check import load_item
from data_rows import read_json_rows
from image_cache import load_cached, open_cache

IGNORE_INDEX = -100


def read_rows(json_path, image_root, keys=("image", "caption"), problems=None) -> list[dict]:
    return read_json_rows(json_path, image_root, keys, problems=problems)


class ImageCaptionDataset(Dataset):
    """`collect_bad_rows`: leave bad rows out into `bad_rows` (for data_check.check_datasets to
    report or drop) instead of raising at the first one."""

    def __init__(self, json_path, image_root, tokenizer, image_processor, *, image_token_id: int,
                 num_image_tokens: int, max_caption_len: int = 128, instruction: str = "",
                 collect_bad_rows: bool = False):
        if max_caption_len < 1:
            raise ValueError("--max_caption_len must be >= 1 (the EOS needs a slot)")
        if tokenizer.eos_token_id is None:
            raise ValueError("the LM tokenizer has no EOS token; captions need one to end on")
        self.source = str(json_path)
        self.bad_rows = [] if collect_bad_rows else None
        self.rows = read_rows(json_path, image_root, problems=self.bad_rows)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_cache = open_cache(json_path, image_processor, self.rows, image_root=image_root)
        self.max_caption_len = max_caption_len
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        extra = tokenizer(instruction, add_special_tokens=False)["input_ids"] if instruction else []
        self.prompt_ids = bos + [image_token_id] * num_image_tokens + extra

    def __len__(self):
        return len(self.rows)

    def drop_rows(self, indices) -> None:
        drop = set(indices)
        self.rows = [r for k, r in enumerate(self.rows) if k not in drop]

    def lengths(self) -> list[int]:
        """Each sample's token count (image tokens, instruction, caption), for length grouping."""
        return [len(self.prompt_ids) + len(self.caption_ids(r["caption"])) for r in self.rows]

    def caption_ids(self, caption: str) -> list[int]:
        ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        return ids[: self.max_caption_len - 1] + [self.tokenizer.eos_token_id]

    def __getitem__(self, idx):
        return load_item(self, idx, self._item)

    def _item(self, idx):
        row = self.rows[idx]
        image = load_cached(row["image_path"], row=row["row"], source=self.source, cache=self.image_cache,
                            processor=self.image_processor)
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        target = self.caption_ids(row["caption"])
        input_ids = self.prompt_ids + target
        labels = [IGNORE_INDEX] * len(self.prompt_ids) + target
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "pixel_values": pixel_values, "index": idx}  # index: names the row of a NaN loss


class CaptionCollator:
    """Right-pads to the longest sequence in the batch (dynamic padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        width = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = b["input_ids"], b["labels"], 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "pixel_values": torch.stack([b["pixel_values"] for b in batch])}
        if "index" in batch[0]:
            out["index"] = torch.tensor([b["index"] for b in batch])
        return out
